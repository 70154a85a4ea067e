"""DVC stage ``similarity@round``: gradient-similarity analysis of one round's network.

The SAME patches for every round: on each tile downsampled by ``ds``, a grid of
network-input windows whose OUTPUT regions tile the tile without overlap (``grid: output``:
neighbouring inputs share context, never an output pixel, so no patch is a near-duplicate of
another; ``grid: input``: the reference's non-overlapping inputs), those whose output region
holds a TRUE vertex (``keep: vertex``, as training patches) or a whole true polygon
(``keep: polygon``), capped per tile and in all by seeded draws (see
:mod:`cadalign.similarity.windows`); tiles without a kept window are skipped and counted. Each patch is the image window (scaled to [-1, 1] as in
training) and the raster of the ROUND's input labels (the labels it trained on), all
polygons kept. The round's ``ds`` network gives per-sample gradients of ``disp[0]``
(``d = 2``, the sum over the output map or the centre pixel: ``similarity.output``).

Writes, in ``--out``: ``counts.csv`` (one row per patch: index, city, tile, window corner in
downsampled px, N_S and the other counts, those of the rotation-invariant k^{C,rot} (``*_rot*``),
zero-gradient flag, query flag), ``neighbours.csv``
(query, rank, neighbour, k^C), ``query_hist.csv`` (query, bin, bin edges, count; k^C of each
query to all other patches over 100 bins of [0, 1]), ``metrics.json`` (summary, wall time,
peak memory, ``n_zero_gradient``: patches whose output does not depend on the parameters, so
their k^C to every other patch is 0; also logged by name), ``ns_hist.png`` (10-bin N_S histogram with an example patch per bin) and
``neighbours.png`` (each query and its k nearest patches, k^C under each).

Baselines: the same counts under the cosine similarity of (a) the raw inputs (image and
polygon raster, flattened) and (b) the last decoder level's features, pooled as the output
(``raw_*``, ``feat_*`` columns of counts.csv; the cosine is ``k^C`` of a one-output vector, 1
on the diagonal, so the counts mean the same). With ``--labels-after`` (the round's realigned
labels) the explanation test (:mod:`cadalign.similarity.explain`): per patch, the vertices
whose INPUT-label position lies in its output window and their median error against the
truth before and after the round (counts.csv ``n_vertices``, ``error_before_px``,
``error_after_px``); ``explanation.csv`` (per method: Spearman and log-log slope of after /
before against N_S with bootstrap intervals), ``explanation.png``; metrics.json adds
``explain_spearman``, ``explain_slope`` and the bootstrap interval of the median N_S
(``N_S_median_lo``/``_hi``).

Usage::

    python -m cadalign.stages.analyze --params params.yaml --round round1 --cities-dir data/cities \
        --truth data/truth --labels data/labels/round0 --models data/models/round1 \
        --out data/similarity/round1
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib.pyplot as plt
import numpy as np
import shapely
import torch
from matplotlib.colors import ListedColormap

from cadalign.atomic import atomic_path, write_json
from cadalign.evaluate import vertex_errors
from cadalign.config import load_cities, load_section
from cadalign.geo.labels import LabelledTile, load_labelled_tiles
from cadalign.model import AlignNet
from cadalign.plots import save_figure
from cadalign.provenance import check_input, write_manifest
from cadalign.raster import EDGE, downsample_image, rasterize_polygons, scale_geoms
from cadalign.similarity import analysis, explain
from cadalign.similarity.windows import cap_patches, tile_windows, vertices_per_window
from cadalign.similarity.density import count_keys
from cadalign.similarity.grads import alignment_output_fn
from cadalign.stages.common import add_threads_option, make_parser, resolve_device, set_threads, setup_logging
from cadalign.settings.train import TrainStageConfig
from cadalign.tracking import stage_run
from cadalign.train import load_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimilarityConfig:
    """The ``similarity`` section of params.yaml."""

    # Downsampling factor of the analysed network; None = the coarsest factor every round
    # trains (train.factors, train.round_factors); the reference analysed ds 4 of 8, 4, 2, 1.
    ds: int | None = None
    # Input window side (px at ds), rounded to the nearest valid network input (reference 124).
    patch_size: int = 124
    # Step of the window grid: "output" = the output side O (output regions tile the tile, no
    # output pixel in two patches; inputs share context), "input" = the input side (reference).
    grid: Literal["output", "input"] = "output"
    # Windows kept: "vertex" = a true vertex in the output region (as training patches),
    # "polygon" = a whole true polygon inside it (reference).
    keep: Literal["vertex", "polygon"] = "vertex"
    patches_per_tile: int | None = None  # None: every kept window (reference 10)
    max_patches: int | None = 2000  # cap on the whole set (seeded draw); None: no cap
    n_queries: int = 20  # the paper shows 20 queries
    seed: int = 0  # fixes the per-tile choice and the queries: the same for every round
    output: Literal["sum", "center"] = "sum"  # disp[0] summed over the output map, or its centre pixel
    k: int = 10  # nearest neighbours per query
    hist_bins: int = 100  # bins of a query's k^C histogram on [0, 1]
    ns_bins: int = 10  # bins of the N_S histogram (one example patch each)
    taus: tuple[float, ...] = (0.5, 0.9)  # thresholds of the hard counts N_tau
    alphas: tuple[float, ...] = (1.0, 2.0)  # exponents of N_alpha+
    chunk_size: int = 16  # patches per batched gradient pass (bounds memory)
    method: Literal["auto", "hooks", "vmap"] = "auto"  # per-sample gradient implementation
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present, else CPU
    # Keep all gradients in memory when they fit (n x p x 2 x 4 bytes; the reference's 7 M
    # parameters take 57 MB per patch); beyond it every pass recomputes them.
    cache_gb: float = 4.0
    resamples: int = 1000  # bootstrap resamples of the intervals (patches drawn with replacement)

    def validate(self) -> None:
        """Check ranges.

        Raises:
            ValueError: naming the offending key.
        """
        positive = ("patch_size", "n_queries", "k", "hist_bins", "ns_bins", "chunk_size", "resamples")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("patches_per_tile", "max_patches"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1 or null")
        if self.ds is not None and self.ds < 1:
            raise ValueError(f"ds={self.ds} must be >= 1 or null (the coarsest factor every round trains)")
        if any(a <= 0 for a in self.alphas):
            raise ValueError(f"alphas={list(self.alphas)} must be > 0")
        count_keys(self.taus, self.alphas)  # repeated levels would add into one column
        if self.cache_gb < 0:
            raise ValueError(f"cache_gb={self.cache_gb} must be >= 0")


@dataclass(frozen=True, eq=False)
class PatchSet:
    """The analysed patches.

    Attributes:
        images: ``(n, S, S, 3)`` uint8 image windows (for figures).
        polys: ``(n, 3, S, S)`` float32 fill/edge/vertex rasters of the input labels.
        cities, tiles: ``(n,)`` city and tile names.
        corners: ``(n, 2)`` int64 window corners ``(x0, y0)`` in downsampled px.
        size: Window side ``S``; margin: ``(S - O) / 2``.
        skipped: ``city/tile`` of the tiles without a kept window.
    """

    images: np.ndarray
    polys: np.ndarray
    cities: np.ndarray
    tiles: np.ndarray
    corners: np.ndarray
    size: int
    margin: int
    skipped: tuple[str, ...] = ()

    def network_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image, polys)`` float32 tensors; the image scaled to [-1, 1] as in training."""
        image = torch.from_numpy(self.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return image.contiguous(), torch.from_numpy(self.polys)


def build_patch_set(
    truth: Sequence[LabelledTile],
    labels: Sequence[LabelledTile],
    ds: int,
    size: int,
    margin: int,
    cfg: SimilarityConfig,
    edge_width: float,
) -> PatchSet:
    """Cut the patch set: windows chosen from the truth, rasters burned from the round's labels.

    Tiles without a kept window are skipped (logged, listed in ``PatchSet.skipped``); above
    ``cfg.max_patches`` a seeded draw keeps that many.

    Args:
        truth: Tiles with the true polygons.
        labels: The same tiles with the round's input labels.
        ds: Downsampling factor.
        size: Window side.
        margin: ``(size - output) / 2``.
        cfg: The similarity settings (grid, keep, caps, seed).
        edge_width: Edge band width of the raster (px at ``ds``; as in training).

    Returns:
        :class:`PatchSet`, tiles in ``truth`` order, windows in grid order.

    Raises:
        FileNotFoundError: if a tile of the truth has no labels.
        ValueError: if no window qualifies.
    """
    by_name = {(t.city, t.name): t for t in labels}
    windows = {
        (t.city, t.name): tile_windows(
            t.tile.image.shape[:2], t.geoms, ds, size, margin, grid=cfg.grid, keep=cfg.keep,
            per_tile=cfg.patches_per_tile, seed=cfg.seed, name=f"{t.city}/{t.name}",
        )
        for t in truth
    }
    skipped = tuple(f"{city}/{name}" for (city, name), w in windows.items() if not len(w))
    if skipped:
        logger.warning("%d tiles have no window with a true %s in its output region: %s", len(skipped), cfg.keep, ", ".join(skipped))
    flat = [(t, tuple(c)) for t in truth for c in windows[(t.city, t.name)]]
    if not flat:
        raise ValueError(
            f"no {size} px window at ds {ds} has a true {cfg.keep} inside its output region; lower "
            "similarity.patch_size or similarity.ds, or set similarity.keep: vertex"
        )
    kept = cap_patches(len(flat), cfg.max_patches, cfg.seed)
    if len(kept) < len(flat):
        logger.info("similarity.max_patches=%d: %d of %d windows analysed", cfg.max_patches, len(kept), len(flat))
    images, polys, cities, tiles, corners = [], [], [], [], []
    cut: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    for i in kept:
        t, (x0, y0) = flat[i]
        if (t.city, t.name) not in by_name:
            raise FileNotFoundError(f"tile {t.city}/{t.name} has true polygons but no labels of the round")
        if (t.city, t.name) not in cut:
            image, (sx, sy) = downsample_image(t.tile.image, ds)
            cut = {(t.city, t.name): (image, scale_geoms(by_name[(t.city, t.name)].geoms, sx, sy))}
        image, geoms = cut[(t.city, t.name)]
        images.append(image[y0 : y0 + size, x0 : x0 + size])
        polys.append(rasterize_polygons(geoms, (size, size), offset=(float(x0), float(y0)), edge_width=edge_width))
        cities.append(t.city)
        tiles.append(t.name)
        corners.append((x0, y0))
    return PatchSet(
        images=np.stack(images),
        polys=np.stack(polys).astype(np.float32),
        cities=np.array(cities),
        tiles=np.array(tiles),
        corners=np.array(corners, dtype=np.int64).reshape(-1, 2),
        size=size,
        margin=margin,
        skipped=skipped,
    )


@dataclass(frozen=True, eq=False)
class Gains:
    """Per patch: vertices in its output window and their median error before and after the round.

    Attributes:
        count: ``(n,)`` vertices whose position in the round's INPUT labels lies in the
            patch's output window (the vertices that window's output moves).
        before, after: ``(n,)`` median distance to the true vertex (full-resolution px) in the
            input and the output labels; NaN without vertex.
    """

    count: np.ndarray
    before: np.ndarray
    after: np.ndarray


def _label_vertices(truth: LabelledTile, labels: LabelledTile, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of ``labels`` in the truth's building and vertex order, and their errors (full-res px)."""
    errors, _, _ = vertex_errors(truth.geoms, truth.ids, labels.geoms, labels.ids, where)
    row = {int(b): i for i, b in enumerate(labels.ids)}
    present = [row[int(b)] for b in truth.ids if int(b) in row]
    return shapely.get_coordinates(labels.geoms[present]), errors


def patch_gains(
    truth: Sequence[LabelledTile],
    before: Sequence[LabelledTile],
    after: Sequence[LabelledTile],
    patches: PatchSet,
    ds: int,
    where: tuple[Path, Path],
) -> Gains:
    """The realignment gain of every patch's vertices (see :class:`Gains`).

    Args:
        truth: Tiles with the true polygons.
        before: The round's input labels.
        after: The round's output labels (the same buildings).
        patches: The patch set (corners at ``ds``).
        ds: Downsampling factor of the corners.
        where: The two label folders (for messages).

    Returns:
        :class:`Gains`.

    Raises:
        ValueError: if the two label sets hold other buildings, or no patch has a vertex in
            its output window (naming the tiles and the settings to change).
    """
    n = len(patches.corners)
    gains = Gains(np.zeros(n, dtype=np.int64), np.full(n, np.nan), np.full(n, np.nan))
    sets = [{(t.city, t.name): t for t in labels} for labels in (before, after)]
    for t in truth:
        rows = np.flatnonzero((patches.cities == t.city) & (patches.tiles == t.name))
        if not rows.size:
            continue
        tiles = [s.get((t.city, t.name)) for s in sets]
        for tile, folder in zip(tiles, where, strict=True):
            if tile is None:
                raise FileNotFoundError(f"{folder}/{t.city}/{t.name}.gpkg is missing; run the stage that writes it")
        (xy, err_before), (_, err_after) = (
            _label_vertices(t, tile, f"{folder}/{t.city}/{t.name}.gpkg") for tile, folder in zip(tiles, where, strict=True)
        )
        if sorted(tiles[0].ids.tolist()) != sorted(tiles[1].ids.tolist()):
            raise ValueError(
                f"{where[0]} and {where[1]} hold other buildings in {t.city}/{t.name}; --labels-after must be "
                "the realigned --labels"
            )
        height, width = t.tile.image.shape[:2]
        scale = np.array([max(1, round(width / ds)) / width, max(1, round(height / ds)) / height])
        inside = vertices_per_window(patches.corners[rows], patches.size, patches.margin, xy * scale)
        gains.count[rows], gains.before[rows], gains.after[rows] = explain.window_medians(inside, err_before, err_after)
    if not gains.count.any():
        tiles_named = ", ".join(sorted({f"{c}/{t}" for c, t in zip(patches.cities, patches.tiles, strict=True)}))
        raise ValueError(
            f"no patch of {tiles_named} has a vertex of {where[0]} in its output window, so no label gain can be "
            "measured; raise similarity.patch_size, set similarity.keep: vertex or similarity.patches_per_tile: null"
        )
    return gains


def _window_size(model: AlignNet, wanted: int) -> tuple[int, int]:
    size = analysis.nearest_network_input_size(model, wanted)
    if size != wanted:
        logger.info("similarity.patch_size %d is not a valid network input; using %d", wanted, size)
    return size, (size - model.output_size(size)) // 2


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def _show_patch(ax: plt.Axes, patches: PatchSet, i: int, title: str) -> None:
    """The image window, the input labels' edges in red, the output region outlined in cyan."""
    ax.imshow(patches.images[i])
    edge = np.ma.masked_equal(patches.polys[i, EDGE], 0)
    ax.imshow(edge, cmap=ListedColormap(["red"]), alpha=0.45, vmin=0, vmax=1)
    m, s = patches.margin, patches.size
    ax.add_patch(plt.Rectangle((m - 0.5, m - 0.5), s - 2 * m, s - 2 * m, fill=False, color="cyan", lw=0.8))
    ax.set_title(title, fontsize=7)
    ax.set_axis_off()


def plot_ns_histogram(
    n_s: np.ndarray, patches: PatchSet, bins: int, path: Path, title: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """N_S histogram with an example patch per bin (below the chart, in bin order).

    Args:
        n_s: ``(n,)`` soft counts of the patches.
        patches: The patch set (for the examples).
        bins: Number of bins.
        path: Output PNG.
        title: Figure title.

    Returns:
        ``(counts, edges, examples)`` of :func:`cadalign.similarity.analysis.ns_histogram`.
    """
    counts, edges, examples = analysis.ns_histogram(n_s, bins)
    fig = plt.figure(figsize=(max(8, 1.3 * bins), 5.5))
    grid = fig.add_gridspec(2, bins, height_ratios=(2.2, 1))
    ax = fig.add_subplot(grid[0, :])
    ax.hist(n_s, bins=edges, color="tab:blue", edgecolor="white")
    ax.set_xlabel("soft neighbour count N_S (self included)")
    ax.set_ylabel("patches")
    ax.set_title(title)
    for b, i in enumerate(examples):
        sub = fig.add_subplot(grid[1, b])
        if i < 0:
            sub.set_axis_off()
            continue
        _show_patch(sub, patches, int(i), f"bin {b}: N_S={n_s[i]:.1f}")
    save_figure(fig, path)
    return counts, edges, examples


def plot_neighbours(result: analysis.SimilarityResult, patches: PatchSet, path: Path, title: str) -> None:
    """Montage: one row per query (first column), then its k nearest patches with k^C.

    Args:
        result: The analysis result.
        patches: The patch set.
        path: Output PNG.
        title: Figure title.
    """
    q, k = result.knn.indices.shape
    fig, axes = plt.subplots(
        q, k + 1, figsize=(1.25 * (k + 1), 1.4 * q + 0.4), squeeze=False, layout="constrained"
    )
    for row, query in enumerate(result.query_indices):
        _show_patch(axes[row, 0], patches, int(query), f"query {query}\nN_S={result.n_s[query]:.1f}")
        for col in range(k):
            idx, val = int(result.knn.indices[row, col]), float(result.knn.values[row, col])
            if idx < 0:
                axes[row, col + 1].set_axis_off()
                continue
            _show_patch(axes[row, col + 1], patches, idx, f"#{idx}\nk^C={val:.3f}")
    fig.suptitle(title)
    save_figure(fig, path)


# Baselines of the explanation test: counts.csv column prefix -> name in explanation.csv.
BASELINES = {"raw": "raw inputs (cosine)", "feat": "decoder features (cosine)"}
EXPLAIN_COLUMNS = ("spearman", "spearman_lo", "spearman_hi", "slope", "slope_lo", "slope_hi", "median_ratio")


def explanation_counts(result: analysis.SimilarityResult, baselines: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``N_S`` of every method of the explanation test, by its name in explanation.csv."""
    out = {"gradient k^C": result.n_s}
    if "N_S_rot" in result.counts:
        out["gradient k^C,rot"] = result.counts["N_S_rot"]
    out.update({BASELINES[prefix]: counts["N_S"] for prefix, counts in baselines.items()})
    return out


def explanation_table(
    n_s: dict[str, np.ndarray], gains: Gains, resamples: int, seed: int
) -> dict[str, dict[str, float]]:
    """:func:`cadalign.similarity.explain.explanation_stats` per method; {} for a method with too few patches."""
    table: dict[str, dict[str, float]] = {}
    for method, values in n_s.items():
        try:
            table[method] = explain.explanation_stats(values, gains.before, gains.after, resamples, seed)
        except ValueError as err:
            logger.warning("explanation test, %s: %s", method, err)
            table[method] = {}
    return table


def plot_explanation(n_s: dict[str, np.ndarray], gains: Gains, table: dict[str, dict[str, float]], path: Path, title: str) -> None:
    """One log-log scatter per method: error after / before against N_S, the fitted line and a -1/2 guide."""
    fig, axes = plt.subplots(1, len(n_s), figsize=(4.2 * len(n_s), 4), squeeze=False, layout="constrained")
    for ax, (method, values) in zip(axes[0], n_s.items(), strict=True):
        keep = explain.usable(values, gains.before, gains.after)
        x, y = values[keep], gains.after[keep] / gains.before[keep]
        ax.scatter(x, y, s=6, alpha=0.5)
        row = table[method]
        if row:
            xs = np.geomspace(x.min(), x.max(), 20)
            fit = np.polyfit(np.log(x), np.log(y), 1)
            ax.plot(xs, np.exp(np.polyval(fit, np.log(xs))), color="tab:red", label=f"slope {row['slope']:.2f}")
            guide = np.exp(np.log(np.median(y)) - 0.5 * (np.log(xs) - np.log(np.median(x))))
            ax.plot(xs, guide, color="grey", ls="--", label="slope -1/2")
            ax.legend(fontsize=7)
            ax.set_title(f"{method}\nrho {row['spearman']:.2f} [{row['spearman_lo']:.2f}, {row['spearman_hi']:.2f}]", fontsize=8)
        else:
            ax.set_title(f"{method}\n(too few patches)", fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("neighbour count N_S")
        ax.set_ylabel("median error after / before")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    save_figure(fig, path)


def write_outputs(
    out: Path,
    result: analysis.SimilarityResult,
    patches: PatchSet,
    cfg: SimilarityConfig,
    title: str,
    baselines: dict[str, dict[str, np.ndarray]],
    gains: Gains | None,
) -> dict[str, dict[str, float]]:
    """Write counts.csv, neighbours.csv, query_hist.csv, the figures and (with gains) explanation.csv/png.

    Args:
        out: Existing output folder.
        result: The analysis result.
        patches: The patch set.
        cfg: The stage settings (histogram bins, bootstrap).
        title: Figure title.
        baselines: Counts of the baseline kernels by column prefix (:data:`BASELINES`).
        gains: The patches' realignment gains, or None without the round's output labels.

    Returns:
        The explanation table (method -> statistics), {} without gains.
    """
    counts_keys = [key for key in result.counts if key != "N_S"]
    queries = set(result.query_indices.tolist())
    base_keys = [(prefix, key) for prefix, counts in baselines.items() for key in counts]
    n = len(result.n_s)
    empty = np.full(n, np.nan)
    count, before, after = (gains.count, gains.before, gains.after) if gains is not None else (np.zeros(n, int), empty, empty)

    def num(v: float) -> str:
        return "" if not np.isfinite(v) else f"{v:.6g}"

    rows = [
        [i, patches.cities[i], patches.tiles[i], *patches.corners[i], f"{result.n_s[i]:.10g}"]
        + [f"{result.counts[key][i]:.10g}" for key in counts_keys]
        + [int(result.degenerate[i]), int(i in queries)]
        + [f"{baselines[prefix][key][i]:.10g}" for prefix, key in base_keys]
        + [int(count[i]), num(before[i]), num(after[i])]
        for i in range(n)
    ]
    header = ["patch", "city", "tile", "x0", "y0", "N_S", *counts_keys, "zero_gradient", "query"]
    header += [f"{prefix}_{key}" for prefix, key in base_keys] + ["n_vertices", "error_before_px", "error_after_px"]
    _write_csv(out / "counts.csv", header, rows)
    table: dict[str, dict[str, float]] = {}
    if gains is not None:
        n_s = explanation_counts(result, baselines)
        table = explanation_table(n_s, gains, cfg.resamples, cfg.seed)
        exp_rows = [[m, int(r.get("n", 0))] + [num(r[c]) if r else "" for c in EXPLAIN_COLUMNS] for m, r in table.items()]
        _write_csv(out / "explanation.csv", ["method", "n_patches", *EXPLAIN_COLUMNS], exp_rows)
        plot_explanation(n_s, gains, table, out / "explanation.png", f"{title}: label gain against N_S")
    nb_rows = [
        [int(query), rank + 1, int(idx), f"{float(val):.6g}"]
        for row, query in enumerate(result.query_indices)
        for rank, (idx, val) in enumerate(zip(result.knn.indices[row], result.knn.values[row], strict=True))
        if idx >= 0
    ]
    _write_csv(out / "neighbours.csv", ["query", "rank", "neighbour", "k_c"], nb_rows)
    bins = result.knn.hist.shape[1]
    hist_rows = [
        [int(query), b, f"{b / bins:.6g}", f"{(b + 1) / bins:.6g}", int(result.knn.hist[row, b])]
        for row, query in enumerate(result.query_indices)
        for b in range(bins)
    ]
    _write_csv(out / "query_hist.csv", ["query", "bin", "bin_lo", "bin_hi", "count"], hist_rows)
    plot_ns_histogram(result.n_s, patches, cfg.ns_bins, out / "ns_hist.png", title)
    plot_neighbours(result, patches, out / "neighbours.png", title)
    return table


def _log_zero_gradients(round_name: str, result: analysis.SimilarityResult, patches: PatchSet) -> None:
    """Name the patches whose output gradient is zero (counted in metrics.json, flagged in counts.csv)."""
    zero = np.flatnonzero(result.degenerate)
    if not zero.size:
        return
    names = ", ".join(
        f"#{i} {patches.cities[i]}/{patches.tiles[i]} ({patches.corners[i][0]}, {patches.corners[i][1]})" for i in zero
    )
    logger.warning(
        "%s: %d of %d patches have a zero output gradient (k^C = 0 to every other patch, N_S = 1): %s",
        round_name,
        zero.size,
        len(result.degenerate),
        names,
    )


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = make_parser("Gradient-similarity analysis of one round's network on a fixed patch set.")
    parser.add_argument("--round", required=True, help="round name, e.g. round1")
    parser.add_argument("--cities-dir", type=Path, required=True)
    parser.add_argument("--truth", type=Path, required=True, help="true polygons (choose the patches)")
    parser.add_argument("--labels", type=Path, required=True, help="labels the round trained on (rasters)")
    parser.add_argument(
        "--labels-after",
        type=Path,
        default=None,
        help="the round's realigned labels (its realign output): enables the explanation test",
    )
    parser.add_argument("--models", type=Path, required=True, help="the round's networks (ds<f>.pt)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    add_threads_option(parser)
    args = parser.parse_args(argv)
    setup_logging()
    set_threads(parser, args)
    cfg = load_section(args.params, "similarity", SimilarityConfig)
    train_cfg = load_section(args.params, "train", TrainStageConfig)
    shared = train_cfg.shared_factors
    if not shared:
        raise ValueError(
            f"{args.params}: train.factors and train.round_factors have no factor in common, so no network "
            "of every round can be compared; keep one factor (e.g. 2) in each list"
        )
    ds = cfg.ds if cfg.ds is not None else shared[0]
    if ds not in shared:
        raise ValueError(
            f"{args.params}: similarity.ds = {ds} is not trained in every round (train.factors and "
            f"train.round_factors share {list(shared)}); set similarity.ds to one of them"
        )
    model_path = args.models / f"ds{ds}.pt"
    if not model_path.is_file():
        raise FileNotFoundError(
            f"no network {model_path} for round {args.round}; run its train stage first "
            f"(dvc repro train@{args.round})"
        )
    device = resolve_device(cfg.device, "similarity.device")
    model = load_model(model_path, map_location=device)
    size, margin = _window_size(model, cfg.patch_size)
    cities = sorted(load_cities(args.params))
    recorded = [check_input(args.params, args.models, "networks")] + [
        check_input(args.params, folder, "labels", cities) for folder in (args.labels, args.labels_after) if folder
    ]
    truth = load_labelled_tiles(args.cities_dir, args.truth, cities)
    labels = load_labelled_tiles(args.cities_dir, args.labels, cities)
    edge_width = train_cfg.patches.edge_width
    patches = build_patch_set(truth, labels, ds, size, margin, cfg, edge_width)
    gains = None
    if args.labels_after is not None:
        after = load_labelled_tiles(args.cities_dir, args.labels_after, cities)
        gains = patch_gains(truth, labels, after, patches, ds, (args.labels, args.labels_after))
    n = len(patches.images)
    queries = analysis.choose_queries(n, cfg.n_queries, cfg.seed)
    logger.info("%s: %d patches of %d px at ds %d, %d queries", args.round, n, size, ds, len(queries))
    run_params = {
        "similarity": dataclasses.asdict(cfg),
        "round": args.round,
        "ds": ds,
        "input_size": size,
        "labels": str(args.labels),
        "labels_after": str(args.labels_after),
        "edge_width": edge_width,
        "device": str(device),
    }
    with stage_run(f"analyze@{args.round}", run_params) as run:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        result = analysis.analyse(
            model,
            model.disp_parameters(),
            patches.network_inputs(),
            alignment_output_fn(cfg.output),
            queries,
            k=cfg.k,
            bins=cfg.hist_bins,
            taus=cfg.taus,
            alphas=cfg.alphas,
            chunk_size=cfg.chunk_size,
            method=cfg.method,
            cache_bytes=int(cfg.cache_gb * 2**30),
            progress=True,
        )
        t_base = time.perf_counter()
        inputs = patches.network_inputs()
        vectors = {
            "raw": analysis.input_vectors(inputs).to(device),
            "feat": analysis.layer_input_features(model, model.disp_heads[0], inputs, cfg.output, cfg.chunk_size),
        }
        baselines = {prefix: analysis.baseline_counts(v, cfg.taus, cfg.alphas)[0] for prefix, v in vectors.items()}
        del vectors
        t_base = time.perf_counter() - t_base
        wall = time.perf_counter() - start
        _log_zero_gradients(args.round, result, patches)
        timings = {**result.timings, "baselines": t_base}
        median, low, high = explain.median_interval(result.n_s, cfg.resamples, cfg.seed)
        metrics = {
            **analysis.summary_metrics(result),
            "N_S_median_lo": low,
            "N_S_median_hi": high,
            "bootstrap_resamples": float(cfg.resamples),
            "bootstrap_seed": float(cfg.seed),
            "n_tiles_skipped": float(len(patches.skipped)),
            "wall_seconds": wall,
            # samples through the gradient computation per second (over all passes)
            "patches_per_second": n * timings["gradient_passes"] / max(timings["gradients"], 1e-9),
            "peak_memory_bytes": float(analysis.peak_memory_bytes(device)),
            "n_parameters": float(sum(p.numel() for _, p in model.disp_parameters())),
            "input_size": float(size),
            "ds": float(ds),
            "seconds": dict(timings),
        }
        with atomic_path(args.out) as tmp:
            tmp.mkdir()
            title = f"{args.round}, ds {ds}, output={cfg.output}"
            table = write_outputs(tmp, result, patches, cfg, title, baselines, gains)
            grad = table.get("gradient k^C", {})
            if grad:  # the headline: does the gradient N_S explain the label gain?
                metrics["explain_spearman"] = grad["spearman"]
                metrics["explain_slope"] = grad["slope"]
            header = {"round": args.round, "output": cfg.output, "device": str(device)}
            write_json(tmp / "metrics.json", {**header, **metrics})
            write_manifest(tmp, args.params, "analyze", args.round, recorded, cities=cities)
        run.log_metrics(metrics)
        for name in ("ns_hist.png", "neighbours.png", "explanation.png"):
            if (args.out / name).is_file():
                run.log_figure(args.out / name)
        for name in ("counts.csv", "query_hist.csv", "neighbours.csv", "metrics.json", "explanation.csv"):
            if (args.out / name).is_file():
                run.log_artifact(args.out / name)
    logger.info(
        "%s: median N_S %.2f [%.2f, %.2f] of %d patches, %.1f s", args.round, median, low, high, n, wall
    )


if __name__ == "__main__":
    main()
