"""DVC stage: realign a round's labels with the round's networks (coarse to fine).

Reads the labels the round trained on, moves every vertex with the networks of all
downsampling factors (coarsest first) and writes the next round's labels, same ids and
vertex order, in each tile's CRS.

Usage::

    python -m cadalign.stages.realign --params params.yaml --round round1 --cities-dir data/cities \
        --labels data/labels/round0 --models data/models/round1 --out data/labels/round1
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from pathlib import Path

import torch

from cadalign.align import WindowLimits, realign
from cadalign.atomic import atomic_path
from cadalign.config import load_cities, load_section
from cadalign.geo.labels import load_labelled_tiles
from cadalign.geo.polygons import check_finite, from_pixels, write_polygons
from cadalign.provenance import check_input, write_manifest
from cadalign.settings.realign import RealignStageConfig
from cadalign.stages.common import add_threads_option, make_parser, resolve_device, set_threads, setup_logging
from cadalign.tracking import stage_run
from cadalign.train import load_model

logger = logging.getLogger(__name__)


def load_models(models_dir: Path, device: torch.device) -> dict[int, torch.nn.Module]:
    """Load every ``ds<f>.pt`` network of a round, keyed by downsampling factor.

    Raises:
        FileNotFoundError: if the folder holds no network.
    """
    models = {}
    for path in sorted(Path(models_dir).glob("ds*.pt")):
        match = re.fullmatch(r"ds(\d+)\.pt", path.name)
        if match:
            models[int(match.group(1))] = load_model(path, map_location=device).to(device).eval()
    if not models:
        raise FileNotFoundError(f"no networks ds<f>.pt in {models_dir}; run the round's train stage first")
    return models


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("Realign a round's labels with the round's networks.")
    parser.add_argument("--round", required=True)
    parser.add_argument("--cities-dir", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True, help="labels the round trained on")
    parser.add_argument("--models", type=Path, required=True, help="the round's networks (ds<f>.pt)")
    parser.add_argument("--out", type=Path, required=True, help="the realigned labels (<city>/<tile>.gpkg)")
    add_threads_option(parser)
    args = parser.parse_args(argv)
    setup_logging()
    set_threads(parser, args)
    cfg = load_section(args.params, "realign", RealignStageConfig)
    device = resolve_device(cfg.device, "realign.device")
    cities = sorted(load_cities(args.params))
    recorded = [check_input(args.params, args.labels, "labels", cities), check_input(args.params, args.models, "networks")]
    models = load_models(args.models, device)
    tiles = load_labelled_tiles(args.cities_dir, args.labels, cities)
    with stage_run(f"realign@{args.round}", {"realign": dataclasses.asdict(cfg), "factors": sorted(models)}) as run:
        start = time.perf_counter()
        limits = WindowLimits()  # an out-of-memory error's smaller batch or window holds for the later tiles
        with atomic_path(args.out) as tmp:
            tmp.mkdir()
            for t in tiles:
                moved = realign(models, t.tile.image, t.geoms, device, cfg.window, cfg.refine, limits) if len(t.geoms) else t.geoms
                check_finite(
                    moved, t.ids, str(args.out / t.city / f"{t.name}.gpkg"),
                    f"the networks in {args.models} moved them there: retrain them (dvc repro train@{args.round})",
                )
                write_polygons(tmp / t.city / f"{t.name}.gpkg", *from_pixels(moved, t.ids, t.tile.info.transform, t.tile.info.crs))
                logger.info("%s: %d buildings realigned", t.name, len(t.geoms))
            write_manifest(tmp, args.params, "realign", args.round, recorded, cities=cities)
        run.log_metrics({"seconds": time.perf_counter() - start, "tiles": len(tiles)})


if __name__ == "__main__":
    main()
