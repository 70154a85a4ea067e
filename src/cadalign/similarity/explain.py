"""Does a patch's neighbour count explain how much its labels improved? (paper section 1)

The paper's argument: a network trained on noisy labels predicts, for an input, about the
mean of the labels of the inputs it sees as similar, so the label noise of a patch with
``n`` such neighbours shrinks by about ``sqrt(n)``. Per round and patch we have the
neighbour count ``N_S`` under the round's network and the realignment gain of the labels
inside the patch's output window, ``ratio = median error after / median error before``
(errors against the truth). The argument predicts ``ratio ~ N_S^(-1/2)``: a negative rank
correlation and a log-log slope near ``-1/2``.

Statistics (numpy and scipy only, so the compare stage can import them cheaply):

- :func:`window_medians`: per output window, the number of vertices in it and their median
  error before and after.
- :func:`explanation_stats`: Spearman's rank correlation of ``(N_S, ratio)`` and the
  least-squares slope of ``log ratio`` on ``log N_S``, each with a percentile bootstrap
  interval over patches (resampled with replacement, ``default_rng([seed, EXPLAIN_STREAM])``;
  one draw serves every method, so the methods' intervals are paired). Patches enter when
  they have a vertex, both medians are > 0 (a log needs them) and ``N_S > 0``.
- :func:`median_interval` and :func:`paired_median_change`: bootstrap intervals of a round's
  median ``N_S`` and of its change between two rounds on the same patches (the same
  resampled patches in both rounds; ``default_rng([seed, MEDIAN_STREAM])``, so a round's
  interval and the change use the same draws).

The bootstrap treats patches as independent; neighbouring patches share label noise (the
noise field is smooth), so the intervals are somewhat too narrow.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from cadalign.evaluate import interval

EXPLAIN_STREAM = 3
"""Second word of the seed of the explanation bootstrap."""
MEDIAN_STREAM = 4
"""Second word of the seed of the median-N_S bootstrap."""
MIN_PATCHES = 3
"""Fewest patches for a rank correlation and a slope."""


def bootstrap_indices(n: int, resamples: int, seed: int, stream: int) -> np.ndarray:
    """``(resamples, n)`` indices drawn with replacement from ``range(n)``.

    Args:
        n: Number of items (>= 1).
        resamples: Number of resamples (>= 1).
        seed: Seed.
        stream: Second word of the seed (one per statistic).

    Returns:
        int64 array.

    Raises:
        ValueError: if ``n`` or ``resamples`` < 1.
    """
    if n < 1 or resamples < 1:
        raise ValueError(f"need at least one item and one resample, got n={n}, resamples={resamples}")
    return np.random.default_rng([seed, stream]).integers(n, size=(resamples, n))


def median_interval(values: np.ndarray, resamples: int, seed: int) -> tuple[float, float, float]:
    """The median of ``values`` and its 95% percentile-bootstrap interval.

    Args:
        values: ``(n,)`` values (e.g. a round's ``N_S`` per patch).
        resamples: Bootstrap resamples.
        seed: Seed (stream :data:`MEDIAN_STREAM`).

    Returns:
        ``(median, low, high)``.
    """
    values = np.asarray(values, dtype=float)
    idx = bootstrap_indices(values.size, resamples, seed, MEDIAN_STREAM)
    low, high = interval(np.median(values[idx], axis=1))
    return float(np.median(values)), low, high


def paired_median_change(
    before: np.ndarray, after: np.ndarray, resamples: int, seed: int
) -> tuple[float, float, float]:
    """``median(after) - median(before)`` on the same patches, with a paired 95% bootstrap interval.

    Each resample draws one set of patches and takes both medians on it.

    Args:
        before: ``(n,)`` values of the earlier round.
        after: ``(n,)`` values of the later round, same patches in the same order.
        resamples: Bootstrap resamples.
        seed: Seed (stream :data:`MEDIAN_STREAM`).

    Returns:
        ``(change, low, high)``.

    Raises:
        ValueError: if the arrays differ in length.
    """
    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if before.shape != after.shape:
        raise ValueError(f"paired values need the same patches, got {before.size} and {after.size}")
    idx = bootstrap_indices(before.size, resamples, seed, MEDIAN_STREAM)
    low, high = interval(np.median(after[idx], axis=1) - np.median(before[idx], axis=1))
    return float(np.median(after) - np.median(before)), low, high


def window_medians(
    inside: np.ndarray, before: np.ndarray, after: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per window: its vertex count and their median error before and after (NaN without vertex).

    Args:
        inside: ``(m, n)`` bool, vertex ``i`` in window ``j`` (e.g.
            :func:`cadalign.similarity.windows.vertices_per_window`).
        before: ``(m,)`` vertex errors before the round.
        after: ``(m,)`` the same vertices' errors after it.

    Returns:
        ``(count, median_before, median_after)``, ``(n,)`` each.
    """
    inside = np.asarray(inside, dtype=bool)
    count = inside.sum(0)
    med_before = np.full(inside.shape[1], np.nan)
    med_after = np.full(inside.shape[1], np.nan)
    for j in np.flatnonzero(count):
        med_before[j] = np.median(before[inside[:, j]])
        med_after[j] = np.median(after[inside[:, j]])
    return count, med_before, med_after


def usable(n_s: np.ndarray, before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Patches that enter the explanation test: finite medians > 0 and ``N_S > 0``."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(before) & np.isfinite(after) & (before > 0) & (after > 0) & (n_s > 0)


def _rank_rows(x: np.ndarray) -> np.ndarray:
    return stats.rankdata(x, axis=1)


def _slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slope of each row of ``y`` on the same row of ``x`` (NaN for a constant ``x``)."""
    xc = x - x.mean(1, keepdims=True)
    yc = y - y.mean(1, keepdims=True)
    var = (xc * xc).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(var > 0, (xc * yc).sum(1) / np.where(var > 0, var, 1.0), np.nan)


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xc = x - x.mean(1, keepdims=True)
    yc = y - y.mean(1, keepdims=True)
    den = np.sqrt((xc * xc).sum(1) * (yc * yc).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (xc * yc).sum(1) / np.where(den > 0, den, 1.0), np.nan)


def _finite_interval(values: np.ndarray) -> tuple[float, float]:
    """95% percentile interval of the finite values (a resample of one repeated patch has none)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    low, high = interval(finite)
    return low, high


def explanation_stats(
    n_s: np.ndarray, before: np.ndarray, after: np.ndarray, resamples: int, seed: int
) -> dict[str, float]:
    """Rank correlation and log-log slope of ``after / before`` against ``N_S``, with 95% intervals.

    Args:
        n_s: ``(n,)`` neighbour counts of the patches (any kernel).
        before: ``(n,)`` median error of each patch's vertices before the round (NaN: none).
        after: ``(n,)`` the same after the round.
        resamples: Bootstrap resamples (over the usable patches).
        seed: Seed (stream :data:`EXPLAIN_STREAM`).

    Returns:
        ``n``, ``spearman``, ``spearman_lo``, ``spearman_hi``, ``slope``, ``slope_lo``,
        ``slope_hi``, ``median_ratio`` (median of ``after / before``).

    Raises:
        ValueError: if fewer than :data:`MIN_PATCHES` patches are usable.
    """
    n_s, before, after = (np.asarray(a, dtype=float) for a in (n_s, before, after))
    keep = usable(n_s, before, after)
    if keep.sum() < MIN_PATCHES:
        raise ValueError(
            f"only {int(keep.sum())} patches have vertices with a non-zero error before and after and N_S > 0; "
            f"the explanation test needs {MIN_PATCHES}"
        )
    x, ratio = n_s[keep], after[keep] / before[keep]
    idx = bootstrap_indices(x.size, resamples, seed, EXPLAIN_STREAM)
    boot_rho = _pearson_rows(_rank_rows(x[idx]), _rank_rows(ratio[idx]))
    boot_slope = _slopes(np.log(x[idx]), np.log(ratio[idx]))
    rho = stats.spearmanr(x, ratio).statistic
    slope = np.polyfit(np.log(x), np.log(ratio), 1)[0]
    rho_lo, rho_hi = _finite_interval(boot_rho)
    slope_lo, slope_hi = _finite_interval(boot_slope)
    return {
        "n": float(x.size),
        "spearman": float(rho),
        "spearman_lo": rho_lo,
        "spearman_hi": rho_hi,
        "slope": float(slope),
        "slope_lo": slope_lo,
        "slope_hi": slope_hi,
        "median_ratio": float(np.median(ratio)),
    }
