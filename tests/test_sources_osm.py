"""Tests for cadalign.sources.osm against a local Overpass-like server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import re
import urllib.parse

import numpy as np
import pytest
import shapely
from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS

from cadalign.config import ConfigError, from_dict
from cadalign.geo.polygons import read_polygons
from cadalign.geo.tiles import write_geotiff
from cadalign.sources import http
from cadalign.sources.osm import (
    OsmConfig,
    OverpassError,
    build_query,
    fetch_tile_buildings,
    parse_overpass,
    tile_bbox_wgs84,
)
from servers import LocalServer, Reply, Route

TRANSFORM = Affine(0.3, 0.0, 620_000.0, 0.0, -0.3, 3_350_000.0)
SIZE = 32
DATE = "2023-06-01T00:00:00Z"
LON0, LAT0 = -97.76, 30.27
TAGS = {"building": "yes"}
BOWTIE = [(0, 0), (2, 2), (2, 0), (0, 2), (0, 0)]  # self-intersecting ring


def _ring(x0: float, y0: float, side: float) -> list[dict[str, float]]:
    pts = [(x0, y0), (x0 + side, y0), (x0 + side, y0 + side), (x0, y0 + side), (x0, y0)]
    return [{"lon": x, "lat": y} for x, y in pts]


def _answer() -> dict:
    """A way square, an unclosed way, a bow-tie way, and a relation with a hole."""
    outer = _ring(LON0, LAT0, 1e-3)
    hole = _ring(LON0 + 2e-4, LAT0 + 2e-4, 4e-4)
    return {
        "version": 0.6,
        "elements": [
            {"type": "way", "id": 11, "tags": TAGS, "geometry": _ring(LON0 + 0.01, LAT0, 2e-4)},
            {"type": "way", "id": 12, "tags": TAGS, "geometry": _ring(LON0, LAT0, 1e-4)[:3]},
            {
                "type": "way",
                "id": 13,
                "tags": TAGS,
                "geometry": [{"lon": LON0 + x * 1e-4, "lat": LAT0 + y * 1e-4} for x, y in BOWTIE],
            },
            {
                "type": "relation",
                "id": 5,
                "tags": {"building": "yes", "type": "multipolygon"},
                "members": [  # the outer ring is split over two ways, listed out of order
                    {"type": "way", "ref": 101, "role": "outer", "geometry": outer[2:]},
                    {"type": "way", "ref": 100, "role": "outer", "geometry": outer[:3]},
                    {"type": "way", "ref": 102, "role": "inner", "geometry": hole},
                ],
            },
        ],
    }


@pytest.fixture()
def tile(tmp_path):
    path = tmp_path / "austin1.tif"
    write_geotiff(path, np.zeros((3, SIZE, SIZE), np.uint8), TRANSFORM, "EPSG:32614")
    return path


@pytest.fixture()
def waits(monkeypatch):
    recorded: list[float] = []
    monkeypatch.setattr(http, "_sleep", recorded.append)
    return recorded


@pytest.fixture()
def overpass():
    with LocalServer() as srv:
        srv.add("/api/interpreter", Route())
        yield srv


def _cfg(srv: LocalServer, **kw) -> OsmConfig:
    return OsmConfig(endpoint=srv.url("/api/interpreter"), date=DATE, timeout_s=25, backoff_s=0.5, **kw)


def _script(srv: LocalServer, *replies: Reply) -> None:
    srv.routes["/api/interpreter"].script.extend(replies)


def _json(data: dict) -> Reply:
    return Reply(status=200, body=json.dumps(data).encode(), headers={"Content-Type": "application/json"})


def test_normal_answer_written(overpass, tile, tmp_path, waits):
    _script(overpass, _json(_answer()))
    out = tmp_path / "osm" / "austin1.gpkg"
    assert fetch_tile_buildings(tile, _cfg(overpass), out) == 3
    gdf = read_polygons(out)
    assert gdf.crs.to_epsg() == 4326
    assert gdf["osm_type"].tolist() == ["way", "way", "relation"]
    assert gdf["osm_id"].tolist() == [11, 13, 5]
    assert gdf["building_id"].tolist() == [22, 26, 11] and gdf["building_id"].is_unique
    way, bowtie, relation = gdf.geometry
    assert way.area == pytest.approx(2e-4**2, rel=1e-6)
    # the self-intersecting bow-tie is repaired into its two triangles
    assert bowtie.is_valid and bowtie.area == pytest.approx(2 * (1e-4**2), rel=1e-6)
    (part,) = shapely.get_parts(relation)  # the GeoPackage column may promote to MultiPolygon
    assert len(part.interiors) == 1
    assert relation.area == pytest.approx(1e-3**2 - 4e-4**2, rel=1e-6)
    assert waits == []


def test_query_has_pinned_date_and_south_west_north_east_bbox(overpass, tile, tmp_path):
    _script(overpass, _json({"elements": []}))
    fetch_tile_buildings(tile, _cfg(overpass), tmp_path / "b.gpkg")
    (request,) = overpass.requests
    assert request.method == "POST"
    query = urllib.parse.parse_qs(request.body.decode())["data"][0]
    assert f'[date:"{DATE}"]' in query and "[out:json]" in query and "[timeout:25]" in query
    assert 'relation["building"]["type"="multipolygon"]' in query and "out geom;" in query
    boxes = re.findall(r"\(([-\d.]+),([-\d.]+),([-\d.]+),([-\d.]+)\)", query)
    assert len(boxes) == 2 and boxes[0] == boxes[1]
    south, west, north, east = map(float, boxes[0])
    # independent check: the tile corners projected with pyproj lie in the box, tightly
    xs = [TRANSFORM.c, TRANSFORM.c + SIZE * TRANSFORM.a]
    ys = [TRANSFORM.f, TRANSFORM.f + SIZE * TRANSFORM.e]
    lon, lat = Transformer.from_crs(32614, 4326, always_xy=True).transform(np.repeat(xs, 2), np.tile(ys, 2))
    assert south < north and west < east
    assert west <= lon.min() + 1e-8 and east >= lon.max() - 1e-8
    assert south <= lat.min() + 1e-8 and north >= lat.max() - 1e-8
    assert east - west == pytest.approx(lon.max() - lon.min(), rel=1e-3)


def test_429_then_200(overpass, tile, tmp_path, waits):
    _script(overpass, Reply(status=429, headers={"Retry-After": "3"}), Reply(status=504), _json(_answer()))
    assert fetch_tile_buildings(tile, _cfg(overpass), tmp_path / "b.gpkg") == 3
    assert waits == [3.0, 1.0]  # Retry-After honoured, then exponential backoff (0.5 * 2)
    assert len(overpass.requests) == 3


def test_remark_timeout_is_an_error_not_empty(overpass, tile, tmp_path):
    remark = 'runtime error: Query timed out in "query" at line 3 after 25 seconds.'
    partial = {"elements": _answer()["elements"][:1], "remark": remark}
    _script(overpass, _json(partial))
    out = tmp_path / "b.gpkg"
    with pytest.raises(OverpassError, match=r"Query timed out.*1 elements came back and may be partial"):
        fetch_tile_buildings(tile, _cfg(overpass), out)
    assert not out.exists()


def test_parse_refuses_error_remark_even_with_elements():
    answer = {"elements": _answer()["elements"], "remark": "runtime error: Query run out of memory"}
    with pytest.raises(OverpassError, match=r"^src: query failed .*out of memory.*4 elements"):
        parse_overpass(answer, "src")
    assert len(parse_overpass({"elements": _answer()["elements"], "remark": "note: fine"})) == 3


def test_malformed_json_names_endpoint(overpass, tile, tmp_path):
    _script(overpass, Reply(status=200, body=b"<html>rate limited</html>"))
    url = overpass.url("/api/interpreter")
    with pytest.raises(OverpassError, match=rf"{url}: answer is not JSON.*<html>rate limited"):
        fetch_tile_buildings(tile, _cfg(overpass), tmp_path / "b.gpkg")


def test_zero_buildings(overpass, tile, tmp_path):
    _script(overpass, _json({"elements": []}), _json({"elements": []}))
    out = tmp_path / "b.gpkg"
    assert fetch_tile_buildings(tile, _cfg(overpass), out) == 0
    assert len(read_polygons(out)) == 0
    flagged = tmp_path / "c.gpkg"
    with pytest.raises(OverpassError, match=r"returned 0 buildings .* expected at least 1"):
        fetch_tile_buildings(tile, _cfg(overpass, min_expected_buildings=1), flagged)
    assert not flagged.exists()


def test_relation_even_odd_island():
    outer, hole, island = _ring(0, 0, 10), _ring(2, 2, 6), _ring(4, 4, 2)
    answer = {
        "elements": [
            {
                "type": "relation",
                "id": 9,
                "members": [
                    {"type": "way", "role": "outer", "geometry": outer},
                    {"type": "way", "role": "inner", "geometry": hole},
                    {"type": "way", "role": "outer", "geometry": island},
                    {"type": "node", "role": "label"},
                ],
            }
        ]
    }
    ((kind, osm_id, geom),) = parse_overpass(answer)
    assert (kind, osm_id) == ("relation", 9)
    assert geom.area == pytest.approx(100 - 36 + 4)
    assert geom.contains(shapely.Point(5, 5)) and not geom.contains(shapely.Point(3, 3))


def test_bbox_errors():
    local = CRS.from_wkt('LOCAL_CS["arbitrary",UNIT["metre",1]]')
    with pytest.raises(ValueError, match=r"odd.tif: cannot transform its CRS"):
        tile_bbox_wgs84(local, TRANSFORM, SIZE, SIZE, tile="odd.tif")
    with pytest.raises(ValueError, match=r"odd.tif: no CRS"):
        tile_bbox_wgs84(None, TRANSFORM, SIZE, SIZE, tile="odd.tif")


def test_build_query_order():
    query = build_query((1.0, 2.0, 3.0, 4.0), DATE, 60)
    assert "(2.00000000,1.00000000,4.00000000,3.00000000)" in query


def test_config_rejects_bad_date():
    with pytest.raises(ConfigError, match="date '2024-01-01' must look like"):
        from_dict(OsmConfig, {"date": "2024-01-01"}, "params.yaml: osm")


def test_answers_cached_per_query_and_date(overpass, tile, tmp_path):
    cache = tmp_path / "cache"
    _script(overpass, _json(_answer()), _json(_answer()))
    first, again = tmp_path / "a.gpkg", tmp_path / "b.gpkg"
    assert fetch_tile_buildings(tile, _cfg(overpass, cache_dir=str(cache)), first) == 3
    patient = OsmConfig(endpoint=overpass.url("/api/interpreter"), date=DATE, timeout_s=99, cache_dir=str(cache))
    assert fetch_tile_buildings(tile, patient, again) == 3
    assert len(overpass.requests) == 1  # the server-side timeout is not part of the key
    assert again.read_bytes() == first.read_bytes()  # the same bytes from the cache
    (cached,) = cache.iterdir()
    assert cached.read_bytes() == json.dumps(_answer()).encode()  # the answer as it came
    older = OsmConfig(endpoint=patient.endpoint, date="2020-01-01T00:00:00Z", cache_dir=str(cache), backoff_s=0)
    fetch_tile_buildings(tile, older, tmp_path / "c.gpkg")
    assert len(overpass.requests) == 2 and len(list(cache.iterdir())) == 2  # another snapshot, another query


def test_cached_answer_with_too_few_buildings_is_asked_again(overpass, tile, tmp_path):
    _script(overpass, _json({"elements": []}), _json(_answer()))
    cfg = _cfg(overpass, cache_dir=str(tmp_path / "cache"))
    assert fetch_tile_buildings(tile, cfg, tmp_path / "a.gpkg") == 0  # accepted when 0 is enough
    assert fetch_tile_buildings(tile, cfg, tmp_path / "b.gpkg", min_expected=1) == 3
    assert len(overpass.requests) == 2


def test_failed_answer_not_cached(overpass, tile, tmp_path):
    _script(overpass, Reply(status=200, body=b"<html>rate limited</html>"), _json(_answer()))
    cfg = _cfg(overpass, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(OverpassError):
        fetch_tile_buildings(tile, cfg, tmp_path / "a.gpkg")
    assert not (tmp_path / "cache").exists()
    assert fetch_tile_buildings(tile, cfg, tmp_path / "a.gpkg") == 3


def test_ways_without_coordinates_counted_apart(caplog):
    elements = _answer()["elements"]
    square = elements[0]["geometry"]
    elements += [
        {"type": "way", "id": 14, "tags": TAGS, "geometry": [None] * len(square)},  # closed, nodes missing
        {"type": "way", "id": 15, "tags": TAGS},
        {"type": "relation", "id": 6, "members": [{"type": "way", "role": "outer", "geometry": None}]},
    ]
    with caplog.at_level(logging.INFO, logger="cadalign.sources.osm"):
        assert len(parse_overpass({"elements": elements}, "src")) == 3
    assert "src: skipped 1 OSM elements that are not closed polygons" in caplog.text  # way 12 alone
    assert "src: skipped 3 OSM elements without inline coordinates" in caplog.text
