"""DVC stage: the study's figures (accuracy curves of all rounds; polygons over an image crop).

Usage::

    python -m cadalign.stages.draw --params params.yaml --cities-dir data/cities \
        --truth data/truth --labels-dir data/labels --eval-dir data/eval --out-dir data/figures

draws every label set of ``rounds:`` in params.yaml (the input first); ``--labels NAME=DIR``
and ``--curves NAME=CSV`` name the sets one by one instead.

Writes ``accuracy.png`` and ``overlay.png`` (truth white, input red, rounds blue, green...).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cadalign.config import load_section
from cadalign.geo.polygons import read_polygons, to_pixels
from cadalign.geo.tiles import read_tile
from cadalign.plots import ROUND_COLOURS, plot_accuracy_curves, plot_overlay
from cadalign.provenance import check_input
from cadalign.settings.rounds import label_sets
from cadalign.stages.common import make_parser, name_path_pairs, setup_logging
from cadalign.tracking import stage_run

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DrawConfig:
    """The ``draw`` section of params.yaml."""

    tile: str = "synthville1"  # <city><number> of the tile shown in the overlay
    window: tuple[int, ...] = (256, 256, 384, 384)  # x0, y0, width, height of the crop (px)

    def validate(self) -> None:
        if len(self.window) != 4 or min(self.window[2:]) < 1:
            raise ValueError(f"window = {list(self.window)}; give [x0, y0, width, height] with width, height >= 1")
        if not re.fullmatch(r"[A-Za-z0-9_-]*?\d+", self.tile):
            raise ValueError(f"tile = {self.tile!r}; name a tile as <city><number>, e.g. synthville1")


def find_tile(cities_dir: Path, name: str) -> Path:
    """The image ``<cities_dir>/<city>/images/<name>.tif`` of the tile named ``name``.

    The city is found on disk rather than cut from the name, since a city's own name may end
    in digits (tile 1 of ``zone2`` is ``zone21``).

    Raises:
        FileNotFoundError: naming ``draw.tile`` and the tiles there are, if no city has it.
        ValueError: if two cities have a tile of that name (``zone2`` tile 1, ``zone`` tile 21).
    """
    found = sorted(Path(cities_dir).glob(f"*/images/{name}.tif"))
    if not found:
        tiles = sorted(p.stem for p in Path(cities_dir).glob("*/images/*.tif"))
        raise FileNotFoundError(
            f"draw.tile = {name!r}: no tile {name}.tif under {cities_dir}/<city>/images/; "
            f"pick one of {', '.join(tiles) or 'none (run the fetch stages first)'}"
        )
    if len(found) > 1:
        raise ValueError(
            f"draw.tile = {name!r} names a tile of {len(found)} cities ({', '.join(str(p) for p in found)}); "
            "rename one of the cities in params.yaml"
        )
    return found[0]


def read_curve(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a ``tau,accuracy`` CSV written by the evaluate stage."""
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return np.array([float(r["tau"]) for r in rows]), np.array([float(r["accuracy"]) for r in rows])


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("Draw the accuracy curves of all rounds and a polygon overlay.")
    parser.add_argument("--cities-dir", type=Path, required=True)
    parser.add_argument("--truth", type=Path, help="folder of the true polygons, drawn first (white)")
    parser.add_argument("--labels-dir", type=Path, help="folder of the label sets; the rounds come from params")
    parser.add_argument("--eval-dir", type=Path, help="folder of the evaluate stages' outputs (accuracy.csv)")
    parser.add_argument("--labels", nargs="+", default=[], help="NAME=DIR of <city>/<tile>.gpkg label sets")
    parser.add_argument("--curves", nargs="+", default=[], help="NAME=CSV accuracy curves")
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_section(args.params, "draw", DrawConfig)
    labels, curves = name_path_pairs(args.labels, "--labels"), name_path_pairs(args.curves, "--curves")
    if args.labels_dir is not None or args.eval_dir is not None:
        if args.labels_dir is None or args.eval_dir is None or labels or curves:
            parser.error("give --labels-dir and --eval-dir together, or --labels and --curves, not a mix")
        _, names = label_sets(args.params)
        labels = {name: args.labels_dir / name for name in names}
        curves = {name: args.eval_dir / name / "accuracy.csv" for name in names}
    if not labels or not curves:
        parser.error("name the label sets: --labels-dir and --eval-dir, or --labels and --curves")
    if args.truth is not None:
        labels = {"truth": args.truth, **labels}
    with stage_run("draw", {"draw": dataclasses.asdict(cfg)}) as run:
        tile_path = find_tile(args.cities_dir, cfg.tile)
        city = tile_path.parent.parent.name
        for folder in labels.values():
            check_input(args.params, folder, "labels", [city])
        for path in curves.values():
            check_input(args.params, path.parent, "accuracy curve")
        tile = read_tile(tile_path)
        layers = {}
        for name, folder in labels.items():
            geoms, _ = to_pixels(read_polygons(folder / city / f"{cfg.tile}.gpkg"), tile.info.transform, tile.info.crs)
            layers[name] = geoms
        colours = {name: ("white" if name == "truth" else None) for name in labels}
        rounds = [n for n in labels if n != "truth"]
        colours.update({n: ROUND_COLOURS[i % len(ROUND_COLOURS)] for i, n in enumerate(rounds)})
        overlay = plot_overlay(tile.image, layers, args.out_dir / "overlay.png", tuple(cfg.window), colours)
        accuracy = plot_accuracy_curves({n: read_curve(p) for n, p in curves.items()}, args.out_dir / "accuracy.png")
        for fig in (overlay, accuracy):
            run.log_figure(fig)
    logger.info("figures in %s", args.out_dir)


if __name__ == "__main__":
    main()
