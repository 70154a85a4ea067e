"""Tests of the training loop on CPU: schedule, checkpoints, resume, NaN stop, DDP (gloo)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset, IterableDataset

from cadalign import train as train_module
from cadalign.model import AlignNet, LossConfig, ModelConfig, center_crop
from cadalign.train import (
    TrainConfig,
    load_model,
    lr_at,
    make_optimizer,
    resume_step,
    save_model,
    setup_runtime,
    source_batches,
    train,
)

MODEL = ModelConfig(image_widths=(4, 8), poly_widths=(2, 4), deep_supervision_levels=1)
SIZE = 36  # -> 12 px output for MODEL
FAST = TrainConfig(
    steps=6, batch_size=2, lr=1e-3, checkpoint_every=3, log_every=1, compile=False, device="cpu"
)


class TinyPatches(Dataset):
    """Seeded random patches with the keys and shapes that train() expects."""

    def __init__(self, n: int = 8, seed: int = 0, nan_after_calls: int | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        out = AlignNet(MODEL).output_size(SIZE)
        self.image = torch.rand(n, 3, SIZE, SIZE, generator=g) * 2 - 1
        self.polys = (torch.rand(n, 3, SIZE, SIZE, generator=g) > 0.6).float()
        self.disp = torch.rand(n, 2, out, out, generator=g) - 0.5
        self.seg = (torch.rand(n, 4, out, out, generator=g) > 0.5).float()
        self.nan_after_calls = nan_after_calls
        self.calls = 0

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.calls += 1
        image = self.image[i]
        if self.nan_after_calls is not None and self.calls > self.nan_after_calls:
            image = torch.full_like(image, float("nan"))
        polys = self.polys[i]
        return {
            "image": image,
            "polys": polys,
            "disp": self.disp[i],
            "seg": self.seg[i],
            "polys_out": center_crop(polys, self.disp.shape[-1]),
        }


def test_lr_schedule_drops_at_step() -> None:
    cfg = TrainConfig(lr=1e-4, lr_drop_step=25_000, lr_after=5e-5)
    assert lr_at(cfg, 0) == 1e-4
    assert lr_at(cfg, 24_999) == 1e-4
    assert lr_at(cfg, 25_000) == 5e-5
    assert lr_at(cfg, 90_000) == 5e-5


def test_train_writes_unwrapped_checkpoint_and_model(tmp_path: Path) -> None:
    logged: list[tuple[int, dict[str, float]]] = []
    stats = train(
        MODEL, LossConfig(), FAST, TinyPatches(), tmp_path / "ckpt.pt", tmp_path / "model.pt",
        on_log=lambda step, terms: logged.append((step, terms)),
    )
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "scaler", "step", "rng", "config", "log"}
    assert ckpt["step"] == 6 and ckpt["scaler"] is None
    assert set(ckpt["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert set(ckpt["config"]) == {"model", "loss", "train"}
    assert list(ckpt["model"]) == list(AlignNet(MODEL).state_dict())  # no module./_orig_mod. prefix
    model = load_model(tmp_path / "model.pt")
    for name, value in model.state_dict().items():
        assert torch.equal(value, ckpt["model"][name])
    assert [s for s, _ in logged] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "disp", "seg", "lr", "patches_per_s"} <= set(logged[0][1])
    assert logged[0][1]["lr"] == FAST.lr
    assert stats["steps"] == 6 and stats["start_step"] == 0 and stats["world_size"] == 1
    assert ckpt["log"] == stats["log"] == logged  # every row logged, kept for a rerun's log
    assert stats["patches_per_s"] > 0


def test_training_reduces_the_loss(tmp_path: Path) -> None:
    cfg = replace(FAST, steps=40, lr=3e-3, checkpoint_every=40)
    logged: list[dict[str, float]] = []
    train(MODEL, LossConfig(), cfg, TinyPatches(n=2), tmp_path / "c.pt", tmp_path / "m.pt",
          on_log=lambda step, terms: logged.append(terms))
    # Two fixed patches: the displacement can be memorised (the random segmentation labels
    # leave an irreducible floor, so the displacement term is the one to watch).
    first, last = [sum(t["disp"] for t in part) / 5 for part in (logged[:5], logged[-5:])]
    assert last < 0.6 * first
    assert logged[-1]["loss"] < logged[0]["loss"]


class _Killed(Exception):
    """Stands in for a kill signal in the middle of a run."""


def _kill_at(step_to_kill: int):
    def on_log(step: int, terms: dict[str, float]) -> None:
        if step == step_to_kill:
            raise _Killed

    return on_log


def test_interrupted_then_resumed_run_equals_uninterrupted(tmp_path: Path) -> None:
    train(MODEL, LossConfig(), FAST, TinyPatches(), tmp_path / "a.ckpt", tmp_path / "a.pt")
    with pytest.raises(_Killed):
        train(MODEL, LossConfig(), FAST, TinyPatches(), tmp_path / "b.ckpt", tmp_path / "b.pt", _kill_at(5))
    assert resume_step(tmp_path / "b.ckpt") == 3 and resume_step(tmp_path / "absent.ckpt") == 0
    assert not (tmp_path / "b.pt").exists()
    stats = train(MODEL, LossConfig(), FAST, TinyPatches(), tmp_path / "b.ckpt", tmp_path / "b.pt")
    assert stats["start_step"] == 3
    a = load_model(tmp_path / "a.pt").state_dict()
    b = load_model(tmp_path / "b.pt").state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7)
    # A different seed gives different weights: the comparison above can fail.
    train(MODEL, LossConfig(), replace(FAST, seed=1), TinyPatches(), tmp_path / "c.ckpt", tmp_path / "c.pt")
    c = load_model(tmp_path / "c.pt").state_dict()
    assert any(not torch.allclose(c[n], a[n]) for n in a)


class StepBatches:
    """A batch source: seeded random batches of TinyPatches' shapes, a pure function of the step.
    Records the steps asked for, the threads that made them and their torch thread counts."""

    def __init__(self) -> None:
        self.asked: list[int] = []
        self.threads: set[int] = set()
        self.torch_threads: set[int] = set()

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        self.asked.append(step)
        self.threads.add(threading.get_ident())
        self.torch_threads.add(torch.get_num_threads())
        g = torch.Generator().manual_seed(step)
        out = AlignNet(MODEL).output_size(SIZE)
        polys = (torch.rand(2, 3, SIZE, SIZE, generator=g) > 0.6).float()
        return {
            "image": torch.rand(2, 3, SIZE, SIZE, generator=g) * 2 - 1,
            "polys": polys,
            "disp": torch.rand(2, 2, out, out, generator=g) - 0.5,
            "seg": (torch.rand(2, 4, out, out, generator=g) > 0.5).float(),
            "polys_out": center_crop(polys, out),
        }


def test_prefetched_batches_equal_the_direct_ones() -> None:
    """The prefetch thread yields the direct sequence, one step ahead at most, with this
    thread's torch thread count; closing it leaves no batch in flight."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a new thread would start with the default (the core count)
    try:
        direct, ahead = StepBatches(), StepBatches()
        expected = [direct.batch(step) for step in range(3, 8)]
        batches = source_batches(ahead, 3, prefetch=True)
        got = [next(batches) for _ in range(5)]
        batches.close()
    finally:
        torch.set_num_threads(threads)
    for want, have in zip(expected, got, strict=True):
        assert all(want[k].numpy().tobytes() == have[k].numpy().tobytes() for k in want)
    assert ahead.asked == [3, 4, 5, 6, 7, 8]  # batch 8 drawn while 7 was used
    assert len(ahead.threads) == 1 and threading.get_ident() not in ahead.threads
    assert ahead.torch_threads == {1}


