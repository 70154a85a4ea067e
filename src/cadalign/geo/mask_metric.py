"""Residual misalignment of polygon labels against the tiles' building masks.

For labels without vertex truth (OpenStreetMap footprints, which no one aligned by hand),
each polygon's misalignment is the length of the integer translation within
``+-max_shift`` px that best lays it onto the ground-truth building mask
(:func:`cadalign.mask_offset.best_translation`). Each polygon is rasterised alone into a
window around it (its pixel bounds grown by ``max_shift``, clipped to the tile), so a tile
with thousands of buildings costs thousands of small FFTs, not full-tile rasters.

Layouts: label files ``<labels_dir>/<city>/<tile>.gpkg`` (the rounds' labels), or
``<cities_dir>/<city>/<layer>/<tile>.gpkg`` (a city's own layers: ``osm``, ``polygons``),
against masks ``<cities_dir>/<city>/gt/<tile>.tif``. Polygons are repaired and clipped to
the tile first; polygons entirely outside it are not measured. A polygon too thin to cover
a pixel centre gets NaN (counted as unmeasured by :func:`summarize_offsets`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import shapely
from affine import Affine
from rasterio import features

from cadalign.geo.polygons import clean_polygons, read_polygons, to_pixels
from cadalign.geo.tiles import read_band
from cadalign.mask_offset import best_translation

logger = logging.getLogger(__name__)

THRESHOLDS_PX = (1, 2, 4, 8)


def polygon_offsets_px(geoms: np.ndarray, gt_mask: np.ndarray, max_shift: int = 32) -> np.ndarray:
    """Best-translation length of each polygon (pixel coordinates) onto a building mask.

    Args:
        geoms: shapely (Multi)Polygons in the mask's pixel coordinates, inside the mask.
        gt_mask: (H, W) building mask (nonzero = building).
        max_shift: search range in pixels along each axis.

    Returns:
        (N,) float64 lengths ``hypot(dx, dy)`` in pixels; NaN for a polygon whose raster
        is empty (it covers no pixel centre).

    Raises:
        ValueError: ``gt_mask`` is not 2-D or ``max_shift`` is negative.
    """
    gt = np.asarray(gt_mask) > 0
    if gt.ndim != 2:
        raise ValueError(f"gt_mask must be 2-D (H, W), got shape {gt.shape}")
    if isinstance(max_shift, bool) or not isinstance(max_shift, (int, np.integer)) or max_shift < 0:
        raise ValueError(f"max_shift must be an integer >= 0, got {max_shift!r}")
    height, width = gt.shape
    out = np.full(len(geoms), np.nan)
    for i, geom in enumerate(geoms):
        x0, y0, x1, y1 = shapely.bounds(geom)
        c0, r0 = max(0, int(np.floor(x0)) - max_shift), max(0, int(np.floor(y0)) - max_shift)
        c1, r1 = min(width, int(np.ceil(x1)) + max_shift), min(height, int(np.ceil(y1)) + max_shift)
        if c1 <= c0 or r1 <= r0:
            continue
        raster = features.rasterize(
            [(geom, 1)], out_shape=(r1 - r0, c1 - c0), transform=Affine.translation(c0, r0), dtype="uint8"
        )
        if not raster.any():
            continue
        dx, dy, _ = best_translation(raster, gt[r0:r1, c0:c1], max_shift)
        out[i] = np.hypot(dx, dy)
    return out


def tile_offsets(label_path: Path, gt_path: Path, max_shift: int = 32) -> np.ndarray:
    """Per-polygon best-translation lengths of one label file against one gt mask.

    Args:
        label_path: polygons with a CRS (any; they are reprojected to the mask's CRS).
        gt_path: the tile's building mask GeoTIFF (0/255).
        max_shift: search range in pixels.

    Returns:
        (N,) float64 lengths in pixels, one per polygon that touches the tile (NaN if it
        covers no pixel centre).

    Raises:
        cadalign.geo.polygons.PolygonError: the label file is missing or lacks a CRS / ids.
        cadalign.geo.tiles.TileError: the mask is missing or unreadable.
    """
    mask, info = read_band(gt_path)
    geoms, ids = to_pixels(read_polygons(label_path), info.transform, info.crs)
    geoms, _, stats = clean_polygons(geoms, ids, info.shape)
    if stats.n_outside:
        logger.debug("%s: %d polygons outside the tile are not measured", label_path, stats.n_outside)
    return polygon_offsets_px(geoms, mask, max_shift)


def _offsets(pairs: list[tuple[str, Path, Path]], max_shift: int) -> dict[str, np.ndarray]:
    """Concatenate :func:`tile_offsets` per city over (city, label, gt) triples."""
    per_city: dict[str, list[np.ndarray]] = {}
    for city, label_path, gt_path in pairs:
        if not gt_path.is_file():
            raise FileNotFoundError(
                f"no building mask {gt_path} for {label_path}: the mask metric needs each tile's gt; "
                "run the fetch stage (test cities have no masks)"
            )
        per_city.setdefault(city, []).append(tile_offsets(label_path, gt_path, max_shift))
    logger.info("measured %d label files against their masks", len(pairs))
    return {city: np.concatenate(parts) for city, parts in per_city.items()}


def label_offsets(
    cities_dir: Path, labels_dir: Path, max_shift: int = 32, cities: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    """Best-translation lengths of every polygon of a label set, per city.

    Args:
        cities_dir: folder of the cities (``<city>/gt/<tile>.tif``).
        labels_dir: label set laid out as ``<city>/<tile>.gpkg``.
        max_shift: search range in pixels.
        cities: the cities of the study (None: every city folder found).

    Returns:
        {city: (N,) float64 lengths in pixels}, tiles concatenated in name order.

    Raises:
        FileNotFoundError: no label file under ``labels_dir``, or a tile has no gt mask.
    """
    files = [p for p in sorted(Path(labels_dir).glob("*/*.gpkg")) if cities is None or p.parent.name in set(cities)]
    if not files:
        raise FileNotFoundError(
            f"no labels under {labels_dir}/<city>/<tile>.gpkg; run the stage that writes them"
        )
    pairs = [(p.parent.name, p, Path(cities_dir) / p.parent.name / "gt" / f"{p.stem}.tif") for p in files]
    return _offsets(pairs, max_shift)


def layer_offsets(
    cities_dir: Path, layer: str, max_shift: int = 32, cities: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    """Best-translation lengths of a layer the cities carry themselves (e.g. ``osm``).

    Cities without the ``<city>/<layer>/`` folder (synthetic cities have no ``osm``) are
    left out and logged.

    Args:
        cities_dir: folder of the cities, each ``<city>/<layer>/<tile>.gpkg`` and
            ``<city>/gt/<tile>.tif``.
        layer: the sub-folder holding the polygons, e.g. ``osm`` or ``polygons``.
        max_shift: search range in pixels.
        cities: the cities of the study (None: every city folder found).

    Returns:
        {city: (N,) float64 lengths in pixels} for the cities that have the layer (may be
        empty).

    Raises:
        FileNotFoundError: ``cities_dir`` is missing, or a tile has no gt mask.
    """
    cities_dir = Path(cities_dir)
    if not cities_dir.is_dir():
        raise FileNotFoundError(f"cities folder {cities_dir} does not exist; run the fetch stage first")
    pairs = []
    for city_dir in sorted(p for p in cities_dir.iterdir() if p.is_dir() and (cities is None or p.name in set(cities))):
        files = sorted((city_dir / layer).glob("*.gpkg"))
        if not files:
            logger.info("%s: no %s/ polygons; city left out of the %s metric", city_dir.name, layer, layer)
        pairs += [(city_dir.name, p, city_dir / "gt" / f"{p.stem}.tif") for p in files]
    return _offsets(pairs, max_shift) if pairs else {}


def summarize_offsets(lengths: np.ndarray) -> dict[str, float | int]:
    """Distribution summary of per-polygon offsets (NaNs counted apart).

    Args:
        lengths: per-polygon best-translation lengths in pixels (NaN = unmeasured).

    Returns:
        ``median_offset_px``, ``mean_offset_px``, ``offset_within_<t>px`` (the fraction
        within t px, for t in 1, 2, 4, 8), ``n_polygons`` (measured) and ``n_unmeasured``.

    Raises:
        ValueError: no polygon was measured (empty or all-NaN ``lengths``).
    """
    lengths = np.asarray(lengths, dtype=np.float64).ravel()
    finite = lengths[np.isfinite(lengths)]
    if len(finite) == 0:
        raise ValueError(
            f"no polygon offset to summarise ({len(lengths)} polygons, none covering a pixel of its tile)"
        )
    out: dict[str, float | int] = {
        "median_offset_px": float(np.median(finite)),
        "mean_offset_px": float(np.mean(finite)),
    }
    for t in THRESHOLDS_PX:
        out[f"offset_within_{t}px"] = float(np.mean(finite <= t))
    out["n_polygons"] = len(finite)
    out["n_unmeasured"] = len(lengths) - len(finite)
    return out


def summarize_by_city(offsets: dict[str, np.ndarray]) -> dict:
    """:func:`summarize_offsets` of all cities together, plus one entry per city.

    Args:
        offsets: {city: per-polygon lengths}, as returned by :func:`label_offsets`.

    Returns:
        The overall summary with a ``cities`` mapping of per-city summaries (cities with no
        measured polygon are left out of it).

    Raises:
        ValueError: no polygon was measured in any city.
    """
    if not offsets:
        raise ValueError("no city to summarise: no label file was measured")
    out: dict = summarize_offsets(np.concatenate(list(offsets.values())))
    out["cities"] = {
        city: summarize_offsets(lengths) for city, lengths in offsets.items() if np.isfinite(lengths).any()
    }
    return out
