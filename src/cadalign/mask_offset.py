"""Residual misalignment of polygon labels measured against a building mask (numpy only).

Without vertex-level ground truth (Inria gives masks, not polygons), the misalignment of a
polygon layer is measured as the integer translation that best lays each rasterised
polygon onto the mask: the shift maximising the intersection-over-union within
``+-max_shift`` pixels. All shifts are scored at once: the intersection counts for every
shift come from one FFT cross-correlation, and the polygon area that stays inside the
window after each shift from an integral image, so no loop over shifts is needed.

Convention: a shift (dx, dy) moves the polygon raster by +dx columns and +dy rows;
pixels moved outside the window are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

logger = logging.getLogger(__name__)


def _check_pair(poly_mask: np.ndarray, gt_mask: np.ndarray, max_shift: int) -> tuple[np.ndarray, np.ndarray]:
    poly = np.asarray(poly_mask).astype(bool)
    gt = np.asarray(gt_mask).astype(bool)
    if poly.ndim != 2 or poly.shape != gt.shape:
        raise ValueError(
            f"poly_mask {poly.shape} and gt_mask {gt.shape} must be 2-D arrays of the same shape"
        )
    if isinstance(max_shift, bool) or not isinstance(max_shift, (int, np.integer)) or max_shift < 0:
        raise ValueError(f"max_shift must be an integer >= 0, got {max_shift!r}")
    return poly, gt


def _kept_area(poly: np.ndarray, sy: int, sx: int) -> np.ndarray:
    """Pixels of ``poly`` still inside the frame after each shift, shape (2sy+1, 2sx+1)."""
    h, w = poly.shape
    integral = np.zeros((h + 1, w + 1), dtype=np.int64)
    integral[1:, 1:] = poly.cumsum(0).cumsum(1)
    dy = np.arange(-sy, sy + 1)
    dx = np.arange(-sx, sx + 1)
    r0, r1 = np.maximum(0, -dy)[:, None], np.minimum(h, h - dy)[:, None]  # rows r with 0 <= r + dy < h
    c0, c1 = np.maximum(0, -dx)[None, :], np.minimum(w, w - dx)[None, :]
    return integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]


def translation_ious(poly_mask: np.ndarray, gt_mask: np.ndarray, max_shift: int = 32) -> np.ndarray:
    """IoU of the shifted polygon raster with the mask for every shift in ``+-max_shift``.

    Args:
        poly_mask: (h, w) bool raster of the polygon(s).
        gt_mask: (h, w) bool building mask.
        max_shift: largest shift in pixels along each axis (clipped to the window size - 1).

    Returns:
        (2*sy+1, 2*sx+1) float64 array; entry [dy + sy, dx + sx] is the IoU for shift (dx, dy),
        with sy, sx the clipped max shifts.

    Raises:
        ValueError: shapes differ, not 2-D, or max_shift negative.
    """
    poly, gt = _check_pair(poly_mask, gt_mask, max_shift)
    h, w = poly.shape
    sy, sx = min(max_shift, h - 1), min(max_shift, w - 1)
    size = (h + sy, w + sx)  # zero padding >= the largest lag: no circular wrap-around
    corr = np.fft.irfft2(np.conj(np.fft.rfft2(poly, size)) * np.fft.rfft2(gt, size), size)
    rows = np.arange(-sy, sy + 1) % size[0]
    cols = np.arange(-sx, sx + 1) % size[1]
    # corr[dy, dx] = sum_{r,c} poly[r, c] * gt[r + dy, c + dx]: the overlap after the shift
    inter = np.rint(corr[np.ix_(rows, cols)])
    union = _kept_area(poly, sy, sx) + gt.sum() - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def best_translation(
    poly_mask: np.ndarray, gt_mask: np.ndarray, max_shift: int = 32
) -> tuple[int, int, float]:
    """The integer shift of the polygon raster that best overlaps the building mask.

    Ties (equal IoU) go to the shortest shift, so a polygon that overlaps nothing reports
    (0, 0).

    Args:
        poly_mask: (h, w) bool raster of the polygon(s).
        gt_mask: (h, w) bool building mask.
        max_shift: search range in pixels along each axis.

    Returns:
        (dx, dy, iou): columns and rows to move the polygon by, and the IoU reached.

    Raises:
        ValueError: shapes differ, not 2-D, max_shift negative, or an empty polygon raster.
    """
    poly, _ = _check_pair(poly_mask, gt_mask, max_shift)
    if not poly.any():
        raise ValueError("poly_mask is empty: rasterise the polygon into the window first")
    ious = translation_ious(poly_mask, gt_mask, max_shift)
    sy, sx = (ious.shape[0] - 1) // 2, (ious.shape[1] - 1) // 2
    dy, dx = np.mgrid[-sy : sy + 1, -sx : sx + 1]
    order = np.lexsort(((dx * dx + dy * dy).ravel(), -ious.ravel()))  # IoU desc, then length asc
    best = order[0]
    return int(dx.ravel()[best]), int(dy.ravel()[best]), float(ious.ravel()[best])


def polygon_shifts(
    polygon_rasters: Iterable[np.ndarray], gt_mask: np.ndarray, max_shift: int = 32
) -> np.ndarray:
    """Best translation of each polygon on its own, in a window around it.

    Each polygon raster is cropped to its bounding box grown by ``max_shift`` (clipped to
    the image), and :func:`best_translation` is run on that window of the mask.

    Args:
        polygon_rasters: (H, W) bool rasters, one per polygon (e.g. a generator).
        gt_mask: (H, W) bool building mask.
        max_shift: search range in pixels.

    Returns:
        (N, 3) float64 array of (dx, dy, iou); NaN rows for empty rasters.

    Raises:
        ValueError: a raster's shape differs from the mask's, or max_shift negative.
    """
    gt = np.asarray(gt_mask).astype(bool)
    rows = []
    for i, raster in enumerate(polygon_rasters):
        poly, _ = _check_pair(raster, gt, max_shift)
        if not poly.any():
            logger.debug("polygon %d has an empty raster; offset is NaN", i)
            rows.append((np.nan, np.nan, np.nan))
            continue
        rr = np.flatnonzero(poly.any(axis=1))
        cc = np.flatnonzero(poly.any(axis=0))
        r0, r1 = max(0, rr[0] - max_shift), min(gt.shape[0], rr[-1] + 1 + max_shift)
        c0, c1 = max(0, cc[0] - max_shift), min(gt.shape[1], cc[-1] + 1 + max_shift)
        rows.append(best_translation(poly[r0:r1, c0:c1], gt[r0:r1, c0:c1], max_shift))
    logger.info("measured the offsets of %d polygons", len(rows))
    return np.array(rows, dtype=np.float64).reshape(-1, 3)


def polygon_offsets(
    polygon_rasters: Iterable[np.ndarray], gt_mask: np.ndarray, max_shift: int = 32
) -> np.ndarray:
    """Length in pixels of each polygon's best translation onto the mask (NaN if empty).

    Args:
        polygon_rasters: (H, W) bool rasters, one per polygon.
        gt_mask: (H, W) bool building mask.
        max_shift: search range in pixels.

    Returns:
        (N,) float64 shift lengths ``hypot(dx, dy)``.
    """
    shifts = polygon_shifts(polygon_rasters, gt_mask, max_shift)
    return np.hypot(shifts[:, 0], shifts[:, 1])
