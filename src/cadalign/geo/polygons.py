"""Building polygons at the edge: GeoPackage I/O, CRS handling and pixel coordinates.

Inside the pipeline, polygons are numpy arrays of shapely geometries in the pixel
coordinates of their tile (x = column, y = row, origin at the top-left corner of the
top-left pixel; see :mod:`cadalign.geo.tiles`) plus an int64 array of building ids. On
disk they are GeoPackages with a CRS and a ``building_id`` column.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import shapely
from affine import Affine
from rasterio.crs import CRS

from cadalign.atomic import atomic_path

logger = logging.getLogger(__name__)

ID_COLUMN = "building_id"
LAYER = "buildings"
GPKG_TIMESTAMP = "2000-01-01T00:00:00.000Z"
"""The ``last_change`` of every GeoPackage written here (GDAL's ``OGR_CURRENT_DATE``). GDAL
otherwise stamps the time of writing, so the same polygons gave a different file, and a
different DVC hash, on every run."""


class PolygonError(ValueError):
    """A polygon file is missing, unreadable or lacks what the pipeline needs."""


@dataclass(frozen=True)
class CleanStats:
    """What :func:`clean_polygons` repaired or dropped, for logs and metrics."""

    n_input: int
    n_kept: int
    n_repaired: int
    n_outside: int
    n_not_polygonal: int
    n_empty: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "polygons_input": self.n_input,
            "polygons_kept": self.n_kept,
            "polygons_repaired": self.n_repaired,
            "polygons_outside_tile": self.n_outside,
            "polygons_not_polygonal": self.n_not_polygonal,
            "polygons_empty": self.n_empty,
        }


def read_polygons(path: str | Path) -> gpd.GeoDataFrame:
    """Read a polygon file (GeoPackage, GeoJSON, ...) that must have a CRS and building ids.

    Raises:
        PolygonError: if the file is missing or unreadable, has no CRS, or no
            ``building_id`` column.
    """
    path = Path(path)
    if not path.is_file():
        raise PolygonError(f"polygon file not found: {path}; run the stage that writes it (dvc repro)")
    try:
        gdf = gpd.read_file(path)
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as err:
        raise PolygonError(f"{path}: not a readable vector file: {err}; delete it and rerun its stage") from err
    check_finite(gdf.geometry.values, gdf[ID_COLUMN].to_numpy() if ID_COLUMN in gdf.columns else np.arange(len(gdf)),
                 f"{path}", "fix or drop them in the file")
    if gdf.crs is None:
        raise PolygonError(
            f"{path}: the polygons have no CRS; assign the right one "
            "(e.g. ogr2ogr -a_srs EPSG:4326 out.gpkg in.gpkg) and rerun"
        )
    if ID_COLUMN not in gdf.columns:
        raise PolygonError(f"{path}: missing column '{ID_COLUMN}' (a unique integer id per building)")
    return gdf


def write_polygons(
    path: str | Path,
    geoms: np.ndarray,
    ids: np.ndarray,
    crs: CRS | str | int,
    columns: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write polygons with their ids (and optional extra columns) as a GeoPackage, atomically.

    The file is a function of its content: the same polygons give the same bytes.
    """
    path = Path(path)
    crs = CRS.from_epsg(crs) if isinstance(crs, int) else CRS.from_user_input(crs)
    data = {ID_COLUMN: np.asarray(ids, dtype=np.int64)}
    data.update(columns or {})
    gdf = gpd.GeoDataFrame(data, geometry=list(np.asarray(geoms, dtype=object)), crs=crs.to_wkt())
    with atomic_path(path) as tmp, _gpkg_timestamp():
        gdf.to_file(tmp, layer=LAYER, driver="GPKG", engine="pyogrio")
    return path


@contextlib.contextmanager
def _gpkg_timestamp() -> Iterator[None]:
    """Stamp GeoPackages with :data:`GPKG_TIMESTAMP` for the block; the option is restored after."""
    before = pyogrio.get_gdal_config_option("OGR_CURRENT_DATE")
    pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": GPKG_TIMESTAMP})
    try:
        yield
    finally:
        pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": before})


def check_finite(geoms: np.ndarray, ids: np.ndarray, where: str, fix: str) -> None:
    """Refuse geometries with a NaN or infinite coordinate (GEOS and the metrics would carry
    them on silently), naming ``where``, the first building ids and ``fix``.

    Raises:
        PolygonError: if any coordinate is not finite.
    """
    coords, index = shapely.get_coordinates(np.asarray(geoms, dtype=object), return_index=True)
    bad = np.unique(index[~np.isfinite(coords).all(axis=1)])
    if len(bad):
        first = ", ".join(str(i) for i in np.asarray(ids)[bad[:5]])
        raise PolygonError(
            f"{where}: {len(bad)} polygon(s) with NaN or infinite coordinates (building ids {first}"
            f"{', ...' if len(bad) > 5 else ''}); {fix}"
        )


def check_some_inside(stats: CleanStats, where: str, polygons_crs: object, tile_crs: object) -> None:
    """Refuse a tile's polygons of which none with an area falls inside the tile.

    They were fetched for the tile's box, so none inside is a wrongly declared CRS rather than
    a tile without buildings (which has no polygon at all).

    Raises:
        PolygonError: naming ``where`` and the two CRSs.
    """
    if stats.n_outside and not stats.n_kept:
        raise PolygonError(_crs_mistake(where, f"none of its {stats.n_input} polygons falls inside its tile", polygons_crs, tile_crs))


def _crs_mistake(where: str, what: str, polygons_crs: object, tile_crs: object) -> str:
    return (
        f"{where}: {what}; their CRS is {polygons_crs}, the tile's {tile_crs}: the polygons' CRS is likely declared "
        "wrongly; declare the right one (e.g. ogr2ogr -a_srs EPSG:<code> out.gpkg in.gpkg) and rerun"
    )


def geometry_array(geoms: list) -> np.ndarray:
    """A 1-D object array of geometries (safe for multi-part geometries and empty lists)."""
    out = np.empty(len(geoms), dtype=object)
    out[:] = geoms
    return out


def _affine_fn(transform: Affine):
    a, b, c, d, e, f = transform[:6]

    def apply(xy: np.ndarray) -> np.ndarray:
        return np.stack([a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f], axis=1)

    return apply


def to_pixels(
    gdf: gpd.GeoDataFrame, transform: Affine, crs: CRS, where: str = "polygons"
) -> tuple[np.ndarray, np.ndarray]:
    """Reproject polygons to the tile's CRS and express them in its pixel coordinates.

    Vertex order and structure are kept, so vertices stay comparable by index.

    Returns:
        (geoms, ids): shapely geometries in pixel coordinates and their int64 building ids.

    Raises:
        PolygonError: naming ``where`` and both CRSs, if a coordinate has no place in the
            tile's CRS (e.g. metres declared as degrees).
    """
    projected = gdf.to_crs(crs.to_wkt() if isinstance(crs, CRS) else crs)
    if not np.isfinite(shapely.get_coordinates(projected.geometry.values)).all():
        raise PolygonError(_crs_mistake(where, "its polygons have no place in the tile's CRS", gdf.crs, crs))
    geoms = shapely.transform(np.asarray(projected.geometry.values, dtype=object), _affine_fn(~transform))
    return geoms, projected[ID_COLUMN].to_numpy(dtype=np.int64)


def from_pixels(geoms: np.ndarray, ids: np.ndarray, transform: Affine, crs: CRS) -> tuple[np.ndarray, np.ndarray, CRS]:
    """Map pixel-coordinate polygons back to the tile's CRS. Returns (geoms, ids, crs)."""
    return shapely.transform(np.asarray(geoms, dtype=object), _affine_fn(transform)), np.asarray(ids), crs


def _polygonal_part(geom: shapely.Geometry) -> shapely.Geometry | None:
    """The polygonal part of a repaired geometry, or None if it has none."""
    if isinstance(geom, (shapely.Polygon, shapely.MultiPolygon)):
        return geom
    if isinstance(geom, shapely.GeometryCollection):
        parts = [g for g in geom.geoms if isinstance(g, (shapely.Polygon, shapely.MultiPolygon))]
        if parts:
            return shapely.union_all(parts)
    return None


def clean_polygons(
    geoms: np.ndarray, ids: np.ndarray, shape: tuple[int, int], where: str = "polygons"
) -> tuple[np.ndarray, np.ndarray, CleanStats]:
    """Repair invalid polygons, clip them to the tile and drop what falls outside.

    Self-intersecting polygons are repaired with ``shapely.make_valid`` (only their polygonal
    part is kept); MultiPolygons and holes are kept; polygons entirely outside the tile box
    ``[0, W] x [0, H]`` are dropped. Each case is counted; empty geometries and those without
    area (points, lines, zero-area polygons) are dropped with a warning naming ``where``.

    Args:
        geoms: shapely geometries in pixel coordinates.
        ids: their building ids.
        shape: (H, W) of the tile.

    Returns:
        (geoms, ids, stats) of the kept polygons.
    """
    geoms = np.asarray(geoms, dtype=object)
    ids = np.asarray(ids, dtype=np.int64)
    invalid = ~shapely.is_valid(geoms)
    repaired = geoms.copy()
    if invalid.any():
        repaired[invalid] = shapely.make_valid(geoms[invalid])
    height, width = shape
    clipped = shapely.clip_by_rect(repaired, 0.0, 0.0, float(width), float(height))
    kept_geoms, kept_ids = [], []
    empty = shapely.is_missing(geoms) | shapely.is_empty(geoms)
    n_outside = n_not_polygonal = 0
    for geom, bid, was_empty in zip(clipped, ids, empty, strict=True):
        if was_empty:
            continue
        if geom is None or geom.is_empty:
            n_outside += 1
            continue
        part = _polygonal_part(geom)
        if part is None or part.is_empty:
            n_not_polygonal += 1
            continue
        kept_geoms.append(part)
        kept_ids.append(bid)
    stats = CleanStats(
        n_input=len(geoms),
        n_kept=len(kept_geoms),
        n_repaired=int(invalid.sum()),
        n_outside=n_outside,
        n_not_polygonal=n_not_polygonal,
        n_empty=int(empty.sum()),
    )
    if stats.n_empty or stats.n_not_polygonal:
        logger.warning(
            "%s: dropped %d empty geometries and %d without area (points, lines, zero-area polygons) of %d",
            where, stats.n_empty, stats.n_not_polygonal, stats.n_input,
        )
    if stats.n_repaired or stats.n_outside or stats.n_not_polygonal or stats.n_empty:
        logger.info("%s: %s", where, stats.as_dict())
    return geometry_array(kept_geoms), np.array(kept_ids, dtype=np.int64), stats
