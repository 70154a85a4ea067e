"""Training-patch throughput: what the data loader delivers to the GPU, per worker count.

On the GPU the training step of the reference network takes ~20 ms for 32 patches (1,600
patches/s, ``bench_train.py``), so the loader must keep up. In one run this prints:

1. the cost of one patch in this process (no workers): CPU ms per patch, and how much of it
   Python's garbage collector takes, as the process is (every object of the training
   process tracked) and with those objects frozen (``gc.freeze()``, as the training loader's
   workers have them, see :func:`cadalign.train.loader_batches`);
2. patches/s through :func:`cadalign.train.loader_batches`, the training loader itself, for
   each worker count.

The tiles are synthetic (``cadalign.sources.synthetic``) with their true polygons as
labels; the patch settings default to the GPU preset's ds-4 network (220 px input, 100 px
output). The process imports the training stage first, so it holds the objects a training
process holds.

Usage::

    python bench/bench_loader.py                          # ds 4, 2048 px tiles, workers 0 1 2
    python bench/bench_loader.py --workers 4 8 12 --batches 40   # on a 16-core GPU machine

The results are printed as tables (the script's output, not a log).
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

import cadalign.stages.train  # noqa: F401  (the objects of a training process)
from cadalign.patches import PatchConfig, PatchDataset, PatchSampler, TileData
from cadalign.raster import rasterizing
from cadalign.sources.synthetic import generate_tile, tile_seed
from cadalign.train import TrainConfig, loader_batches, setup_runtime


@dataclass
class GcClock:
    """CPU time spent in the garbage collector, from ``gc.callbacks``."""

    seconds: float = 0.0
    full: int = 0  # collections of the oldest generation
    _start: float = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.process_time()
            return
        self.seconds += time.process_time() - self._start
        self.full += info["generation"] == 2


def make_tiles(size: int, styles: Sequence[str], seed: int) -> list[TileData]:
    """One synthetic tile per style, labelled with its true polygons."""
    tiles = []
    for n, style in enumerate(styles, start=1):
        tile = generate_tile(size, style, tile_seed(seed, n))
        labels = np.asarray(tile.polygons, dtype=object)
        tiles.append(TileData(image=tile.image, labels=labels, ids=np.asarray(tile.ids)))
    return tiles


def per_patch(sampler: PatchSampler, n: int, frozen: bool, seed: int) -> tuple[float, float, float]:
    """CPU ms per patch, of which in the collector, and full collections per 100 patches."""
    rng = np.random.default_rng(seed)
    clock = GcClock()
    if frozen:
        gc.freeze()
    gc.callbacks.append(clock)
    try:
        with rasterizing():
            start = time.process_time()
            for _ in range(n):
                sampler.draw(rng)
            total = time.process_time() - start
    finally:
        gc.callbacks.remove(clock)
        if frozen:
            gc.unfreeze()
    return total / n * 1e3, clock.seconds / n * 1e3, clock.full / n * 100


def loader_rate(dataset: PatchDataset, workers: int, batch_size: int, warmup: int, batches: int) -> float:
    """Patches per second through the training loader, after ``warmup`` batches."""
    cfg = TrainConfig(batch_size=batch_size, num_workers=workers, device="cpu")
    stream = loader_batches(dataset, cfg, setup_runtime(cfg), 0)
    for _ in range(warmup):  # also absorbs the workers' start
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    elapsed = time.perf_counter() - start
    stream.close()  # ends the loader and its workers
    return batches * batch_size / elapsed


def main() -> None:
    """Parse arguments, measure, print the tables."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=2048, help="synthetic tile side (px)")
    parser.add_argument("--styles", nargs="+", default=["dense", "suburb", "industrial"])
    parser.add_argument("--ds", type=int, default=4, help="downsampling factor of the network")
    parser.add_argument("--input-size", type=int, default=220)
    parser.add_argument("--output-size", type=int, default=100)
    parser.add_argument("--keep-prob", type=float, default=1.0, help="train.patches.keep_prob")
    parser.add_argument("--field-scale", type=float, default=2.0, help="train.patches.field_scale")
    parser.add_argument("--patches", type=int, default=300, help="patches timed in this process, each way")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches per worker count")
    parser.add_argument("--batches", type=int, default=10, help="timed batches per worker count")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    tiles = make_tiles(args.size, args.styles, args.seed)
    cfg = PatchConfig(
        ds=args.ds,
        input_size=args.input_size,
        output_size=args.output_size,
        field_scale=args.field_scale,
        keep_prob=args.keep_prob,
        field_extent=args.size / args.ds,
        seed=args.seed,
    )
    dataset = PatchDataset(tiles, cfg)
    print(
        f"ds {args.ds}, {args.input_size} -> {args.output_size} px, {len(tiles)} tiles of {args.size} px "
        f"({sum(len(t.labels) for t in tiles)} polygons), keep_prob {args.keep_prob}; "
        f"{len(gc.get_objects()):,} objects tracked by the collector"
    )
    print("\n| collector | CPU ms / patch | in the collector | full collections / 100 patches |")
    print("| --- | --- | --- | --- |")
    per_patch(dataset.sampler, 10, False, args.seed + 1)  # warm caches
    for frozen in (False, True):
        ms, gc_ms, full = per_patch(dataset.sampler, args.patches, frozen, args.seed)
        label = "objects frozen (the workers)" if frozen else "as the process is"
        print(f"| {label} | {ms:.2f} | {gc_ms:.2f} ms ({gc_ms / ms:.0%}) | {full:.1f} |")

    print(f"\n| workers | patches/s (batch {args.batch_size}) |")
    print("| --- | --- |")
    for workers in args.workers:
        rate = loader_rate(dataset, workers, args.batch_size, args.warmup, args.batches)
        print(f"| {workers} | {rate:.0f} |")


if __name__ == "__main__":
    main()