def test_prefetching_run_resumes_exactly(tmp_path: Path) -> None:
    """Prefetch on (the default) and off give the same weights; a prefetching run killed
    after its step-3 checkpoint and resumed ends with the same bytes as an uninterrupted one."""
    assert FAST.prefetch
    cfg = replace(FAST, batch_size=2)
    train(MODEL, LossConfig(), cfg, StepBatches(), tmp_path / "a.ckpt", tmp_path / "a.pt")
    source = StepBatches()
    train(MODEL, LossConfig(), replace(cfg, prefetch=False), source, tmp_path / "d.ckpt", tmp_path / "d.pt")
    assert source.threads == {threading.get_ident()}
    with pytest.raises(_Killed):
        train(MODEL, LossConfig(), cfg, StepBatches(), tmp_path / "b.ckpt", tmp_path / "b.pt", _kill_at(5))
    resumed = StepBatches()
    stats = train(MODEL, LossConfig(), cfg, resumed, tmp_path / "b.ckpt", tmp_path / "b.pt")
    assert stats["start_step"] == 3 and resumed.asked[0] == 3
    a, b, d = (load_model(tmp_path / f"{x}.pt").state_dict() for x in "abd")
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], d[k]) for k in a)


def test_resume_rejects_a_checkpoint_of_another_model(tmp_path: Path) -> None:
    train(MODEL, LossConfig(), replace(FAST, steps=1), TinyPatches(), tmp_path / "c.pt", tmp_path / "m.pt")
    other = replace(MODEL, image_widths=(5, 8))
    with pytest.raises(ValueError, match="written for a different model"):
        train(other, LossConfig(), FAST, TinyPatches(), tmp_path / "c.pt", tmp_path / "m2.pt")


