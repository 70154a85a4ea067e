"""End-to-end tests of the train stage on the tiny seeded city (CPU, a few steps)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import shapely
import torch
from conftest import max_weight_diff
from studies import run_train

from cadalign.align import realign as align
from cadalign.config import ConfigError, load_section
from cadalign.geo.polygons import read_polygons, write_polygons
from cadalign.model import AlignNet
from cadalign.stages import initialize, realign, train
from cadalign.train import load_model


def test_train_writes_one_network_per_factor_and_a_loss_log(train_study: dict[str, Path]) -> None:
    run_train(train_study)
    assert sorted(f.name for f in train_study["models"].iterdir()) == ["ds1.pt", "ds2.pt", "manifest.json"]
    net = load_model(train_study["models"] / "ds2.pt")
    assert net.cfg.image_widths == (4, 8)
    rows = train_study["log"].read_text().splitlines()
    assert rows[0] == "round,ds,step,loss,lr,patches_per_s" and len(rows) == 1 + 2 * 4
    assert all(np.isfinite(float(r.split(",")[3])) for r in rows[1:])


def _log_rows(log: Path) -> list[list[str]]:
    """The training log's rows without the patch rate (a timing)."""
    return [row.split(",")[:-1] for row in log.read_text().splitlines()]


def test_rerun_resumes_from_checkpoints(train_study: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    run_train(train_study)
    first = torch.load(train_study["models"] / "ds1.pt", weights_only=True)["model"]
    log = train_study["log"].read_text()
    with caplog.at_level(logging.INFO):
        run_train(train_study)  # e.g. DVC reran the stage: finished checkpoints are reused
    assert caplog.text.count("resuming from") == 2
    second = torch.load(train_study["models"] / "ds1.pt", weights_only=True)["model"]
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert train_study["log"].read_text() == log  # rebuilt from the checkpoints, rates included


class _Killed(Exception):
    """Stands in for a kill in the middle of a network's training."""


def test_a_killed_stage_reruns_to_the_models_and_log_of_an_uninterrupted_one(
    train_study: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed at step 3 of the second network (after its step-2 checkpoint), the rerun resumes
    the exact sampler's stream: the same model bytes and the same log rows as a run never killed."""
    whole = {**train_study, "models": tmp_path / "whole" / "models", "ckpt": tmp_path / "whole" / "ckpt",
             "log": tmp_path / "whole" / "log.csv"}
    run_train(whole)
    real_train = train.train

    def killed_at_ds1_step3(*args, **kwargs):
        on_log = kwargs["on_log"]

        def dying(step: int, stats: dict[str, float]) -> None:
            on_log(step, stats)
            if args[4].name == "ds1.ckpt" and step == 3:
                raise _Killed

        return real_train(*args, **{**kwargs, "on_log": dying})

    monkeypatch.setattr(train, "train", killed_at_ds1_step3)
    with pytest.raises(_Killed):
        run_train(train_study)
    monkeypatch.setattr(train, "train", real_train)
    assert not train_study["log"].exists() and not train_study["models"].exists()
    run_train(train_study)
    for ds in (1, 2):
        assert (train_study["models"] / f"ds{ds}.pt").read_bytes() == (whole["models"] / f"ds{ds}.pt").read_bytes()
    assert _log_rows(train_study["log"]) == _log_rows(whole["log"])
    assert [r[2] for r in _log_rows(whole["log"])[1:]] == ["1", "2", "3", "4"] * 2


def test_cosmetic_settings_keep_the_checkpoints(train_study: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    """log_every, checkpoint_every and prefetch change no weight: a checkpoint made with other
    values is resumed (the lr test below shows a key that counts)."""
    run_train(train_study)
    text = train_study["params"].read_text()
    train_study["params"].write_text(
        text.replace("checkpoint_every: 2, log_every: 1,", "checkpoint_every: 3, log_every: 2, prefetch: false,")
    )
    with caplog.at_level(logging.INFO):
        run_train(train_study)
    assert caplog.text.count("resuming from") == 2 and "was made for other labels or settings" not in caplog.text


def test_checkpoint_of_other_settings_is_discarded(train_study: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    run_train(train_study)
    train_study["params"].write_text(train_study["params"].read_text().replace("lr: 0.001", "lr: 0.002"))
    with caplog.at_level(logging.INFO):
        run_train(train_study)
    assert caplog.text.count("was made for other labels or settings") == 2 and "resuming from" not in caplog.text
    assert sorted(p.name for p in train_study["ckpt"].iterdir()) == [
        "ds1.ckpt", "ds1.ckpt.prev", "ds1.fingerprint", "ds2.ckpt", "ds2.ckpt.prev", "ds2.fingerprint"
    ]


def test_empty_and_missing_labels(train_study: dict[str, Path]) -> None:
    for path in (train_study["round0"] / "tinytown").glob("*.gpkg"):
        gdf = read_polygons(path)
        write_polygons(path, np.array([], dtype=object), np.array([], dtype=np.int64), gdf.crs)
    with pytest.raises(ValueError, match="every label file is empty"):
        run_train(train_study)
    train_study["round0"] = train_study["round0"].parent / "nothing"
    with pytest.raises(FileNotFoundError, match="no labels of city 'tinytown'"):
        run_train(train_study)


@pytest.fixture
def warm(train_study: dict[str, Path]) -> dict[str, Path]:
    """The tiny study with train.warm_start from the initialize stage's networks, at a vanishing lr."""
    text = train_study["params"].read_text().replace("lr: 0.001}", "lr: 1.0e-12}")
    text = text.replace("  patches: {keep_prob: 1.0}\n", "  patches: {keep_prob: 1.0}\n  warm_start: true\n")
    train_study["params"].write_text(text)
    train_study["init"] = train_study["models"].parent / "round0"
    initialize.main(["--params", str(train_study["params"]), "--out", str(train_study["init"])])
    return train_study


def test_warm_start_trains_from_the_given_networks(warm: dict[str, Path]) -> None:
    run_train(warm, init=warm["init"])
    cfg = load_section(warm["params"], "train", train.TrainStageConfig)
    for ds in (1, 2):
        trained, start = load_model(warm["models"] / f"ds{ds}.pt"), load_model(warm["init"] / f"ds{ds}.pt")
        # at lr 1e-12 four Adam steps move no weight by more than ~4e-12
        assert max_weight_diff(trained, start) < 1e-9
        torch.manual_seed(train.network_seed(cfg, 1, ds))  # what a fresh round-1 network starts from
        assert max_weight_diff(trained, AlignNet(cfg.model)) > 1e-3


def test_warm_start_needs_matching_networks(warm: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"train.warm_start is true; pass --init"):
        run_train(warm)
    wider = warm["params"].read_text().replace("image_widths: [4, 8]", "image_widths: [6, 8]")
    warm["params"].write_text(wider)
    initialize.main(["--params", str(warm["params"]), "--out", str(warm["init"])])
    warm["params"].write_text(wider.replace("image_widths: [6, 8]", "image_widths: [4, 8]"))
    with pytest.raises(ValueError, match=r"manifest.json: the networks in .*train.model.image_widths was \[6, 8\], is \[4, 8\]"):
        run_train(warm, init=warm["init"])
    (warm["init"] / "manifest.json").unlink()  # networks of one's own: each file's settings are checked
    with pytest.raises(ValueError, match=r"ds2.pt was made with other train.model settings"):
        run_train(warm, init=warm["init"])
    (warm["init"] / "ds2.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"ds2.pt is missing.*train.warm_start: false"):
        run_train(warm, init=warm["init"])


def test_factors_of_a_round_and_those_every_round_shares() -> None:
    cfg = train.TrainStageConfig(factors=(2, 4, 1), round_factors={"round2": (1, 2), "round3": (8, 2, 1)})
    assert cfg.factors_of("round1") == (4, 2, 1) and cfg.factors_of("round2") == (2, 1)
    assert cfg.shared_factors == (2, 1)
    assert train.TrainStageConfig(factors=(4, 2)).shared_factors == (4, 2)


def test_round_factors_set_the_networks_of_named_rounds(warm: dict[str, Path]) -> None:
    text = warm["params"].read_text().replace("  warm_start: true\n", "  warm_start: true\n  round_factors: {round2: [1]}\n")
    warm["params"].write_text(text)
    with pytest.raises(ConfigError, match=r"params.yaml: train.round_factors names rounds but there is no 'rounds'"):
        run_train(warm, init=warm["init"], round_name="round2")
    text += "rounds: {round1: round0, round2: round1, round3: round2}\n"
    warm["params"].write_text(text)
    run_train(warm, init=warm["init"], round_name="round2")
    assert sorted(f.name for f in warm["models"].glob("ds*.pt")) == ["ds1.pt"]
    rows = [r.split(",") for r in warm["log"].read_text().splitlines()[1:]]
    assert {(r[0], r[1]) for r in rows} == {("round2", "1")}
    # warm-started from the previous round's ds-1 network, as without round_factors
    assert max_weight_diff(load_model(warm["models"] / "ds1.pt"), load_model(warm["init"] / "ds1.pt")) < 1e-9
    run_train(warm, init=warm["init"], round_name="round3")  # a round not named trains train.factors
    assert sorted(f.name for f in warm["models"].glob("ds*.pt")) == ["ds1.pt", "ds2.pt"]
    warm["params"].write_text(text.replace("{round2: [1]}", "{Round2: [1]}"))  # a typo would train train.factors
    with pytest.raises(ConfigError, match=r"train.round_factors.Round2 names no round of 'rounds' \(round1, round2, round3\)"):
        run_train(warm, init=warm["init"], round_name="round2")
    warm["params"].write_text(text.replace("{round2: [1]}", "{round2: [2, 2]}"))
    with pytest.raises(ValueError, match=r"params.yaml: train: round_factors.round2 = \[2, 2\]; list distinct"):
        run_train(warm, init=warm["init"], round_name="round2")


def test_round_factors_of_the_first_round_start_from_the_initialize_stage(warm: dict[str, Path]) -> None:
    text = warm["params"].read_text().replace("  warm_start: true\n", "  warm_start: true\n  grow: true\n  round_factors: {round1: [1]}\n")
    warm["params"].write_text(text + "rounds: {round1: round0, round2: round1}\n")
    initialize.main(["--params", str(warm["params"]), "--out", str(warm["init"])])
    assert sorted(f.name for f in warm["init"].glob("ds*.pt")) == ["ds1.pt"]  # round 1's coarsest (and only) factor
    run_train(warm, init=warm["init"])
    assert sorted(f.name for f in warm["models"].glob("ds*.pt")) == ["ds1.pt"]
    assert max_weight_diff(load_model(warm["models"] / "ds1.pt"), load_model(warm["init"] / "ds1.pt")) < 1e-9


@pytest.mark.parametrize("warm_start", [True, False])
def test_grow_starts_finer_networks_from_the_coarser_one(
    warm: dict[str, Path], warm_start: bool, caplog: pytest.LogCaptureFixture
) -> None:
    text = warm["params"].read_text().replace("  warm_start: true\n", f"  warm_start: {str(warm_start).lower()}\n  grow: true\n")
    warm["params"].write_text(text)
    cfg = load_section(warm["params"], "train", train.TrainStageConfig)
    initialize.main(["--params", str(warm["params"]), "--out", str(warm["init"])])  # now ds2.pt only
    with caplog.at_level(logging.INFO):
        run_train(warm, init=warm["init"])
    assert "ds=1 starts from the ds=2 network just trained (train.grow)" in caplog.text
    ds2, ds1 = load_model(warm["models"] / "ds2.pt"), load_model(warm["models"] / "ds1.pt")
    # at lr 1e-12 the ds-1 network keeps the weights of the ds-2 network it starts from
    assert max_weight_diff(ds1, ds2) < 1e-9
    if warm_start:
        assert max_weight_diff(ds2, load_model(warm["init"] / "ds2.pt")) < 1e-9
    else:
        torch.manual_seed(train.network_seed(cfg, 1, 2))
        assert max_weight_diff(ds2, AlignNet(cfg.model)) < 1e-9
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_train(warm, init=warm["init"])  # a rerun resumes both finished checkpoints
    assert caplog.text.count("resuming from") == 2 and "was made for other labels" not in caplog.text
    # the ds-1 checkpoint belongs to the network it grew from: another start gives another stamp
    stamps = {
        train.fingerprint(cfg, warm["round0"], ["tinytown"], 1, None, grown_from=net) for net in (ds2, AlignNet(cfg.model))
    }
    assert len(stamps | {train.fingerprint(cfg, warm["round0"], ["tinytown"], 1, None)}) == 3


def test_grow_needs_the_coarsest_network(warm: dict[str, Path]) -> None:
    warm["params"].write_text(warm["params"].read_text().replace("  warm_start: true\n", "  warm_start: true\n  grow: true\n"))
    (warm["init"] / "ds2.pt").unlink()
    (warm["init"] / "ds1.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"ds2.pt is missing"):
        run_train(warm, init=warm["init"])


def test_cascade_trains_finer_networks_on_the_coarser_realignment(
    train_study: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    text = train_study["params"].read_text().replace("  patches: {keep_prob: 1.0}\n", "  patches: {keep_prob: 1.0}\n  cascade: true\n")
    train_study["params"].write_text(text)
    with caplog.at_level(logging.INFO):
        run_train(train_study)
    logged = re.search(r"cascade: ds=2 moved the training labels ([\d.]+) px", caplog.text)
    assert logged is not None and "cascade: ds=1" not in caplog.text  # the finest network realigns nothing
    # independently: the written ds2 network realigns the round-0 labels by that much
    window = load_section(train_study["params"], "realign", realign.RealignStageConfig).window
    net = load_model(train_study["models"] / "ds2.pt")
    tiles = train.training_tiles(train_study["cities"], train_study["round0"], ["tinytown"])
    shifts = np.concatenate(
        [
            np.linalg.norm(
                shapely.get_coordinates(align({2: net}, t.image, t.labels, "cpu", window))
                - shapely.get_coordinates(t.labels),
                axis=1,
            )
            for t in tiles
        ]
    )
    assert shifts.mean() > 0.01
    assert float(logged.group(1)) == pytest.approx(shifts.mean(), abs=0.006)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_train(train_study)  # both finished checkpoints are reused
    assert caplog.text.count("resuming from") == 2
    caplog.clear()
    train_study["params"].write_text(text.replace("progress: false}", "progress: false, symmetries: 2}"))
    with caplog.at_level(logging.WARNING):
        run_train(train_study)  # other realignment settings: only the finer network starts afresh
    assert caplog.text.count("was made for other labels or settings") == 1 and "ds1.ckpt" in caplog.text


def test_device_sampler_trains_every_network_deterministically(train_study: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    """train.patches.sampler: device trains from batches made by step; a fresh rerun writes the same weights."""
    text = train_study["params"].read_text()
    train_study["params"].write_text(text.replace("patches: {keep_prob: 1.0}", "patches: {keep_prob: 1.0, sampler: device}"))
    assert load_section(train_study["params"], "train", train.TrainStageConfig).patches.sampler == "device"
    run_train(train_study)
    first = {f.name: torch.load(f, weights_only=True)["model"] for f in sorted(train_study["models"].glob("ds*.pt"))}
    assert sorted(first) == ["ds1.pt", "ds2.pt"]
    for path in [*train_study["ckpt"].iterdir(), *train_study["models"].iterdir()]:
        path.unlink()
    with caplog.at_level(logging.INFO):
        run_train(train_study)
    assert "resuming from" not in caplog.text
    for name, weights in first.items():
        again = torch.load(train_study["models"] / name, weights_only=True)["model"]
        assert all(torch.equal(weights[k], again[k]) for k in weights), name
