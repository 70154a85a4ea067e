"""Exact resume of the exact patch sampler, and corrupt checkpoints and model files (CPU)."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import shapely
import torch

from cadalign.model import LossConfig, ModelConfig
from cadalign.patches import PatchConfig, PatchDataset, TileData
from cadalign.train import (
    CorruptFileError,
    TrainConfig,
    latest_checkpoint,
    load_model,
    loader_batches,
    previous_checkpoint,
    resume_step,
    setup_runtime,
    train,
)

MODEL = ModelConfig(image_widths=(4, 8), poly_widths=(2, 4), deep_supervision_levels=1)
PATCHES = PatchConfig(input_size=36, output_size=12, max_displacement=3.0, seed=7)  # MODEL: 36 -> 12 px
FAST = TrainConfig(steps=7, batch_size=2, lr=1e-3, checkpoint_every=3, log_every=1, compile=False, device="cpu")


def tiny_tile() -> TileData:
    """A seeded 96 px tile with a few boxes."""
    rng = np.random.default_rng(0)
    image = rng.integers(40, 200, size=(96, 96, 3), dtype=np.uint8)
    labels = np.array([shapely.box(x, y, x + 14, y + 10) for x in (8, 40, 70) for y in (10, 50)], dtype=object)
    return TileData(image=image, labels=labels, ids=np.arange(len(labels)))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_yields_the_batches_the_loader_would_have(workers: int) -> None:
    """The DataLoader hands out batches round robin over its workers; a stream resumed at step 3
    (odd, so each restarted worker plays another one) continues the uninterrupted sequence."""
    cfg = TrainConfig(batch_size=2, num_workers=workers, device="cpu")
    dataset = PatchDataset([tiny_tile()], PATCHES)
    rt = setup_runtime(cfg)
    whole = loader_batches(dataset, cfg, rt, 0)
    expected = [next(whole)["image"] for _ in range(7)]
    whole.close()
    resumed = loader_batches(dataset, cfg, rt, 3)
    got = [next(resumed)["image"] for _ in range(4)]
    resumed.close()
    assert len({e.numpy().tobytes() for e in expected}) == 7  # every step its own patches
    for want, have in zip(expected[3:], got, strict=True):
        assert want.numpy().tobytes() == have.numpy().tobytes()
    # by hand: step t is samples (t // W) * 2 + (0, 1) of worker t % W (without workers, t * 2 + ...)
    w = max(workers, 1)
    for t in (0, 4, 5):
        by_hand = [dataset.sample((t // w) * 2 + j, t % w)["image"] for j in (0, 1)]
        assert torch.equal(expected[t], torch.stack(by_hand))
    assert torch.equal(dataset.resumed(0, 2).sample(0)["image"], dataset.sample(0)["image"])


KILLED_RUN = """
import os, signal, sys
from dataclasses import replace
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
from test_resume import FAST, MODEL, PATCHES, tiny_tile
from cadalign.model import LossConfig
from cadalign.patches import PatchDataset
from cadalign.train import train

torch.set_num_threads(1)
out, workers, kill_at = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

def on_log(step, stats):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

train(MODEL, LossConfig(), replace(FAST, num_workers=workers), PatchDataset([tiny_tile()], PATCHES),
      out / "run.ckpt", out / "model.pt", on_log=on_log)
"""


def _train(out: Path, workers: int, stream: int = 0) -> dict:
    """The training of KILLED_RUN in this process, on one thread as there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg, data = replace(FAST, num_workers=workers), PatchDataset([tiny_tile()], PATCHES, stream=stream)
        return train(MODEL, LossConfig(), cfg, data, out / "run.ckpt", out / "model.pt")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # a subprocess and three trainings: about 10 s alone, more on a busy box
