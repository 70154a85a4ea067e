"""DVC stage ``similarity-compare``: the per-round similarity statistics side by side.

Reads the folders written by :mod:`cadalign.stages.analyze` for every round (they must hold
the same patches and queries, which is checked) and writes one chart per statistic with all
rounds overlaid, plus a summary table:

- ``ns_distribution.png``: the N_S distribution of each round (ECDF and histogram on shared
  bins); the paper's finding is that round 2's patches are closer to all others (larger
  N_S) than rounds 1 and 3;
- ``query_hist.png``: small multiples, one panel per query (the first ``--queries``), the
  k^C histogram of that query to all other patches for each round;
- ``summary.csv`` (one row per round: the median N_S with its bootstrap interval, the
  explanation test's headline, ...);
- ``changes.csv``: the change of the median N_S between consecutive rounds, with a paired
  95% bootstrap interval (the same resampled patches in both rounds; resamples and seed
  from the rounds' metrics.json, which must agree);
- ``metrics.json``: ``{round: {statistic: value}, "changes": {"<a>_to_<b>": {...}}}``.

Usage::

    python -m cadalign.stages.compare --params params.yaml --similarity-dir data/similarity --out data/compare

(``--rounds round1=DIR round2=DIR ...`` names the rounds one by one instead of ``rounds:``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from cadalign.atomic import atomic_path, write_json
from cadalign.plots import ROUND_COLOURS, save_figure
from cadalign.similarity.explain import paired_median_change
from cadalign.provenance import check_input
from cadalign.settings.rounds import label_sets
from cadalign.stages.common import setup_logging
from cadalign.tracking import stage_run

logger = logging.getLogger(__name__)

# Columns of summary.csv (keys of each round's metrics.json); missing ones are left empty.
SUMMARY_KEYS = (
    "n_patches",
    "N_S_mean",
    "N_S_median",
    "N_S_median_lo",
    "N_S_median_hi",
    "N_S_q10",
    "N_S_q90",
    "N_S_fraction_median",
    "N_tau_0.9_mean",
    "knn_mean_kc",
    "knn_frac_above",
    "query_frac_above",
    "n_zero_gradient",
    "explain_spearman",
    "explain_slope",
    "wall_seconds",
    "peak_memory_bytes",
)
# Round colours: ROUND_COLOURS[0] (red) is the input labels' colour in the other figures.
_FIRST_ROUND_COLOUR = 1


@dataclass(frozen=True, eq=False)
class RoundStats:
    """One round's analysis, as read back from its folder.

    Attributes:
        patches: ``(city, tile, x0, y0)`` of every patch, in patch order.
        n_s: ``(n,)`` N_S per patch.
        queries: ``(q,)`` query patch indices, sorted.
        hist: ``(q, bins)`` k^C histograms of the queries over equal bins of [0, 1].
        metrics: The round's metrics.json.
    """

    patches: list[tuple[str, str, int, int]]
    n_s: np.ndarray
    queries: np.ndarray
    hist: np.ndarray
    metrics: dict[str, Any]


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run the similarity stage of that round first")
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def load_round(folder: Path) -> RoundStats:
    """Read one round's analysis folder.

    Args:
        folder: Output folder of :mod:`cadalign.stages.analyze`.

    Returns:
        :class:`RoundStats`.

    Raises:
        FileNotFoundError: if a file is missing.
    """
    counts = _read_csv(folder / "counts.csv")
    hist_rows = _read_csv(folder / "query_hist.csv")
    metrics_path = folder / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} is missing; run the similarity stage of that round first")
    queries = sorted({int(r["query"]) for r in hist_rows})
    bins = 1 + max((int(r["bin"]) for r in hist_rows), default=-1)
    hist = np.zeros((len(queries), bins), dtype=np.int64)
    row_of = {q: i for i, q in enumerate(queries)}
    for r in hist_rows:
        hist[row_of[int(r["query"])], int(r["bin"])] = int(r["count"])
    return RoundStats(
        patches=[(r["city"], r["tile"], int(r["x0"]), int(r["y0"])) for r in counts],
        n_s=np.array([float(r["N_S"]) for r in counts]),
        queries=np.array(queries, dtype=np.int64),
        hist=hist,
        metrics=json.loads(metrics_path.read_text()),
    )


def check_same_patches(rounds: Mapping[str, RoundStats]) -> None:
    """Raise unless every round analysed the same patches and queries.

    Args:
        rounds: Round name -> its statistics, in display order.

    Raises:
        ValueError: naming the first round that differs from the first one.
    """
    names = list(rounds)
    first = rounds[names[0]]
    for name in names[1:]:
        if rounds[name].patches != first.patches:
            raise ValueError(
                f"{name} analysed other patches than {names[0]}; rerun every similarity stage with the same "
                "similarity and train settings"
            )
        if not np.array_equal(rounds[name].queries, first.queries):
            raise ValueError(
                f"{name} has other query patches than {names[0]}; rerun with the same similarity.seed"
            )


def _colour(i: int) -> str:
    return ROUND_COLOURS[(_FIRST_ROUND_COLOUR + i) % len(ROUND_COLOURS)]


def ns_distribution_figure(n_s: Mapping[str, np.ndarray], n_patches: int) -> plt.Figure:
    """ECDF (left) and histogram on shared bins (right) of N_S, one line per round.

    Args:
        n_s: Round name -> ``(n,)`` N_S values.
        n_patches: Size of the patch set (upper end of N_S).

    Returns:
        The figure (each axis has one line or step per round).
    """
    fig, (ax_cdf, ax_hist) = plt.subplots(1, 2, figsize=(11, 4))
    values = np.concatenate([np.asarray(v, dtype=float) for v in n_s.values()])
    edges = np.histogram_bin_edges(values, bins=20)
    for i, (name, v) in enumerate(n_s.items()):
        v = np.sort(np.asarray(v, dtype=float))
        ecdf = np.arange(1, v.size + 1) / v.size
        ax_cdf.plot(v, ecdf, drawstyle="steps-post", color=_colour(i), label=name)
        counts, _ = np.histogram(v, bins=edges)
        ax_hist.stairs(counts, edges, color=_colour(i), label=name, linewidth=1.5)
    ax_cdf.set_xlabel(f"soft neighbour count N_S (of {n_patches} patches, self included)")
    ax_cdf.set_ylabel("fraction of patches with N_S <= x")
    ax_hist.set_xlabel("N_S")
    ax_hist.set_ylabel("patches")
    for ax in (ax_cdf, ax_hist):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("N_S per round (same patches)")
    return fig


def query_hist_figure(hists: Mapping[str, np.ndarray], queries: Sequence[int], n_panels: int) -> plt.Figure:
    """Small multiples: per query, its k^C histogram (to all other patches) for each round.

    Args:
        hists: Round name -> ``(q, bins)`` histograms over equal bins of [0, 1].
        queries: The ``q`` query patch indices.
        n_panels: Largest number of queries shown (the first ones).

    Returns:
        The figure, one axis per query with one step per round.
    """
    shown = min(n_panels, len(queries))
    cols = min(3, max(shown, 1))
    rows = max(1, math.ceil(shown / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for j, ax in enumerate(axes.ravel()):
        if j >= shown:
            ax.set_axis_off()
            continue
        for i, (name, hist) in enumerate(hists.items()):
            edges = np.linspace(0.0, 1.0, hist.shape[1] + 1)
            ax.stairs(hist[j], edges, color=_colour(i), label=name)
        ax.set_title(f"query patch {queries[j]}", fontsize=9)
        ax.set_xlabel("k^C to the other patches")
        ax.set_ylabel("patches")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        if j == 0:
            ax.legend(fontsize=8)
    fig.suptitle("k^C histogram of the same queries per round")
    fig.tight_layout()
    return fig


def summary_rows(rounds: Mapping[str, RoundStats]) -> list[list[object]]:
    """The rows of summary.csv.

    Args:
        rounds: Round name -> its statistics.

    Returns:
        One row per round: the round name then :data:`SUMMARY_KEYS` (empty where absent).
    """
    return [[name] + [data.metrics.get(key, "") for key in SUMMARY_KEYS] for name, data in rounds.items()]


CHANGE_COLUMNS = ("from", "to", "N_S_median_from", "N_S_median_to", "change", "change_lo", "change_hi")


def median_changes(rounds: Mapping[str, RoundStats]) -> dict[str, dict[str, float]]:
    """Change of the median N_S from each round to the next, with its paired bootstrap interval.

    Args:
        rounds: Round name -> its statistics (same patches), in order.

    Returns:
        ``{"<a>_to_<b>": {"change", "change_lo", "change_hi"}}`` for consecutive rounds.

    Raises:
        ValueError: if the rounds' bootstrap settings are missing or differ.
    """
    settings = {
        name: (r.metrics.get("bootstrap_resamples"), r.metrics.get("bootstrap_seed")) for name, r in rounds.items()
    }
    if any(None in v for v in settings.values()) or len(set(settings.values())) > 1:
        raise ValueError(
            f"bootstrap settings (resamples, seed) per round: {settings}; rerun every analyze stage with the same "
            "similarity.resamples and similarity.seed"
        )
    resamples, seed = (int(v) for v in next(iter(settings.values())))
    names = list(rounds)
    out = {}
    for a, b in zip(names, names[1:]):
        change, low, high = paired_median_change(rounds[a].n_s, rounds[b].n_s, resamples, seed)
        out[f"{a}_to_{b}"] = {"change": change, "change_lo": low, "change_hi": high}
    return out


def _round_arg(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=FOLDER, got {text!r}")
    return name, Path(folder)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Overlay the similarity statistics of all rounds.")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--rounds", type=_round_arg, nargs="+", help="NAME=FOLDER per round")
    given.add_argument(
        "--similarity-dir", type=Path, help="folder of the analyze stages' outputs; the rounds of --params"
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="with --similarity-dir (rounds)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--queries", type=int, default=6, help="queries in the small multiples (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    setup_logging()
    if args.queries < 1:
        parser.error(f"--queries must be >= 1, got {args.queries}")
    if args.similarity_dir is not None:  # every round of the study, in the order it is made
        study, made = label_sets(args.params)
        args.rounds = [(name, args.similarity_dir / name) for name in made if name in study]
    names = [name for name, _ in args.rounds]
    if len(set(names)) != len(names):
        parser.error(f"round names repeat: {names}")
    for _, folder in args.rounds if args.similarity_dir is not None else ():  # --params names the study
        check_input(args.params, folder, "similarity analysis")
    rounds = {name: load_round(folder) for name, folder in args.rounds}
    check_same_patches(rounds)
    first = rounds[names[0]]
    n_patches = len(first.patches)
    run_params = {"rounds": {n: str(f) for n, f in args.rounds}, "queries": args.queries}
    with stage_run("compare", run_params) as run:
        with atomic_path(args.out) as tmp:
            tmp.mkdir()
            fig = ns_distribution_figure({n: r.n_s for n, r in rounds.items()}, n_patches)
            save_figure(fig, tmp / "ns_distribution.png")
            hists = {n: r.hist for n, r in rounds.items()}
            fig = query_hist_figure(hists, first.queries.tolist(), args.queries)
            save_figure(fig, tmp / "query_hist.png")
            with (tmp / "summary.csv").open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["round", *SUMMARY_KEYS])
                writer.writerows(summary_rows(rounds))
            changes = median_changes(rounds)
            with (tmp / "changes.csv").open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(CHANGE_COLUMNS)
                for key, c in changes.items():
                    a, b = key.split("_to_")
                    medians = [float(np.median(rounds[x].n_s)) for x in (a, b)]
                    writer.writerow([a, b, *medians, c["change"], c["change_lo"], c["change_hi"]])
            summary: dict[str, Any] = {
                n: {k: r.metrics[k] for k in SUMMARY_KEYS if k in r.metrics} for n, r in rounds.items()
            }
            summary["changes"] = changes
            write_json(tmp / "metrics.json", summary)
        run.log_metrics(summary)
        for name in ("ns_distribution.png", "query_hist.png"):
            run.log_figure(args.out / name)
        for name in ("summary.csv", "changes.csv", "metrics.json"):
            run.log_artifact(args.out / name)
    medians = ", ".join(f"{n} {r.metrics.get('N_S_median', math.nan):.2f}" for n, r in rounds.items())
    logger.info("median N_S per round: %s (of %d patches)", medians, n_patches)


if __name__ == "__main__":
    main()