def test_non_finite_loss_stops_without_model_file(tmp_path: Path) -> None:
    data = TinyPatches(nan_after_calls=3 * FAST.batch_size)  # steps 0-2 fine, step 3 gets NaN
    with pytest.raises(FloatingPointError, match=rf"non-finite loss at step 3 .*the last checkpoint {tmp_path / 'ckpt.pt'} is kept"):
        train(MODEL, LossConfig(), FAST, data, tmp_path / "ckpt.pt", tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 3
    with pytest.raises(FloatingPointError, match="non-finite loss at step 0 .*; no checkpoint was written yet and no model"):
        train(MODEL, LossConfig(), FAST, TinyPatches(nan_after_calls=0), tmp_path / "new.pt", tmp_path / "model.pt")


class TinyStream(IterableDataset):
    """The same patches as an endless stream (an iterable dataset shards itself)."""

    def __iter__(self):
        patches = TinyPatches()
        while True:
            yield from (patches[i] for i in range(len(patches)))


def test_iterable_dataset_trains(tmp_path: Path) -> None:
    cfg = replace(FAST, steps=2)
    stats = train(MODEL, LossConfig(), cfg, TinyStream(), tmp_path / "c.pt", tmp_path / "m.pt")
    assert stats["steps"] == 2 and stats["loss"]["loss"] > 0


def test_weight_decay_applies_to_conv_weights_only() -> None:
    """With a zero gradient, AdamW shrinks decayed weights by (1 - lr * wd) and nothing else."""
    model = AlignNet(MODEL)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = make_optimizer(model, replace(FAST, lr=0.1, weight_decay=0.5), fused=False)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if name.endswith("weight") else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor)


