"""Registration error of polygon labels against the true polygons, per vertex.

Noise and alignment move vertices but never add, drop or reorder them, so a label vertex
corresponds to the true vertex of the same building id and the same index in
``shapely.get_coordinates`` order. The error of a vertex is the Euclidean distance in pixels.
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


@dataclass(frozen=True)
class MatchStats:
    """How the labels matched the truth (buildings missing from the labels are not scored)."""

    n_buildings: int
    n_missing: int
    n_vertices: int


def vertex_errors(
    true_geoms: np.ndarray, true_ids: np.ndarray, geoms: np.ndarray, ids: np.ndarray, where: str = "labels"
) -> tuple[np.ndarray, np.ndarray, MatchStats]:
    """Per-vertex distance between label polygons and the true polygons, matched by id.

    Args:
        true_geoms, true_ids: the true polygons (pixel coordinates) and their building ids.
        geoms, ids: the labels to score, same coordinate system.
        where: name of the labels (a file) used in error messages.

    Returns:
        (errors, building_ids, stats): float64 array with one error per matched vertex (in the
        truth's building order, then vertex order), the building id of each of those
        vertices, and match counts.

    Raises:
        ValueError: if an id repeats, or a building's vertex count differs from the truth's
            (the labels were not derived from the truth by moving vertices).
    """
    true_ids = np.asarray(true_ids, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    for name, arr in (("true polygons", true_ids), (where, ids)):
        uniq, counts = np.unique(arr, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"{name}: building_id {uniq[counts > 1][0]} appears more than once; ids must be unique")
    index = {bid: i for i, bid in enumerate(ids)}
    rows = [index.get(bid, -1) for bid in true_ids]
    present = np.array([r >= 0 for r in rows], dtype=bool)
    n_missing = int((~present).sum())
    if n_missing:
        logger.warning("%s: %d of %d true buildings have no label; they are not scored", where, n_missing, len(true_ids))
    t = np.asarray(true_geoms, dtype=object)[present]
    p = np.asarray(geoms, dtype=object)[[r for r in rows if r >= 0]]
    nt, np_ = shapely.get_num_coordinates(t), shapely.get_num_coordinates(p)
    bad = np.flatnonzero(nt != np_)
    if len(bad):
        bid = true_ids[present][bad[0]]
        raise ValueError(
            f"{where}: building {bid} has {np_[bad[0]]} vertices but the truth has {nt[bad[0]]}; "
            "labels must be the true polygons with moved vertices (same order)"
        )
    diff = shapely.get_coordinates(p) - shapely.get_coordinates(t)
    errors = np.hypot(diff[:, 0], diff[:, 1])
    building_ids = np.repeat(true_ids[present], nt)
    return errors, building_ids, MatchStats(n_buildings=len(true_ids), n_missing=n_missing, n_vertices=len(errors))


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
