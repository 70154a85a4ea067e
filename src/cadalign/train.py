"""Training loop of one :class:`~cadalign.model.AlignNet` (one downsampling factor).

Read top to bottom: the configuration, the runtime (device, precision, DDP) set up once,
the checkpoint format, then :func:`train` and its parts (set-up and resume, the step, the
log, the checkpoint).

- Single process: ``train(...)`` on CPU or one GPU.
- Several GPUs (or CPU processes): launch with ``torchrun --nproc_per_node N``; ``RANK`` in
  the environment switches on DistributedDataParallel (nccl on CUDA, gloo on CPU). Each rank
  draws its own shard of the patches; rank 0 alone logs, checkpoints and writes the model.
- Resumable: a checkpoint (model, optimizer, grad scaler, step, RNG states, configs and the
  rows logged so far) is written atomically every ``checkpoint_every`` steps, the previous
  one kept; a restarted run loads the newest readable one (a corrupt one is moved aside)
  and continues with the same patches, so an interrupted run ends where an uninterrupted
  one would, with the same log.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import math
import os
import pickle
import random
import sys
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from tqdm import tqdm

from cadalign.atomic import atomic_path
from cadalign.config import from_dict
from cadalign.model import AlignNet, LossConfig, ModelConfig, alignment_loss
from cadalign.precision import AmpDtype, autocast, autocast_dtype

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train`."""

    steps: int = 100_000  # optimizer steps (the reference trained up to 100k per network)
    batch_size: int = 16  # patches per step PER PROCESS (reference: 8-32)
    lr: float = 1e-4  # Adam learning rate until lr_drop_step
    lr_drop_step: int = 25_000  # step from which lr_after applies (reference: 25k)
    lr_after: float = 5e-5
    # Decoupled weight decay (AdamW) on convolution weights only, not biases. The
    # reference's L2 term was computed on the initial values and had no effect, so 0 is
    # the faithful default.
    weight_decay: float = 0.0
    checkpoint_every: int = 1000  # steps between checkpoints (and always at the end)
    log_every: int = 50  # steps between on_log calls / progress-bar updates
    seed: int = 0  # offset by the rank, so each process draws different patches
    num_workers: int = 0  # DataLoader worker processes per rank
    # A batch source's next batch drawn in a background thread during the step (see source_batches).
    prefetch: bool = True
    compile: bool = True  # torch.compile the model (CUDA only; ignored on CPU)
    channels_last: bool = True  # NHWC memory layout (CUDA only; faster convolutions)
    amp: bool = True  # mixed-precision autocast (CUDA only; CPU runs in float32)
    # Autocast dtype on CUDA; float16 adds a GradScaler (for GPUs without bfloat16).
    amp_dtype: AmpDtype = "bfloat16"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def validate(self) -> None:
        """Check ranges.

        Raises:
            ValueError: naming the offending field.
        """
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0 or self.lr_after <= 0:
            raise ValueError(f"lr={self.lr} and lr_after={self.lr_after} must be positive")
        if self.weight_decay < 0 or self.num_workers < 0 or self.lr_drop_step < 0:
            raise ValueError("weight_decay, num_workers and lr_drop_step must be >= 0")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of the reference's step schedule.

    Args:
        cfg: ``lr``, ``lr_drop_step`` and ``lr_after``.
        step: 0-based optimizer step.

    Returns:
        ``lr`` before ``lr_drop_step``, ``lr_after`` from it on.
    """
    return cfg.lr if step < cfg.lr_drop_step else cfg.lr_after


# ----------------------------------------------------------------------------- runtime


@dataclass(frozen=True)
class Runtime:
    """Where and how this process computes; built once by :func:`setup_runtime`."""

    device: torch.device
    rank: int  # global rank (0 when not distributed)
    world_size: int
    local_rank: int  # GPU index on this node
    distributed: bool
    autocast_dtype: torch.dtype | None  # None: plain float32

    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes files."""
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed-precision context for the forward pass (a no-op in float32)."""
        return autocast(self.device, self.autocast_dtype)


def training_device(cfg: TrainConfig) -> torch.device:
    """The device :func:`train` will run on in this process (the local GPU, or the CPU)."""
    if cfg.device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Pick the device and precision, join the process group when launched by torchrun, seed.

    ``RANK`` in the environment means DDP (``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
    and ``MASTER_PORT`` as set by torchrun). Seeds torch, numpy and ``random`` with
    ``cfg.seed + rank``.

    Args:
        cfg: training settings (device, amp, seed).

    Returns:
        The runtime. CUDA requested (``device`` "cuda" or "auto") but absent gives the CPU
        with a logged warning.
    """
    device = training_device(cfg)
    use_cuda = device.type == "cuda"
    if cfg.device != "cpu" and not use_cuda:
        logger.warning(
            "train.optim.device=%r but CUDA is not available: falling back to CPU (float32)", cfg.device
        )
    distributed = "RANK" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls/convs on tensor cores
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed patch size: let cuDNN pick kernels once
    if distributed and not dist.is_initialized():  # joined once per process, kept for later calls
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, device_id=device if use_cuda else None)
    seed = cfg.seed + rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return Runtime(device, rank, world_size, local_rank, distributed, autocast_dtype(device, cfg.amp, cfg.amp_dtype))


