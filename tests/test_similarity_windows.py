"""Tests of the window selection of the similarity analysis against shapely and brute force."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from cadalign.raster import downsample_image
from cadalign.similarity import windows


def test_grid_windows_tile_the_image_without_overlap() -> None:
    corners = windows.grid_windows(70, 100, 30)
    assert len(corners) == (70 // 30) * (100 // 30)
    boxes = [shapely.box(x, y, x + 30, y + 30) for x, y in corners]
    assert all(b.within(shapely.box(0, 0, 100, 70)) for b in boxes)
    union = shapely.union_all(boxes)
    assert union.area == pytest.approx(30 * 30 * len(boxes))  # no overlap
    assert len(windows.grid_windows(20, 20, 30)) == 0
    with pytest.raises(ValueError, match="window size"):
        windows.grid_windows(10, 10, 0)


def test_windows_with_polygon_matches_shapely_containment() -> None:
    rng = np.random.default_rng(0)
    corners = windows.grid_windows(120, 120, 40)
    x, y = rng.uniform(0, 110, (2, 40))
    w, h = rng.uniform(2, 25, (2, 40))
    geoms = shapely.box(x, y, x + w, y + h)
    size, margin = 40, 8
    got = windows.windows_with_polygon(corners, size, margin, shapely.bounds(geoms))
    lo, hi = margin, size - margin
    regions = [shapely.box(cx + lo, cy + lo, cx + hi, cy + hi) for cx, cy in corners]
    want = [bool(shapely.contains(region, geoms).any()) for region in regions]
    assert got.tolist() == want
    assert 0 < got.sum() < len(corners)  # the case is not trivial
    assert not windows.windows_with_polygon(corners, size, margin, np.zeros((0, 4))).any()


def test_select_windows_is_seeded_by_tile_name() -> None:
    cands = windows.grid_windows(200, 200, 20)
    a = windows.select_windows(cands, 10, 3, "city/tile1")
    assert len(a) == 10 and len({tuple(c) for c in a}) == 10
    assert {tuple(c) for c in a} <= {tuple(c) for c in cands}
    np.testing.assert_array_equal(a, windows.select_windows(cands, 10, 3, "city/tile1"))
    assert not np.array_equal(a, windows.select_windows(cands, 10, 3, "city/tile2"))
    np.testing.assert_array_equal(windows.select_windows(cands[:4], 10, 3, "x"), cands[:4])
    with pytest.raises(ValueError, match="patches_per_tile"):
        windows.select_windows(cands, 0, 3, "x")


def test_tile_windows_keeps_the_grid_windows_with_a_true_vertex_in_their_output() -> None:
    # a 101 x 83 tile at ds 2: the downsampled grid is 50 x 42 (rounded as downsample_image rounds)
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 95, 6), rng.uniform(0, 77, 6)
    geoms = shapely.box(x, y, x + 5, y + 5)
    size, margin = 16, 4  # output 8: the grid steps by 8
    got = windows.tile_windows((83, 101), geoms, 2, size, margin, grid="output", keep="vertex",
                               per_tile=None, seed=0, name="c/t")
    small, (sx, sy) = downsample_image(np.zeros((83, 101, 1), np.uint8), 2)
    assert small.shape[:2] == (42, 50)
    vertices = shapely.get_coordinates(geoms) * (sx, sy)
    want = []
    for y0 in range(0, 42 - size + 1, size - 2 * margin):
        for x0 in range(0, 50 - size + 1, size - 2 * margin):
            lo, hi = np.array([x0, y0]) + margin, np.array([x0, y0]) + size - margin
            if ((vertices >= lo) & (vertices < hi)).all(1).any():
                want.append((x0, y0))
    assert 0 < len(want) < 4 * 5  # some windows kept, not all
    assert [tuple(c) for c in got.tolist()] == want
    # input grid and a per-tile cap: a seeded subset of the input-grid windows
    capped = windows.tile_windows((83, 101), geoms, 2, size, margin, grid="input", keep="vertex",
                                  per_tile=1, seed=0, name="c/t")
    assert len(capped) == 1 and capped[0, 0] % size == 0 and capped[0, 1] % size == 0


def test_cap_patches_is_a_seeded_sorted_subset() -> None:
    kept = windows.cap_patches(50, 7, 3)
    assert len(set(kept.tolist())) == 7 and np.all(np.diff(kept) > 0) and kept.max() < 50
    np.testing.assert_array_equal(kept, windows.cap_patches(50, 7, 3))
    np.testing.assert_array_equal(windows.cap_patches(5, 7, 3), np.arange(5))
    with pytest.raises(ValueError, match="max_patches"):
        windows.cap_patches(5, 0, 3)
