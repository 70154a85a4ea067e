"""Validation at the door (issue 26 item 7, beyond params.yaml's own checks in test_config.py):
an unknown city source named before DVC's bare message, a wrongly declared CRS, dropped truth
geometries as a warning with counts, NaN/inf coordinates refused where they enter."""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
from conftest import TINY_STUDY_PARAMS, make_dvc_project
from studies import run_realign

from cadalign.config import ConfigError
from cadalign.geo.polygons import PolygonError, clean_polygons, read_polygons
from cadalign.stages import check, initialize, misalign, realign

CITIES = "cities:\n  tinytown: {source: synthetic, tiles: [1, 2]}\n  other: {source: osm, tiles: [1]}\nsynthetic: {seed: 0}\n"


def _misalign(tmp_path: Path, city_dir: Path, params: Path) -> None:
    misalign.main(
        ["--params", str(params), "--city", "tinytown", "--city-dir", str(city_dir),
         "--truth-out", str(tmp_path / "truth"), "--labels-out", str(tmp_path / "labels"),
         "--fields-out", str(tmp_path / "noise")]
    )


def _params(tmp_path: Path) -> Path:
    params = tmp_path / "params.yaml"
    params.write_text("cities:\n  tinytown: {source: synthetic, tiles: [1, 2]}\nnoise: {max_displacement: 3.0, seed: 4}\n")
    return params


def test_an_unknown_source_is_named_with_the_key(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(CITIES)
    with pytest.raises(ConfigError, match=re.escape(f"{params}: cities.other.source = 'osm' is not a source; use one of")):
        check.check_sources(params)
    params.write_text(CITIES.replace("source: osm", "source: inria"))
    with pytest.raises(ConfigError, match=re.escape("cities.other.source is inria but params.yaml has no 'inria' section")):
        check.check_sources(params)


def test_dvc_repro_names_the_unknown_source_before_dvc_does(tmp_path: Path) -> None:
    """DVC resolves a fetch stage's ``${item.source}`` before running it; the check stage runs first."""
    proj, _ = make_dvc_project(tmp_path, CITIES.replace("tinytown", "synthville") + TINY_STUDY_PARAMS)
    env = {**os.environ, "PYTHONPATH": str(proj / "src")}
    done = subprocess.run(["dvc", "repro"], cwd=proj, env=env, capture_output=True, text=True, check=False)
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "cities.other.source = 'osm' is not a source; use one of" in out, out[-2000:]
    assert "Parameters 'osm' are missing" not in out
    assert not (proj / "data").exists()  # no stage ran before it


def test_polygons_with_a_wrongly_declared_crs_are_refused_naming_both_crss(tmp_path: Path, tiny_city: Path) -> None:
    """UTM metres declared as degrees (EPSG:4326): every polygon falls far outside its tile."""
    path = tiny_city / "polygons" / "tinytown1.gpkg"
    utm = read_polygons(path).to_crs(32631)
    path.unlink()
    utm.set_crs(4326, allow_override=True).to_file(path, driver="GPKG")
    with pytest.raises(PolygonError) as err:
        _misalign(tmp_path, tiny_city, _params(tmp_path))
    assert str(err.value).startswith(f"{path}: its polygons have no place in the tile's CRS; their CRS is EPSG:4326, "
                                     "the tile's EPSG:32631: the polygons' CRS is likely declared wrongly")
    # degrees declared as UTM metres: in range, but all far outside the tile
    path.unlink()
    wgs = utm.to_crs(4326)
    wgs.set_crs(32631, allow_override=True).to_file(path, driver="GPKG")
    with pytest.raises(PolygonError) as err:
        _misalign(tmp_path, tiny_city, _params(tmp_path))
    assert str(err.value).startswith(f"{path}: none of its 4 polygons falls inside its tile; their CRS is EPSG:32631, "
                                     "the tile's EPSG:32631: the polygons' CRS is likely declared wrongly")


def test_dropped_truth_geometries_are_a_warning_with_counts(caplog: pytest.LogCaptureFixture) -> None:
    geoms = np.array([shapely.box(1, 1, 5, 5), shapely.Point(3, 3), shapely.Polygon(),
                      shapely.Polygon([(1, 1), (4, 1), (7, 1), (1, 1)]), None], dtype=object)
    with caplog.at_level(logging.WARNING):
        _, ids, stats = clean_polygons(geoms, np.arange(5), (10, 10), where="city/polygons/t1.gpkg")
    assert ids.tolist() == [0] and (stats.n_empty, stats.n_not_polygonal) == (2, 2)
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warning] == [
        "city/polygons/t1.gpkg: dropped 2 empty geometries and 2 without area (points, lines, zero-area polygons) of 5"
    ]


def test_nan_coordinates_in_a_polygon_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "labels.gpkg"
    geoms = [shapely.box(0, 0, 1, 1), shapely.Polygon([(0, 0), (np.nan, 0), (1, 1)]), shapely.box(0, 0, 2, np.inf)]
    gpd.GeoDataFrame({"building_id": [7, 8, 9]}, geometry=geoms, crs=32631).to_file(path, driver="GPKG")
    with pytest.raises(PolygonError, match=re.escape(f"{path}: 2 polygon(s) with NaN or infinite coordinates (building ids 8, 9)")):
        read_polygons(path)


def test_misalign_refuses_to_write_non_finite_labels(tmp_path: Path, tiny_city: Path, monkeypatch) -> None:
    monkeypatch.setattr(misalign.noise, "misalign", lambda geoms, field: shapely.transform(geoms, lambda xy: xy - np.inf))
    with pytest.raises(PolygonError, match=re.escape(f"{tmp_path / 'labels' / 'tinytown1.gpkg'}: 4 polygon(s) with NaN")):
        _misalign(tmp_path, tiny_city, _params(tmp_path))
    assert not (tmp_path / "labels").exists()


def test_realign_refuses_to_write_non_finite_labels(train_study: dict[str, Path], monkeypatch) -> None:
    initialize.main(["--params", str(train_study["params"]), "--out", str(train_study["models"])])
    monkeypatch.setattr(realign, "realign", lambda models, image, geoms, *args: shapely.transform(geoms, lambda xy: xy + np.inf))
    out = train_study["round1"]
    with pytest.raises(PolygonError, match=re.escape(f"{out / 'tinytown' / 'tinytown1.gpkg'}: 4 polygon(s) with NaN or infinite")) as err:
        run_realign(train_study)
    assert f"the networks in {train_study['models']} moved them there" in str(err.value)
    assert not out.exists()