# ----------------------------------------------------------------------------- data


class _ShardedStream(Sampler[int]):
    """Endless, resumable stream of dataset indices for one rank.

    Epoch ``e`` is a permutation seeded by ``(seed, e)``, identical on all ranks; rank ``r``
    takes every ``world_size``-th index of it (like ``DistributedSampler``). The stream
    starts ``start`` indices in, so a resumed run draws exactly the patches it would have.
    """

    def __init__(self, n: int, seed: int, rank: int, world_size: int, start: int) -> None:
        self.n, self.seed, self.rank, self.world_size, self.start = n, seed, rank, world_size, start
        self.per_epoch = len(range(rank, n, world_size))

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.per_epoch)
        while True:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
            yield from perm[self.rank :: self.world_size][offset:].tolist()
            epoch, offset = epoch + 1, 0


@runtime_checkable
class ResumableStream(Protocol):
    """An iterable dataset that a resumed run continues (e.g. :class:`cadalign.patches.PatchDataset`).

    ``resumed(step, batch_size)`` returns the dataset whose stream, loaded by a fresh
    ``DataLoader(batch_size=batch_size)`` with the same workers, yields the batches of
    steps ``step, step + 1, ...`` of the uninterrupted stream; ``resumed(0, batch_size)``
    yields the stream itself.
    """

    def resumed(self, step: int, batch_size: int) -> IterableDataset: ...


def loader_batches(
    dataset: Dataset, cfg: TrainConfig, rt: Runtime, start_step: int
) -> Generator[dict[str, Any], None, None]:
    """Endless batches for this rank, starting at ``start_step``."""
    loader_rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rt.rank * 10_007 + start_step)
    common: dict[str, Any] = {
        "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers,
        "pin_memory": rt.device.type == "cuda",
        "drop_last": True,
        "generator": loader_rng,  # seeds the workers: deterministic, also after a resume
        "persistent_workers": cfg.num_workers > 0,
    }
    if isinstance(dataset, IterableDataset):
        # The dataset shards itself by rank and worker; a resumed run restarts its stream
        # unless the dataset can continue it.
        if isinstance(dataset, ResumableStream):
            dataset = dataset.resumed(start_step, cfg.batch_size)
        while True:
            yield from _start(DataLoader(dataset, **common))
    n = len(dataset)  # type: ignore[arg-type]
    if n < rt.world_size * cfg.batch_size:
        raise ValueError(
            f"the dataset has {n} patches, fewer than one batch per process "
            f"({rt.world_size} x train.optim.batch_size={cfg.batch_size}); lower train.optim.batch_size"
        )
    sampler = _ShardedStream(n, cfg.seed, rt.rank, rt.world_size, start_step * cfg.batch_size)
    yield from _start(DataLoader(dataset, sampler=sampler, **common))


@runtime_checkable
class BatchSource(Protocol):
    """Whole batches made by the caller (e.g. :class:`cadalign.device_patches.DeviceSampler`).

    ``batch(step)`` returns the batch of optimizer step ``step`` of this rank (a dict of float
    tensors as :func:`train` takes them, ideally already on the training device). It must be a
    pure function of the step, so a resumed run draws exactly the batches it would have.
    """

    def batch(self, step: int) -> dict[str, torch.Tensor]: ...


