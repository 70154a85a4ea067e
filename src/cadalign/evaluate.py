"""Registration error of polygon labels against the true polygons, per vertex.

Noise and alignment move vertices but never add, drop or reorder them, so a label vertex
corresponds to the true vertex of the same building id and the same index in
``shapely.get_coordinates`` order. The error of a vertex is the Euclidean distance in pixels.
Every true building is scored: labels whose ids do not match the truth one to one, that look
swapped or that lie outside their tile are refused, never scored on a subset.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely

logger = logging.getLogger(__name__)

TAU_MAX = 32.0
TAU_STEP = 0.25
THRESHOLDS = (1, 2, 4, 8)
"""Pixel thresholds reported as ``frac_within_<t>px``."""


SWAP_FACTOR = 2.0
"""Two labels count as swapped when exchanging their ids would cut the pair's error (mean vertex
error of each, summed) by this factor. Honest labels stay below it: under a smooth noise field
neighbours move alike, and exchanging their ids can only help where their displacements differ."""
OUTSIDE_MARGIN_PX = 2 * TAU_MAX
"""A label polygon farther than this from its tile was misplaced: the true polygons lie inside the
tile and the default noise (24 px per axis) moves a vertex by at most 34 px."""


@dataclass(frozen=True)
class MatchStats:
    """What was scored: every true building of the tile, each with all its vertices."""

    n_buildings: int
    n_vertices: int


def _first(ids: np.ndarray, n: int = 5) -> str:
    """The first ``n`` of ``ids`` for an error message, e.g. ``3 (ids 7, 9, 12)``."""
    ids = np.asarray(ids)
    more = ", ..." if len(ids) > n else ""
    return f"{len(ids)} (ids {', '.join(str(int(i)) for i in ids[:n])}{more})"


def _check_ids(true_ids: np.ndarray, ids: np.ndarray, where: str, truth_where: str) -> None:
    """Ids unique on both sides and the same set: every true building labelled once, nothing else."""
    for name, arr in ((truth_where, true_ids), (where, ids)):
        uniq, counts = np.unique(arr, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"{name}: {_first(uniq[counts > 1])} building ids appear more than once; ids must be unique")
    missing = np.setdiff1d(true_ids, ids)
    if len(missing):
        raise ValueError(
            f"{where}: {_first(missing)} true buildings of {truth_where} have no label; every true building must "
            "be labelled once (the labels are the true polygons moved): rerun the stage that writes them"
        )
    extra = np.setdiff1d(ids, true_ids)
    if len(extra):
        raise ValueError(
            f"{where}: {_first(extra)} labels have no true building in {truth_where}; labels must keep the true "
            "building ids: rerun the stage that writes them"
        )


def _mean_vertex_error(a: shapely.Geometry, b: shapely.Geometry) -> float:
    d = shapely.get_coordinates(a) - shapely.get_coordinates(b)
    return float(np.hypot(d[:, 0], d[:, 1]).mean())


def _check_swaps(t: np.ndarray, p: np.ndarray, ids: np.ndarray, own: np.ndarray, where: str) -> None:
    """Refuse two labels whose ids look exchanged (see :data:`SWAP_FACTOR`).

    A label's candidate partner is the true building whose centroid is nearest to the label's.
    """
    if len(t) < 2:
        return
    tree = shapely.STRtree(shapely.centroid(t))
    label_index, nearest = tree.query_nearest(shapely.centroid(p), all_matches=False)
    counts = shapely.get_num_coordinates(t)
    for i, j in zip(label_index, nearest, strict=True):
        if i == j or counts[i] != counts[j]:
            continue
        swapped = _mean_vertex_error(p[i], t[j]) + _mean_vertex_error(p[j], t[i])
        if SWAP_FACTOR * swapped < own[i] + own[j]:
            raise ValueError(
                f"{where}: the labels of buildings {ids[i]} and {ids[j]} look swapped: each lies "
                f"{swapped / 2:.1f} px (mean per vertex) from the other's true polygon and {(own[i] + own[j]) / 2:.1f} px "
                "from its own; a label must keep its building's id: rerun the stage that writes them"
            )


def vertex_errors(
    true_geoms: np.ndarray,
    true_ids: np.ndarray,
    geoms: np.ndarray,
    ids: np.ndarray,
    where: str = "labels",
    truth_where: str = "true polygons",
    tile_shape: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, MatchStats]:
    """Per-vertex distance between label polygons and the true polygons, matched by id.

    Args:
        true_geoms, true_ids: the true polygons (pixel coordinates) and their building ids.
        geoms, ids: the labels to score, same coordinate system.
        where: name of the labels (a file) used in error messages.
        truth_where: name of the true polygons (a file) used in error messages.
        tile_shape: (height, width) of the tile in pixels, to refuse labels outside it
            (farther than :data:`OUTSIDE_MARGIN_PX`); None skips that check.

    Returns:
        (errors, building_ids, stats): float64 array with one error per vertex (in the
        truth's building order, then vertex order), the building id of each of those
        vertices, and the counts scored.

    Raises:
        ValueError: naming the file and the first ids, if an id repeats, a true building
            has no label, a label has no true building, a building's vertex count differs
            from the truth's (the labels were not derived from the truth by moving
            vertices), two labels look swapped, or a label lies outside its tile.
    """
    true_ids = np.asarray(true_ids, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    _check_ids(true_ids, ids, where, truth_where)
    index = {bid: i for i, bid in enumerate(ids)}
    t = np.asarray(true_geoms, dtype=object)
    p = np.asarray(geoms, dtype=object)[[index[bid] for bid in true_ids]]
    if tile_shape is not None and len(p):
        height, width = tile_shape
        far = shapely.distance(p, shapely.box(0, 0, width, height)) > OUTSIDE_MARGIN_PX
        if far.any():
            raise ValueError(
                f"{where}: {_first(true_ids[far])} labels lie more than {OUTSIDE_MARGIN_PX:g} px outside their "
                f"{width} x {height} px tile; the labels were written for another tile or CRS: rerun the stage "
                "that writes them"
            )
    nt, np_ = shapely.get_num_coordinates(t), shapely.get_num_coordinates(p)
    bad = np.flatnonzero(nt != np_)
    if len(bad):
        raise ValueError(
            f"{where}: building {true_ids[bad[0]]} has {np_[bad[0]]} vertices but the truth has {nt[bad[0]]} "
            f"({_first(true_ids[bad])} buildings differ); labels must be the true polygons with moved vertices "
            "(same order)"
        )
    diff = shapely.get_coordinates(p) - shapely.get_coordinates(t)
    errors = np.hypot(diff[:, 0], diff[:, 1])
    starts = np.r_[0, np.cumsum(nt)[:-1]].astype(np.int64)
    own = np.add.reduceat(errors, starts) / np.maximum(nt, 1) if len(errors) else np.zeros(len(t))
    _check_swaps(t, p, true_ids, own, where)
    building_ids = np.repeat(true_ids, nt)
    return errors, building_ids, MatchStats(n_buildings=len(true_ids), n_vertices=len(errors))


def accuracy_curve(errors: np.ndarray, tau_max: float = TAU_MAX, step: float = TAU_STEP) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of vertices with error <= tau, for tau = 0, step, ..., tau_max."""
    taus = np.arange(0.0, tau_max + step / 2, step)
    errors = np.sort(np.asarray(errors, dtype=np.float64))
    if len(errors) == 0:
        return taus, np.zeros_like(taus)
    return taus, np.searchsorted(errors, taus, side="right") / len(errors)


