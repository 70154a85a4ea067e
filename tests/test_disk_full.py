"""A full disk gives "no space left on device" with the path, from every writer (issue 26 item 8).

A real full file system needs root (a small tmpfs); the writers' failures are simulated:
ENOSPC raised by the write itself, or the writer's own misleading error (GDAL's GeoPackage
driver: "no such table: gpkg_contents") while the disk reports no free byte.
"""

from __future__ import annotations

import errno
import shutil
from collections import namedtuple
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import torch

from cadalign import atomic, train
from cadalign.geo import tiles
from cadalign.geo.polygons import write_polygons
from cadalign.model import AlignNet, ModelConfig
from cadalign.plots import save_figure
from cadalign.provenance import write_manifest

Usage = namedtuple("Usage", "total used free")


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _no_free_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9, 0))


def _check(err: pytest.ExceptionInfo, path: Path) -> None:
    assert err.value.errno == errno.ENOSPC
    assert f"no space left on device writing {path}; free space there and rerun" in str(err.value)
    assert [p.name for p in path.parent.iterdir()] == []  # no partial file left


def test_json_and_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Path, "write_text", _enospc)
    for write in (atomic.write_json, atomic.write_text):
        with pytest.raises(OSError) as err:
            write(tmp_path / "out" / "metrics.json", "{}")
        _check(err, tmp_path / "out" / "metrics.json")


def test_geopackage_reports_the_full_disk_not_gpkg_contents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def gdal_on_a_full_disk(*args, **kwargs):
        raise pyogrio.errors.DataSourceError("sqlite3_exec(CREATE TABLE ...) failed: no such table: gpkg_contents")

    monkeypatch.setattr(pyogrio, "write_dataframe", gdal_on_a_full_disk)
    _no_free_byte(monkeypatch)
    path = tmp_path / "labels" / "tile1.gpkg"
    with pytest.raises(OSError) as err:
        write_polygons(path, np.array([shapely.box(0, 0, 1, 1)], dtype=object), np.array([1]), "EPSG:32631")
    _check(err, path)
    assert "no such table: gpkg_contents" in str(err.value)  # the writer's own words, kept
    assert isinstance(err.value.__cause__, pyogrio.errors.DataSourceError)


def test_the_same_failure_with_free_space_is_not_called_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def bad_driver(*args, **kwargs):
        raise pyogrio.errors.DataSourceError("no such table: gpkg_contents")

    monkeypatch.setattr(pyogrio, "write_dataframe", bad_driver)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 0, 10**9))
    with pytest.raises(pyogrio.errors.DataSourceError):
        write_polygons(tmp_path / "t.gpkg", np.array([shapely.box(0, 0, 1, 1)], dtype=object), np.array([1]), "EPSG:32631")


def test_geotiff(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args, **kwargs):
        raise rasterio.errors.RasterioIOError("Free disk space available is 0 bytes")

    monkeypatch.setattr(tiles.rasterio, "open", full)
    _no_free_byte(monkeypatch)
    path = tmp_path / "noise" / "tile1.tif"
    with pytest.raises(OSError) as err:
        tiles.write_geotiff(path, np.zeros((2, 4, 4), np.float32), rasterio.Affine.identity(), 32631)
    _check(err, path)


def test_figure_network_and_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plt.Figure, "savefig", _enospc)
    path = tmp_path / "figures" / "accuracy.png"
    with pytest.raises(OSError) as err:
        save_figure(plt.figure(), path)
    _check(err, path)
    monkeypatch.setattr(torch, "save", _enospc)
    path = tmp_path / "models" / "ds1.pt"
    with pytest.raises(OSError) as err:
        train.save_model(AlignNet(ModelConfig(image_widths=(4, 8), poly_widths=(2, 4), deep_supervision_levels=1)), path)
    _check(err, path)
    monkeypatch.setattr(Path, "write_text", _enospc)
    params = tmp_path / "params.yaml"
    shutil.copyfile(Path(__file__).parents[1] / "params.yaml", params)
    with pytest.raises(OSError) as err:
        write_manifest(tmp_path / "labels", params, "realign", "round1")
    _check(err, tmp_path / "labels" / "manifest.json")


def test_a_nested_write_is_named_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file written into a folder being written atomically (a manifest, a tile) names its own path."""
    monkeypatch.setattr(Path, "write_text", _enospc)
    with pytest.raises(OSError) as err, atomic.atomic_path(tmp_path / "round1") as tmp:
        tmp.mkdir()
        atomic.write_json(tmp / "manifest.json", {})
    assert str(err.value).count("no space left on device writing") == 1
    assert [p.name for p in tmp_path.iterdir()] == []
