"""Training loop of one :class:`~cadalign.model.AlignNet` (one downsampling factor).

Read top to bottom: the configuration, the runtime (device, precision, DDP) set up once,
the checkpoint format, then :func:`train`.

- Single process: ``train(...)`` on CPU or one GPU.
- Several GPUs (or CPU processes): launch with ``torchrun --nproc_per_node N``; ``RANK`` in
  the environment switches on DistributedDataParallel (nccl on CUDA, gloo on CPU). Each rank
  draws its own shard of the patches; rank 0 alone logs, checkpoints and writes the model.
- Resumable: a checkpoint (model, optimizer, grad scaler, step, RNG states, configs) is
  written atomically every ``checkpoint_every`` steps; a restarted run loads it and continues
  with the same patch order, so an interrupted run ends where an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
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
        # The dataset shards itself by rank and worker; a resumed run restarts its stream.
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


def _save(obj: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` atomically, with the same bytes for the same content.

    Saved to a path, the archive's inner folder takes the file's name, here the random
    name of the temporary file; saved through a file object it is always "archive".
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        torch.save(obj, file)


def _configs(model_cfg: ModelConfig, loss_cfg: LossConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    return {"model": asdict(model_cfg), "loss": asdict(loss_cfg), "train": asdict(train_cfg)}


def _load_checkpoint(path: Path, model_cfg: ModelConfig) -> dict[str, Any]:
    # On the CPU: RNG states must stay CPU tensors; load_state_dict moves weights and
    # optimizer state to the parameters' device.
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    saved = from_dict(ModelConfig, ckpt["config"]["model"], where=f"{path}: config.model")
    if saved != model_cfg:
        raise ValueError(
            f"checkpoint {path} was written for a different model ({saved}, now {model_cfg}); "
            "restore the model params or delete the checkpoint to start over"
        )
    return ckpt


def resume_step(checkpoint_path: str | Path) -> int:
    """Step a run with this checkpoint will resume from (0 if there is none yet).

    Lets a caller give an iterable dataset a fresh stream on resume instead of replaying
    the patches of the first steps.

    Args:
        checkpoint_path: the ``checkpoint_path`` that will be passed to :func:`train`.

    Returns:
        The number of steps already done.
    """
    path = Path(checkpoint_path)
    if not path.exists():
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


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
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}; run the train stage first")
    blob = torch.load(path, map_location=map_location, weights_only=True)
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
            checkpoint) or from the index. An iterable dataset must shard itself by rank
            and restarts its stream on resume. Or a :class:`BatchSource`: whole batches of
            ``train_cfg.batch_size`` by step, which a resume continues exactly.
        checkpoint_path: resumable training state, written every ``checkpoint_every`` steps.
        model_path: final weights ``{model, config}``, written at the end.
        on_log: called on rank 0 every ``log_every`` steps with the step (1-based count of
            finished steps) and the loss terms, ``lr`` and ``patches_per_s``.
        init: a network to start from (warm start; its config must equal ``model_cfg``)
            instead of the seeded random initialisation. A checkpoint, when present, wins.

    Returns:
        Final statistics: ``steps``, ``start_step``, ``loss`` (terms of the last step),
        ``patches_per_s`` (mean over the run), ``device``, ``world_size``, and ``model`` (the
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
    on_cuda = rt.device.type == "cuda"
    raw_model = AlignNet(model_cfg)
    if init is not None:
        if init.cfg != model_cfg:
            raise ValueError(f"the initial network has config {init.cfg}, not the model to train {model_cfg}")
        raw_model.load_state_dict(init.state_dict())
    raw_model = raw_model.to(rt.device)
    optimizer = make_optimizer(raw_model, train_cfg, fused=on_cuda)
    scaler = torch.amp.GradScaler("cuda") if rt.autocast_dtype == torch.float16 else None

    start_step = 0
    if checkpoint_path.exists():
        ckpt = _load_checkpoint(checkpoint_path, model_cfg)
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt["scaler"] is not None:
            scaler.load_state_dict(ckpt["scaler"])
        if not rt.distributed:  # under DDP each rank keeps its own seed (rank 0's RNG was saved)
            _set_rng_state(ckpt["rng"])
        start_step = ckpt["step"]
        logger.info("resuming from %s at step %d", checkpoint_path, start_step)

    # Wrap for speed (CUDA) and distribution; raw_model keeps unprefixed parameter names.
    model: nn.Module = raw_model
    if on_cuda and train_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if on_cuda and train_cfg.compile:
        model = torch.compile(model)
    if rt.distributed:
        model = DistributedDataParallel(model, device_ids=[rt.local_rank] if on_cuda else None)
    layout = torch.channels_last if on_cuda and train_cfg.channels_last else torch.contiguous_format

    def checkpoint(step: int) -> None:
        if rt.is_main:
            _save(
                {
                    "model": raw_model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "step": step,
                    "rng": _rng_state(),
                    "config": _configs(model_cfg, loss_cfg, train_cfg),
                },
                checkpoint_path,
            )

    if isinstance(dataset, BatchSource):
        batches = source_batches(dataset, start_step, prefetch=train_cfg.prefetch)
    else:
        batches = loader_batches(dataset, train_cfg, rt, start_step)
    terms: dict[str, float] = {}
    patches_per_step = train_cfg.batch_size * rt.world_size
    t_start = t_log = time.perf_counter()
    step_log = start_step
    bar = tqdm(
        total=train_cfg.steps,
        initial=start_step,
        disable=not rt.is_main,
        desc="train",
        unit="step",
        mininterval=0.5 if sys.stderr.isatty() else 30.0,  # few lines in DVC and CI logs
    )
    model.train()
    for step in range(start_step, train_cfg.steps):
        lr = lr_at(train_cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(batches)
        try:
            batch = {k: v.to(rt.device, non_blocking=True) for k, v in batch.items()}
            with rt.autocast():
                out = model(
                    batch["image"].contiguous(memory_format=layout),
                    batch["polys"].contiguous(memory_format=layout),
                )
            loss, terms = alignment_loss(out, batch["disp"], batch["seg"], batch["polys_out"], step, loss_cfg)
            if rt.distributed:  # global mean of the terms, so every rank sees a non-finite loss
                values = torch.tensor(list(terms.values()), dtype=torch.float64, device=rt.device)
                dist.all_reduce(values)
                terms = dict(zip(terms, (values / rt.world_size).tolist(), strict=True))
            if not math.isfinite(terms["loss"]):
                raise FloatingPointError(
                    f"non-finite loss at step {step} ({terms}); the last checkpoint {checkpoint_path} is "
                    "kept and no model was written: check the input patches or lower train.optim.lr"
                )
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
        except torch.OutOfMemoryError as err:
            raise RuntimeError(
                f"CUDA out of memory at step {step} with train.optim.batch_size={train_cfg.batch_size} "
                f"per process: lower train.optim.batch_size in params.yaml"
            ) from err
        done = step + 1
        bar.update(1)
        if done % train_cfg.log_every == 0 or done == train_cfg.steps:
            now = time.perf_counter()
            speed = (done - step_log) * patches_per_step / max(now - t_log, 1e-9)
            stats = {**terms, "lr": lr, "patches_per_s": speed}
            t_log, step_log = now, done
            bar.set_postfix(loss=f"{terms['loss']:.4g}", patches_per_s=f"{stats['patches_per_s']:.1f}")
            if on_log is not None and rt.is_main:
                on_log(done, stats)
        if done % train_cfg.checkpoint_every == 0 or done == train_cfg.steps:
            checkpoint(done)
    bar.close()
    batches.close()  # a prefetch thread stops here (after an exception: when the iterator is collected)

    elapsed = time.perf_counter() - t_start
    if rt.is_main:
        save_model(raw_model, model_path)
        logger.info("wrote %s after %d steps", model_path, train_cfg.steps)
    if rt.distributed:
        dist.barrier()  # no rank goes on (to the next network, or exits) before rank 0 has written
    ran = train_cfg.steps - start_step
    return {
        "steps": train_cfg.steps,
        "start_step": start_step,
        "loss": terms,
        "patches_per_s": ran * patches_per_step / elapsed if ran > 0 else 0.0,
        "device": str(rt.device),
        "world_size": rt.world_size,
        "model": raw_model,
    }
