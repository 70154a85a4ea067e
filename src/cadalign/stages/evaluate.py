"""DVC stage: score a set of labels against the true polygons, per vertex.

Reads every ``<truth>/<city>/<tile>.gpkg`` of the cities in params.yaml, the labels of the
same name under ``--labels`` and the tile's georeferencing under ``--cities-dir``; writes the
summary metrics (JSON, a DVC metric) and the accuracy curve (CSV with columns
``tau,accuracy``, a DVC plot). Next to the vertex metric, ``mask_offset`` holds the
mask-based residual of each label polygon (best translation within +-32 px against the
tile's building mask), the measure that also works for labels without vertex truth. Each
median comes with a 95% interval from a cluster bootstrap over buildings (the vertices of
one building share its misalignment), and the per-vertex errors are written as CSV for the
``contrast`` stage, which pairs the rounds. Every true building is scored: labels that miss,
add, duplicate or swap building ids, or lie outside their tile, stop the stage with an error
naming the file; ``n_buildings`` and ``n_vertices`` (overall and per city) count what was scored.

Usage::

    python -m cadalign.stages.evaluate --name round0 --cities-dir data/cities \
        --truth data/truth --labels data/labels/round0 \
        --metrics data/eval/round0/metrics.json --curve data/eval/round0/accuracy.csv \
        --errors data/eval/round0/errors.csv
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from cadalign import evaluate
from cadalign.atomic import write_json, write_text
from cadalign.config import load_cities, load_section
from cadalign.geo.labels import label_files
from cadalign.geo.mask_metric import label_offsets, summarize_by_city
from cadalign.geo.polygons import read_polygons, to_pixels
from cadalign.geo.tiles import read_info
from cadalign.provenance import check_input, write_manifest
from cadalign.stages.common import make_parser, setup_logging
from cadalign.tracking import stage_run

logger = logging.getLogger(__name__)


def vertex_table(cities_dir: Path, truth_dir: Path, labels_dir: Path, cities: list[str]) -> evaluate.VertexTable:
    """Per-vertex errors of every tile of the study's cities, in city, tile, truth order.

    Raises:
        FileNotFoundError: if a city has no true polygons or a tile's labels are missing.
        ValueError: naming the file, if a tile's labels do not hold every true building once
            (see :func:`cadalign.evaluate.vertex_errors`).
    """
    parts: dict[str, list[np.ndarray]] = {name: [] for name in evaluate.VertexTable.COLUMNS}
    for truth_path in label_files(truth_dir, cities):
        city, tile = truth_path.parent.name, truth_path.stem
        label_path = labels_dir / city / truth_path.name
        if not label_path.is_file():
            raise FileNotFoundError(
                f"labels missing for tile {tile}: {label_path}; rerun the stage that writes {labels_dir}"
            )
        info = read_info(cities_dir / city / "images" / f"{tile}.tif")
        true_geoms, true_ids = to_pixels(read_polygons(truth_path), info.transform, info.crs)
        geoms, ids = to_pixels(read_polygons(label_path), info.transform, info.crs)
        errors, building_ids, _ = evaluate.vertex_errors(
            true_geoms, true_ids, geoms, ids, where=str(label_path), truth_where=str(truth_path), tile_shape=info.shape
        )
        parts["city"].append(np.full(len(errors), city))
        parts["tile"].append(np.full(len(errors), tile))
        parts["building_id"].append(building_ids)
        parts["vertex"].append(_index_within_runs(building_ids))
        parts["error_px"].append(errors)
    return evaluate.VertexTable(**{name: np.concatenate(arrays) for name, arrays in parts.items()})


def _index_within_runs(ids: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... counting again from 0 wherever ``ids`` changes (a building's vertices)."""
    if len(ids) == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    return np.arange(len(ids)) - np.repeat(starts, np.diff(np.r_[starts, len(ids)]))


def _summary(table: evaluate.VertexTable, mask: np.ndarray, cfg: evaluate.BootstrapConfig) -> dict:
    """The metrics of the vertices in ``mask``, with the 95% interval of their median."""
    medians = evaluate.cluster_bootstrap_medians(
        table.error_px[mask], table.building_id[mask], table.city[mask], cfg.resamples, cfg.seed
    )
    low, high = evaluate.interval(medians[:, 0])
    buildings = {(tile, bid) for tile, bid in zip(table.tile[mask], table.building_id[mask], strict=True)}
    return {
        **evaluate.summarize(table.error_px[mask]), "n_buildings": len(buildings),
        "median_ci95_low_px": low, "median_ci95_high_px": high,
    }


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("Score labels against the true polygons (per-vertex error, accuracy curve).")
    parser.add_argument("--name", required=True, help="name of the labels in metrics and MLflow, e.g. round0")
    parser.add_argument("--cities-dir", type=Path, required=True)
    parser.add_argument("--truth", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--curve", type=Path, required=True)
    parser.add_argument("--errors", type=Path, required=True, help="per-vertex errors (CSV), for the contrast stage")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_section(args.params, "evaluate", evaluate.BootstrapConfig)
    params = {"labels": str(args.labels), "name": args.name, "evaluate": dataclasses.asdict(cfg)}
    with stage_run(f"evaluate@{args.name}", params) as run:
        cities = sorted(load_cities(args.params))
        recorded = check_input(args.params, args.labels, "labels", cities)
        table = vertex_table(args.cities_dir, args.truth, args.labels, cities)
        if len(table.error_px) == 0:
            raise ValueError(f"{args.labels}: the labels matched no true vertex (empty labels?); rerun the stage that writes them")
        everything = np.ones(len(table.error_px), dtype=bool)
        metrics = _summary(table, everything, cfg)
        in_city = {city: table.city == city for city in cities}
        metrics["cities"] = {city: _summary(table, mask, cfg) for city, mask in in_city.items() if mask.any()}
        metrics["mask_offset"] = summarize_by_city(label_offsets(args.cities_dir, args.labels, cities=cities))
        taus, curve = evaluate.accuracy_curve(table.error_px)
        write_json(args.metrics, metrics)
        write_text(args.curve, "tau,accuracy\n" + "".join(f"{t:.2f},{a:.6f}\n" for t, a in zip(taus, curve, strict=True)))
        write_text(args.errors, table.to_csv())
        write_manifest(args.errors.parent, args.params, "evaluate", args.name, [recorded], cities=cities)
        run.log_metrics(metrics)
        run.log_artifact(args.curve)
        logger.info(
            "%s: median error %.2f px (95%% interval %.2f-%.2f), AUC %.3f over %d vertices",
            args.name, metrics["median_error_px"], metrics["median_ci95_low_px"], metrics["median_ci95_high_px"],
            metrics["auc"], metrics["n_vertices"],
        )


if __name__ == "__main__":
    main()
