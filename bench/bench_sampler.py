"""Patch sampler throughput: the device sampler against the exact one, and training on its batches.

1. Patches per second of ``cadalign.patches.PatchSampler.draw`` (per patch on the CPU, in this
   process, one thread) and of ``cadalign.device_patches.DeviceSampler.batch`` (a whole batch
   on the training device), timed interleaved batch by batch (exact, device, exact, ...) so
   that contention hits both, with the same settings and tiles.
2. Training steps per second of ``train.model`` from params.yaml on the device sampler's
   batches (drawing included) against the same steps on one fixed random batch (the sampler's
   cost on the training loop: the ratio is the share of the GPU the sampler leaves to training).
3. With ``--compile``: torch.compile's first-step seconds and the steps per second of the
   training step eager and compiled (random batch), interleaved after the compiled warm-up.
4. With ``--step-times N``: wall seconds per step of ``cadalign.train.train`` itself (N steps,
   the median after two warm-up steps) with the exact sampler in ``--workers`` loader
   processes, the device sampler in the training thread, and the device sampler prefetching
   the next batch in a background thread (``train.optim.prefetch``); ``--repeats`` rounds of
   the three, interleaved, and the median of the rounds. Torch runs ``--threads`` threads.

The tiles are synthetic (``cadalign.sources.synthetic``), labelled with their true polygons.

Usage::

    python bench/bench_sampler.py                          # ds 4, 120 -> 64 px, batch 8 (the CPU study)
    python bench/bench_sampler.py --tiny --json out.json   # seconds (CI, GPU checks)
    python bench/bench_sampler.py --compile --threads 2    # + compile seconds and steps/s both ways
    python bench/bench_sampler.py --threads 2 --step-times 16 --repeats 3   # + s/step in train()

The figures are printed (the script's output, not a log); ``--json`` also writes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cadalign.config import load_section
from cadalign.device_patches import DeviceSampler
from cadalign.model import AlignNet, LossConfig, ModelConfig, alignment_loss
from cadalign.patches import PatchConfig, PatchDataset, PatchSampler, TileData
from cadalign.raster import rasterizing
from cadalign.sources.synthetic import generate_tile, tile_seed
from cadalign.settings.train import TrainStageConfig
from cadalign.train import TrainConfig, train, training_device

from benchargs import add_tiny_and_json, parse_args

TINY = {"size": 256, "styles": ["dense"], "ds": 2, "input_size": 60, "batch_size": 4, "batches": 3, "train_steps": 2}
TINY_MODEL = ModelConfig(image_widths=(4, 8), poly_widths=(2, 4), deep_supervision_levels=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_tiles(size: int, styles: list[str], seed: int) -> list[TileData]:
    """One synthetic tile per style, labelled with its true polygons."""
    tiles = []
    for n, style in enumerate(styles, start=1):
        tile = generate_tile(size, style, tile_seed(seed, n))
        tiles.append(TileData(image=tile.image, labels=np.asarray(tile.polygons, dtype=object), ids=np.asarray(tile.ids)))
    return tiles


def sampler_rates(exact: PatchSampler, device: DeviceSampler, batches: int, seed: int) -> tuple[float, float]:
    """Patches per second (exact, device), interleaved batch by batch after one untimed batch each."""
    n = device.batch_size
    rng = np.random.default_rng(seed)
    spent = {"exact": 0.0, "device": 0.0}
    with rasterizing():
        for step in range(batches + 1):
            start = time.perf_counter()
            for _ in range(n):
                exact.draw(rng).as_tensors()
            exact_s = time.perf_counter() - start
            start = time.perf_counter()
            device.batch(step)
            _sync(device.device)
            device_s = time.perf_counter() - start
            if step:  # the first batch warms caches and allocators
                spent["exact"] += exact_s
                spent["device"] += device_s
    return batches * n / spent["exact"], batches * n / spent["device"]


def train_step(model_cfg: ModelConfig, device: torch.device, compiled: bool) -> Callable[[dict[str, torch.Tensor]], float]:
    """One seeded network and its optimizer; returns a function doing a training step on a batch."""
    torch.manual_seed(0)
    model = AlignNet(model_cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    net = torch.compile(model) if compiled else model
    loss_cfg = LossConfig()

    def step(batch: dict[str, torch.Tensor]) -> float:
        prediction = net(batch["image"], batch["polys"])
        loss, _ = alignment_loss(prediction, batch["disp"], batch["seg"], batch["polys_out"], 0, loss_cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def training_rates(
    sampler: DeviceSampler, model_cfg: ModelConfig, steps: int
) -> tuple[float, float]:
    """Steps per second on the sampler's batches (drawing included) and on one fixed batch, interleaved."""
    dev = sampler.device
    on_patches, on_fixed = train_step(model_cfg, dev, False), train_step(model_cfg, dev, False)
    fixed = {k: torch.rand_like(v) for k, v in sampler.batch(0).items()}
    on_patches(sampler.batch(0))
    on_fixed(fixed)
    spent = [0.0, 0.0]
    for step in range(1, steps + 1):
        start = time.perf_counter()
        on_patches(sampler.batch(step))
        spent[0] += time.perf_counter() - start
        start = time.perf_counter()
        on_fixed(fixed)
        spent[1] += time.perf_counter() - start
    return steps / spent[0], steps / spent[1]