def source_batches(
    source: BatchSource, start_step: int, prefetch: bool = False
) -> Generator[dict[str, torch.Tensor], None, None]:
    """Endless batches of a :class:`BatchSource` from ``start_step`` on.

    With ``prefetch``, batch ``k + 1`` is drawn in one background thread while the caller uses
    batch ``k`` (torch ops release the GIL; on a GPU the thread's kernels queue on the same
    stream, so a batch is complete before the step's kernels read it). The thread runs
    torch with this thread's intra-op thread count and CUDA device, so it yields the same
    bytes as direct calls; a batch stays a pure function of its step, so a resume is exact.
    Closing the iterator waits for the batch in flight.
    """
    if not prefetch:
        return (source.batch(step) for step in itertools.count(start_step))
    return _prefetched(source, start_step)


def _prefetched(source: BatchSource, start_step: int) -> Generator[dict[str, torch.Tensor], None, None]:
    device = torch.cuda.current_device() if torch.cuda.is_initialized() else None

    def start(threads: int = torch.get_num_threads()) -> None:
        torch.set_num_threads(threads)  # per thread: a new one would start with the default
        if device is not None:
            torch.cuda.set_device(device)  # not a context on GPU 0 for every rank

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch", initializer=start) as pool:
        pending = pool.submit(source.batch, start_step)
        for step in itertools.count(start_step + 1):
            batch = pending.result()
            pending = pool.submit(source.batch, step)
            yield batch


def _start(loader: DataLoader) -> Iterator[Any]:
    """Start iterating ``loader``; its worker processes run OpenCV single-threaded and
    leave the objects they inherit out of Python's garbage collection.

    - OpenCV: otherwise every worker runs OpenCV's own pool of one thread per core (the
      patches' warps and resizes), and N workers fight over the cores with N x cores threads.
      Changing OpenCV's pool inside a forked worker can deadlock it, so the setting is made
      here while the workers fork, and inherited.
    - Garbage collection: a worker inherits every object of the training process (~340,000
      with torch, mlflow and the tiles). A full collection walks all of them (~0.2 s), and
      a patch's GeoJSON and shapely temporaries set one off about every 75 patches: a sixth
      of a worker's time, a quarter on dense blocks (``bench/bench_loader.py``).
      ``gc.freeze()`` before the fork moves them to the permanent generation in the workers
      (and keeps the collector from writing to the shared pages); the parent unfreezes
      right after.
    """
    if loader.num_workers == 0:
        return iter(loader)
    before = cv2.getNumThreads()
    frozen = gc.get_freeze_count()  # a caller's own freeze stays as it was
    cv2.setNumThreads(0)  # 0: no threading in OpenCV calls
    gc.freeze()
    try:
        return iter(loader)  # the workers fork here
    finally:
        if not frozen:
            gc.unfreeze()
        cv2.setNumThreads(before)


# ----------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict[str, Any]:
    """RNG states as plain types, loadable with ``torch.load(weights_only=True)``."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": {**np_state, "state": {**np_state["state"], "key": np_state["state"]["key"].tolist()}},
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np_state = state["numpy"]
    key = np.asarray(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state({**np_state, "state": {**np_state["state"], "key": key}})
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _save(obj: dict[str, Any], path: str | Path, previous: Path | None = None) -> None:
    """``torch.save`` atomically, with the same bytes for the same content.

    Saved to a path, the archive's inner folder takes the file's name, here the random
    name of the temporary file; saved through a file object it is always "archive".
    With ``previous``, the file at ``path`` becomes ``previous`` once the new one is complete,
    so a kill at any point leaves at least one complete file.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as file:
            torch.save(obj, file)
        if previous is not None and path.is_file():
            os.replace(path, previous)


