"""Tests of the fetch stage: Inria cities end to end against local servers, and synthetic cities.

The fake Inria dataset holds 64x64 px tiles of Austin (a training city, UTM 14N) with
building masks drawn from known shapes, and a Bellingham tile (a test city, no mask). It is
served as five split 7z volumes; a fake Overpass answers with the same buildings moved by
:data:`OSM_SHIFT` pixels, given in lon/lat.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import shapely.affinity
import yaml
from affine import Affine
from pyproj import Transformer
from rasterio import features

from cadalign.config import SOURCES, ConfigError
from cadalign.geo.polygons import read_polygons, to_pixels
from cadalign.geo.tiles import read_band, write_geotiff
from cadalign.sources import http
from cadalign.sources.inria import PARTS, ZIP_NAME, InriaError
from cadalign.sources.osm import OverpassError
from cadalign.stages import fetch, measure
from conftest import TINY_STUDY_PARAMS, make_dvc_project
from servers import LocalServer, Reply, Route, serve_volumes, seven_zip, split_bytes

EPSG = 32614  # UTM 14N, where Austin is
SIZE = 64
PX = 0.3
DATE = "2022-03-01T00:00:00Z"
TRAINING = re.escape("['austin', 'chicago', 'kitsap', 'tyrol-w', 'vienna']")
OSM_SHIFT = (2.0, -1.0)  # px (columns, rows) by which the fake OSM buildings are off


def _transform(n: int) -> Affine:
    # Tiles 1 km apart, so one tile's buildings never touch another tile.
    return Affine(PX, 0.0, 620_000.0 + 1000.0 * n, 0.0, -PX, 3_350_000.0)


def _shapes(n: int) -> list[shapely.Geometry]:
    """Buildings of tile n in pixel coordinates: boxes, an L, a courtyard (n moves them a bit)."""
    return [
        shapely.box(4 + n, 4, 20 + n, 16),
        shapely.Polygon([(32, 6), (52, 6), (52, 14), (40, 14), (40, 28), (32, 28)]),
        shapely.Polygon(shapely.box(6, 34, 30, 58).exterior, [shapely.box(13, 41, 23, 51).exterior.coords]),
        shapely.box(40, 38 + n, 58, 56),
    ]


def _mask(n: int) -> np.ndarray:
    return features.rasterize(((g, 255) for g in _shapes(n)), out_shape=(SIZE, SIZE), dtype="uint8")


def _overpass_answer(tiles: list[int]) -> bytes:
    """An ``out geom`` answer with every building of ``tiles``, moved by OSM_SHIFT px."""
    to_wgs84 = Transformer.from_crs(EPSG, 4326, always_xy=True)
    elements = []
    for n in tiles:
        transform = _transform(n)
        for k, geom in enumerate(_shapes(n)):
            ring = np.asarray(shapely.affinity.translate(geom, *OSM_SHIFT).exterior.coords)
            xs, ys = transform @ (ring[:, 0], ring[:, 1])
            lon, lat = to_wgs84.transform(xs, ys)
            coords = [{"lon": float(a), "lat": float(b)} for a, b in zip(lon, lat, strict=True)]
            way = {"type": "way", "id": 1000 * n + k, "tags": {"building": "yes"}, "geometry": coords}
            elements.append(way)
    return json.dumps({"version": 0.6, "elements": elements}).encode()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Fake AerialImageDataset zip (austin 1-3, bellingham 1) as 5 split 7z volumes."""
    base = tmp_path_factory.mktemp("inria")
    rng = np.random.default_rng(5)
    root = base / "AerialImageDataset"
    tiles = [("austin", 1), ("austin", 2), ("austin", 3), ("bellingham", 1)]
    for city, n in tiles:
        split = "train" if city == "austin" else "test"
        image = rng.integers(0, 256, size=(3, SIZE, SIZE), dtype=np.uint8)
        write_geotiff(root / split / "images" / f"{city}{n}.tif", image, _transform(n), EPSG)
        if split == "train":
            mask = _mask(n) if n < 3 else np.zeros((SIZE, SIZE), np.uint8)  # tile 3 has no building
            write_geotiff(root / "train" / "gt" / f"{city}{n}.tif", mask, _transform(n), EPSG)
    zip_path = base / ZIP_NAME
    with zipfile.ZipFile(zip_path, "w") as zf:
        for path in sorted(root.rglob("*.tif")):
            zf.write(path, path.relative_to(base).as_posix())
    zip_bytes = zip_path.read_bytes()
    volumes = split_bytes(seven_zip({ZIP_NAME: zip_bytes}), len(PARTS))
    return {"md5": hashlib.md5(zip_bytes).hexdigest(), "volumes": volumes}


