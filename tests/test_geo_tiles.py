"""Tests of GeoTIFF reading and writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from cadalign.geo.tiles import TileError, read_band, read_info, read_tile, write_geotiff


def test_write_read_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(3, 64, 64), dtype=np.uint8)
    transform = Affine(0.3, 0, 600000.0, 0, -0.3, 4000000.0)
    path = write_geotiff(tmp_path / "t.tif", image, transform, 32617)
    tile = read_tile(path)
    np.testing.assert_array_equal(tile.image, np.moveaxis(image, 0, -1))
    assert tile.info.crs.to_epsg() == 32617 and tile.info.transform == transform
    with rasterio.open(path) as src:
        assert src.profile["tiled"] and src.compression.name.lower() == "deflate"
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left behind


def test_bad_tiles(tmp_path: Path) -> None:
    with pytest.raises(TileError, match="not found.*fetch"):
        read_tile(tmp_path / "nope.tif")
    (tmp_path / "fake.tif").write_text("hello")
    with pytest.raises(TileError, match="fake.tif.*not a readable GeoTIFF"):
        read_info(tmp_path / "fake.tif")
    good = write_geotiff(tmp_path / "good.tif", np.ones((3, 300, 300), np.uint8) * 7, Affine(1, 0, 0, 0, -1, 300), 32617)
    data = good.read_bytes()
    (tmp_path / "trunc.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(TileError, match="trunc.tif"):
        read_tile(tmp_path / "trunc.tif")
    mask = write_geotiff(tmp_path / "mask.tif", np.zeros((16, 16), np.uint8), Affine(1, 0, 0, 0, -1, 16), 32617)
    with pytest.raises(TileError, match="RGB uint8"):
        read_tile(mask)
    band, info = read_band(mask)
    assert band.shape == (16, 16) and info.shape == (16, 16)
    with rasterio.open(tmp_path / "nocrs.tif", "w", driver="GTiff", width=4, height=4, count=3, dtype="uint8") as dst:
        dst.write(np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(TileError, match="no CRS"):
        read_info(tmp_path / "nocrs.tif")
