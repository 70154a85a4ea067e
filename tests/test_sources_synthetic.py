"""Tests for the synthetic city generator (cadalign.sources.synthetic)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import cv2
import numpy as np
from numpy._core._multiarray_umath import __cpu_dispatch__
import pyogrio
import pytest
import rasterio
import shapely
from affine import Affine
from shapely import affinity

from cadalign.geo.polygons import read_polygons, to_pixels
from cadalign.sources.synthetic import STYLES, SyntheticTile, generate_tile, tile_seed, write_city
from cadalign.sources.synthetic.exact import _blur, _sin, _upsample

SIZE = 192
# md5 of generate_tile(96, "dense", seed=0) image + mask bytes; changes only with the renderer
PINNED_DENSE_96 = "3f7c344893c1c892063c6ed89c1fa756"


@pytest.fixture(scope="module")
def tiles() -> dict[str, SyntheticTile]:
    """One small seeded tile per style."""
    return {style: generate_tile(SIZE, style, seed=7) for style in STYLES}


def _centres_inside(polygons: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Independent rasterization: is each pixel centre (c + 0.5, r + 0.5) inside a polygon?"""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    union = shapely.union_all(polygons) if len(polygons) else shapely.Polygon()
    return shapely.contains_xy(union, cols.ravel() + 0.5, rows.ravel() + 0.5).reshape(shape)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.parametrize("style", STYLES)
def test_same_seed_is_identical(style: str, tiles: dict[str, SyntheticTile]) -> None:
    again = generate_tile(SIZE, style, seed=7)
    first = tiles[style]
    assert again.image.tobytes() == first.image.tobytes()
    assert again.mask.tobytes() == first.mask.tobytes()
    np.testing.assert_array_equal(again.ids, first.ids)
    assert len(again.polygons) == len(first.polygons)
    assert all(shapely.equals_exact(again.polygons, first.polygons, tolerance=0.0))


def test_different_seeds_differ() -> None:
    a, b = generate_tile(128, "dense", seed=1), generate_tile(128, "dense", seed=2)
    assert np.abs(a.image.astype(int) - b.image.astype(int)).mean() > 5
    assert not np.array_equal(a.mask, b.mask)


@pytest.mark.parametrize("style", STYLES)
def test_arrays_and_polygons(style: str, tiles: dict[str, SyntheticTile]) -> None:
    tile = tiles[style]
    assert tile.image.shape == (SIZE, SIZE, 3) and tile.image.dtype == np.uint8
    assert tile.mask.shape == (SIZE, SIZE) and tile.mask.dtype == np.uint8
    assert set(np.unique(tile.mask)) <= {0, 255}
    assert tile.ids.dtype == np.int64 and len(np.unique(tile.ids)) == len(tile.ids) == len(tile.polygons)
    assert len(tile.polygons) > 0
    assert all(isinstance(p, shapely.Polygon) for p in tile.polygons)
    assert shapely.is_valid(tile.polygons).all()
    bounds = shapely.bounds(tile.polygons)
    assert bounds[:, :2].min() >= 0 and bounds[:, 2:].max() <= SIZE
    # no two footprints overlap (touching is allowed)
    tree = shapely.STRtree(tile.polygons)
    left, right = tree.query(tile.polygons, predicate="intersects")
    pairs = left < right
    overlap = shapely.area(shapely.intersection(tile.polygons[left[pairs]], tile.polygons[right[pairs]]))
    assert overlap.sum() < 1e-6
    # footprints away from the tile border keep simple rings: rectangle 5, L 7, T 9 coordinates
    inner = (bounds[:, :2].min(axis=1) > 1) & (bounds[:, 2:].max(axis=1) < SIZE - 1)
    counts = shapely.get_num_coordinates(shapely.get_exterior_ring(tile.polygons[inner]))
    assert set(counts.tolist()) <= {5, 7, 9}


@pytest.mark.parametrize("style", STYLES)
def test_mask_matches_polygons(style: str, tiles: dict[str, SyntheticTile]) -> None:
    tile = tiles[style]
    assert _iou(_centres_inside(tile.polygons, tile.mask.shape), tile.mask > 0) > 0.95


def test_courtyards_are_holes() -> None:
    holed = [p for seed in range(6) for p in generate_tile(256, "dense", seed).polygons if len(p.interiors)]
    assert holed, "dense tiles should contain courtyard buildings"
    tile = generate_tile(256, "dense", 0)
    # a hole is not building: its pixel centres are 0 in the mask
    for p in tile.polygons:
        for ring in p.interiors:
            x, y = shapely.Polygon(ring).representative_point().coords[0]
            assert tile.mask[int(y), int(x)] == 0