@pytest.fixture()
def server(dataset, monkeypatch):
    monkeypatch.setattr(http, "_sleep", lambda s: None)
    with LocalServer() as srv:
        serve_volumes(srv, PARTS, dataset["volumes"])
        srv.add("/api/interpreter", Route(data=_overpass_answer([1, 2]), content_type="application/json"))
        yield srv


def _params(tmp_path: Path, server: LocalServer, dataset: dict, cities: str, extra: str = "") -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(
        f"cities:\n{cities}\n"
        "synthetic:\n  size: 64\n  seed: 3\n"
        "download:\n"
        f"  inria:\n    base_url: {server.url('/aerial/')}\n    dir: {tmp_path / 'downloads'}\n"
        "    retries: 1\n    backoff_s: 0.0\n    timeout_s: 10.0\n"
        f"  overpass:\n    cache: {tmp_path / 'overpass'}\n    retries: 1\n    backoff_s: 0.0\n    timeout_s: 10\n"
        "inria:\n"
        f"  zip_md5: {dataset['md5']}\n"
        f"  osm:\n    endpoint: {server.url('/api/interpreter')}\n    date: '{DATE}'\n"
        f"{extra}"
    )
    return path


def _run(params: Path, city: str, out: Path) -> None:
    fetch.main(["--params", str(params), "--city", city, "--out", str(out)])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_inria_city_end_to_end(tmp_path, server, dataset):
    params = _params(tmp_path, server, dataset, "  austin: {source: inria, tiles: [2, 1]}")
    out = tmp_path / "data" / "cities" / "austin"
    _run(params, "austin", out)
    layout = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert layout == [
        f"{folder}/austin{n}.{ext}"
        for folder, ext in [("gt", "tif"), ("images", "tif"), ("osm", "gpkg"), ("polygons", "gpkg")]
        for n in (1, 2)
    ]
    assert [p.name for p in out.parent.iterdir()] == ["austin"]  # no temporary folder left behind
    assert [r.path for r in server.requests if r.method == "GET"] == [f"/aerial/{name}" for name in PARTS]
    posts = server.requests_to("/api/interpreter")
    queries = [urllib.parse.unquote_plus(r.body.decode()) for r in posts]
    assert len(queries) == 2 and all(f'[date:"{DATE}"]' in q for q in queries)
    for n in (1, 2):
        mask, info = read_band(out / "gt" / f"austin{n}.tif")
        assert info.crs.to_epsg() == EPSG and info.transform == _transform(n)
        truth = read_polygons(out / "polygons" / f"austin{n}.gpkg")
        assert truth.crs.to_epsg() == EPSG  # written in the tile's CRS
        ids = truth["building_id"].to_numpy()
        assert len(np.unique(ids)) == len(ids) == len(_shapes(n)) and (ids // 1_000_000 == n).all()
        geoms, _ = to_pixels(truth, info.transform, info.crs)
        burnt = features.rasterize(((g, 1) for g in geoms), out_shape=mask.shape, dtype="uint8") > 0
        assert _iou(burnt, mask == 255) > 0.95
        assert any(len(p.interiors) for g in geoms for p in shapely.get_parts(g))  # the courtyard is kept
        osm = read_polygons(out / "osm" / f"austin{n}.gpkg")
        assert osm.crs.to_epsg() == 4326 and len(osm) == 2 * len(_shapes(n))  # the fake answers every tile
    # The OSM buildings are off by OSM_SHIFT: the mask metric sees exactly that, the vectorised truth 0.
    osm_metrics = measure.measure_layer(out.parent, "osm")
    assert osm_metrics["median_offset_px"] == pytest.approx(np.hypot(*OSM_SHIFT))
    assert osm_metrics["n_polygons"] == 8 and osm_metrics["offset_within_1px"] == 0.0
    assert measure.measure_layer(out.parent, "polygons")["median_offset_px"] == 0.0


def test_rerun_reuses_download(tmp_path, server, dataset):
    params = _params(tmp_path, server, dataset, "  austin: {source: inria, tiles: [1]}")
    _run(params, "austin", tmp_path / "a")
    n_get = sum(r.method == "GET" for r in server.requests)
    _run(params, "austin", tmp_path / "a")
    assert sum(r.method == "GET" for r in server.requests) == n_get  # the verified zip is reused
    assert sorted(p.name for p in (tmp_path / "a" / "images").iterdir()) == ["austin1.tif"]


@pytest.mark.parametrize(
    ("city", "message"),
    [
        ("paris", rf"unknown Inria city 'paris'.*valid: {TRAINING}"),
        (
            "bellingham",
            r"'bellingham' is an Inria test city: test cities have no public building masks.*"
            rf"training city: {TRAINING}",
        ),
    ],
)
def test_unusable_city_names_valid_ones(tmp_path, server, dataset, city, message):
    params = _params(tmp_path, server, dataset, f"  {city}: {{source: inria, tiles: [1]}}")
    with pytest.raises(InriaError, match=message):
        _run(params, city, tmp_path / "out")
    assert server.requests == [] and not (tmp_path / "out").exists()


def test_unknown_inria_key_rejected(tmp_path, server, dataset):
    austin = "  austin: {source: inria, tiles: [1]}"
    params = _params(tmp_path, server, dataset, austin, extra="    endpiont: x\n")
    with pytest.raises(ConfigError, match=r"unknown key 'inria\.osm\.endpiont'"):
        _run(params, "austin", tmp_path / "out")
    params = _params(tmp_path, server, dataset, austin, extra="  simplify_px: -1\n")
    with pytest.raises(ConfigError, match=r"simplify_px = -1.0; set inria.simplify_px >= 0"):
        _run(params, "austin", tmp_path / "out")


def test_empty_osm_answer_over_buildings_fails_atomically(tmp_path, server, dataset):
    server.routes["/api/interpreter"].data = json.dumps({"elements": []}).encode()
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("kept")
    params = _params(tmp_path, server, dataset, "  austin: {source: inria, tiles: [1]}")
    message = (
        r"^austin: tile austin1: Overpass returned 0 buildings .* at least 1; .* Retry later\. Its gt mask shows "
        r"buildings and inria.require_osm_buildings is true; if OSM really lacks them, set "
        r"inria.require_osm_buildings: false"
    )
    with pytest.raises(OverpassError, match=message) as err:
        _run(params, "austin", out)
    assert str(tmp_path) not in str(err.value)  # no temporary path that is gone by now
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no half-written city
    assert [p.name for p in out.iterdir()] == ["previous.txt"]  # the previous output is untouched
    # The escape hatch for really unmapped areas; tile 3's mask is empty, so it never needs OSM buildings.
    lenient = "  require_osm_buildings: false\n"
    params = _params(tmp_path, server, dataset, "  austin: {source: inria, tiles: [1, 3]}", lenient)
    _run(params, "austin", out)
    assert len(read_polygons(out / "osm" / "austin1.gpkg")) == 0
    assert len(read_polygons(out / "polygons" / "austin3.gpkg")) == 0


def test_synthetic_city_still_works(tmp_path, server, dataset, caplog):
    city = "  tinyville: {source: synthetic, style: suburb, tiles: [1, 2]}"
    params = _params(tmp_path, server, dataset, city)
    out = tmp_path / "cities" / "tinyville"
    with caplog.at_level(logging.INFO, logger="cadalign.stages.fetch"):
        _run(params, "tinyville", out)
    assert server.requests == []
    for n in (1, 2):
        with rasterio.open(out / "images" / f"tinyville{n}.tif") as src:
            assert src.count == 3 and src.shape == (SIZE, SIZE)
        mask, info = read_band(out / "gt" / f"tinyville{n}.tif")
        geoms, _ = to_pixels(read_polygons(out / "polygons" / f"tinyville{n}.gpkg"), info.transform, info.crs)
        if len(geoms):
            burnt = features.rasterize(((g, 1) for g in geoms), out_shape=mask.shape, dtype="uint8") > 0
            assert _iou(burnt, mask > 0) > 0.9
    assert not (out / "osm").exists()


def test_unknown_synthetic_style_names_the_key(tmp_path, server, dataset):
    params = _params(tmp_path, server, dataset, "  tinyville: {source: synthetic, style: suburbs, tiles: [1]}")
    with pytest.raises(ConfigError, match=r"params.yaml: cities.tinyville: style = 'suburbs' is not a synthetic style; "
                       r"use one of dense, suburb, industrial"):
        _run(params, "tinyville", tmp_path / "cities" / "tinyville")
    assert not (tmp_path / "cities").exists()


@pytest.mark.slow
def test_dvc_repro_inria_city(tmp_path, server, dataset, monkeypatch):
    """The project's dvc.yaml runs the registration study on an Inria city from the local servers.

    Fetch, misalign, three rounds of train and realign, the evaluations, the OSM mask metric
    and the figures. The similarity stages are left out: their 124-px analysis windows need
    tiles larger than these 64-px fakes (the synthetic whole-study test runs them).
    """
    params = _params(tmp_path, server, dataset, "  austin: {source: inria, tiles: [1, 2]}")
    text = params.read_text() + TINY_STUDY_PARAMS + "draw: {tile: austin1, window: [0, 0, 64, 64]}\n"
    proj, dvc = make_dvc_project(tmp_path, text)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    dvc("repro", "misalign")
    assert sorted(p.name for p in (proj / "data" / "cities").iterdir()) == ["austin"]
    city_dir = proj / "data" / "cities" / "austin"
    assert sorted(p.name for p in city_dir.iterdir()) == ["gt", "images", "osm", "polygons"]
    labels = proj / "data" / "labels" / "round0" / "austin"
    assert sorted(p.name for p in labels.iterdir()) == ["austin1.gpkg", "austin2.gpkg", "manifest.json"]
    tracked = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]["fetch@austin"]["params"]["params.yaml"]
    assert tracked["inria"]["osm"]["date"] == DATE and "download" not in tracked  # the data keys, not the how
    n_requests = len(server.requests)
    assert "didn't change" in dvc("repro", "misalign")
    text = (proj / "params.yaml").read_text()
    how = text.replace("retries: 1", "retries: 4").replace("timeout_s: 10", "timeout_s: 30")
    (proj / "params.yaml").write_text(how.replace(str(tmp_path / "overpass"), str(tmp_path / "cache2")))
    assert "didn't change" in dvc("repro", "misalign")  # retries, timeouts, folders refetch nothing
    (proj / "params.yaml").write_text(text.replace(DATE, "2023-01-01T00:00:00Z"))
    assert "fetch@austin" in dvc("status")  # another OSM snapshot is other data
    (proj / "params.yaml").write_text(text)
    assert len(server.requests) == n_requests
    dvc("repro", "draw", "measure@osm")
    for k in range(4):
        metrics = json.loads((proj / "data" / "eval" / f"round{k}" / "metrics.json").read_text())
        assert metrics["n_vertices"] > 0 and metrics["mask_offset"]["n_polygons"] > 0
    osm = json.loads((proj / "data" / "eval" / "osm" / "metrics.json").read_text())
    assert osm["median_offset_px"] == pytest.approx(np.hypot(*OSM_SHIFT))  # the fake OSM shift
    assert (proj / "data" / "figures" / "overlay.png").read_bytes()[:4] == b"\x89PNG"
    assert len(server.requests) == n_requests  # training and evaluation never touch the network


