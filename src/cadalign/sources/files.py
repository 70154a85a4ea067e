"""One's own files as a city: GeoTIFF tiles, one vector file of building polygons, optional masks.

A city whose ``source`` is ``files`` (:class:`cadalign.config.FilesCityConfig`) names its
images (paths or glob patterns; the matched paths sorted, tile n is the n-th), one vector
file of building polygons (anything GDAL reads, in any CRS) and optionally a building mask
per image (same file name, same grid). :func:`write_city` writes the layout every later
stage reads (as for synthetic and Inria cities): ``images/<city><n>.tif`` (RGB uint8),
``gt/<city><n>.tif`` (0/255 mask) and ``polygons/<city><n>.gpkg`` (the true polygons in the
tile's CRS, clipped to the tile, ids ``n * id_stride + k``).

Image rule (:func:`to_rgb8`), applied once here so training and realignment read the same
pixels: the bands ``bands`` (1-based; one band is replicated to R, G, B; default band 1 of a
1-band image, bands 1-3 otherwise) are taken; a pixel is missing where any of them is the
nodata value (``nodata``, else the file's own tag), NaN or infinite, or where the file's own
mask (internal or ``.msk``, not an alpha band) says so. uint8 bands are
kept as they are; any other type is stretched per band and per tile: the ``files.stretch``
percentiles (default 2 and 98 %) of the band's valid pixels, ``lo`` and ``hi``, map to 0 and
255, ``round(clip((v - lo) / (hi - lo), 0, 1) * 255)``. Missing pixels become 0. A tile with
no valid pixel, or whose band is constant (``hi == lo``), is refused.

Polygons: invalid ones are repaired with ``shapely.make_valid`` (their polygonal part kept),
empty and non-polygonal ones dropped, each counted and logged as a warning; MultiPolygons and
holes are kept. The polygons outside every tile are counted; when no polygon meets any tile
(most likely a wrong CRS) the stage fails naming both CRSs. Without masks, ``gt/`` holds the
true polygons burned into the tile grid, as for a synthetic city.
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import rasterio
import shapely
import shapely.affinity
from rasterio import features
from rasterio.enums import MaskFlags
from rasterio.errors import RasterioIOError
from tqdm import tqdm

from cadalign.config import FilesCityConfig
from cadalign.geo.polygons import ID_COLUMN, clean_polygons, from_pixels, geometry_array, to_pixels, write_polygons
from cadalign.geo.tiles import TileInfo, read_info, write_geotiff

logger = logging.getLogger(__name__)

SOURCE_ROW = "source_row"
"""Column of the written polygons: the row of the polygon in the user's vector file (0-based)."""


class FilesError(ValueError):
    """A file of a ``files`` city is missing, unreadable or unusable (the message names the key)."""


@dataclass(frozen=True)
class FilesConfig:
    """The ``files`` section of params.yaml (shared by the cities whose source is ``files``).

    Attributes:
        stretch: the low and high percentiles (%) of each band's valid pixels that map to 0
            and 255 for images that are not uint8 (robust to a few saturated or dark pixels).
    """

    stretch: tuple[float, ...] = (2.0, 98.0)

    def validate(self) -> None:
        """Raise ValueError on an unusable setting."""
        if len(self.stretch) != 2 or not 0 <= self.stretch[0] < self.stretch[1] <= 100:
            raise ValueError(
                f"stretch = {list(self.stretch)}; set files.stretch to [low, high] percentiles, 0 <= low < high <= 100"
            )