def compile_figures(model_cfg: ModelConfig, batch: dict[str, torch.Tensor], steps: int) -> dict[str, float]:
    """Seconds of the first compiled step (compilation) and steps/s eager vs compiled, interleaved."""
    dev = batch["image"].device
    eager, compiled = train_step(model_cfg, dev, False), train_step(model_cfg, dev, True)
    start = time.perf_counter()
    eager(batch)
    first_eager = time.perf_counter() - start
    start = time.perf_counter()
    compiled(batch)
    _sync(dev)
    first_compiled = time.perf_counter() - start
    compiled(batch)  # the backward graph's second-step recompile, if any
    spent = [0.0, 0.0]
    for _ in range(steps):
        for i, fn in enumerate((eager, compiled)):
            start = time.perf_counter()
            fn(batch)
            _sync(dev)
            spent[i] += time.perf_counter() - start
    return {
        "first_step_eager_s": first_eager,
        "compile_s": first_compiled,
        "eager_steps_per_s": steps / spent[0],
        "compiled_steps_per_s": steps / spent[1],
        "compiled_speedup": spent[0] / spent[1],
    }


def step_seconds(
    tiles: list[TileData], cfg: PatchConfig, model_cfg: ModelConfig, opts: TrainConfig, steps: int, repeats: int
) -> dict[str, float | list[float]]:
    """Median wall seconds per step of train() for each way of making its batches (see the module docstring),
    and under ``<way>_rounds`` the figure of each round."""
    ways = {
        f"exact_workers_{opts.num_workers}": lambda: PatchDataset(tiles, cfg),
        "device": lambda: DeviceSampler(tiles, cfg, opts.batch_size, training_device(opts)),
        "device_prefetch": lambda: DeviceSampler(tiles, cfg, opts.batch_size, training_device(opts)),
    }
    found: dict[str, list[float]] = {name: [] for name in ways}
    os.environ.setdefault("TQDM_DISABLE", "1")  # train()'s progress bar, a line per run otherwise
    for _ in range(repeats):
        for name, source in ways.items():
            seconds: list[float] = []
            run = dataclasses.replace(
                opts, steps=steps, log_every=1, checkpoint_every=steps, compile=False, prefetch=name.endswith("prefetch")
            )
            with tempfile.TemporaryDirectory() as tmp:  # a fresh run each time, not a resume
                train(
                    model_cfg, LossConfig(), run, source(), Path(tmp) / "c.pt", Path(tmp) / "m.pt",
                    on_log=lambda step, stats: seconds.append(run.batch_size / stats["patches_per_s"]),
                )
            found[name].append(statistics.median(seconds[2:]))  # after the loader's start and the first step
    return {name: statistics.median(values) for name, values in found.items()} | {
        f"{name}_rounds": values for name, values in found.items()
    }


