"""`dvc repro` of the whole study on a tiny synthetic city, as a user runs it (slow: ~1-2 min), and dvc.yaml itself."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import TINY_STUDY_PARAMS, make_dvc_project


@pytest.mark.slow
def test_dvc_repro_whole_study(tmp_path, monkeypatch) -> None:
    params = (
        "cities:\n  minitown: {source: synthetic, style: dense, tiles: [1]}\n"
        "synthetic: {size: 384, seed: 0}\n"
        "draw: {tile: minitown1, window: [0, 0, 384, 384]}\n" + TINY_STUDY_PARAMS
    )
    proj, dvc = make_dvc_project(tmp_path, params)
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    dvc("repro")
    for k in range(4):
        metrics = json.loads((proj / "data" / "eval" / f"round{k}" / "metrics.json").read_text())
        assert metrics["n_vertices"] > 0 and 0 <= metrics["auc"] <= 1
    shown = json.loads(dvc("metrics", "show", "--json"))
    assert "data/eval/round3/metrics.json" in json.dumps(shown)
    for fig in ("accuracy.png", "overlay.png"):
        assert (proj / "data" / "figures" / fig).read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (proj / "data" / "models" / "round2").iterdir()) == ["ds1.pt", "ds2.pt"]
    # train.round_factors: round 3 has the ds-2 network alone (realign@round3 uses what the round wrote)
    assert [p.name for p in (proj / "data" / "models" / "round3").iterdir()] == ["ds2.pt"]
    # train.grow: round 1 starts from the coarsest network only
    assert [p.name for p in (proj / "data" / "models" / "round0").iterdir()] == ["ds2.pt"]
    changes = json.loads((proj / "data" / "eval" / "changes" / "metrics.json").read_text())
    assert list(changes) == ["round0_to_round1", "round1_to_round2", "round2_to_round3"]
    assert all(c["ci95_low_px"] <= c["median_change_px"] <= c["ci95_high_px"] for c in changes.values())
    compare = json.loads((proj / "data" / "similarity" / "compare" / "metrics.json").read_text())
    assert set(compare) == {"round1", "round2", "round3"}
    assert all(compare[r]["n_patches"] > 0 for r in compare)
    # a second repro has nothing to do
    assert "Data and pipelines are up to date" in dvc("repro") or "didn't change" in dvc("status")
    # the MLflow mirror: every stage run nested under one study run
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("cadalign")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    study = [r for r in runs if r.data.tags.get("cadalign.role") == "study"]
    stages = {r.info.run_name for r in runs if r.data.tags.get("cadalign.role") == "stage"}
    assert len(study) == 1
    assert {"fetch@minitown", "misalign@minitown", "train@round1", "realign@round3", "evaluate@round3", "draw",
            "analyze@round2", "compare", "contrast"} <= stages
    train3 = next(r for r in runs if r.info.run_name == "train@round3")
    assert train3.data.tags["mlflow.parentRunId"] == study[0].info.run_id
    assert client.get_metric_history(train3.info.run_id, "ds2.loss")  # per-step losses (round 3: ds 2 alone)
    assert not client.get_metric_history(train3.info.run_id, "ds1.loss")

    # a rerun from scratch writes the same bytes, so the same DVC hashes, for every output
    # but those that hold timings: the training logs (throughput) and the similarity metrics
    # (seconds, peak memory), whose results are the same
    first = _output_hashes(proj / "dvc.lock")
    similarity = json.loads((proj / "data" / "similarity" / "round3" / "metrics.json").read_text())
    shutil.rmtree(proj / "data" / "checkpoints")  # else training resumes at its last step
    dvc("repro", "--force")
    second = _output_hashes(proj / "dvc.lock")
    assert second.keys() == first.keys() and len(first) > 20
    changed = sorted(path for path in first if second[path] != first[path])
    timed = [f"data/similarity/{r}/metrics.json" for r in ("compare", "round1", "round2", "round3")]
    timed += ["data/similarity/compare/summary.csv"] + [f"data/train_logs/round{k}.csv" for k in (1, 2, 3)]
    assert changed == sorted(timed)
    again = json.loads((proj / "data" / "similarity" / "round3" / "metrics.json").read_text())
    timings = {"wall_seconds", "patches_per_second", "peak_memory_bytes", "seconds"}
    assert timings <= again.keys() and len(again) > 20
    results = {k: v for k, v in similarity.items() if k not in timings}
    assert {k: v for k, v in again.items() if k not in timings} == results


def _output_hashes(lock: Path) -> dict[str, str]:
    stages = yaml.safe_load(lock.read_text())["stages"]
    return {out["path"]: out["md5"] for stage in stages.values() for out in stage.get("outs", [])}


def test_dvc_yaml_names_every_round_of_params() -> None:
    """The lists of dvc.yaml that name the rounds one by one follow `rounds` in params.yaml."""
    repo = Path(__file__).resolve().parents[1]
    rounds = list(yaml.safe_load((repo / "params.yaml").read_text())["rounds"])
    dvc = yaml.safe_load((repo / "dvc.yaml").read_text())
    stages = dvc["stages"]
    assert stages["evaluate"]["foreach"] == ["round0", *rounds]
    draw = stages["draw"]["cmd"].split()
    assert [a.split("=")[0] for a in draw if a.startswith("round") and "/labels/" in a] == ["round0", *rounds]
    assert [a.split("=")[0] for a in draw if a.startswith("round") and "/eval/" in a] == ["round0", *rounds]
    compare = stages["compare"]
    assert [a.split("=")[0] for a in compare["cmd"].split() if a.startswith("round")] == rounds
    assert sorted({d.split("/")[2] for d in compare["deps"] if d.startswith("data/similarity/")}) == rounds
    contrast = stages["contrast"]
    assert [a.split("=")[0] for a in contrast["cmd"].split() if a.startswith("round")] == ["round0", *rounds]
    assert [d.split("/")[2] for d in contrast["deps"] if d.startswith("data/eval/")] == ["round0", *rounds]
    (accuracy,) = [p["accuracy"] for p in dvc["plots"] if isinstance(p, dict) and "accuracy" in p]
    assert list(accuracy["y"]) == [f"data/eval/{r}/accuracy.csv" for r in ["round0", *rounds]]


def _module_file(src: Path, name: str) -> Path | None:
    path = src / Path(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _package_imports(src: Path, module: str) -> set[Path]:
    """Files of the cadalign modules ``module`` imports, directly or not (function-level imports too)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse(_module_file(src, name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for full in names:
                parts = full.split(".")
                todo += [".".join(parts[:i]) for i in range(2, len(parts) + 1) if parts[0] == "cadalign"
                         and _module_file(src, ".".join(parts[:i]))]
    return {_module_file(src, name).relative_to(src.parent) for name in seen}


@pytest.mark.parametrize(
    ("pipeline", "some_stages"),
    [("dvc.yaml", {"fetch", "misalign", "train", "realign", "analyze"}), ("pipelines/toy/dvc.yaml", {"estimate_density"})],
)
def test_stage_deps_are_the_package_code_it_imports(pipeline: str, some_stages: set[str]) -> None:
    """Each stage's src/ deps cover every cadalign module it imports (so DVC reruns it), and name nothing else."""
    repo = Path(__file__).resolve().parents[1]
    dvc_file = repo / pipeline
    stages = yaml.safe_load(dvc_file.read_text())["stages"]
    assert some_stages <= set(stages)
    for name, stage in stages.items():
        body = stage.get("do", stage)
        module = body["cmd"].split("python -m ")[1].split()[0]
        files = {f for f in _package_imports(repo / "src", module) if (repo / f).read_text().strip()}  # not empty __init__s
        paths = [(dvc_file.parent / d).resolve().relative_to(repo) for d in body["deps"]]
        deps = [d for d in paths if d.parts[0] == "src"]
        covered = {f for f in files if any(f == d or d in f.parents for d in deps)}
        assert covered == files, f"{pipeline}: {name}: add {sorted(map(str, files - covered))} to its deps"
        unused = [str(d) for d in deps if not any(f == d or d in f.parents for f in files)]
        assert not unused, f"{pipeline}: {name}: {unused} in its deps, but the stage does not import them"