def summarize(errors: np.ndarray) -> dict[str, float]:
    """Median, mean, area under the accuracy curve (normalised to [0, 1]) and fractions within thresholds."""
    errors = np.asarray(errors, dtype=np.float64)
    if len(errors) == 0:
        raise ValueError("no vertices to evaluate: the labels matched no true building")
    taus, curve = accuracy_curve(errors)
    metrics = {
        "median_error_px": float(np.median(errors)),
        "mean_error_px": float(errors.mean()),
        "auc": float(np.trapezoid(curve, taus) / taus[-1]),
        "n_vertices": int(len(errors)),
    }
    for t in THRESHOLDS:
        metrics[f"frac_within_{t}px"] = float((errors <= t).mean())
    return metrics


def cluster_bootstrap_medians(
    errors: np.ndarray, clusters: np.ndarray, strata: np.ndarray, n_resamples: int, seed: int
) -> np.ndarray:
    """Medians of vertex errors over resamples of whole buildings (a stratified cluster bootstrap).

    The vertices of one building share its misalignment, so they are not independent: each
    resample draws, within every stratum (city), as many buildings as it has, with
    replacement, and keeps all their vertices. The same draw serves every row of ``errors``,
    so rows of the same vertices (label sets of two rounds) give paired medians.

    Args:
        errors: (R, V) errors of V vertices in R label sets (or (V,) for one).
        clusters: (V,) building of each vertex (any hashable id; unique within a stratum).
        strata: (V,) stratum (city) of each vertex.
        n_resamples: number of resamples (>= 1).
        seed: seeds the draws, so the result is reproducible.

    Returns:
        (n_resamples, R) medians, one row per resample.
    """
    errors = np.atleast_2d(np.asarray(errors, dtype=np.float64))
    if errors.shape[1] == 0:
        raise ValueError("no vertices to resample")
    if n_resamples < 1:
        raise ValueError(f"n_resamples = {n_resamples}; draw at least one resample")
    keys = np.array([f"{s}\0{c}" for s, c in zip(strata, clusters, strict=True)])
    unique_keys, vertex_cluster = np.unique(keys, return_inverse=True)
    cluster_stratum = np.array([k.split("\0", 1)[0] for k in unique_keys])
    groups = [np.flatnonzero(cluster_stratum == s) for s in np.unique(cluster_stratum)]
    rng = np.random.default_rng(seed)
    out = np.empty((n_resamples, errors.shape[0]))
    counts = np.zeros(len(unique_keys), dtype=np.int64)
    for b in range(n_resamples):
        counts[:] = 0
        for members in groups:
            counts += np.bincount(members[rng.integers(len(members), size=len(members))], minlength=len(counts))
        out[b] = np.median(np.repeat(errors, counts[vertex_cluster], axis=1), axis=1)
    return out


