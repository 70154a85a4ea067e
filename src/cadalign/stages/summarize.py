"""DVC stage: the study's headline, one small metrics file per label set, mirrored to MLflow.

For each label set of the study, in the order ``rounds:`` in params.yaml makes them (the noisy
input first), writes ``<out>/<name>.json`` with the headline numbers: the median vertex error
and its 95% interval, the AUC of the accuracy curve, the fractions within 2, 4 and 8 px (from
the evaluate stage) and the median neighbour count N_S of the round's network (from the
analyze stage; the input labels have none). These files are the study's DVC metrics, so
``dvc metrics show`` prints one short row per label set; the per-city and per-estimator
details stay in the evaluate and analyze outputs.

The same numbers go to the MLflow study run as series with step = the label set's position
(0 for the input), so the UI charts the median error by round, and the figures are attached to
the study run as artifacts.

Usage::

    python -m cadalign.stages.summarize --params params.yaml --eval-dir data/eval \
        --similarity-dir data/similarity --figures data/figures data/compare \
        --out data/metrics
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cadalign.atomic import write_json
from cadalign.provenance import check_input
from cadalign.settings.rounds import label_sets
from cadalign.stages.common import make_parser, setup_logging
from cadalign.tracking import StageRun, stage_run

logger = logging.getLogger(__name__)

# headline key -> (source, key in that source's metrics.json)
# Short keys, so that `dvc metrics show` prints a row per label set in 120 columns:
# median_px and its 95% interval ci_low / ci_high (px), frac_<t>px = fraction of vertices within t px.
HEADLINE = {
    "median_px": ("eval", "median_error_px"),
    "ci_low": ("eval", "median_ci95_low_px"),
    "ci_high": ("eval", "median_ci95_high_px"),
    "auc": ("eval", "auc"),
    "frac_2px": ("eval", "frac_within_2px"),
    "frac_4px": ("eval", "frac_within_4px"),
    "frac_8px": ("eval", "frac_within_8px"),
    "median_ns": ("similarity", "N_S_median"),
}
STAGE_OF = {"eval": "evaluate", "similarity": "analyze"}


def _read(path: Path, stage: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `dvc repro {stage}` first")
    return json.loads(path.read_text())


def headline(name: str, dirs: dict[str, Path], has_network: bool) -> dict[str, float]:
    """The headline numbers of label set ``name`` from the metrics files under ``dirs``.

    Raises:
        FileNotFoundError: naming the metrics file and the stage that writes it.
        KeyError: naming the file and the key, when a metrics file lacks a headline key.
    """
    sources = {"eval": _read(dirs["eval"] / name / "metrics.json", f"evaluate@{name}")}
    if has_network:
        sources["similarity"] = _read(dirs["similarity"] / name / "metrics.json", f"analyze@{name}")
    out = {}
    for key, (source, field) in HEADLINE.items():
        if source not in sources:
            continue
        if field not in sources[source]:
            path = dirs[source] / name / "metrics.json"
            raise KeyError(f"{path} has no '{field}'; it was written by another version: rerun {STAGE_OF[source]}@{name}")
        out[key] = float(sources[source][field])
    return out


def mirror(study: StageRun | None, rows: dict[str, dict[str, float]], figures: list[Path]) -> None:
    """Log the headline to the study run with step = position, skipping values already there
    (a rerun with the same numbers adds no duplicate point), and attach the figures."""
    if study is None or study.run_id is None:
        return
    last: dict[tuple[str, int], float] = {}  # (key, step) -> the value logged last; one history read per key
    for key in dict.fromkeys(k for values in rows.values() for k in values):
        for m in study.client.get_metric_history(study.run_id, key):
            last[(key, m.step)] = m.value
    for step, values in enumerate(rows.values()):
        fresh = {key: value for key, value in values.items() if last.get((key, step)) != value}
        study.log_metrics(fresh, step=step)
    for path in figures:
        for png in sorted(path.glob("*.png")) if path.is_dir() else [path]:
            study.log_figure(png)


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("Headline metrics of every label set of the study, one small file each.")
    parser.add_argument("--eval-dir", type=Path, required=True, help="folder of the evaluate stages' outputs")
    parser.add_argument("--similarity-dir", type=Path, required=True, help="folder of the analyze stages' outputs")
    parser.add_argument("--figures", type=Path, nargs="*", default=[], help="figures (or folders of PNGs) to attach")
    parser.add_argument("--out", type=Path, required=True, help="folder of the headline files (<label set>.json)")
    args = parser.parse_args(argv)
    setup_logging()
    rounds, names = label_sets(args.params)
    dirs = {"eval": args.eval_dir, "similarity": args.similarity_dir}
    for name in names:
        check_input(args.params, args.eval_dir / name, "evaluation")
        if name in rounds:
            check_input(args.params, args.similarity_dir / name, "similarity analysis")
    with stage_run("summarize", {"rounds": rounds}) as run:
        rows = {name: headline(name, dirs, has_network=name in rounds) for name in names}
        stale = sorted(p.stem for p in args.out.glob("*.json") if p.stem not in rows) if args.out.is_dir() else []
        for name in stale:  # a label set dropped from `rounds` must not linger as a metric
            (args.out / f"{name}.json").unlink()
            logger.info("removed %s: %s is no longer a label set of the study", args.out / f"{name}.json", name)
        for name, row in rows.items():
            write_json(args.out / f"{name}.json", row)
            logger.info("%s: median %.2f px (%.2f-%.2f), AUC %.3f", name, row["median_px"], row["ci_low"],
                        row["ci_high"], row["auc"])
        run.log_metrics({f"{name}.{k}": v for name, row in rows.items() for k, v in row.items()})
        mirror(run.study, rows, args.figures)


if __name__ == "__main__":
    main()