@pytest.mark.parametrize("style", STYLES)
def test_image_is_textured_and_buildings_stand_out(style: str, tiles: dict[str, SyntheticTile]) -> None:
    tile = tiles[style]
    grey = tile.image.astype(np.float64).mean(axis=2)
    blocks = grey[: SIZE // 8 * 8, : SIZE // 8 * 8].reshape(SIZE // 8, 8, SIZE // 8, 8)
    assert np.median(blocks.std(axis=(1, 3))) > 2.0  # not flat colour areas
    assert grey.std() > 15
    roof = tile.image[tile.mask > 0].astype(np.float64).mean(axis=0)
    ground = tile.image[tile.mask == 0].astype(np.float64).mean(axis=0)
    assert np.abs(roof - ground).sum() > 15


@pytest.mark.parametrize("style", STYLES)
def test_shadows_fall_away_from_the_sun(style: str) -> None:
    """Ground right outside a footprint is darker on the shadow side than on the sun side."""
    dark, lit = [], []
    for seed in range(3):
        tile = generate_tile(256, style, seed)
        grey = tile.image.astype(np.float64).mean(axis=2)
        dx, dy = tile.shadow_direction
        for p in tile.polygons:
            shadow_band = affinity.translate(p, 4 * dx, 4 * dy).difference(p)
            sun_band = affinity.translate(p, -4 * dx, -4 * dy).difference(p)
            for band, out in ((shadow_band, dark), (sun_band, lit)):
                inside = _centres_inside(np.array([band], dtype=object), grey.shape) & (tile.mask == 0)
                out.extend(grey[inside].tolist())
    assert np.mean(dark) < 0.8 * np.mean(lit)


def test_styles_differ() -> None:
    """Dense: many buildings, high coverage; suburb: sparse small houses; industrial: few big halls."""
    count, area, cover = {}, {}, {}
    for style in STYLES:
        tiles = [generate_tile(256, style, seed) for seed in range(3)]
        count[style] = np.mean([len(t.polygons) for t in tiles])
        area[style] = np.mean(np.concatenate([shapely.area(t.polygons) for t in tiles]))
        cover[style] = np.mean([(t.mask > 0).mean() for t in tiles])
    assert count["dense"] > 2 * count["industrial"]
    assert cover["dense"] > 1.5 * cover["suburb"]
    assert area["industrial"] > 3 * area["dense"]
    assert area["industrial"] > 3 * area["suburb"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 32}, "size"),
        ({"size": 100.5}, "size"),
        ({"style": "rural"}, "style"),
        ({"seed": -1}, "seed"),
        ({"pixel_size": 0.0}, "pixel_size"),
    ],
)
def test_generate_tile_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"size": 128, "style": "dense", "seed": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        generate_tile(**args)


