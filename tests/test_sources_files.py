"""Tests of the ``files`` source: one's own GeoTIFF tiles, vector file of buildings and masks.

Two seeded fixtures, as users bring them:

- a panchromatic tile (1 band, uint16, nodata 0 on a strip) in UTM 31N (EPSG:32631), its
  buildings in an EPSG:4326 GeoJSON that also holds an invalid bow tie, an empty geometry, a
  line and a building far outside the tile;
- a 4-band uint8 tile (R, G, B, near infrared) in Lambert-93 (EPSG:2154) with its buildings
  in a Shapefile in EPSG:3857 and a 0/1 building mask shifted by :data:`MASK_SHIFT` px.

The buildings are drawn into the images from the same pixel shapes, so the reprojected
polygons must fall on the bright pixels.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import shapely.affinity
from affine import Affine
from conftest import TINY_STUDY_PARAMS, make_dvc_project
from rasterio import features

from cadalign.config import ConfigError, FilesCityConfig, load_cities
from cadalign.geo.polygons import read_polygons, to_pixels
from cadalign.geo.tiles import read_band, read_tile, write_geotiff
from cadalign.sources import files
from cadalign.stages import fetch, measure, misalign

PAN = {"epsg": 32631, "shape": (80, 96), "transform": Affine(0.5, 0.0, 448_000.0, 0.0, -0.5, 5_411_000.0)}
RGBN = {"epsg": 2154, "shape": (72, 64), "transform": Affine(0.3, 0.0, 651_000.0, 0.0, -0.3, 6_862_000.0)}
NODATA_COLUMNS = 4  # the pan tile's last columns are nodata (0)
MASK_SHIFT = 2  # px (columns) by which the 4-band tile's mask is off its buildings


def _shapes() -> list[shapely.Geometry]:
    """Buildings in pixel coordinates: a box, an L, a courtyard (hole), a MultiPolygon."""
    return [
        shapely.box(6, 6, 26, 20),
        shapely.Polygon([(32, 6), (52, 6), (52, 14), (40, 14), (40, 28), (32, 28)]),
        shapely.Polygon(shapely.box(6, 34, 34, 62).exterior, [shapely.box(14, 42, 26, 54).exterior.coords]),
        shapely.MultiPolygon([shapely.box(42, 40, 50, 60), shapely.box(54, 40, 60, 60)]),
    ]


BOWTIE = shapely.Polygon([(64, 6), (84, 26), (84, 6), (64, 26)])  # self-intersecting: repaired into 2 triangles


def _to_crs(geoms: list, spec: dict) -> gpd.GeoSeries:
    t = spec["transform"]
    return gpd.GeoSeries([shapely.affinity.affine_transform(g, [t.a, t.b, t.d, t.e, t.c, t.f]) for g in geoms],
                         crs=spec["epsg"])


def _burn(geoms: list, shape: tuple[int, int]) -> np.ndarray:
    return features.rasterize(((g, 1) for g in geoms), out_shape=shape, dtype="uint8") > 0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.fixture()
def pan(tmp_path: Path) -> dict:
    """The 1-band uint16 UTM tile and its EPSG:4326 GeoJSON."""
    rng = np.random.default_rng(11)
    height, width = PAN["shape"]
    drawn = _shapes() + [shapely.make_valid(BOWTIE)]
    image = rng.integers(8_000, 12_000, size=PAN["shape"]).astype(np.uint16)
    inside = _burn(drawn, PAN["shape"])
    image[inside] = rng.integers(30_000, 32_000, size=int(inside.sum()))
    image[:, width - NODATA_COLUMNS:] = 0
    path = tmp_path / "pan" / "scene_a.tif"
    write_geotiff(path, image, PAN["transform"], PAN["epsg"], nodata=0)
    far = shapely.box(10, 10, 30, 30)
    geoms = list(_to_crs([*_shapes(), BOWTIE], PAN).to_crs(4326))
    geoms += [shapely.Polygon(), shapely.LineString([(2.3, 48.8), (2.31, 48.81)]),
              _to_crs([shapely.affinity.translate(far, 20_000, 0)], PAN).to_crs(4326).iloc[0]]
    vector = tmp_path / "vectors" / "buildings.geojson"
    vector.parent.mkdir()
    gpd.GeoDataFrame({"name": [f"b{i}" for i in range(len(geoms))]}, geometry=geoms, crs=4326).to_file(vector)
    return {"image": path, "array": image, "drawn": drawn, "vector": vector}


@pytest.fixture()
def rgbn(tmp_path: Path) -> dict:
    """The 4-band uint8 Lambert-93 tile, its EPSG:3857 Shapefile and a shifted 0/1 mask."""
    rng = np.random.default_rng(12)
    image = rng.integers(40, 110, size=(4, *RGBN["shape"]), dtype=np.uint8)
    inside = _burn(_shapes(), RGBN["shape"])
    image[:3, inside] = 210
    image[3] = rng.integers(0, 256, size=RGBN["shape"], dtype=np.uint8)  # a near infrared band unlike R, G, B
    path = tmp_path / "rgbn" / "scene_b.tif"
    write_geotiff(path, image, RGBN["transform"], RGBN["epsg"])
    mask = np.roll(inside, MASK_SHIFT, axis=1).astype(np.uint8)
    mask_path = tmp_path / "masks" / "scene_b.tif"
    write_geotiff(mask_path, mask, RGBN["transform"], RGBN["epsg"])
    vector = tmp_path / "shp" / "buildings.shp"
    vector.parent.mkdir()
    gpd.GeoDataFrame({"id": np.arange(4)}, geometry=_to_crs(_shapes(), RGBN).to_crs(3857)).to_file(vector)
    return {"image": path, "array": image, "inside": inside, "mask": mask_path, "vector": vector}


def _params(tmp_path: Path, city: str, extra: str = "", stretch: str = "[2.0, 98.0]") -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(f"cities:\n  mine: {city}\nfiles: {{stretch: {stretch}}}\n{extra}")
    return path


def _fetch(params: Path, out: Path) -> None:
    fetch.main(["--params", str(params), "--city", "mine", "--out", str(out)])


def _written(out: Path, n: int = 1) -> tuple[np.ndarray, np.ndarray, rasterio.Affine, np.ndarray]:
    """(RGB image, pixel-coordinate polygons, transform, gt mask) of written tile n."""
    tile = read_tile(out / "images" / f"mine{n}.tif")
    geoms, _ = to_pixels(read_polygons(out / "polygons" / f"mine{n}.gpkg"), tile.info.transform, tile.info.crs)
    gt, _ = read_band(out / "gt" / f"mine{n}.tif")
    return tile.image, geoms, tile.info.transform, gt


def test_pan_uint16_tile_with_geojson_in_wgs84(tmp_path, pan, caplog):
    params = _params(tmp_path, f"{{source: files, tiles: [1], images: '{pan['image'].parent}/*.tif', "
                               f"polygons: {pan['vector']}}}")
    out = tmp_path / "cities" / "mine"
    with caplog.at_level(logging.INFO):
        _fetch(params, out)
    image, geoms, transform, gt = _written(out)
    assert transform == PAN["transform"] and image.shape == (*PAN["shape"], 3)
    # The 1 band, replicated, stretched from its own 2-98 % percentiles (nodata left out) to 0..255.
    raw = pan["array"].astype(np.float64)
    valid = pan["array"] != 0
    lo, hi = np.percentile(raw[valid], [2, 98])
    expected = np.where(valid, np.round(np.interp(raw, [lo, hi], [0.0, 255.0])), 0).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(image[..., c], expected)
    assert not image[:, -NODATA_COLUMNS:].any()
    # The polygons, given in lon/lat, land on the buildings drawn in the image.
    bright = image[..., 0] > 128
    assert _iou(_burn(list(geoms), PAN["shape"]), bright) > 0.97
    assert np.array_equal(gt > 0, _burn(list(geoms), PAN["shape"]))  # no mask: the truth burned in
    parts = [p for g in geoms for p in shapely.get_parts(g)]
    assert any(len(p.interiors) == 1 for p in parts)  # the courtyard keeps its hole
    assert sorted(shapely.get_num_geometries(geoms)) == [1, 1, 1, 2, 2]  # the MultiPolygon, the repaired bow tie
    assert len(geoms) == 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        f"{pan['vector']}: 1 invalid polygons repaired (make_valid), 1 empty and 1 not polygonal" in m and "of 8" in m
        for m in warnings
    ), warnings
    assert any(f"{pan['vector']}: 1 of 6 polygons meet none of the 1 tiles" in r.getMessage() for r in caplog.records)


def test_float_bands_with_a_nodata_param_and_nan(tmp_path, pan):
    """A float32 reflectance tile, -9999 fill without a nodata tag (cities.mine.nodata says it), a NaN."""
    rng = np.random.default_rng(3)
    data = rng.normal(0.2, 0.05, size=(3, *PAN["shape"])).astype(np.float32)
    data[:, _burn(pan["drawn"], PAN["shape"])] += 0.5
    data[1] *= 3.0
    data[:, :, :5] = -9999.0
    data[0, 10, 10] = np.nan
    path = tmp_path / "float" / "refl.tif"
    write_geotiff(path, data, PAN["transform"], PAN["epsg"])
    city = f"{{source: files, tiles: [1], images: {path}, polygons: {pan['vector']}, nodata: -9999, bands: [3, 2, 1]}}"
    _fetch(_params(tmp_path, city, stretch="[5, 95]"), tmp_path / "cities" / "mine")
    image, *_ = _written(tmp_path / "cities" / "mine")
    valid = np.all(data > -9000, axis=0) & ~np.isnan(data).any(axis=0)
    assert (~valid).sum() == 5 * PAN["shape"][0] + 1
    for c, band in enumerate(data[::-1].astype(np.float64)):  # bands [3, 2, 1] -> R, G, B
        lo, hi = np.percentile(band[valid], [5, 95])
        want = np.where(valid, np.round(np.interp(band, [lo, hi], [0.0, 255.0])), 0)
        np.testing.assert_array_equal(image[..., c], want.astype(np.uint8))
        assert (image[..., c][valid] == 255).mean() == pytest.approx(0.05, abs=0.01)  # the top 5 % saturate


def test_internal_mask_marks_missing_pixels(tmp_path, pan):
    """A tile without a nodata tag whose GDAL internal mask hides a saturated strip."""
    image = pan["array"].copy()
    image[:, :6] = 65_535
    path = tmp_path / "masked" / "scene.tif"
    path.parent.mkdir()
    height, width = PAN["shape"]
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(
        path, "w", driver="GTiff", width=width, height=height, count=1, dtype="uint16",
        crs=f"EPSG:{PAN['epsg']}", transform=PAN["transform"],
    ) as dst:
        dst.write(image, 1)
        dst.write_mask(np.where(np.arange(width) < 6, 0, 255).astype(np.uint8)[None].repeat(height, 0))
    _fetch(_params(tmp_path, f"{{source: files, tiles: [1], images: {path}, polygons: {pan['vector']}}}"),
           tmp_path / "cities" / "mine")
    out, *_ = _written(tmp_path / "cities" / "mine")
    valid = np.arange(width)[None].repeat(height, 0) >= 6  # the zeros of the last columns are valid here: no tag
    lo, hi = np.percentile(image[valid].astype(np.float64), [2, 98])
    want = np.where(valid, np.round(np.interp(image.astype(np.float64), [lo, hi], [0.0, 255.0])), 0)
    np.testing.assert_array_equal(out[..., 0], want.astype(np.uint8))


def test_four_band_uint8_tile_with_shapefile_and_mask(tmp_path, rgbn):
    params = _params(tmp_path, f"{{source: files, tiles: [1], images: [{rgbn['image']}], polygons: {rgbn['vector']}, "
                               f"masks: '{rgbn['mask'].parent}/*.tif'}}")
    out = tmp_path / "cities" / "mine"
    _fetch(params, out)
    image, geoms, _, gt = _written(out)
    # uint8 R, G, B kept as they are (GDAL labels band 4 alpha: its zeros must not mask pixels)
    assert (rgbn["array"][3] == 0).any()
    np.testing.assert_array_equal(np.moveaxis(image, -1, 0), rgbn["array"][:3])
    assert _iou(_burn(list(geoms), RGBN["shape"]), rgbn["inside"]) > 0.97
    np.testing.assert_array_equal(gt, np.roll(rgbn["inside"], MASK_SHIFT, axis=1) * 255)  # the given mask, as 0/255
    # The mask metric of the true polygons measures the mask's shift.
    metrics = measure.measure_layer(out.parent, "polygons")
    assert metrics["median_offset_px"] == MASK_SHIFT and metrics["n_polygons"] == 4


def test_band_choice_replicates_one_band(tmp_path, rgbn):
    params = _params(tmp_path, f"{{source: files, tiles: [1], images: {rgbn['image']}, polygons: {rgbn['vector']}, "
                               "bands: [4]}")
    _fetch(params, tmp_path / "cities" / "mine")
    image, *_ = _written(tmp_path / "cities" / "mine")
    for c in range(3):
        np.testing.assert_array_equal(image[..., c], rgbn["array"][3])


def test_fetch_then_misalign(tmp_path, pan, rgbn):
    """Two tiles in two CRSs from one glob (tile n = the n-th sorted path), then the misalign stage."""
    both = gpd.pd.concat([gpd.read_file(pan["vector"]).to_crs(3857), gpd.read_file(rgbn["vector"])])
    vector = tmp_path / "both.gpkg"
    gpd.GeoDataFrame(geometry=list(both.geometry), crs=3857).to_file(vector)
    city = f"{{source: files, tiles: [2, 1], images: ['{tmp_path}/rgbn/*.tif', '{tmp_path}/pan/*'], polygons: {vector}}}"
    params = _params(tmp_path, city, "noise: {max_displacement: 3.0, n_bumps: 30, seed: 1}\n")
    out = tmp_path / "cities" / "mine"
    _fetch(params, out)
    assert read_tile(out / "images" / "mine1.tif").info.crs.to_epsg() == PAN["epsg"]  # pan/scene_a sorts first
    assert read_tile(out / "images" / "mine2.tif").info.crs.to_epsg() == RGBN["epsg"]
    labels = tmp_path / "labels" / "round0" / "mine"
    misalign.main(["--params", str(params), "--city", "mine", "--city-dir", str(out), "--truth-out",
                   str(tmp_path / "truth" / "mine"), "--labels-out", str(labels), "--fields-out", str(tmp_path / "noise")])
    truth = read_polygons(tmp_path / "truth" / "mine" / "mine2.gpkg")
    noisy = read_polygons(labels / "mine2.gpkg")
    assert list(truth["building_id"]) == [2_000_000 + k for k in range(4)]
    shifts = [shapely.hausdorff_distance(a, b) / 0.3 for a, b in zip(truth.geometry, noisy.geometry, strict=True)]
    assert 0 < max(shifts) <= 3.0 * np.sqrt(2) + 1e-6  # moved, by at most the noise amplitude


def _error(tmp_path: Path, city: str, extra: str = "") -> str:
    out = tmp_path / "cities" / "mine"
    with pytest.raises((files.FilesError, ConfigError)) as err:
        _fetch(_params(tmp_path, city, extra), out)
    assert not out.exists()  # nothing half-written
    return str(err.value)


def test_glob_matching_nothing_and_missing_files(tmp_path, pan):
    message = _error(tmp_path, f"{{source: files, tiles: [1], images: '{tmp_path}/nope/*.tif', polygons: {pan['vector']}}}")
    assert message == f"cities.mine.images: the pattern '{tmp_path}/nope/*.tif' matches no file (relative to {Path.cwd()}); fix the pattern"
    message = _error(tmp_path, f"{{source: files, tiles: [1], images: {pan['image']}, polygons: {tmp_path}/missing.gpkg}}")
    assert message == f"cities.mine.polygons: file not found: {tmp_path}/missing.gpkg (relative to {Path.cwd()}); fix the path"
    message = _error(tmp_path, f"{{source: files, tiles: [1, 2], images: {pan['image']}, polygons: {pan['vector']}}}")
    assert message.startswith("cities.mine.tiles: tile 2 asked for, but cities.mine.images matches 1 files")


def test_tile_and_vector_without_crs(tmp_path, pan, rgbn):
    bare = tmp_path / "bare.tif"
    with rasterio.open(bare, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint16") as dst:
        dst.write(np.arange(64, dtype=np.uint16).reshape(1, 8, 8))
    message = _error(tmp_path, f"{{source: files, tiles: [1], images: {bare}, polygons: {pan['vector']}}}")
    assert message == (f"{bare}: the tile has no CRS (cities.mine.images); georeference it, "
                       f"e.g. gdal_edit.py -a_srs EPSG:xxxx {bare}")
    rgbn["vector"].with_suffix(".prj").unlink()
    message = _error(tmp_path, f"{{source: files, tiles: [1], images: {rgbn['image']}, polygons: {rgbn['vector']}}}")
    assert message.startswith(f"{rgbn['vector']}: the polygons have no CRS (cities.mine.polygons); assign the right one")


def test_polygons_in_a_wrong_crs_name_both(tmp_path, pan):
    wrong = tmp_path / "wrong_zone.geojson"  # UTM 31N coordinates labelled as UTM 32N: 6 degrees off
    utm = gpd.read_file(pan["vector"]).to_crs(PAN["epsg"])
    gpd.GeoDataFrame(geometry=list(utm.geometry), crs=32632).to_file(wrong)
    message = _error(tmp_path, f"{{source: files, tiles: [1], images: {pan['image']}, polygons: {wrong}}}")
    assert re.match(rf"{re.escape(str(wrong))}: none of its 6 polygons \(CRS EPSG:32632, bounds .*\) meets any tile "
                    r"of cities\.mine\.images \(CRS EPSG:32631\); most likely one of the two CRSs is wrong", message)


@pytest.mark.parametrize(
    ("bands", "expected"),
    [("[5]", "band 5 does not exist, the image has 4; fix cities.mine.bands"),
     ("[1, 2]", "cities.mine: bands = [1, 2]; give three 1-based band numbers")],
)
def test_bad_band_choice(tmp_path, rgbn, bands, expected):
    message = _error(tmp_path, f"{{source: files, tiles: [1], images: {rgbn['image']}, polygons: {rgbn['vector']}, "
                               f"bands: {bands}}}")
    assert expected in message


@pytest.mark.parametrize(("fill", "expected"), [(0, "every pixel is nodata"), (1234, "band 1 of the chosen bands is constant (1234)")])
def test_constant_or_empty_image_is_refused(tmp_path, pan, fill, expected):
    flat = tmp_path / "flat.tif"
    write_geotiff(flat, np.full(PAN["shape"], fill, dtype=np.uint16), PAN["transform"], PAN["epsg"], nodata=0)
    message = _error(tmp_path, f"{{source: files, tiles: [1], images: {flat}, polygons: {pan['vector']}}}")
    assert message.startswith(f"{flat}: {expected}")


def test_mask_must_match_its_image(tmp_path, rgbn, pan):
    message = _error(tmp_path, f"{{source: files, tiles: [1], images: {rgbn['image']}, polygons: {rgbn['vector']}, "
                               f"masks: {pan['image']}}}")
    assert message.startswith(f"cities.mine.masks: no mask for {rgbn['image']}")


def test_files_city_config(tmp_path):
    path = _params(tmp_path, "{source: files, tiles: [1], images: a.tif, polygons: b.gpkg, colour: red}")
    with pytest.raises(ConfigError, match=r"unknown key 'cities.mine.colour'"):
        load_cities(path)
    path = _params(tmp_path, "{source: file, tiles: [1]}")
    with pytest.raises(ConfigError, match=re.escape("cities.mine.source: 'file' is not one of ['synthetic', 'inria', 'files']")):
        load_cities(path)
    path = _params(tmp_path, "{source: files, tiles: [1], images: [a.tif, 'b/*.tif'], polygons: b.gpkg}")
    assert load_cities(path)["mine"] == FilesCityConfig(source="files", tiles=(1,), images=("a.tif", "b/*.tif"), polygons="b.gpkg")
    path = _params(tmp_path, "{source: files, tiles: [1], images: a.tif, polygons: b.gpkg}", stretch="[98, 2]")
    with pytest.raises(ConfigError, match=re.escape("set files.stretch to [low, high] percentiles")):
        _fetch(path, tmp_path / "out")


@pytest.mark.slow
def test_dvc_repro_files_city(tmp_path, pan, monkeypatch):
    """The project's dvc.yaml runs the study on a city of one's own files (similarity aside, as for Inria)."""
    city = f"{{source: files, tiles: [1], images: '{pan['image'].parent}/*.tif', polygons: {pan['vector']}}}"
    text = f"cities:\n  mine: {city}\nfiles: {{stretch: [2.0, 98.0]}}\n" + TINY_STUDY_PARAMS
    text += "draw: {tile: mine1, window: [0, 0, 80, 80]}\n"
    proj, dvc = make_dvc_project(tmp_path, text)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    dvc("repro", "draw", "measure@polygons")
    assert "files:" in (proj / "dvc.lock").read_text()  # the files section is a param of the fetch
    for k in range(4):
        metrics = json.loads((proj / "data" / "eval" / f"round{k}" / "metrics.json").read_text())
        assert metrics["n_vertices"] > 0 and metrics["mask_offset"]["n_polygons"] == 5
    assert (proj / "data" / "figures" / "overlay.png").read_bytes()[:4] == b"\x89PNG"
