"""DVC stage of the toy pipeline: the sinusoid check of the neighbour-count estimators.

Reads section ``toy`` of ``--params`` (:class:`cadalign.similarity.toy.ToyConfig`), runs
:func:`cadalign.similarity.toy.run_toy` and writes:

- ``--out-dir/metrics.json``: medians per frequency of every estimator, log-log slopes for
  ``f >= 2``, monotonicity flags, final training losses, run time;
- ``--out-dir/per_sample.npz``: ``alpha``, ``frequencies``, ``final_loss`` and, per
  estimator, the ``(n_frequencies, n)`` per-sample medians over runs;
- ``--plots-dir/counts.csv``: one row per frequency, one column per estimator (for
  ``dvc plots``);
- ``--plots-dir/counts.png``: log-log chart of every estimator against ``f``, with a
  ``1/f`` guide.

Usage (from ``pipelines/toy``)::

    python -m cadalign.stages.estimate_density --params params.yaml \\
        --out-dir outputs --plots-dir outputs/plots
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from cadalign.atomic import atomic_path, write_json
from cadalign.config import load_section
from cadalign.similarity.toy import ToyConfig, ToyResult, frequency_label, run_toy, summarize
from cadalign.stages.common import make_parser, setup_logging
from cadalign.tracking import stage_run

logger = logging.getLogger(__name__)


def write_counts_csv(path: Path, cfg: ToyConfig, medians: dict[str, dict[str, float]]) -> None:
    """Write the per-frequency medians as CSV (columns ``f`` and one per estimator), atomically.

    Args:
        path: Destination file.
        cfg: Settings (for the frequencies).
        medians: Estimator -> {frequency label: median}.
    """
    names = list(medians)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["f", *names])
        for freq in sorted(cfg.frequencies):
            label = frequency_label(freq)
            writer.writerow([f"{freq:g}", *(f"{medians[name][label]:.4f}" for name in names)])


def plot_counts(path: Path, cfg: ToyConfig, medians: dict[str, dict[str, float]], n: int) -> None:
    """Log-log chart of every estimator's median count against the frequency, atomically.

    Args:
        path: Destination PNG.
        cfg: Settings (frequencies).
        medians: Estimator -> {frequency label: median}.
        n: Number of samples (for the ``n / f`` guide).
    """
    freqs = np.array(sorted(cfg.frequencies))
    fig = Figure(figsize=(6.4, 4.8))  # no pyplot: no global backend state
    ax = fig.subplots()
    for name, values in medians.items():
        ys = [values[frequency_label(f)] for f in freqs]
        ax.plot(freqs, ys, marker="o", lw=2.5 if name == "N_S" else 1.2, label=name)
    ax.plot(freqs, n / freqs, "k--", lw=1, label="n / f")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("frequency f")
    ax.set_ylabel("median neighbour count")
    ax.set_title(f"Neighbour-count estimators, sinusoid toy (n = {n}, {cfg.n_runs} runs)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def write_outputs(cfg: ToyConfig, result: ToyResult, out_dir: Path, plots_dir: Path) -> dict[str, Any]:
    """Write metrics, per-sample arrays, the CSV and the PNG; return the metrics.

    Args:
        cfg: Settings used.
        result: Output of :func:`run_toy`.
        out_dir: Folder of ``metrics.json`` and ``per_sample.npz``.
        plots_dir: Folder of ``counts.csv`` and ``counts.png``.

    Returns:
        The metrics dict written to ``metrics.json``.
    """
    metrics = summarize(cfg, result)
    write_json(out_dir / "metrics.json", metrics)
    with atomic_path(out_dir / "per_sample.npz") as tmp, tmp.open("wb") as fh:
        np.savez_compressed(
            fh,
            alpha=result.alpha,
            frequencies=np.asarray(cfg.frequencies),
            final_loss=result.final_loss,
            **result.per_sample,
        )
    medians = metrics["median"]
    write_counts_csv(plots_dir / "counts.csv", cfg, medians)
    plot_counts(plots_dir / "counts.png", cfg, medians, cfg.n_samples)
    return metrics


def main(argv: list[str] | None = None) -> None:
    """Run the toy stage (see the module docstring).

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).
    """
    parser = make_parser("Sinusoid check of the gradient-similarity neighbour-count estimators.")
    parser.add_argument(
        "--out-dir", type=Path, required=True, help="folder of metrics.json and per_sample.npz"
    )
    parser.add_argument("--plots-dir", type=Path, required=True, help="folder of counts.csv and counts.png")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default %(default)s: the tiny MLP runs fastest on one)",
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    setup_logging()
    cfg = load_section(args.params, "toy", ToyConfig)
    torch.set_num_threads(args.threads)
    with stage_run("estimate_density", {"toy": dataclasses.asdict(cfg)}, study="toy") as run:
        result = run_toy(cfg)
        metrics = write_outputs(cfg, result, args.out_dir, args.plots_dir)
        run.log_metrics(metrics)
        run.log_figure(args.plots_dir / "counts.png")
        run.log_artifact(args.out_dir / "metrics.json")
        run.log_artifact(args.plots_dir / "counts.csv")
    logger.info(
        "toy done in %.0f s: N_S slope (f >= 2) %.3f, all estimators decreasing: %s",
        result.seconds,
        metrics["slope"]["N_S"],
        bool(metrics["all_decreasing"]),
    )


if __name__ == "__main__":
    main()