def test_out_of_memory_gives_batch_size_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_module, "alignment_loss", oom)
    with pytest.raises(RuntimeError, match="lower train.optim.batch_size in params.yaml"):
        train(MODEL, LossConfig(), FAST, TinyPatches(), tmp_path / "c.pt", tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_the_same_weights_give_the_same_file(tmp_path: Path) -> None:
    # saved to the path, torch would name the archive's folder after the temporary file
    model = AlignNet(MODEL)
    save_model(model, tmp_path / "a.pt")
    save_model(model, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert not list(tmp_path.glob(".*"))  # no temporary file left
    for name, value in load_model(tmp_path / "b.pt").state_dict().items():
        assert torch.equal(value, model.state_dict()[name])


def test_load_model_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model file not found"):
        load_model(tmp_path / "absent.pt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_cpu_fallback_warns(device: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cadalign.train"):
        rt = setup_runtime(TrainConfig(device=device))
    assert rt.device == torch.device("cpu") and rt.autocast_dtype is None and rt.world_size == 1
    assert "CUDA is not available: falling back to CPU" in caplog.text


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        TrainConfig(batch_size=0).validate()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    out = Path(out_dir)
    seen: list[int] = []
    stats = train(
        MODEL, LossConfig(), replace(FAST, steps=4, checkpoint_every=2), TinyPatches(),
        out / f"ckpt_rank{rank}.pt", out / f"model_rank{rank}.pt",
        on_log=lambda step, terms: seen.append(step),
    )
    model = stats.pop("model")
    torch.save(model.state_dict(), out / f"returned_rank{rank}.pt")
    (out / f"stats_rank{rank}.json").write_text(json.dumps({**stats, "logged": seen}))
    # A second network in the same process (the train stage trains one per factor).
    train(MODEL, LossConfig(), replace(FAST, steps=1), TinyPatches(), out / f"second_ckpt_rank{rank}.pt",
          out / f"second_model_rank{rank}.pt")
    dist.destroy_process_group()  # train() leaves the group to its caller


@pytest.mark.slow  # two processes: about 5-10 s on a 2-core box
def test_ddp_two_cpu_ranks_with_gloo(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    stats = [json.loads((tmp_path / f"stats_rank{r}.json").read_text()) for r in (0, 1)]
    for s in stats:  # both ranks ran every step in a world of 2 and agree on the global loss
        assert s["world_size"] == 2 and s["steps"] == 4
    assert stats[0]["loss"] == stats[1]["loss"] and stats[0]["loss"]["loss"] > 0
    assert stats[0]["logged"] == [1, 2, 3, 4] and stats[1]["logged"] == []  # rank 0 alone logs
    assert (tmp_path / "ckpt_rank0.pt").exists() and (tmp_path / "model_rank0.pt").exists()
    assert not (tmp_path / "ckpt_rank1.pt").exists() and not (tmp_path / "model_rank1.pt").exists()
    assert (tmp_path / "second_model_rank0.pt").exists() and not (tmp_path / "second_model_rank1.pt").exists()
    ckpt = torch.load(tmp_path / "ckpt_rank0.pt", weights_only=True)
    assert ckpt["step"] == 4
    assert list(ckpt["model"]) == list(AlignNet(MODEL).state_dict())  # DDP's module. prefix removed
    # every rank returns the same trained network, the one rank 0 wrote
    returned = [torch.load(tmp_path / f"returned_rank{r}.pt", weights_only=True) for r in (0, 1)]
    written = torch.load(tmp_path / "model_rank0.pt", weights_only=True)["model"]
    for name, value in written.items():
        assert torch.equal(returned[0][name], value) and torch.equal(returned[1][name], value)


WORKER_THREADS = """
import cv2, gc, numpy as np, torch
from torch.utils.data import IterableDataset
from cadalign.train import TrainConfig, loader_batches, setup_runtime

class Threads(IterableDataset):
    def __iter__(self):
        image = np.zeros((1024, 1024, 3), np.uint8)
        while True:
            cv2.resize(image, (512, 512), interpolation=cv2.INTER_AREA)  # OpenCV at work in the worker
            yield {"threads": torch.tensor(cv2.getNumThreads()), "frozen": torch.tensor(gc.get_freeze_count())}

cv2.setNumThreads(2)
cv2.resize(np.zeros((4096, 4096, 3), np.uint8), (999, 999), interpolation=cv2.INTER_AREA)  # the parent's pool runs
cfg = TrainConfig(batch_size=2, num_workers=2, device="cpu")
batches = loader_batches(Threads(), cfg, setup_runtime(cfg), 0)
seen = [next(batches) for _ in range(4)]
print(sorted({t for b in seen for t in b["threads"].tolist()}), cv2.getNumThreads())
print(min(f for b in seen for f in b["frozen"].tolist()), len(gc.get_objects()), gc.get_freeze_count())
"""


def test_loader_workers_run_opencv_single_threaded_with_inherited_objects_frozen() -> None:
    # in a subprocess with a time limit: a fork-unsafe OpenCV setting would hang, not fail
    done = subprocess.run([sys.executable, "-c", WORKER_THREADS], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    threads, frozen = done.stdout.splitlines()
    workers, parent = threads.split("] ")
    assert workers == "[1" and int(parent) == 2  # the workers single-threaded, the parent as it was
    worker_frozen, parent_objects, parent_frozen = map(int, frozen.split())
    # the workers' collector skips what they inherited (torch alone is > 100k objects); the
    # parent's collection is back to normal
    assert worker_frozen > parent_objects // 2 > 50_000 and parent_frozen == 0