def _patterns(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def resolve_paths(value: str | Sequence[str], key: str) -> list[Path]:
    """The files that paths and glob patterns name, sorted, without repeats.

    Args:
        value: a path or glob pattern, or a list of them.
        key: the params key they come from (for messages), e.g. ``cities.mycity.images``.

    Raises:
        FilesError: a path that does not exist, or a pattern that matches no file.
    """
    found: set[Path] = set()
    for pattern in _patterns(value):
        if glob.has_magic(pattern):
            matched = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
            if not matched:
                raise FilesError(
                    f"{key}: the pattern {pattern!r} matches no file (relative to {Path.cwd()}); fix the pattern"
                )
            found.update(matched)
        elif Path(pattern).is_file():
            found.add(Path(pattern))
        else:
            raise FilesError(f"{key}: file not found: {pattern} (relative to {Path.cwd()}); fix the path")
    return sorted(found)


def choose_bands(count: int, bands: Sequence[int], path: Path, key: str) -> list[int]:
    """The three 1-based bands read into R, G, B (one band repeated three times for a gray image).

    Raises:
        FilesError: a band beyond the image's ``count`` bands, or a 2-band image with no choice.
    """
    if not bands:
        if count == 2:
            raise FilesError(f"{path}: 2 bands; say which to use in {key}, e.g. bands: [1]")
        bands = [1] if count < 3 else [1, 2, 3]
    bad = [b for b in bands if b > count]
    if bad:
        raise FilesError(f"{path}: band {bad[0]} does not exist, the image has {count}; fix {key}")
    return list(bands) * 3 if len(bands) == 1 else list(bands)


def to_rgb8(data: np.ndarray, valid: np.ndarray, stretch: tuple[float, float], where: str = "image") -> np.ndarray:
    """Map (3, H, W) bands of any type to RGB uint8 by the module's rule.

    Args:
        data: (3, H, W) bands (uint8 kept as is; any other type stretched per band).
        valid: (H, W) bool, False on missing pixels (they become 0).
        stretch: the (low, high) percentiles in % mapped to 0 and 255.
        where: the file, for messages.

    Returns:
        (3, H, W) uint8.

    Raises:
        FilesError: no valid pixel, or a constant band.
    """
    if not valid.any():
        raise FilesError(f"{where}: every pixel is nodata; check the file or the nodata value")
    out = np.zeros(data.shape, dtype=np.uint8)
    for c, band in enumerate(data):
        values = band[valid]
        if data.dtype == np.uint8:
            lo, hi = float(values.min()), float(values.max())
            out[c][valid] = values
        else:
            lo, hi = (float(v) for v in np.percentile(values, stretch))
            if hi > lo:
                scaled = np.clip((values.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)
                out[c][valid] = np.round(scaled * 255.0).astype(np.uint8)
        if not hi > lo:
            raise FilesError(
                f"{where}: band {c + 1} of the chosen bands is constant ({lo:g}) over its valid pixels "
                f"(between the {stretch[0]:g} and {stretch[1]:g} % percentiles); choose other bands or fix the file"
            )
    return out


def read_rgb8(path: Path, city: FilesCityConfig, name: str, stretch: tuple[float, float]) -> tuple[np.ndarray, TileInfo]:
    """One image mapped to RGB uint8 (:func:`to_rgb8`) and its georeferencing.

    Raises:
        FilesError: unreadable file, no CRS, a bad band choice, no valid pixel, a constant band.
    """
    key = f"cities.{name}.images"
    try:
        with rasterio.open(path) as src:
            if src.crs is None:
                raise FilesError(
                    f"{path}: the tile has no CRS ({key}); georeference it, e.g. gdal_edit.py -a_srs EPSG:xxxx {path}"
                )
            bands = choose_bands(src.count, city.bands, path, f"cities.{name}.bands")
            data = src.read(bands)
            valid = _valid_pixels(src, data, bands, city.nodata)
            info = TileInfo(path=path, crs=src.crs, transform=src.transform, height=src.height, width=src.width)
    except RasterioIOError as err:
        raise FilesError(f"{path}: not a readable GeoTIFF ({key}): {err}; fix or replace the file") from err
    return to_rgb8(data, valid, stretch, where=str(path)), info


def _valid_pixels(src: rasterio.DatasetReader, data: np.ndarray, bands: list[int], nodata: float | None) -> np.ndarray:
    """(H, W) bool: no chosen band is nodata, NaN or infinite, or masked by the file's own mask.

    The nodata value is ``nodata`` if given, else the file's tag, compared as a number (a value
    the type cannot hold matches nothing). An alpha band is not read as a mask: GDAL labels the
    4th band of any 4-band uint8 GeoTIFF alpha unless told otherwise, so an R, G, B, NIR tile's
    near infrared would mask its pixels.
    """
    valid = np.ones(data.shape[1:], dtype=bool)
    value = src.nodata if nodata is None else nodata
    if value is not None and not np.isnan(value):
        valid &= np.all(data != value, axis=0)
    if data.dtype.kind == "f":
        valid &= np.all(np.isfinite(data), axis=0)
    for band in sorted(set(bands)):
        flags = src.mask_flag_enums[band - 1]
        if MaskFlags.per_dataset in flags and MaskFlags.alpha not in flags:  # an internal or .msk mask
            valid &= src.read_masks(band) > 0
    return valid


def read_buildings(path: Path, layer: str, name: str) -> gpd.GeoDataFrame:
    """The user's building polygons: repaired, polygonal, with a ``source_row`` column.

    Invalid geometries are repaired (``shapely.make_valid``, polygonal part kept); empty and
    non-polygonal ones are dropped; the counts are logged as a warning.

    Raises:
        FilesError: the file is missing or unreadable, has several layers and no ``layer``,
            has no CRS or no polygon.
    """
    key = f"cities.{name}.polygons"
    if not path.is_file():
        raise FilesError(f"{key}: file not found: {path} (relative to {Path.cwd()}); fix the path")
    try:
        if not layer:
            layers = [str(row[0]) for row in pyogrio.list_layers(path)]
            if len(layers) > 1:
                raise FilesError(f"{path}: {len(layers)} layers {layers}; choose one with cities.{name}.layer")
        gdf = gpd.read_file(path, layer=layer or None, engine="pyogrio")
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as err:
        raise FilesError(f"{path}: not a readable vector file ({key}, layer {layer!r}): {err}; fix the file") from err
    if gdf.crs is None:
        raise FilesError(
            f"{path}: the polygons have no CRS ({key}); assign the right one, "
            f"e.g. ogr2ogr -a_srs EPSG:4326 fixed.gpkg {path}, and point {key} at the result"
        )
    geoms = np.asarray(gdf.geometry.values, dtype=object)
    present = np.array([g is not None and not g.is_empty for g in geoms], dtype=bool)
    invalid = present.copy()
    invalid[present] = ~shapely.is_valid(geoms[present])
    repaired = geoms.copy()
    repaired[invalid] = shapely.make_valid(geoms[invalid])
    polygonal = np.zeros(len(geoms), dtype=bool)
    for i in np.flatnonzero(present):
        repaired[i] = _polygonal(repaired[i])
        polygonal[i] = repaired[i] is not None
    counts = {
        "empty": int((~present).sum()),
        "repaired": int((invalid & polygonal).sum()),
        "not_polygonal": int((present & ~polygonal).sum()),
    }
    if any(counts.values()):
        logger.warning(
            "%s: %d invalid polygons repaired (make_valid), %d empty and %d not polygonal (points, lines, "
            "or invalid with no area left) dropped, of %d",
            path, counts["repaired"], counts["empty"], counts["not_polygonal"], len(geoms),
        )
    rows = np.flatnonzero(polygonal)
    if len(rows) == 0:
        raise FilesError(f"{path}: no building polygon among its {len(geoms)} features ({key}); check the file or layer")
    return gpd.GeoDataFrame(
        {SOURCE_ROW: rows.astype(np.int64)}, geometry=list(repaired[rows]), crs=gdf.crs
    )


def _polygonal(geom: shapely.Geometry) -> shapely.Geometry | None:
    """The polygonal part of a geometry (Polygon, MultiPolygon or the polygons of a collection)."""
    if isinstance(geom, (shapely.Polygon, shapely.MultiPolygon)):
        return None if geom.is_empty else geom
    if isinstance(geom, shapely.GeometryCollection):
        parts = [g for g in geom.geoms if isinstance(g, (shapely.Polygon, shapely.MultiPolygon)) and not g.is_empty]
        if parts:
            return shapely.union_all(parts)
    return None


def tile_buildings(
    buildings: gpd.GeoDataFrame, tree: shapely.STRtree, info: TileInfo
) -> tuple[np.ndarray, np.ndarray]:
    """The buildings over one tile, in its pixel coordinates, clipped to it.

    Args:
        buildings: from :func:`read_buildings`.
        tree: ``shapely.STRtree`` of ``buildings.geometry`` (in their own CRS).
        info: the tile.

    Returns:
        (geoms, rows): pixel-coordinate (Multi)Polygons and their ``source_row``.
    """
    height, width = info.shape
    # the tile's outline, densified so that it stays close to the true footprint in another CRS
    outline = shapely.segmentize(shapely.box(0, 0, width, height), max(width, height) / 64)
    t = info.transform
    footprint = gpd.GeoSeries(
        [shapely.affinity.affine_transform(outline, [t.a, t.b, t.d, t.e, t.c, t.f])], crs=info.crs.to_wkt()
    ).to_crs(buildings.crs)
    near = np.sort(tree.query(footprint.iloc[0], predicate="intersects"))
    if len(near) == 0:
        return geometry_array([]), np.zeros(0, dtype=np.int64)
    part = buildings.iloc[near].rename(columns={SOURCE_ROW: ID_COLUMN})
    geoms, rows = to_pixels(part, info.transform, info.crs)
    geoms, rows, _ = clean_polygons(geoms, rows, info.shape)
    return geoms, rows


def write_city(
    name: str, city: FilesCityConfig, cfg: FilesConfig, out_dir: Path, id_stride: int
) -> dict[str, int]:
    """Write the tiles ``city.tiles`` of a files city into ``out_dir`` (see the module docstring).

    Args:
        name: the city name (file-name prefix).
        city: its entry of ``cities:``.
        cfg: the ``files`` section.
        out_dir: an existing, empty folder.
        id_stride: building ids are ``n * id_stride + k`` (k: the polygon's index in tile n).

    Returns:
        Counts for the logs: tiles, buildings (written, over all tiles), polygons read,
        polygons outside every tile, tiles with a given mask.

    Raises:
        FilesError: naming the file and the params key, for any unusable input.
    """
    images = resolve_paths(city.images, f"cities.{name}.images")
    beyond = [n for n in city.tiles if n > len(images)]
    if beyond:
        raise FilesError(
            f"cities.{name}.tiles: tile {beyond[0]} asked for, but cities.{name}.images matches "
            f"{len(images)} files (tile n is the n-th of the sorted paths: {[str(p) for p in images[:5]]}"
            f"{' ...' if len(images) > 5 else ''}); use tile numbers 1..{len(images)}"
        )
    masks = _masks_by_stem(city, name, [images[n - 1] for n in city.tiles])
    buildings = read_buildings(Path(city.polygons), city.layer, name)
    tree = shapely.STRtree(np.asarray(buildings.geometry.values, dtype=object))
    used = np.zeros(len(buildings), dtype=bool)
    row_index = {int(r): i for i, r in enumerate(buildings[SOURCE_ROW])}
    counts = {"tiles": len(city.tiles), "buildings": 0, "polygons_read": len(buildings), "masks": 0}
    crss = set()
    for n in tqdm(city.tiles, desc=f"{name}: tiles", unit="tile", disable=len(city.tiles) < 2):
        tile, image_path = f"{name}{n}", images[n - 1]
        rgb, info = read_rgb8(image_path, city, name, (cfg.stretch[0], cfg.stretch[1]))
        crss.add(info.crs.to_string())
        geoms, rows = tile_buildings(buildings, tree, info)
        if len(geoms) >= id_stride:
            raise FilesError(f"{image_path}: {len(geoms)} buildings, more than the {id_stride - 1} ids a tile can have")
        used[[row_index[int(r)] for r in rows]] = True
        ids = n * id_stride + np.arange(len(geoms), dtype=np.int64)
        write_geotiff(out_dir / "images" / f"{tile}.tif", rgb, info.transform, info.crs)
        write_polygons(
            out_dir / "polygons" / f"{tile}.gpkg", *from_pixels(geoms, ids, info.transform, info.crs),
            columns={SOURCE_ROW: rows},
        )
        if image_path.stem in masks:
            gt = read_mask(masks[image_path.stem], info, image_path, name)
            counts["masks"] += 1
        elif len(geoms):  # no mask: the truth burned in, as for a synthetic city
            gt = features.rasterize(((g, 255) for g in geoms), out_shape=info.shape, dtype="uint8")
        else:
            gt = np.zeros(info.shape, dtype=np.uint8)
        write_geotiff(out_dir / "gt" / f"{tile}.tif", gt, info.transform, info.crs)
        given = ", mask given" if image_path.stem in masks else ""
        logger.info("%s = %s: %d buildings%s", tile, image_path, len(geoms), given)
        counts["buildings"] += len(geoms)
    if counts["buildings"] == 0:
        bounds = ", ".join(f"{v:.6g}" for v in buildings.total_bounds)
        raise FilesError(
            f"{city.polygons}: none of its {len(buildings)} polygons (CRS {buildings.crs.to_string()}, bounds {bounds}) "
            f"meets any tile of cities.{name}.images (CRS {', '.join(sorted(crss))}); most likely one of the two CRSs "
            f"is wrong: assign the right one to the file (ogr2ogr -a_srs / gdal_edit.py -a_srs), or fix cities.{name}.polygons"
        )
    counts["polygons_outside"] = int((~used).sum())
    if counts["polygons_outside"]:
        logger.info(
            "%s: %d of %d polygons meet none of the %d tiles",
            city.polygons, counts["polygons_outside"], len(buildings), len(city.tiles),
        )
    return counts


def _masks_by_stem(city: FilesCityConfig, name: str, images: list[Path]) -> dict[str, Path]:
    """The mask of each of ``images`` (same file name without extension), when masks are given."""
    if not _patterns(city.masks):
        return {}
    key = f"cities.{name}.masks"
    masks = resolve_paths(city.masks, key)
    by_stem: dict[str, Path] = {}
    for path in masks:
        if path.stem in by_stem:
            raise FilesError(f"{key}: two masks named {path.stem}: {by_stem[path.stem]} and {path}; keep one")
        by_stem[path.stem] = path
    missing = [p for p in images if p.stem not in by_stem]
    if missing:
        raise FilesError(
            f"{key}: no mask for {missing[0]} (a mask has its image's file name, e.g. {missing[0].stem}.tif); "
            f"add it or leave {key} empty"
        )
    return by_stem


def read_mask(path: Path, info: TileInfo, image: Path, name: str) -> np.ndarray:
    """A building mask (nonzero = building, nodata = none) as 0/255 uint8 on its image's grid.

    Raises:
        FilesError: the mask is unreadable or not on the image's grid.
    """
    key = f"cities.{name}.masks"
    try:
        mask_info = read_info(path)
        with rasterio.open(path) as src:
            band, valid = src.read(1), src.read_masks(1) > 0
    except (RasterioIOError, ValueError) as err:
        raise FilesError(f"{path}: not a readable mask ({key}): {err}; fix or replace it") from err
    if (mask_info.crs, mask_info.transform, mask_info.shape) != (info.crs, info.transform, info.shape):
        raise FilesError(
            f"{path}: the mask is not on the grid of its image {image} ({mask_info.shape} px, {mask_info.crs}, "
            f"{tuple(mask_info.transform)[:6]} against {info.shape} px, {info.crs}, {tuple(info.transform)[:6]}); "
            f"resample it to the image's grid or fix {key}"
        )
    return np.where(valid & (band > 0), 255, 0).astype(np.uint8)