def main() -> None:
    """Parse arguments, measure, print (and write) the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="train.model and train.patches from here")
    parser.add_argument("--size", type=int, default=1024, help="synthetic tile side (px)")
    parser.add_argument("--styles", nargs="+", default=["dense", "suburb", "industrial"])
    parser.add_argument("--ds", type=int, default=4, help="downsampling factor of the network")
    parser.add_argument("--input-size", type=int, default=120, help="network input (px); the output follows from the model")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=10, help="timed batches each way")
    parser.add_argument("--train-steps", type=int, default=10, help="timed training steps each way")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes on a CPU)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-times", type=int, default=0, help="steps of train() per run (0: not measured)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of --step-times")
    parser.add_argument("--workers", type=int, default=1, help="loader processes of the exact sampler in --step-times")
    add_tiny_and_json(parser, TINY, "seconds, a tiny network")
    args = parse_args(parser, TINY)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    stage = load_section(args.params, "train", TrainStageConfig)
    model_cfg = TINY_MODEL if args.tiny else stage.model
    probe = AlignNet(model_cfg)
    input_size = probe.input_size(probe.output_size(args.input_size))
    cfg = dataclasses.replace(
        stage.patches,
        ds=args.ds,
        input_size=input_size,
        output_size=probe.output_size(input_size),
        max_displacement=model_cfg.disp_max_px,
        field_extent=None,
        seed=args.seed,
    )
    # train.patches.field_extent is in full-resolution px (patch_config divides it by ds)
    cfg = dataclasses.replace(cfg, field_extent=max(args.size / args.ds, cfg.crop_size))
    device = training_device(TrainConfig(device=args.device))
    tiles = make_tiles(args.size, args.styles, args.seed)
    start = time.perf_counter()
    sampler = DeviceSampler(tiles, cfg, args.batch_size, device)
    setup_s = time.perf_counter() - start
    exact = PatchSampler(tiles, cfg)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"device: {device} ({name}); torch {torch.__version__}")
    print(
        f"ds {cfg.ds}, {cfg.input_size} -> {cfg.output_size} px, batch {args.batch_size}, {len(tiles)} tiles of "
        f"{args.size} px, field_scale {cfg.field_scale}, keep_prob {cfg.keep_prob}; device sampler set up in {setup_s:.2f} s"
    )
    exact_rate, device_rate = sampler_rates(exact, sampler, args.batches, args.seed)
    figures: dict[str, object] = {
        "device": str(device),
        "device_name": name,
        "batch_size": args.batch_size,
        "input_size": cfg.input_size,
        "ds": cfg.ds,
        "setup_s": setup_s,
        "exact_patches_per_s": exact_rate,
        "device_patches_per_s": device_rate,
        "speedup": device_rate / exact_rate,
    }
    print(f"exact sampler  {exact_rate:9.1f} patches/s (CPU, one process)")
    print(f"device sampler {device_rate:9.1f} patches/s on {device}: {device_rate / exact_rate:.1f}x")
    on_patches, on_fixed = training_rates(sampler, model_cfg, args.train_steps)
    figures.update(
        train_steps_per_s_real_patches=on_patches,
        train_steps_per_s_random_tensors=on_fixed,
        train_real_over_random=on_patches / on_fixed,
    )
    print(
        f"training (eager): {on_patches:.2f} steps/s on device patches, {on_fixed:.2f} on one random batch "
        f"({100 * on_patches / on_fixed:.0f}%)"
    )
    if args.compile:
        found = compile_figures(model_cfg, sampler.batch(0), args.train_steps)
        figures["compile"] = found
        print(
            f"compile: first step {found['compile_s']:.1f} s (eager {found['first_step_eager_s']:.2f} s); "
            f"{found['eager_steps_per_s']:.2f} steps/s eager, {found['compiled_steps_per_s']:.2f} compiled "
            f"({found['compiled_speedup']:.2f}x)"
        )
    if args.step_times:
        opts = TrainConfig(batch_size=args.batch_size, num_workers=args.workers, device=args.device, lr=1e-3)
        found = step_seconds(tiles, cfg, model_cfg, opts, args.step_times, args.repeats)
        figures["step_seconds"] = found
        rounds = {k: ", ".join(f"{v:.3f}" for v in found[f"{k}_rounds"]) for k in found if not k.endswith("_rounds")}
        for name, rounds_text in rounds.items():
            print(f"train() {name:18s} {found[name]:.3f} s/step (median of rounds: {rounds_text})")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