def _configs(model_cfg: ModelConfig, loss_cfg: LossConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    return {"model": asdict(model_cfg), "loss": asdict(loss_cfg), "train": asdict(train_cfg)}


CHECKPOINT_KEYS = frozenset({"model", "optimizer", "scaler", "step", "rng", "config"})
"""What every checkpoint holds; ``log`` (the rows logged so far) is absent from those of earlier versions."""


def previous_checkpoint(path: str | Path) -> Path:
    """Where the checkpoint before the newest one at ``path`` is kept (``<name>.prev``)."""
    path = Path(path)
    return path.with_name(f"{path.name}.prev")


def checkpoint_files(path: str | Path) -> list[Path]:
    """The checkpoints of ``path`` that exist, newest first (the newest, then the previous)."""
    return [p for p in (Path(path), previous_checkpoint(path)) if p.is_file()]


class CorruptFileError(ValueError):
    """A model or checkpoint file that cannot be read (truncated, empty, not written by this code)."""


def _read(path: Path, keys: frozenset[str], what: str, fix: str) -> dict[str, Any]:
    """``torch.load`` of a dict with ``keys`` on the CPU; anything else raises naming the file (and ``fix``)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, empty or garbage: torch raises EOFError, RuntimeError, ...
        # torch's own text for garbage suggests weights_only=False (unsafe): say what it means
        if isinstance(err, pickle.UnpicklingError):
            reason = "not written by torch.save"
        else:
            reason = (str(err).strip().splitlines() or ["empty" if path.stat().st_size == 0 else "no detail"])[0][:200]
        raise CorruptFileError(f"{path} is not a readable {what} ({type(err).__name__}: {reason}){fix}") from err
    missing = keys - set(blob) if isinstance(blob, dict) else keys
    if missing:
        raise CorruptFileError(f"{path} is not a complete {what} (missing {', '.join(sorted(missing))}){fix}")
    return blob


def _load_checkpoint(path: Path, model_cfg: ModelConfig | None) -> dict[str, Any]:
    # On the CPU: RNG states must stay CPU tensors; load_state_dict moves weights and
    # optimizer state to the parameters' device.
    ckpt = _read(path, CHECKPOINT_KEYS, "checkpoint", "")
    if model_cfg is not None:
        saved = from_dict(ModelConfig, ckpt["config"]["model"], where=f"{path}: config.model")
        if saved != model_cfg:
            raise ValueError(
                f"checkpoint {path} was written for a different model ({saved}, now {model_cfg}); "
                "restore the model params or delete the checkpoint to start over"
            )
    return ckpt


def latest_checkpoint(
    path: str | Path, model_cfg: ModelConfig | None = None, move_aside: bool = True
) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint of ``path`` (see :func:`checkpoint_files`) and its file, or None.

    A corrupt one (truncated, empty, garbage) is logged at WARNING and, with ``move_aside``,
    renamed to ``<name>.corrupt``; the previous one is tried next.

    Args:
        path: the ``checkpoint_path`` of :func:`train`.
        model_cfg: when given, a checkpoint of another model raises instead of being skipped.
        move_aside: rename corrupt files (the process that writes checkpoints does).

    Raises:
        ValueError: if a readable checkpoint was written for another model.
    """
    for candidate in checkpoint_files(path):
        try:
            return candidate, _load_checkpoint(candidate, model_cfg)
        except CorruptFileError as err:
            if move_aside:
                aside = candidate.with_name(f"{candidate.name}.corrupt")
                os.replace(candidate, aside)
                logger.warning("%s; moved it to %s, resuming from the previous checkpoint if there is one", err, aside)
            else:
                logger.warning("%s; trying the previous checkpoint", err)
    return None


def resume_step(checkpoint_path: str | Path) -> int:
    """Step a run with this checkpoint will resume from (0 if there is none yet).

    Args:
        checkpoint_path: the ``checkpoint_path`` that will be passed to :func:`train`.

    Returns:
        The number of steps already done (of the newest readable checkpoint).
    """
    found = latest_checkpoint(checkpoint_path, move_aside=False)
    return 0 if found is None else int(found[1]["step"])


def save_model(model: AlignNet, path: str | Path) -> None:
    """Write a network's weights and config (``{model, config}``) atomically, for :func:`load_model`."""
    _save({"model": model.state_dict(), "config": asdict(model.cfg)}, path)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> AlignNet:
    """Load a network written by :func:`save_model` (e.g. by :func:`train`).

    Args:
        path: the model file (a dict with ``model`` and ``config``).
        map_location: device for the weights.

    Returns:
        The network in eval mode.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CorruptFileError: (a ValueError) if it is not a complete model file, naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}; run the train stage first")
    blob = _read(path, frozenset({"model", "config"}), "model file", "; rerun the stage that writes it (dvc repro)")
    model = AlignNet(from_dict(ModelConfig, blob["config"], where=f"{path}: config"))
    model.load_state_dict(blob["model"])
    return model.to(map_location).eval()


# ----------------------------------------------------------------------------- training


def make_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on convolution weights (dim >= 2) only.

    Decoupled decay shrinks each weight by ``lr * weight_decay`` per step, independent of
    the gradient scale (the reference's L2 term had no effect, see :class:`TrainConfig`).
    With ``weight_decay`` 0 this is exactly Adam, the reference's optimizer.

    Args:
        model: the network (unwrapped).
        cfg: ``lr`` and ``weight_decay``.
        fused: use the single-kernel implementation (CUDA).

    Returns:
        The optimizer; biases are in a group without decay.
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)


LogRow = tuple[int, dict[str, float]]
"""One logged row: the step (1-based count of finished steps) and the statistics of :func:`train`'s ``on_log``."""


@dataclass
class _State:
    """What a checkpoint holds: the network (unwrapped), its optimizer and scaler, the steps
    done and the rows logged so far."""

    model: AlignNet
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    step: int = 0
    log: list[LogRow] = field(default_factory=list)


def _initial_state(model_cfg: ModelConfig, train_cfg: TrainConfig, rt: Runtime, init: AlignNet | None) -> _State:
    """A seeded (or ``init``) network on the training device with a fresh optimizer."""
    raw_model = AlignNet(model_cfg)
    if init is not None:
        if init.cfg != model_cfg:
            raise ValueError(f"the initial network has config {init.cfg}, not the model to train {model_cfg}")
        raw_model.load_state_dict(init.state_dict())
    raw_model = raw_model.to(rt.device)
    optimizer = make_optimizer(raw_model, train_cfg, fused=rt.device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda") if rt.autocast_dtype == torch.float16 else None
    return _State(raw_model, optimizer, scaler)


def _resume(state: _State, checkpoint_path: Path, train_cfg: TrainConfig, rt: Runtime) -> None:
    """Load the newest readable checkpoint of ``checkpoint_path`` into ``state``, if there is one."""
    found = latest_checkpoint(checkpoint_path, state.model.cfg, move_aside=rt.is_main)
    if found is None:
        return
    path, ckpt = found
    state.model.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    if state.scaler is not None and ckpt["scaler"] is not None:
        state.scaler.load_state_dict(ckpt["scaler"])
    if not rt.distributed:  # under DDP each rank keeps its own seed (rank 0's RNG was saved)
        _set_rng_state(ckpt["rng"])
    state.step = int(ckpt["step"])
    state.log = [(int(step), dict(stats)) for step, stats in ckpt.get("log", [])]  # absent in older checkpoints
    saved = ckpt["config"]["train"]
    for key in ("batch_size", "num_workers"):  # the patch stream continues where it stopped only with both
        if saved.get(key) != getattr(train_cfg, key):
            logger.warning(
                "the checkpoint was made with train.optim.%s=%s, now %s: the resumed run draws other patches "
                "than an uninterrupted one would", key, saved.get(key), getattr(train_cfg, key)
            )
    logger.info("resuming from %s at step %d", path, state.step)


def _checkpoint(state: _State, checkpoint_path: Path, configs: dict[str, Any]) -> None:
    """Write ``state`` as the newest checkpoint (the one before it is kept as the previous)."""
    ckpt = {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "step": state.step,
        "rng": _rng_state(),
        "config": configs,
        "log": state.log,
    }
    _save(ckpt, checkpoint_path, previous_checkpoint(checkpoint_path))


def _wrapped(raw_model: AlignNet, cfg: TrainConfig, rt: Runtime) -> tuple[nn.Module, torch.memory_format]:
    """The network as the step runs it (NHWC, compiled, DDP as configured) and its input layout.
    The raw network keeps unprefixed parameter names for checkpoints and the model file."""
    on_cuda = rt.device.type == "cuda"
    model: nn.Module = raw_model
    if on_cuda and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if on_cuda and cfg.compile:
        model = torch.compile(model)
    if rt.distributed:
        model = DistributedDataParallel(model, device_ids=[rt.local_rank] if on_cuda else None)
    layout = torch.channels_last if on_cuda and cfg.channels_last else torch.contiguous_format
    return model, layout


def _step(
    model: nn.Module,
    state: _State,
    batch: dict[str, torch.Tensor],
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    rt: Runtime,
    layout: torch.memory_format,
    checkpoint_path: Path,
) -> dict[str, float]:
    """One optimizer step (step ``state.step``, whose learning rate is already set) on ``batch``.

    Returns:
        The loss terms, averaged over the ranks.
    """
    step = state.step
    try:
        batch = {k: v.to(rt.device, non_blocking=True) for k, v in batch.items()}
        with rt.autocast():
            out = model(batch["image"].contiguous(memory_format=layout), batch["polys"].contiguous(memory_format=layout))
        loss, terms = alignment_loss(out, batch["disp"], batch["seg"], batch["polys_out"], step, loss_cfg)
        if rt.distributed:  # global mean of the terms, so every rank sees a non-finite loss
            values = torch.tensor(list(terms.values()), dtype=torch.float64, device=rt.device)
            dist.all_reduce(values)
            terms = dict(zip(terms, (values / rt.world_size).tolist(), strict=True))
        if not math.isfinite(terms["loss"]):
            kept = checkpoint_files(checkpoint_path)
            raise FloatingPointError(
                f"non-finite loss at step {step} ({terms}); "
                + (f"the last checkpoint {kept[0]} is kept" if kept else "no checkpoint was written yet")
                + " and no model was written: check the input patches or lower train.optim.lr"
            )
        state.optimizer.zero_grad(set_to_none=True)
        if state.scaler is not None:
            state.scaler.scale(loss).backward()
            state.scaler.step(state.optimizer)
            state.scaler.update()
        else:
            loss.backward()
            state.optimizer.step()
    except torch.OutOfMemoryError as err:
        raise RuntimeError(
            f"CUDA out of memory at step {step} with train.optim.batch_size={train_cfg.batch_size} "
            f"per process: lower train.optim.batch_size in params.yaml"
        ) from err
    return terms


class _Progress:
    """The progress bar and the rows logged every ``log_every`` steps (kept in ``state.log``,
    passed to ``on_log`` on rank 0), with the patch rate since the previous row."""

    def __init__(
        self, cfg: TrainConfig, rt: Runtime, state: _State, on_log: Callable[[int, dict[str, float]], None] | None
    ) -> None:
        self.cfg, self.rt, self.state, self.on_log = cfg, rt, state, on_log
        self.patches_per_step = cfg.batch_size * rt.world_size
        self.t_start = self.t_log = time.perf_counter()
        self.step_log = state.step
        self.bar = tqdm(
            total=cfg.steps,
            initial=state.step,
            disable=not rt.is_main,
            desc="train",
            unit="step",
            mininterval=0.5 if sys.stderr.isatty() else 30.0,  # few lines in DVC and CI logs
        )

    def done(self, terms: dict[str, float], lr: float) -> None:
        """Record the step just finished (``state.step`` counts it)."""
        done = self.state.step
        self.bar.update(1)
        if done % self.cfg.log_every and done != self.cfg.steps:
            return
        now = time.perf_counter()
        speed = (done - self.step_log) * self.patches_per_step / max(now - self.t_log, 1e-9)
        stats = {**terms, "lr": lr, "patches_per_s": speed}
        self.t_log, self.step_log = now, done
        self.bar.set_postfix(loss=f"{terms['loss']:.4g}", patches_per_s=f"{speed:.1f}")
        self.state.log.append((done, stats))
        if self.on_log is not None and self.rt.is_main:
            self.on_log(done, stats)



def train(
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    dataset: Dataset | BatchSource,
    checkpoint_path: Path,
    model_path: Path,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    init: AlignNet | None = None,
) -> dict[str, Any]:
    """Train one alignment network, resuming from ``checkpoint_path`` if it exists.

    Args:
        model_cfg: network settings.
        loss_cfg: loss weights.
        train_cfg: optimisation and runtime settings.
        dataset: map-style or iterable dataset of dicts with float tensors ``image``
            (3,S,S) in [-1,1], ``polys`` (3,S,S), ``disp`` (2,O,O) in [-1,1], ``seg``
            (4,O,O) and ``polys_out`` (3,O,O) (the input raster cropped to the output).
            A map-style dataset is drawn in a seeded, per-rank sharded order that a resume
            continues exactly; its own randomness (augmentation) resumes exactly when it
            comes from the process RNGs with ``num_workers`` 0 (restored from the
            checkpoint) or from the index. An iterable dataset must shard itself by rank;
            one with a ``resumed(step, batch_size)`` method (:class:`ResumableStream`, e.g.
            :class:`cadalign.patches.PatchDataset`) continues where it stopped, any other
            restarts its stream on resume. Or a :class:`BatchSource`: whole batches of
            ``train_cfg.batch_size`` by step, which a resume continues exactly.
        checkpoint_path: resumable training state, written every ``checkpoint_every`` steps;
            the one before the newest is kept as ``<name>.prev`` (:func:`checkpoint_files`).
            A corrupt one is moved to ``<name>.corrupt`` and the previous one resumed.
        model_path: final weights ``{model, config}``, written at the end.
        on_log: called on rank 0 every ``log_every`` steps with the step (1-based count of
            finished steps) and the loss terms, ``lr`` and ``patches_per_s``.
        init: a network to start from (warm start; its config must equal ``model_cfg``)
            instead of the seeded random initialisation. A checkpoint, when present, wins.

    Returns:
        Final statistics: ``steps``, ``start_step``, ``loss`` (terms of the last step),
        ``patches_per_s`` (mean over the run), ``device``, ``world_size``, ``log`` (every
        row logged, those before a resume included, from the checkpoint) and ``model`` (the
        trained network, unwrapped, on ``device``; the same on every rank).

    Raises:
        FloatingPointError: on a non-finite loss; the last good checkpoint stays, and no
            model file is written.
        RuntimeError: on CUDA out-of-memory, with a hint to lower the batch size.
        ValueError: if the checkpoint or ``init`` belongs to a different model, or the
            dataset is smaller than a batch.
    """
    rt = setup_runtime(train_cfg)
    checkpoint_path, model_path = Path(checkpoint_path), Path(model_path)
    state = _initial_state(model_cfg, train_cfg, rt, init)
    _resume(state, checkpoint_path, train_cfg, rt)
    start_step = state.step
    model, layout = _wrapped(state.model, train_cfg, rt)
    if isinstance(dataset, BatchSource):
        batches = source_batches(dataset, start_step, prefetch=train_cfg.prefetch)
    else:
        batches = loader_batches(dataset, train_cfg, rt, start_step)
    configs = _configs(model_cfg, loss_cfg, train_cfg)
    progress = _Progress(train_cfg, rt, state, on_log)
    terms: dict[str, float] = {}
    model.train()
    while state.step < train_cfg.steps:
        lr = lr_at(train_cfg, state.step)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        terms = _step(model, state, next(batches), loss_cfg, train_cfg, rt, layout, checkpoint_path)
        state.step += 1
        progress.done(terms, lr)
        if rt.is_main and (state.step % train_cfg.checkpoint_every == 0 or state.step == train_cfg.steps):
            _checkpoint(state, checkpoint_path, configs)
    progress.bar.close()
    batches.close()  # a prefetch thread stops here (after an exception: when the iterator is collected)

    elapsed = time.perf_counter() - progress.t_start
    if rt.is_main:
        save_model(state.model, model_path)
        logger.info("wrote %s after %d steps", model_path, train_cfg.steps)
    if rt.distributed:
        dist.barrier()  # no rank goes on (to the next network, or exits) before rank 0 has written
    ran = train_cfg.steps - start_step
    return {
        "steps": train_cfg.steps,
        "start_step": start_step,
        "loss": terms,
        "patches_per_s": ran * progress.patches_per_step / elapsed if ran > 0 else 0.0,
        "device": str(rt.device),
        "world_size": rt.world_size,
        "log": list(state.log),
        "model": state.model,
    }
