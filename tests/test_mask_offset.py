"""Tests for cadalign.mask_offset."""

from __future__ import annotations

import numpy as np
import pytest

from cadalign.mask_offset import best_translation, polygon_offsets, polygon_shifts, translation_ious


def _shift(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Move a mask by (dx, dy), zero fill, independent of the code under test."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    for r in range(h):
        for c in range(w):
            if mask[r, c] and 0 <= r + dy < h and 0 <= c + dx < w:
                out[r + dy, c + dx] = True
    return out


def _blobs(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for _ in range(n):
        r, c = rng.integers(8, np.array(shape) - 20)
        h, w = rng.integers(3, 12, size=2)
        mask[r : r + h, c : c + w] = True
    return mask


@pytest.mark.parametrize(("dx", "dy"), [(5, -3), (-7, 0), (0, 11), (-12, -9), (0, 0)])
def test_known_shift_recovered(dx, dy):
    poly = _blobs(np.random.default_rng(1), (64, 80), 4)
    poly[:14] = poly[-14:] = False
    poly[:, :14] = poly[:, -14:] = False  # keep everything inside the frame after the shift
    gt = _shift(poly, dx, dy)
    assert best_translation(poly, gt, max_shift=16) == (dx, dy, 1.0)


def test_ious_match_brute_force():
    rng = np.random.default_rng(2)
    poly = rng.random((13, 17)) > 0.6
    gt = rng.random((13, 17)) > 0.5
    ious = translation_ious(poly, gt, max_shift=5)
    assert ious.shape == (11, 11)
    for dy in range(-5, 6):
        for dx in range(-5, 6):
            moved = _shift(poly, dx, dy)
            expected = (moved & gt).sum() / (moved | gt).sum()
            assert ious[dy + 5, dx + 5] == pytest.approx(expected, abs=1e-12)


def test_max_shift_clipped_to_window_and_ties():
    poly = np.zeros((4, 5), bool)
    poly[1, 1] = True
    ious = translation_ious(poly, np.zeros((4, 5), bool), max_shift=32)
    assert ious.shape == (7, 9) and not ious.any()
    assert best_translation(poly, np.zeros((4, 5), bool), max_shift=32) == (0, 0, 0.0)


def test_polygon_offsets_per_polygon():
    shape = (120, 150)
    shifts = [(3, 4), (-6, 0), (0, -2)]
    boxes = [(20, 30, 12, 15), (60, 90, 10, 20), (95, 20, 8, 8)]
    polys, gt = [], np.zeros(shape, bool)
    for (r, c, h, w), (dx, dy) in zip(boxes, shifts, strict=True):
        p = np.zeros(shape, bool)
        p[r : r + h, c : c + w] = True
        polys.append(p)
        gt |= _shift(p, dx, dy)
    polys.append(np.zeros(shape, bool))
    out = polygon_shifts(iter(polys), gt, max_shift=8)
    np.testing.assert_array_equal(out[:3, :2], np.array(shifts, float))
    np.testing.assert_array_equal(out[:3, 2], 1.0)
    lengths = polygon_offsets(polys, gt, max_shift=8)
    np.testing.assert_allclose(lengths[:3], [5.0, 6.0, 2.0])
    assert np.isnan(lengths[3])


def test_errors():
    with pytest.raises(ValueError, match="same shape"):
        best_translation(np.ones((4, 4), bool), np.ones((4, 5), bool))
    with pytest.raises(ValueError, match="poly_mask is empty"):
        best_translation(np.zeros((4, 4), bool), np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="max_shift must be an integer >= 0"):
        best_translation(np.ones((4, 4), bool), np.ones((4, 4), bool), max_shift=-1)
