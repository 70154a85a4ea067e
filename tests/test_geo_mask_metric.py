"""Tests of cadalign.geo.mask_metric: known shifts of labels recovered against a mask."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
import shapely.affinity
from affine import Affine
from rasterio import features

from cadalign.geo.mask_metric import (
    label_offsets,
    layer_offsets,
    polygon_offsets_px,
    summarize_by_city,
    summarize_offsets,
)
from cadalign.geo.polygons import from_pixels, geometry_array, write_polygons
from cadalign.geo.tiles import write_geotiff

EPSG = 32633
SIZE = 160
TRANSFORM = Affine(0.5, 0.0, 400_000.0, 0.0, -0.5, 5_300_000.0)
# Buildings far enough apart (> 2 * the largest shift) that each can only match itself.
BUILDINGS = [
    shapely.box(10, 10, 40, 30),
    shapely.Polygon([(90, 10), (140, 10), (140, 25), (110, 25), (110, 50), (90, 50)]),
    shapely.Polygon(shapely.box(15, 90, 60, 140).exterior, [shapely.box(28, 103, 47, 127).exterior.coords]),
    shapely.box(100, 100, 145, 150),
]
SHIFTS = [(3, 0), (-2, 4), (0, 0), (5, -5)]  # px (columns, rows) applied to each label


def _mask() -> np.ndarray:
    return features.rasterize(((g, 255) for g in BUILDINGS), out_shape=(SIZE, SIZE), dtype="uint8")


def _labels(extra: list[shapely.Geometry] = ()) -> np.ndarray:
    moved = [shapely.affinity.translate(g, dx, dy) for g, (dx, dy) in zip(BUILDINGS, SHIFTS, strict=True)]
    return geometry_array(moved + list(extra))


def _write(path: Path, geoms_px: np.ndarray, crs: int = EPSG) -> None:
    """Labels written in ``crs`` (reprojected from the tile's CRS when it differs)."""
    geoms, ids, _ = from_pixels(geoms_px, np.arange(len(geoms_px)), TRANSFORM, f"EPSG:{EPSG}")
    if crs != EPSG:
        geoms = geometry_array(list(gpd.GeoSeries(list(geoms), crs=EPSG).to_crs(crs).values))
    write_polygons(path, geoms, ids, crs)


def _expected() -> np.ndarray:
    return np.array([np.hypot(dx, dy) for dx, dy in SHIFTS])


def test_polygon_offsets_recover_known_shifts():
    got = polygon_offsets_px(_labels(), _mask(), max_shift=8)
    np.testing.assert_allclose(got, _expected())
    # The search range is honoured: a 5 px shift along an axis cannot be found within +-4 px.
    assert polygon_offsets_px(_labels()[3:], _mask(), max_shift=4)[0] <= np.hypot(4, 4)


def test_label_offsets_per_city_with_reprojection(tmp_path):
    cities, labels = tmp_path / "cities", tmp_path / "labels"
    for city, crs in [("alpha", EPSG), ("beta", 4326)]:  # beta's labels are in lon/lat
        write_geotiff(cities / city / "gt" / f"{city}1.tif", _mask(), TRANSFORM, EPSG)
        _write(labels / city / f"{city}1.gpkg", _labels(), crs)
    offsets = label_offsets(cities, labels)
    assert sorted(offsets) == ["alpha", "beta"]
    for lengths in offsets.values():
        np.testing.assert_allclose(lengths, _expected(), atol=1e-9)


def test_outside_and_tiny_polygons(tmp_path):
    cities = tmp_path / "cities"
    write_geotiff(cities / "alpha" / "gt" / "alpha1.tif", _mask(), TRANSFORM, EPSG)
    outside = shapely.box(SIZE + 10, 0, SIZE + 30, 20)  # not on the tile: not measured at all
    tiny = shapely.box(70.1, 70.1, 70.4, 70.4)  # covers no pixel centre: NaN
    _write(cities / "alpha" / "osm" / "alpha1.gpkg", _labels([outside, tiny]), 4326)
    write_geotiff(cities / "synthetic" / "gt" / "synthetic1.tif", _mask(), TRANSFORM, EPSG)  # no osm/ folder
    offsets = layer_offsets(cities, "osm")
    assert list(offsets) == ["alpha"]
    lengths = offsets["alpha"]
    assert len(lengths) == len(BUILDINGS) + 1 and np.isnan(lengths[-1])
    np.testing.assert_allclose(lengths[:-1], _expected())
    summary = summarize_offsets(lengths)
    assert summary["n_polygons"] == len(BUILDINGS) and summary["n_unmeasured"] == 1


def test_summaries_against_hand_computation():
    lengths = np.array([0.0, 1.0, 2.0, 5.0, np.nan])
    summary = summarize_offsets(lengths)
    assert summary == {
        "median_offset_px": 1.5,
        "mean_offset_px": 2.0,
        "offset_within_1px": 0.5,
        "offset_within_2px": 0.75,
        "offset_within_4px": 0.75,
        "offset_within_8px": 1.0,
        "n_polygons": 4,
        "n_unmeasured": 1,
    }
    both = summarize_by_city({"a": lengths, "b": np.array([np.nan]), "c": np.array([9.0])})
    assert both["n_polygons"] == 5 and both["mean_offset_px"] == pytest.approx(17 / 5)
    assert sorted(both["cities"]) == ["a", "c"] and both["cities"]["c"]["offset_within_8px"] == 0.0
    with pytest.raises(ValueError, match="no polygon offset to summarise"):
        summarize_offsets(np.array([np.nan]))


def test_errors_name_the_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no labels under .*labels/<city>/<tile>.gpkg"):
        label_offsets(tmp_path, tmp_path / "labels")
    _write(tmp_path / "labels" / "alpha" / "alpha1.gpkg", _labels())
    with pytest.raises(FileNotFoundError, match=r"no building mask .*alpha/gt/alpha1.tif"):
        label_offsets(tmp_path / "cities", tmp_path / "labels")
    with pytest.raises(ValueError, match="max_shift must be an integer >= 0"):
        polygon_offsets_px(_labels(), _mask(), max_shift=-1)