def _queries(server: LocalServer) -> list[str]:
    return [urllib.parse.parse_qs(r.body.decode())["data"][0] for r in server.requests_to("/api/interpreter")]


def test_reset_mid_city_then_rerun_asks_only_the_missing_tiles(tmp_path, server, dataset):
    # tile 1 answers, tile 2's answer is cut by a reset on both attempts (download.overpass.retries = 1)
    cut = [Reply(cut_after=10, reset=True), Reply(cut_after=10, reset=True)]
    server.routes["/api/interpreter"].script.extend([Reply(), *cut])
    params = _params(tmp_path, server, dataset, "  austin: {source: inria, tiles: [1, 2, 3]}")
    out = tmp_path / "data" / "cities" / "austin"
    with pytest.raises(http.DownloadError, match="/api/interpreter: giving up after 2 attempts"):
        _run(params, "austin", out)
    assert not out.exists()
    first = _queries(server)
    assert len(first) == 3 and first[1] == first[2] != first[0]
    n_get = sum(r.method == "GET" for r in server.requests)
    _run(params, "austin", out)
    second = _queries(server)[3:]
    assert len(second) == 2 and second[0] == first[1] and first[0] not in second  # tiles 2 and 3 only
    assert sum(r.method == "GET" for r in server.requests) == n_get  # the verified zip is reused
    # another run, into another folder, takes every tile from the cache and writes the same bytes
    again = tmp_path / "again" / "austin"
    _run(params, "austin", again)
    assert len(_queries(server)) == 5
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert len(files) == 12 and files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((out / f).read_bytes() == (again / f).read_bytes() for f in files)


def test_fetch_params_are_the_keys_that_change_the_data():
    """dvc.yaml tracks the section of the city's source; the only other section the stage reads is
    `download` (how, not what), so a retry count or a folder refetches nothing."""
    repo = Path(__file__).resolve().parents[1]
    stage = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["fetch"]["do"]
    assert stage["params"] == ["cities.${key}", "${item.source}"]
    read = set(re.findall(r"load_section\([^,]+,\s*\"(\w+)\"", Path(fetch.__file__).read_text()))
    assert read - set(SOURCES) == {"download"}
    operational = {"retries", "backoff_s", "timeout_s", "download_dir", "dir", "cache", "base_url", "parts"}
    data_keys = {f.name for cls in (fetch.InriaSourceConfig, fetch.OsmSourceConfig) for f in dataclasses.fields(cls)}
    assert not data_keys & operational
