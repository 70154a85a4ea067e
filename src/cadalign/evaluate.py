"""Registration error of polygon labels against the true polygons, per vertex.

Noise and alignment move vertices but never add, drop or reorder them, so a label vertex
corresponds to the true vertex of the same building id and the same index in
``shapely.get_coordinates`` order. The error of a vertex is the Euclidean distance in pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

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
) -> tuple[np.ndarray, MatchStats]:
    """Per-vertex distance between label polygons and the true polygons, matched by id.

    Args:
        true_geoms, true_ids: the true polygons (pixel coordinates) and their building ids.
        geoms, ids: the labels to score, same coordinate system.
        where: name of the labels (a file) used in error messages.

    Returns:
        (errors, stats): float64 array with one error per matched vertex, and match counts.

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
    return errors, MatchStats(n_buildings=len(true_ids), n_missing=n_missing, n_vertices=len(errors))


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
