"""DVC stage: score a set of labels against the true polygons, per vertex.

Reads every ``<truth>/<city>/<tile>.gpkg`` of the cities in params.yaml, the labels of the
same name under ``--labels`` and the tile's georeferencing under ``--cities-dir``; writes the
summary metrics (JSON, a DVC metric) and the accuracy curve (CSV with columns
``tau,accuracy``, a DVC plot). Next to the vertex metric, ``mask_offset`` holds the
mask-based residual of each label polygon (best translation within +-32 px against the
tile's building mask), the measure that also works for labels without vertex truth.

Usage::

    python -m cadalign.stages.evaluate --name round0 --cities-dir data/cities \
        --truth data/truth --labels data/labels/round0 \
        --metrics data/eval/round0/metrics.json --curve data/eval/round0/accuracy.csv
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cadalign import evaluate
from cadalign.atomic import write_json, write_text
from cadalign.config import load_cities
from cadalign.geo.labels import label_files
from cadalign.geo.mask_metric import label_offsets, summarize_by_city
from cadalign.geo.polygons import read_polygons, to_pixels
from cadalign.geo.tiles import read_info
from cadalign.stages.common import make_parser, setup_logging
from cadalign.tracking import stage_run

logger = logging.getLogger(__name__)


def tile_errors(
    cities_dir: Path, truth_dir: Path, labels_dir: Path, cities: list[str]
) -> dict[str, dict[str, np.ndarray]]:
    """Per-vertex errors of every tile of the study's cities: {city: {tile: errors}}.

    Raises:
        FileNotFoundError: if a city has no true polygons or a tile's labels are missing.
    """
    truth_files = label_files(truth_dir, cities)
    out: dict[str, dict[str, np.ndarray]] = {}
    for truth_path in truth_files:
        city, tile = truth_path.parent.name, truth_path.stem
        label_path = labels_dir / city / truth_path.name
        if not label_path.is_file():
            raise FileNotFoundError(
                f"labels missing for tile {tile}: {label_path}; rerun the stage that writes {labels_dir}"
            )
        info = read_info(cities_dir / city / "images" / f"{tile}.tif")
        true_geoms, true_ids = to_pixels(read_polygons(truth_path), info.transform, info.crs)
        geoms, ids = to_pixels(read_polygons(label_path), info.transform, info.crs)
        errors, stats = evaluate.vertex_errors(true_geoms, true_ids, geoms, ids, where=str(label_path))
        if stats.n_missing:
            logger.warning("%s: %d buildings missing from the labels", label_path, stats.n_missing)
        out.setdefault(city, {})[tile] = errors
    return out


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("Score labels against the true polygons (per-vertex error, accuracy curve).")
    parser.add_argument("--name", required=True, help="name of the labels in metrics and MLflow, e.g. round0")
    parser.add_argument("--cities-dir", type=Path, required=True)
    parser.add_argument("--truth", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--curve", type=Path, required=True)
    args = parser.parse_args(argv)
    setup_logging()
    with stage_run(f"evaluate@{args.name}", {"labels": str(args.labels), "name": args.name}) as run:
        cities = sorted(load_cities(args.params))
        per_city = tile_errors(args.cities_dir, args.truth, args.labels, cities)
        all_errors = np.concatenate([e for tiles in per_city.values() for e in tiles.values()])
        if len(all_errors) == 0:
            raise ValueError(f"{args.labels}: the labels matched no true vertex (empty labels?); rerun the stage that writes them")
        metrics = evaluate.summarize(all_errors)
        metrics["cities"] = {
            city: evaluate.summarize(np.concatenate(list(tiles.values())))
            for city, tiles in per_city.items()
            if sum(len(e) for e in tiles.values())
        }
        metrics["mask_offset"] = summarize_by_city(label_offsets(args.cities_dir, args.labels, cities=cities))
        taus, curve = evaluate.accuracy_curve(all_errors)
        write_json(args.metrics, metrics)
        write_text(args.curve, "tau,accuracy\n" + "".join(f"{t:.2f},{a:.6f}\n" for t, a in zip(taus, curve, strict=True)))
        run.log_metrics(metrics)
        run.log_artifact(args.curve)
        logger.info(
            "%s: median error %.2f px, AUC %.3f over %d vertices",
            args.name, metrics["median_error_px"], metrics["auc"], metrics["n_vertices"],
        )


if __name__ == "__main__":
    main()
