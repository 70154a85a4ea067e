"""Tests of the measure stage on the tiny city of conftest, with OSM-like labels moved by a known shift."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import shapely

from cadalign.config import ConfigError
from cadalign.geo.polygons import read_polygons, write_polygons
from cadalign.stages import measure
from studies import write_tiny_city

SHIFT_M = (0.9, 1.2)  # metres east, north: 3 px right and 4 px up on the 0.3 m tiles, 5 px long


def _add_osm_layer(city_dir: Path) -> None:
    """``osm/<tile>.gpkg``: the true polygons moved by SHIFT_M, in a metric CRS."""
    for path in sorted((city_dir / "polygons").glob("*.gpkg")):
        gdf = read_polygons(path).to_crs(32631)
        moved = shapely.transform(gdf.geometry.to_numpy(), lambda xy: xy + SHIFT_M)
        write_polygons(city_dir / "osm" / path.name, moved, gdf["building_id"].to_numpy(), 32631)


def _run(cities: Path, layer: str, out: Path) -> dict:
    """Run the stage with a params.yaml naming every city folder present."""
    params = out.parent / "params.yaml"
    params.parent.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in cities.iterdir() if p.is_dir()) if cities.is_dir() else []
    params.write_text("cities:\n" + "".join(f"  {n}: {{source: synthetic, tiles: [1]}}\n" for n in names))
    measure.main(["--params", str(params), "--cities-dir", str(cities), "--layer", layer, "--metrics", str(out)])
    return json.loads(out.read_text())


def test_measure_osm_layer(tmp_path):
    cities = tmp_path / "cities"
    _add_osm_layer(write_tiny_city(cities, "tinytown"))
    write_tiny_city(cities, "plainville", n_tiles=1)  # like a synthetic city: no osm/
    metrics = _run(cities, "osm", tmp_path / "eval" / "osm" / "metrics.json")
    assert metrics["median_offset_px"] == pytest.approx(5.0)
    assert metrics["n_polygons"] == 8 and metrics["n_unmeasured"] == 0  # 4 buildings on each of 2 tiles
    assert metrics["offset_within_4px"] == 0.0 and metrics["offset_within_8px"] == 1.0
    assert list(metrics["cities"]) == ["tinytown"] and metrics["cities_without_layer"] == ["plainville"]
    truth = _run(cities, "polygons", tmp_path / "truth.json")  # the true polygons sit on their mask
    assert truth["median_offset_px"] == 0.0 and truth["n_polygons"] == 12
    assert truth["cities_without_layer"] == []


def test_no_city_with_the_layer(tmp_path):
    cities = tmp_path / "cities"
    write_tiny_city(cities, "plainville", n_tiles=1)
    metrics = _run(cities, "osm", tmp_path / "m.json")
    assert metrics["n_polygons"] == 0 and metrics["cities"] == {}
    assert metrics["cities_without_layer"] == ["plainville"]
    assert metrics["max_shift_px"] == 32


def test_bad_inputs(tmp_path):
    cities = tmp_path / "cities"
    city = write_tiny_city(cities, "tinytown", n_tiles=1)
    with pytest.raises(ConfigError, match=r"invalid layer name '\.\./x'"):
        _run(cities, "../x", tmp_path / "m.json")
    _add_osm_layer(city)
    shutil.rmtree(city / "gt")
    with pytest.raises(FileNotFoundError, match=r"no building mask .*tinytown/gt/tinytown1.tif"):
        _run(cities, "osm", tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()
