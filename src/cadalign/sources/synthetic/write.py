"""A synthetic city written to disk in the Inria layout (GeoTIFFs) with its footprints (GeoPackages)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import geopandas as gpd
import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import CRSError
from tqdm import tqdm

from cadalign.config import check_name
from cadalign.geo.polygons import from_pixels, geometry_array, write_polygons
from cadalign.geo.tiles import write_geotiff
from cadalign.sources.synthetic.tile import _check_args, generate_tile, tile_seed

logger = logging.getLogger(__name__)


def _tile_numbers(n_tiles: int | Sequence[int]) -> list[int]:
    """Tile numbers 1..n_tiles, or the given distinct numbers; ids need n < 1000."""
    if isinstance(n_tiles, (int, np.integer)) and not isinstance(n_tiles, bool):
        if not 1 <= n_tiles <= 999:
            raise ValueError(
                f"n_tiles={n_tiles!r}: must be an integer in 1..999 (building ids are n * 1_000_000 + k)"
            )
        return list(range(1, int(n_tiles) + 1))
    if isinstance(n_tiles, Sequence) and not isinstance(n_tiles, str) and len(n_tiles) > 0:
        numbers = list(n_tiles)
        ok = all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and 1 <= n <= 999 for n in numbers)
        if ok and len(set(numbers)) == len(numbers):
            return [int(n) for n in numbers]
    raise ValueError(
        f"n_tiles={n_tiles!r}: pass a tile count in 1..999 or a non-empty list of distinct tile numbers in 1..999"
    )


def write_city(
    out_dir: Path,
    city: str,
    n_tiles: int | Sequence[int],
    size: int,
    style: str,
    seed: int,
    epsg: int = 32616,
    origin: tuple[float, float] = (500000.0, 4350000.0),
    pixel_size: float = 0.3,
) -> list[Path]:
    """Write a synthetic city in the Inria layout, plus its footprints as GeoPackages.

    Files: ``out_dir/images/<city><n>.tif`` (RGB uint8, tiled 256, DEFLATE),
    ``out_dir/gt/<city><n>.tif`` (uint8 0/255) and ``out_dir/polygons/<city><n>.gpkg``
    (layer ``buildings``, EPSG:4326, column ``building_id`` = n * 1_000_000 + k), for
    n = 1..n_tiles. Tile n has its top-left corner at
    ``origin + ((n - 1) * size * pixel_size, 0)`` in ``EPSG:<epsg>``, north up. Tile n
    depends only on (seed, n, size, style, pixel_size), so a subset of tile numbers can be
    written on its own and equals the same tiles of the full city.

    Args:
        out_dir: destination folder (created if needed).
        city: city name, used in file names (letters, digits, '-', '_').
        n_tiles: number of tiles (>= 1), writing tiles 1..n_tiles; or a sequence of
            distinct tile numbers (each 1..999) to write only those.
        size: tile side in pixels (>= 64).
        style: one of :data:`STYLES`.
        seed: non-negative base seed; tile n uses :func:`tile_seed` (seed, n).
        epsg: EPSG code of the projected CRS of the tiles.
        origin: (x, y) of the top-left corner of tile 1 in that CRS.
        pixel_size: metres per pixel.

    Returns:
        The written image paths, in tile order.

    Raises:
        ValueError: if an argument is invalid (the message names it and the fix).
    """
    check_name(city)
    numbers = _tile_numbers(n_tiles)
    _check_args(size, style, seed, pixel_size)
    try:
        crs = CRS.from_epsg(epsg)
    except CRSError as err:
        raise ValueError(f"epsg={epsg!r}: not a known EPSG code; pass e.g. 32616 (UTM 16N)") from err
    if not crs.is_projected:
        raise ValueError(f"epsg={epsg!r}: must be a projected CRS in metres (e.g. a UTM zone)")
    out_dir = Path(out_dir)
    written = []
    for n in tqdm(numbers, desc=f"synthetic {city}", unit="tile", disable=len(numbers) < 4):
        tile = generate_tile(size, style, tile_seed(seed, n), pixel_size)
        x0 = origin[0] + (n - 1) * size * pixel_size
        transform = Affine(pixel_size, 0.0, x0, 0.0, -pixel_size, origin[1])
        name = f"{city}{n}"
        image_path = write_geotiff(out_dir / "images" / f"{name}.tif", np.moveaxis(tile.image, -1, 0), transform, crs)
        write_geotiff(out_dir / "gt" / f"{name}.tif", tile.mask, transform, crs)
        ids = tile.ids + n * 1_000_000
        geoms, ids, _ = from_pixels(tile.polygons, ids, transform, crs)
        wgs84 = gpd.GeoSeries(list(geoms), crs=crs.to_wkt()).to_crs(4326)
        write_polygons(out_dir / "polygons" / f"{name}.gpkg", geometry_array(list(wgs84.values)), ids, 4326)
        written.append(image_path)
        logger.info("wrote %s (%d buildings)", image_path, len(ids))
    return written