def interval(values: np.ndarray, level: float = 0.95) -> list[float]:
    """The central ``level`` percentile interval of bootstrap values, as [low, high]."""
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(np.asarray(values, dtype=np.float64), [tail, 100.0 - tail])
    return [float(low), float(high)]


@dataclass(frozen=True)
class BootstrapConfig:
    """The ``evaluate`` section of params.yaml: the intervals of the medians (evaluate and contrast stages)."""

    resamples: int = 1000  # cluster-bootstrap resamples (whole buildings, within each city)
    seed: int = 0  # seeds the resamples: the same intervals on every rerun

    def validate(self) -> None:
        if self.resamples < 1:
            raise ValueError(f"resamples = {self.resamples}; draw at least 1 (1000 for a 95% interval)")


@dataclass(frozen=True)
class VertexTable:
    """One row per scored vertex: where it is and its error (px); ``errors.csv`` on disk."""

    city: np.ndarray
    tile: np.ndarray
    building_id: np.ndarray
    vertex: np.ndarray  # index of the vertex within its building
    error_px: np.ndarray

    COLUMNS = ("city", "tile", "building_id", "vertex", "error_px")

    def to_csv(self) -> str:
        rows = zip(self.city, self.tile, self.building_id, self.vertex, self.error_px, strict=True)
        return ",".join(self.COLUMNS) + "\n" + "".join(f"{c},{t},{b},{v},{e:.6f}\n" for c, t, b, v, e in rows)


def read_vertex_table(path: Path) -> VertexTable:
    """Read the per-vertex errors (``errors.csv``) that the evaluate stage wrote.

    Raises:
        ValueError: naming the file, if its header or a row is not the evaluate stage's.
    """
    with Path(path).open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if tuple(header or ()) != VertexTable.COLUMNS:
            raise ValueError(f"{path}: header {header}, expected {list(VertexTable.COLUMNS)}; rerun the evaluate stage")
        rows = list(reader)
    bad = next((i for i, row in enumerate(rows) if len(row) != len(VertexTable.COLUMNS)), None)
    if bad is not None:
        raise ValueError(f"{path}: line {bad + 2} has {len(rows[bad])} fields, expected {len(VertexTable.COLUMNS)}; rerun the evaluate stage")
    cols = list(zip(*rows)) if rows else [()] * len(VertexTable.COLUMNS)
    return VertexTable(
        city=np.array(cols[0], dtype=str),
        tile=np.array(cols[1], dtype=str),
        building_id=np.array(cols[2], dtype=np.int64),
        vertex=np.array(cols[3], dtype=np.int64),
        error_px=np.array(cols[4], dtype=np.float64),
    )
