"""The presets of conf/: params.yaml is the default one, every preset loads, DVC composes them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cadalign.config import ConfigError, read_params
from cadalign.model import AlignNet, ModelConfig
from cadalign.presets import check, compose, load_all, main, params_text, preset_names

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def test_params_yaml_is_the_default_preset_with_its_comments() -> None:
    assert check(CONF, REPO / "params.yaml", ["cpu"]) == ["cpu"]  # raises at the first differing key
    assert (REPO / "params.yaml").read_text() == params_text(CONF)
    assert "# px, largest |dx|, |dy|" in (REPO / "params.yaml").read_text()


@pytest.mark.parametrize("name", ["cpu", "gpu", "full", "tiny"])
def test_every_preset_loads_through_the_stage_configs(name: str, tmp_path: Path) -> None:
    assert name in preset_names(CONF)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(compose(CONF, name)))
    load_all(path)


def test_full_and_gpu_train_the_reference_network() -> None:
    full, gpu, cpu = (compose(CONF, name) for name in ("full", "gpu", "cpu"))
    # the reference network of the H100 benchmark of docs/gpu.md: 6.69 M parameters, 220 -> 100 px
    net = AlignNet(ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in full["train"]["model"].items()}))
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 2) == 6.69
    assert net.output_size(full["train"]["input_size"]) == 100
    assert full["train"]["factors"] == [8, 4, 2, 1] and full["train"]["optim"]["batch_size"] == 32
    assert gpu["train"]["model"]["image_widths"] == full["train"]["model"]["image_widths"]
    assert gpu["synthetic"]["size"] == full["synthetic"]["size"] == 5000
    # the presets change what they name and inherit the rest
    assert gpu["evaluate"] == full["evaluate"] == cpu["evaluate"]
    assert cpu["noise"]["renoise_displacement"] == 0.0  # so `-S noise.renoise_displacement=16` finds the key


def test_unknown_preset_names_the_presets(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"no preset 'nope' .*the presets are cpu, full, gpu, tiny"):
        compose(CONF, "nope")
    with pytest.raises(SystemExit, match=r"the presets are cpu, full, gpu, tiny"):
        main(["show", "nope", "--conf", str(CONF)])
    main(["list", "--conf", str(CONF)])
    assert capsys.readouterr().out.split() == ["cpu", "full", "gpu", "tiny"]


def test_check_names_the_drifted_key_and_the_stale_preset(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    data = read_params(REPO / "params.yaml")
    data["train"]["optim"]["steps"] = 7
    params.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"differs from conf/ at 'train.optim.steps'; put the change in conf/preset/cpu.yaml"):
        check(CONF, params)
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "preset" / "stale.yaml").write_text("# @package _global_\ndefaults: [cpu, _self_]\ntrain: {optim: {stepz: 5}}\n")
    with pytest.raises(ConfigError, match=r"preset stale .*unknown key 'train.optim.stepz'"):
        check(conf, REPO / "params.yaml")
    (conf / "preset" / "stale.yaml").write_text("# @package _global_\ndefaults: [cpu, _self_]\ndraw: {tile: nowhere1}\n")
    with pytest.raises(ConfigError, match=r"preset stale .*draw.tile = 'nowhere1' is none of the tiles"):
        check(conf, REPO / "params.yaml")


@pytest.mark.slow
def test_dvc_exp_run_composes_a_preset_from_one_word(tmp_path: Path) -> None:
    """Through DVC itself: `-S preset=gpu`, a plain `-S key=value`, an unknown preset, `dvc repro`."""
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copytree(CONF, proj / "conf")
    shutil.copy(REPO / "params.yaml", proj / "params.yaml")
    # one stage that copies the params it ran with
    (proj / "dvc.yaml").write_text(
        "stages:\n  echo:\n    cmd: cp params.yaml ran.yaml\n    params: [train.optim, noise]\n    outs: [ran.yaml]\n"
    )
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(args, cwd=proj, env=env, capture_output=True, text=True, check=False)
        assert (done.returncode == 0) == ok, done.stdout[-2000:] + done.stderr[-2000:]
        return done

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    shutil.copy(REPO / ".dvc" / "config", proj / ".dvc" / "config")  # the project's: hydra.enabled
    run("git", "add", "-A")
    run("git", "commit", "-qm", "init")

    run("dvc", "exp", "run", "-S", "preset=gpu")
    assert read_params(proj / "ran.yaml") == compose(CONF, "gpu")
    run("dvc", "exp", "run", "-S", "noise.renoise_displacement=16")
    ran = read_params(proj / "ran.yaml")
    assert ran["noise"]["renoise_displacement"] == 16
    ran["noise"]["renoise_displacement"] = 0.0
    assert ran == compose(CONF, "cpu")
    failed = run("dvc", "exp", "run", "--dry", "-S", "preset=nope", ok=False)
    assert "Could not find 'preset/nope'" in failed.stderr
    assert "Available options in 'preset':\n\tcpu\n\tfull\n\tgpu\n\ttiny\n" in failed.stderr
    # dvc repro reads params.yaml as it is: comments and all
    run("git", "checkout", "params.yaml")
    run("dvc", "repro")
    assert (proj / "params.yaml").read_text() == params_text(CONF)
    assert read_params(proj / "ran.yaml") == compose(CONF, "cpu")
