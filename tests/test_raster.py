"""Tests of the fill/edge/vertex rasterization."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from affine import Affine
from conftest import seeded_buildings
from rasterio import features

from cadalign.geo.polygons import geometry_array
from cadalign.raster import EDGE, FILL, VERTEX, rasterize_polygons, rasterizing


def test_fill_follows_pixel_centre_rule() -> None:
    raster = rasterize_polygons(geometry_array([shapely.box(2, 3, 6, 5)]), (10, 10))
    expect = np.zeros((10, 10), dtype=np.uint8)
    expect[3:5, 2:6] = 1  # pixels whose centres (c + .5, r + .5) are inside
    np.testing.assert_array_equal(raster[FILL], expect)


def test_edge_band_and_vertices() -> None:
    box = shapely.box(10.2, 10.2, 30.2, 20.2)
    raster = rasterize_polygons(geometry_array([box]), (40, 40), edge_width=3.0)
    rows, cols = np.nonzero(raster[EDGE])
    centres = shapely.points(cols + 0.5, rows + 0.5)
    # every edge pixel centre lies within 1.5 px of the ring, and the band is ~3 px wide
    assert shapely.distance(centres, box.exterior).max() <= 1.5 + 1e-9
    assert 2 <= raster[EDGE][15, 5:16].sum() <= 4
    vr, vc = np.nonzero(raster[VERTEX])
    assert set(zip(vc.tolist(), vr.tolist())) == {(10, 10), (30, 10), (30, 20), (10, 20)}


def test_offset_and_scale() -> None:
    box = geometry_array([shapely.box(100, 200, 120, 220)])
    full = rasterize_polygons(box, (16, 16), offset=(96, 196), scale=0.5)
    # (100-96)/2 = 2 .. (120-96)/2 = 12 in x, same in y
    assert full[FILL][2:12, 2:12].all() and full[FILL].sum() == 100


def test_empty_and_outside() -> None:
    assert rasterize_polygons(geometry_array([]), (5, 5)).sum() == 0
    assert rasterize_polygons(geometry_array([shapely.box(50, 50, 60, 60)]), (5, 5)).sum() == 0


def test_channels_match_rasterio_on_the_shapes_themselves() -> None:
    # independent path: rasterio reads each shapely geometry's __geo_interface__
    def burn(shapes: np.ndarray) -> np.ndarray:
        return features.rasterize(((g, 1) for g in shapes), out_shape=(128, 128), transform=Affine.identity(), dtype="uint8")

    kinds = set()
    for seed in range(3):
        shapes = seeded_buildings(np.random.default_rng(seed))  # courtyard, MultiPolygon, some cut by the border
        kinds |= {g.geom_type for g in shapes}
        raster = rasterize_polygons(shapes, (128, 128), edge_width=2.0)
        with rasterizing():  # one GDAL environment for many calls: the same rasters
            np.testing.assert_array_equal(rasterize_polygons(shapes, (128, 128), edge_width=2.0), raster)
        np.testing.assert_array_equal(raster[FILL], burn(shapes))
        np.testing.assert_array_equal(raster[EDGE], burn(shapely.buffer(shapely.boundary(shapes), 1.0, quad_segs=2)))
        assert raster[FILL].sum() > 100 and raster[EDGE].sum() > 100
    assert kinds == {"Polygon", "MultiPolygon"}


def test_other_geometry_types_are_rejected() -> None:
    with pytest.raises(ValueError, match="only Polygons and MultiPolygons.*LINESTRING"):
        rasterize_polygons(geometry_array([shapely.LineString([(1, 1), (5, 5)])]), (8, 8))
