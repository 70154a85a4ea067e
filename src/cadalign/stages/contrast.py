"""DVC stage: how much each round changed the median vertex error, with a 95% interval.

Reads the per-vertex errors (``errors.csv``) that the evaluate stage wrote for each label
set, in the order ``rounds:`` in params.yaml makes them (``--eval-dir``: round0, round1, ...)
or in the order given (``--errors``), and for every pair of consecutive sets writes
the change of the median error, its interval from a paired cluster bootstrap (the same
buildings drawn for both sets, within each city) and the share of resamples in which the
median fell. Rounds whose interval lies below zero made the labels better beyond what the
choice of buildings explains.

Usage::

    python -m cadalign.stages.contrast --params params.yaml --eval-dir data/eval \
        --metrics data/changes/metrics.json
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from cadalign import evaluate
from cadalign.atomic import write_json
from cadalign.config import load_section
from cadalign.provenance import check_input
from cadalign.settings.rounds import label_sets
from cadalign.stages.common import make_parser, name_path_pairs, setup_logging
from cadalign.tracking import stage_run

logger = logging.getLogger(__name__)


def check_same_vertices(tables: dict[str, evaluate.VertexTable], paths: dict[str, Path]) -> None:
    """Refuse error tables that do not list the same vertices in the same order.

    Raises:
        ValueError: naming the two files.
    """
    names = list(tables)
    first = tables[names[0]]
    for name in names[1:]:
        table = tables[name]
        same = (np.array_equal(getattr(table, column), getattr(first, column))
                for column in ("city", "tile", "building_id", "vertex"))
        if not all(same):
            raise ValueError(
                f"{paths[name]} and {paths[names[0]]} score other vertices (other cities, tiles or truth); "
                "rerun the evaluate stages on the same truth"
            )


def change(before: np.ndarray, after: np.ndarray, mask: np.ndarray, table: evaluate.VertexTable,
           cfg: evaluate.BootstrapConfig) -> dict[str, float]:
    """The change of the median error from ``before`` to ``after`` over the vertices in ``mask``."""
    medians = evaluate.cluster_bootstrap_medians(
        np.stack([before[mask], after[mask]]), table.building_id[mask], table.city[mask], cfg.resamples, cfg.seed
    )
    deltas = medians[:, 1] - medians[:, 0]
    low, high = evaluate.interval(deltas)
    median_before, median_after = float(np.median(before[mask])), float(np.median(after[mask]))
    return {
        "median_before_px": median_before,
        "median_after_px": median_after,
        "median_change_px": median_after - median_before,
        "ci95_low_px": low,
        "ci95_high_px": high,
        "share_fell": float(np.mean(deltas < 0)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("Change of the median vertex error from each label set to the next, with intervals.")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--eval-dir", type=Path, help="folder of the evaluate stages' outputs; rounds from params")
    given.add_argument("--errors", nargs="+", help="NAME=CSV per-vertex errors, in round order")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_section(args.params, "evaluate", evaluate.BootstrapConfig)
    if args.eval_dir is not None:
        _, names = label_sets(args.params)
        paths = {name: args.eval_dir / name / "errors.csv" for name in names}
    else:
        paths = name_path_pairs(args.errors, "--errors")
    if len(paths) < 2:
        raise ValueError(f"--errors names {len(paths)} label set(s); give at least two, e.g. round0=... round1=...")
    for path in paths.values():
        check_input(args.params, path.parent, "per-vertex errors")
    with stage_run("contrast", {"evaluate": dataclasses.asdict(cfg), "label_sets": list(paths)}) as run:
        tables = {name: evaluate.read_vertex_table(path) for name, path in paths.items()}
        check_same_vertices(tables, paths)
        table = next(iter(tables.values()))
        everything = np.ones(len(table.error_px), dtype=bool)
        metrics = {}
        names = list(tables)
        for a, b in zip(names, names[1:]):
            before, after = tables[a].error_px, tables[b].error_px
            entry = change(before, after, everything, table, cfg)
            entry["cities"] = {
                city: change(before, after, table.city == city, table, cfg) for city in sorted(set(table.city))
            }
            metrics[f"{a}_to_{b}"] = entry
            logger.info(
                "%s -> %s: median %+.2f px (95%% interval %+.2f to %+.2f), fell in %.0f%% of resamples",
                a, b, entry["median_change_px"], entry["ci95_low_px"], entry["ci95_high_px"], 100 * entry["share_fell"],
            )
        write_json(args.metrics, metrics)
        run.log_metrics(metrics)


if __name__ == "__main__":
    main()
