"""How fast does one alignment network learn? Error on held-out patches against training steps.

Trains the network of one downsampling factor exactly as the train stage does (the ``train``
section of params.yaml, :func:`cadalign.train.train`, resumed segment by segment from its
checkpoint) on a label set, and after every segment prints its displacement error on a fixed
set of held-out patches built from the TRUE polygons with all polygons kept: the mean length
of (prediction - target) in px over the edge pixels of the input raster, next to the error of
predicting zero (the untrained baseline).

Trained on the true polygons it measures how fast the settings learn at all; trained on the
noisy round-0 labels it measures self-denoising (the network beats the labels it learned
from when its error falls below the zero baseline).

Usage (after ``dvc repro misalign``)::

    python bench/bench_learning.py --labels data/truth --steps 1000 --every 200
    python bench/bench_learning.py --labels data/labels/round0 --ds 2 --params my_params.yaml

The results are printed as a table (the script's output, not a log).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import torch

from cadalign.config import load_cities, load_section
from cadalign.patches import PatchDataset
from cadalign.settings.train import TrainStageConfig, network_seed, patch_config
from cadalign.stages.train import training_tiles
from cadalign.train import load_model, train

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--cities-dir", type=Path, default=Path("data/cities"))
    parser.add_argument("--labels", type=Path, default=Path("data/labels/round0"), help="the labels to train on")
    parser.add_argument("--truth", type=Path, default=Path("data/truth"), help="the true polygons (held-out patches)")
    parser.add_argument("--ds", type=int, help="downsampling factor (default: the coarsest of train.factors)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=200, help="steps between evaluations")
    parser.add_argument("--n-eval", type=int, default=48, help="held-out patches")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_section(args.params, "train", TrainStageConfig)
    ds = args.ds or max(cfg.factors)
    cities = sorted(load_cities(args.params))
    seed = network_seed(cfg, 1, ds)
    pcfg = patch_config(cfg, ds, seed)
    held_out_cfg = dataclasses.replace(pcfg, keep_prob=1.0, seed=seed + 1)
    held_out = PatchDataset(training_tiles(args.cities_dir, args.truth, cities), held_out_cfg)
    samples = [held_out.sample(i) for i in range(args.n_eval)]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    edge = batch["polys_out"][:, 1] > 0.5
    scale = cfg.model.disp_max_px
    zero = (batch["disp"] * scale).norm(dim=1)[edge].mean().item()
    data = training_tiles(args.cities_dir, args.labels, cities)

    print(f"ds {ds}, labels {args.labels}, {len(samples)} held-out patches, zero prediction {zero:.3f} px")
    print(f"{'step':>6} {'edge error px':>14} {'vs zero':>8} {'loss':>9} {'patches/s':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, model_path = Path(tmp) / "net.ckpt", Path(tmp) / "net.pt"
        for end in range(args.every, args.steps + 1, args.every):
            optim = dataclasses.replace(cfg.optim, steps=end, seed=seed, checkpoint_every=args.every, num_workers=0)
            start = time.perf_counter()
            # one stream: each segment resumes the sampler where the last one stopped (exact resume)
            result = train(cfg.model, cfg.loss, optim, PatchDataset(data, pcfg), ckpt, model_path)
            speed = args.every * optim.batch_size / (time.perf_counter() - start)
            net = load_model(model_path)
            with torch.no_grad():
                pred = net(batch["image"], batch["polys"]).disp[0]
            err = ((pred - batch["disp"]) * scale).norm(dim=1)[edge].mean().item()
            print(f"{end:>6} {err:>14.3f} {err / zero:>8.3f} {result['loss']['loss']:>9.4g} {speed:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
