"""Reading and writing georeferenced tiles (GeoTIFF) at the edge of the pipeline.

A tile's pixel grid is given by its affine ``transform``: ``transform * (x, y)`` maps pixel
coordinates (x = column, y = row, origin at the top-left corner of the top-left pixel) to
the tile's CRS, and ``~transform`` maps back. Every tile keeps its own CRS (Inria tiles come
in several UTM zones), so nothing here reprojects rasters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import RasterioIOError

from cadalign.atomic import atomic_path

logger = logging.getLogger(__name__)


class TileError(ValueError):
    """A tile file is missing, unreadable, or not what the pipeline expects."""


@dataclass(frozen=True)
class TileInfo:
    """Georeferencing of a tile without its pixels."""

    path: Path
    crs: CRS
    transform: Affine
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)


@dataclass(frozen=True)
class Tile:
    """An RGB tile: ``image`` (H, W, 3) uint8 and its georeferencing."""

    image: np.ndarray
    info: TileInfo


def _open(path: Path) -> rasterio.DatasetReader:
    if not path.is_file():
        raise TileError(f"tile not found: {path}; run the fetch stage (dvc repro) to create it")
    try:
        return rasterio.open(path)
    except RasterioIOError as err:
        raise TileError(
            f"{path}: not a readable GeoTIFF (truncated or corrupt download?): {err}; "
            "delete it and rerun the fetch stage"
        ) from err


def _info(path: Path, src: rasterio.DatasetReader) -> TileInfo:
    if src.crs is None:
        raise TileError(f"{path}: the tile has no CRS; georeference it (e.g. gdal_edit.py -a_srs EPSG:xxxx)")
    if src.width == 0 or src.height == 0:
        raise TileError(f"{path}: the tile is empty (0 pixels)")
    return TileInfo(path=path, crs=src.crs, transform=src.transform, height=src.height, width=src.width)


def read_info(path: str | Path) -> TileInfo:
    """Read a tile's CRS, transform and size.

    Raises:
        TileError: if the file is missing, not a GeoTIFF, has no CRS or no pixels.
    """
    path = Path(path)
    with _open(path) as src:
        return _info(path, src)


def read_tile(path: str | Path) -> Tile:
    """Read an RGB uint8 tile.

    Raises:
        TileError: if the file is missing, truncated, not 3-band uint8, or has no CRS.
    """
    path = Path(path)
    with _open(path) as src:
        info = _info(path, src)
        if src.count < 3 or src.dtypes[0] != "uint8":
            raise TileError(
                f"{path}: expected an RGB uint8 image (3 bands), got {src.count} band(s) of {src.dtypes[0]}"
            )
        try:
            data = src.read((1, 2, 3))
        except RasterioIOError as err:
            raise TileError(f"{path}: pixel data unreadable (truncated file?): {err}; delete it and refetch") from err
    return Tile(image=np.ascontiguousarray(np.moveaxis(data, 0, -1)), info=info)


def read_band(path: str | Path, band: int = 1) -> tuple[np.ndarray, TileInfo]:
    """Read one band (e.g. a 0/255 building mask or a field component) and its georeferencing."""
    path = Path(path)
    with _open(path) as src:
        info = _info(path, src)
        try:
            return src.read(band), info
        except RasterioIOError as err:
            raise TileError(f"{path}: pixel data unreadable (truncated file?): {err}; delete it and refetch") from err


def write_geotiff(
    path: str | Path,
    array: np.ndarray,
    transform: Affine,
    crs: CRS | str | int,
    nodata: float | None = None,
    descriptions: tuple[str, ...] | None = None,
) -> Path:
    """Write a (C, H, W) array as a tiled, DEFLATE-compressed GeoTIFF, atomically.

    Args:
        path: destination file.
        array: (C, H, W) or (H, W) array; uint8 RGB gets the RGB photometric tag.
        transform: pixel-to-CRS affine transform.
        crs: CRS object, WKT/``EPSG:xxxx`` string or EPSG code.
        nodata: optional nodata value.
        descriptions: optional band names.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    if array.ndim == 2:
        array = array[None]
    count, height, width = array.shape
    crs = CRS.from_epsg(crs) if isinstance(crs, int) else CRS.from_user_input(crs)
    profile = {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": count,
        "dtype": array.dtype.name,
        "crs": crs,
        "transform": transform,
        "compress": "deflate",
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "nodata": nodata,
    }
    if count == 3 and array.dtype == np.uint8:
        profile["photometric"] = "RGB"
    if array.dtype.kind == "f":
        profile["predictor"] = 3
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(array)
            if descriptions:
                for i, name in enumerate(descriptions, start=1):
                    dst.set_band_description(i, name)
    return path