@pytest.mark.parametrize("workers", [0, 2])
def test_a_killed_training_resumes_to_the_bytes_of_an_uninterrupted_one(tmp_path: Path, workers: int) -> None:
    """SIGKILL at step 5 (after the step-3 checkpoint), rerun: the model file is byte-identical,
    and the log holds every step once."""
    whole, killed, other = tmp_path / "whole", tmp_path / "killed", tmp_path / "other"
    _train(whole, workers)
    script = KILLED_RUN.format(tests=str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", script, str(killed), str(workers), "5"], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == -9, done.stderr[-3000:]
    assert not (killed / "model.pt").exists() and resume_step(killed / "run.ckpt") == 3
    stats = _train(killed, workers)
    assert stats["start_step"] == 3 and [step for step, _ in stats["log"]] == [1, 2, 3, 4, 5, 6, 7]
    assert (killed / "model.pt").read_bytes() == (whole / "model.pt").read_bytes()
    _train(other, workers, stream=1)  # the comparison can fail: other patches give other bytes
    assert (other / "model.pt").read_bytes() != (whole / "model.pt").read_bytes()


# ----------------------------------------------------------------------------- corrupt files

SMALL = TrainConfig(steps=4, batch_size=2, lr=1e-3, checkpoint_every=2, log_every=1, compile=False, device="cpu")


def _damage(path: Path, how: str) -> bytes:
    data = path.read_bytes()
    damaged = {"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"not a checkpoint\n" * 50}[how]
    path.write_bytes(damaged)
    return damaged


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
def test_a_corrupt_model_file_is_named(tmp_path: Path, how: str) -> None:
    train(MODEL, LossConfig(), SMALL, PatchDataset([tiny_tile()], PATCHES), tmp_path / "c", tmp_path / "m.pt")
    _damage(tmp_path / "m.pt", how)
    with pytest.raises(CorruptFileError, match=rf"{tmp_path / 'm.pt'} is not a readable model file .*rerun the stage"):
        load_model(tmp_path / "m.pt")


def test_a_model_file_without_weights_is_named(tmp_path: Path) -> None:
    torch.save({"config": {}}, tmp_path / "m.pt")
    with pytest.raises(CorruptFileError, match=rf"{tmp_path / 'm.pt'} is not a complete model file \(missing model\)"):
        load_model(tmp_path / "m.pt")


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
def test_a_corrupt_checkpoint_is_moved_aside_and_the_previous_one_resumed(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Steps 2 and 4 leave two checkpoints; the newest damaged, a rerun resumes from step 2 and
    ends with the bytes of an uninterrupted run (and its whole log)."""
    ckpt = tmp_path / "run.ckpt"
    stats = train(MODEL, LossConfig(), SMALL, PatchDataset([tiny_tile()], PATCHES), ckpt, tmp_path / "a.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "run.ckpt", "run.ckpt.prev"]
    assert [torch.load(p, weights_only=True)["step"] for p in (ckpt, previous_checkpoint(ckpt))] == [4, 2]
    damaged = _damage(ckpt, how)
    with caplog.at_level(logging.INFO, logger="cadalign.train"):
        again = train(MODEL, LossConfig(), SMALL, PatchDataset([tiny_tile()], PATCHES), ckpt, tmp_path / "b.pt")
    assert f"{ckpt} is not a readable checkpoint" in caplog.text and f"moved it to {ckpt}.corrupt" in caplog.text
    assert f"resuming from {ckpt}.prev at step 2" in caplog.text
    assert (tmp_path / "run.ckpt.corrupt").read_bytes() == damaged
    assert again["start_step"] == 2 and again["log"] == [(s, again["log"][s - 1][1]) for s in (1, 2, 3, 4)]
    assert [row[1]["loss"] for row in again["log"]] == [row[1]["loss"] for row in stats["log"]]
    assert (tmp_path / "b.pt").read_bytes() == (tmp_path / "a.pt").read_bytes()
    assert resume_step(ckpt) == 4


def test_two_corrupt_checkpoints_start_afresh(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = tmp_path / "run.ckpt"
    train(MODEL, LossConfig(), SMALL, PatchDataset([tiny_tile()], PATCHES), ckpt, tmp_path / "a.pt")
    _damage(ckpt, "truncated")
    _damage(previous_checkpoint(ckpt), "empty")
    with caplog.at_level(logging.WARNING, logger="cadalign.train"):
        again = train(MODEL, LossConfig(), SMALL, PatchDataset([tiny_tile()], PATCHES), ckpt, tmp_path / "b.pt")
    assert caplog.text.count("is not a readable checkpoint") == 2 and again["start_step"] == 0
    assert sorted(p.name for p in tmp_path.glob("*.corrupt")) == ["run.ckpt.corrupt", "run.ckpt.prev.corrupt"]
    assert (tmp_path / "b.pt").read_bytes() == (tmp_path / "a.pt").read_bytes()


def test_a_checkpoint_without_a_step_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = tmp_path / "run.ckpt"
    torch.save({"model": {}, "config": {}}, ckpt)
    with caplog.at_level(logging.WARNING, logger="cadalign.train"):
        assert latest_checkpoint(ckpt, move_aside=False) is None
    assert f"{ckpt} is not a complete checkpoint (missing optimizer, rng, scaler, step)" in caplog.text
    assert ckpt.exists()  # only the writer moves files aside