def test_write_city_layout_and_georeferencing(tmp_path) -> None:
    size, pixel = 128, 0.3
    origin = (500000.0, 4350000.0)
    paths = write_city(tmp_path, "synthville", n_tiles=2, size=size, style="suburb", seed=3, origin=origin)
    assert paths == [tmp_path / "images" / "synthville1.tif", tmp_path / "images" / "synthville2.tif"]
    all_ids = []
    for n in (1, 2):
        image_path = tmp_path / "images" / f"synthville{n}.tif"
        gt_path = tmp_path / "gt" / f"synthville{n}.tif"
        gpkg = tmp_path / "polygons" / f"synthville{n}.gpkg"
        with rasterio.open(image_path) as src:
            assert src.crs.to_epsg() == 32616
            assert src.count == 3 and src.dtypes == ("uint8",) * 3
            assert src.profile["tiled"] and src.block_shapes[0] == (256, 256)
            assert src.compression.name.lower() == "deflate"
            assert [c.name for c in src.colorinterp] == ["red", "green", "blue"]
            expected = Affine(pixel, 0, origin[0] + (n - 1) * size * pixel, 0, -pixel, origin[1])
            assert src.transform.almost_equals(expected)
            image = np.moveaxis(src.read(), 0, -1)
            crs, transform = src.crs, src.transform
        with rasterio.open(gt_path) as src:
            assert src.count == 1 and src.dtypes[0] == "uint8"
            gt = src.read(1)
        assert set(np.unique(gt)) <= {0, 255}
        # the files hold exactly the tile generated from the derived seed
        tile = generate_tile(size, "suburb", tile_seed(3, n), pixel)
        np.testing.assert_array_equal(image, tile.image)
        np.testing.assert_array_equal(gt, tile.mask)
        assert [name for name, _ in pyogrio.list_layers(gpkg)] == ["buildings"]
        gdf = read_polygons(gpkg)
        assert gdf.crs.to_epsg() == 4326
        assert gdf["building_id"].dtype == np.int64
        geoms, ids = to_pixels(gdf, transform, crs)
        assert _iou(_centres_inside(geoms, gt.shape), gt > 0) > 0.95
        assert (ids // 1_000_000 == n).all()
        all_ids.extend(ids.tolist())
    assert len(set(all_ids)) == len(all_ids)


def test_write_city_tile_subset_equals_full_city(tmp_path) -> None:
    full = write_city(tmp_path / "full", "town", n_tiles=3, size=64, style="industrial", seed=5)
    part = write_city(tmp_path / "part", "town", n_tiles=[3], size=64, style="industrial", seed=5)
    assert [p.name for p in part] == ["town3.tif"]
    with rasterio.open(full[2]) as a, rasterio.open(part[0]) as b:
        np.testing.assert_array_equal(a.read(), b.read())
        assert a.transform == b.transform


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_tiles": 0}, "n_tiles"),
        ({"n_tiles": 1000}, "n_tiles"),
        ({"n_tiles": [1, 1]}, "n_tiles"),
        ({"n_tiles": [0, 2]}, "n_tiles"),
        ({"n_tiles": []}, "n_tiles"),
        ({"size": 16}, "size"),
        ({"style": "rural"}, "style"),
        ({"city": "../escape"}, "city"),
        ({"epsg": 4326}, "epsg"),
    ],
)
def test_write_city_rejects_bad_arguments(tmp_path, kwargs: dict, match: str) -> None:
    args = {"out_dir": tmp_path, "city": "synthville", "n_tiles": 1, "size": 64, "style": "dense", "seed": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        write_city(**args)
    assert not any(tmp_path.iterdir())


# Prints the md5 of a small tile per style (image, mask, polygons) and the SIMD targets in use.
_DIGEST_SCRIPT = """
import hashlib, json, sys
import cv2, numpy as np, shapely
if sys.argv[1] == "restricted":
    cv2.setUseOptimized(False)
from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
from cadalign.sources.synthetic import STYLES, generate_tile
digests = {}
for style in STYLES:
    tile = generate_tile(96, style, seed=0)
    wkb = b"".join(shapely.to_wkb(tile.polygons))
    digests[style] = hashlib.md5(tile.image.tobytes() + tile.mask.tobytes() + wkb).hexdigest()
simd = [name for name in __cpu_dispatch__ if __cpu_features__.get(name)]
print(json.dumps({"digests": digests, "numpy_simd": simd, "cv_opt": cv2.useOptimized()}))
"""


def _digests(restricted: bool) -> dict:
    env = dict(os.environ)
    if restricted:  # what an older x86-64 CPU would run: numpy and OpenCV without AVX/AVX2/AVX-512 kernels
        env["NPY_DISABLE_CPU_FEATURES"] = " ".join(__cpu_dispatch__)
        env["OPENCV_CPU_DISABLE"] = "AVX512-SKX,AVX2,FP16,AVX,SSE4.2,SSE4.1"
    mode = "restricted" if restricted else "default"
    out = subprocess.run(
        [sys.executable, "-c", _DIGEST_SCRIPT, mode], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tiles_do_not_depend_on_the_cpus_simd_kernels() -> None:
    """The same tiles with numpy's and OpenCV's AVX2/AVX-512 kernels switched off (issue 26, item 10)."""
    default, restricted = _digests(False), _digests(True)
    assert restricted["numpy_simd"] == [] and not restricted["cv_opt"]  # the restriction took effect
    assert restricted["digests"] == default["digests"]


def test_small_tile_md5_is_pinned() -> None:
    """Any machine renders this tile byte for byte as committed; a change here changes every study."""
    tile = generate_tile(96, "dense", seed=0)
    digest = hashlib.md5(tile.image.tobytes() + tile.mask.tobytes()).hexdigest()
    assert digest == PINNED_DENSE_96


def test_sin_matches_libm() -> None:
    x = np.linspace(-60.0, 60.0, 20001)
    np.testing.assert_allclose(_sin(x), np.sin(x), rtol=0, atol=1e-12)


def test_blur_and_upsample_match_opencv() -> None:
    """The numpy replacements compute what cv2.GaussianBlur and cv2.resize (INTER_CUBIC) compute."""
    rng = np.random.default_rng(0)
    image = rng.random((40, 50, 3)).astype(np.float32)
    for sigma in (0.6, 0.8, 1.2):
        np.testing.assert_allclose(_blur(image, sigma), cv2.GaussianBlur(image, (0, 0), sigma), atol=1e-6)
    small = rng.standard_normal((14, 12)).astype(np.float32)
    for cell in (2, 3, 7):
        big = cv2.resize(small, (12 * cell, 14 * cell), interpolation=cv2.INTER_CUBIC)
        oy, ox, height, width = 1, cell - 1, 14 * cell - 3, 12 * cell - cell - 2
        ours = _upsample(_upsample(small, cell, oy, height, axis=0), cell, ox, width, axis=1)
        np.testing.assert_allclose(ours, big[oy : oy + height, ox : ox + width], atol=1e-5)
