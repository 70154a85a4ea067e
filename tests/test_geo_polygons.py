"""Tests of polygon I/O, CRS handling and the pixel convention."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import shapely
from affine import Affine
from rasterio.crs import CRS

from cadalign.geo.polygons import (
    GPKG_TIMESTAMP,
    PolygonError,
    clean_polygons,
    from_pixels,
    geometry_array,
    read_polygons,
    to_pixels,
    write_polygons,
)
from studies import TINY_EPSG, tiny_polygons


def test_pixel_convention_matches_transform() -> None:
    # top-left corner of the tile at (500000, 5000000), 0.3 m pixels, north up
    transform = Affine(0.3, 0, 500000.0, 0, -0.3, 5000000.0)
    crs = CRS.from_epsg(TINY_EPSG)
    # a point at the centre of pixel (row 2, col 5) in map coordinates
    x, y = 500000.0 + 5.5 * 0.3, 5000000.0 - 2.5 * 0.3
    gdf = gpd.GeoDataFrame({"building_id": [7]}, geometry=[shapely.Point(x, y).buffer(0.01)], crs=crs.to_wkt())
    geoms, ids = to_pixels(gdf, transform, crs)
    centre = shapely.centroid(geoms[0])
    assert ids.tolist() == [7]
    assert centre.x == pytest.approx(5.5, abs=1e-6) and centre.y == pytest.approx(2.5, abs=1e-6)


def test_round_trip_through_wgs84_gpkg(tmp_path: Path) -> None:
    transform = Affine(0.3, 0, 500000.0, 0, -0.3, 5000000.0)
    crs = CRS.from_epsg(TINY_EPSG)
    geoms = tiny_polygons()
    proj, ids, _ = from_pixels(geoms, np.arange(4) + 1, transform, crs)
    wgs = gpd.GeoSeries(list(proj), crs=crs.to_wkt()).to_crs(4326)
    path = write_polygons(tmp_path / "b.gpkg", geometry_array(list(wgs.values)), ids, 4326)
    info = pyogrio.read_info(path)
    assert CRS.from_user_input(info["crs"]).to_epsg() == 4326 and info["features"] == 4
    back, back_ids = to_pixels(read_polygons(path), transform, crs)
    assert back_ids.tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(shapely.get_coordinates(back), shapely.get_coordinates(geoms), atol=1e-5)
    assert len(back[2].interiors) == 1  # the courtyard survived


def test_the_same_polygons_give_the_same_file(tmp_path: Path) -> None:
    # GDAL stamps a GeoPackage with the time of writing (ms), unless told a fixed one
    geoms, ids = tiny_polygons(), np.arange(4) + 1
    first = write_polygons(tmp_path / "a" / "p.gpkg", geoms, ids, TINY_EPSG)
    time.sleep(0.05)
    second = write_polygons(tmp_path / "b" / "p.gpkg", geoms, ids, TINY_EPSG)
    assert first.read_bytes() == second.read_bytes()
    with sqlite3.connect(first) as db:
        assert db.execute("SELECT last_change FROM gpkg_contents").fetchall() == [(GPKG_TIMESTAMP,)]
    assert pyogrio.get_gdal_config_option("OGR_CURRENT_DATE") is None  # not left set for other writers


def test_read_errors(tmp_path: Path) -> None:
    with pytest.raises(PolygonError, match="not found"):
        read_polygons(tmp_path / "missing.gpkg")
    (tmp_path / "junk.gpkg").write_bytes(b"not a geopackage")
    with pytest.raises(PolygonError, match="junk.gpkg"):
        read_polygons(tmp_path / "junk.gpkg")
    nocrs = tmp_path / "nocrs.gpkg"
    gpd.GeoDataFrame({"building_id": [1]}, geometry=[shapely.box(0, 0, 1, 1)]).to_file(nocrs)
    with pytest.raises(PolygonError, match="no CRS.*assign"):
        read_polygons(nocrs)


def test_clean_repairs_clips_and_counts() -> None:
    bowtie = shapely.Polygon([(1, 1), (9, 9), (9, 1), (1, 9)])  # self-intersecting
    geoms = geometry_array([shapely.box(2, 2, 5, 5), bowtie, shapely.box(60, 60, 70, 70), shapely.box(-5, 10, 5, 20)])
    kept, ids, stats = clean_polygons(geoms, np.array([1, 2, 3, 4]), (32, 32))
    assert ids.tolist() == [1, 2, 4]
    assert stats.n_repaired == 1 and stats.n_outside == 1 and stats.n_kept == 3
    assert all(shapely.is_valid(kept))
    assert kept[1].area == pytest.approx(32.0)  # the bowtie's two triangles
    assert kept[2].bounds == (0.0, 10.0, 5.0, 20.0)  # clipped to the tile
