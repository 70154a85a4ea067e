"""OpenStreetMap buildings for a tile through the Overpass API, pinned to a date.

One POST per tile: building ways and building multipolygon relations in the tile's WGS84
bounding box, at the snapshot ``[date:"..."]`` (OSM changes over time; the pinned date makes
reruns return the same buildings). The query ends in ``out geom;`` so ways and the member
ways of relations come back with their coordinates inline: one request, no node lookup and
no recursion, at the price of repeating shared nodes (fine at tile size). Relations are
assembled here (even-odd rule over their closed member rings, so holes and islands in
courtyards come out right).

Overpass failure modes handled: HTTP 429/504 (and other 5xx) are retried with backoff,
honouring ``Retry-After``; a 200 answer whose ``remark`` reports a runtime error (server
timeout, out of memory) raises :class:`OverpassError` even when elements came back, since
they may be partial, and is never read as "no buildings"; a body that is not JSON raises
naming the endpoint; fewer buildings than ``min_expected_buildings`` raises.

Answers are cached on disk (``cache_dir``), one file per query: the key is the endpoint and
the query text without its ``[timeout:]`` (so the tile's box and the snapshot date), so a
rerun after a failure sends only the queries not answered yet, and another city or study
over the same tile reuses them. Only answers that passed every check are stored, atomically.

HTTP uses the stdlib (:mod:`cadalign.sources.http`): the well-kept clients (overpy, osmnx)
are not installed here, and one POST with retries needs nothing more.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import shapely.ops
from affine import Affine
from rasterio._err import CPLE_BaseError
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.transform import array_bounds
from rasterio.warp import transform_bounds

from cadalign.atomic import atomic_path
from cadalign.geo.polygons import geometry_array, write_polygons
from cadalign.geo.tiles import read_info
from cadalign.sources.http import request_bytes

logger = logging.getLogger(__name__)

_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
# Remark fragments Overpass uses for failed or cut-short queries.
_REMARK_ERRORS = ("error", "timed out", "timeout", "out of memory")
# building_id = 2 * osm_id + type code: unique across ways and relations, stable across runs.
_TYPE_CODE = {"way": 0, "relation": 1}
USER_AGENT = "cadalign/0.1 (research reproduction; Overpass building download)"

Bbox = tuple[float, float, float, float]


class OverpassError(RuntimeError):
    """Overpass answered, but not with a complete, usable list of buildings."""


@dataclass(frozen=True)
class OsmConfig:
    """How buildings are fetched from Overpass.

    Attributes:
        endpoint: Overpass interpreter URL.
        date: OSM snapshot to query (ISO UTC, ``YYYY-MM-DDTHH:MM:SSZ``).
        timeout_s: server-side query timeout ``[timeout:]``; the socket waits 30 s longer.
        retries: retries on 429/5xx/connection errors.
        backoff_s: first wait between retries, doubled each time (Retry-After wins).
        min_expected_buildings: fewer buildings than this is an error (e.g. 1 when the
            tile's gt mask shows buildings); 0 accepts an empty answer.
        densify_pts: points per tile edge when projecting the bbox to WGS84.
        cache_dir: folder of cached answers, shared by every tile and city ("" = no cache).

    In params.yaml, ``endpoint``, ``date``, ``min_expected_buildings`` and ``densify_pts``
    are keys of ``inria.osm`` (they decide the buildings); ``timeout_s``, ``retries``,
    ``backoff_s`` and ``cache_dir`` (as ``cache``) of ``download.overpass``.
    """

    endpoint: str = "https://overpass-api.de/api/interpreter"
    date: str = "2024-01-01T00:00:00Z"
    timeout_s: int = 180  # Overpass default; a 5000x5000 px tile at 0.3 m is ~2 km2
    retries: int = 5
    backoff_s: float = 30.0  # public Overpass rate-limits per IP; short waits just get 429 again
    min_expected_buildings: int = 0
    densify_pts: int = 21
    cache_dir: str = ""

    def validate(self) -> None:
        """Raise ValueError on an unusable setting."""
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"endpoint {self.endpoint!r} must be an http(s) URL")
        if not _DATE_RE.match(self.date):
            raise ValueError(f"date {self.date!r} must look like 2024-01-01T00:00:00Z")
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0 or self.min_expected_buildings < 0:
            raise ValueError("timeout_s must be > 0; retries, backoff_s, min_expected_buildings >= 0")


def tile_bbox_wgs84(
    crs: CRS | None, transform: Affine, width: int, height: int, *, tile: str = "tile", densify_pts: int = 21
) -> Bbox:
    """The tile's bounding box in WGS84 degrees, edges densified so curvature is covered.

    Args:
        crs: the tile's CRS.
        transform: its pixel-to-CRS affine transform.
        width: width in pixels.
        height: height in pixels.
        tile: name used in error messages (e.g. the file path).
        densify_pts: extra points per edge for the projection.

    Returns:
        (west, south, east, north) in degrees.

    Raises:
        ValueError: no CRS, a CRS that cannot be transformed to WGS84, or a box that
            crosses the antimeridian; the message names ``tile``.
    """
    if crs is None:
        raise ValueError(f"{tile}: no CRS; georeference the tile before querying OSM")
    west, south, east, north = array_bounds(height, width, transform)
    try:
        box = transform_bounds(crs, "EPSG:4326", west, south, east, north, densify_pts=densify_pts)
    except (CPLE_BaseError, CRSError) as err:
        raise ValueError(
            f"{tile}: cannot transform its CRS {crs} to WGS84 ({err}); fix the tile's CRS"
        ) from err
    if not all(math.isfinite(v) for v in box) or box[0] > box[2] or box[1] > box[3]:
        raise ValueError(f"{tile}: WGS84 bounds {box} are unusable (antimeridian or a bad CRS)")
    return box


def build_query(bbox: Bbox, date: str, timeout: int) -> str:
    """Overpass QL for building ways and multipolygon relations in ``bbox`` at ``date``.

    Args:
        bbox: (west, south, east, north) in degrees (Overpass wants south,west,north,east).
        date: snapshot date, ``YYYY-MM-DDTHH:MM:SSZ``.
        timeout: server-side timeout in seconds.

    Returns:
        The query text.
    """
    west, south, east, north = bbox
    box = f"{south:.8f},{west:.8f},{north:.8f},{east:.8f}"
    return (
        f'[out:json][timeout:{int(timeout)}][date:"{date}"];\n'
        "(\n"
        f'  way["building"]({box});\n'
        f'  relation["building"]["type"="multipolygon"]({box});\n'
        ");\n"
        "out geom;\n"
    )


def check_answer(body: bytes, endpoint: str) -> dict[str, Any]:
    """Decode an Overpass answer body into JSON with an element list.

    Args:
        body: the HTTP response body.
        endpoint: the URL it came from, for messages.

    Returns:
        The decoded answer.

    Raises:
        OverpassError: the body is not JSON or has no ``elements`` list; names ``endpoint``.
    """
    try:
        answer = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OverpassError(
            f"{endpoint}: answer is not JSON ({err}; starts with {body[:120]!r}); the server is "
            "overloaded or the endpoint is wrong; retry later or set osm.endpoint"
        ) from err
    if not isinstance(answer, dict) or not isinstance(answer.get("elements"), list):
        raise OverpassError(
            f"{endpoint}: JSON answer without an 'elements' list; is this an Overpass endpoint?"
        )
    return answer


def _check_remark(answer: dict[str, Any], source: str) -> None:
    """Refuse an answer whose ``remark`` reports a runtime error (its elements may be partial)."""
    remark = str(answer.get("remark", ""))
    if remark and any(word in remark.lower() for word in _REMARK_ERRORS):
        raise OverpassError(
            f"{source}: query failed on the server ({remark.strip()}); {len(answer.get('elements', []))} "
            "elements came back and may be partial, so nothing is written. Retry later or raise "
            "download.overpass.timeout_s."
        )
    if remark:
        logger.warning("%s: remark in answer: %s", source, remark)


def _coords(geometry: Any) -> list[tuple[float, float]] | None:
    """(lon, lat) list of an ``out geom`` geometry, or None if a node is missing."""
    if not isinstance(geometry, list) or any(not isinstance(p, dict) for p in geometry):
        return None
    return [(float(p["lon"]), float(p["lat"])) for p in geometry]


def _polygonal(geom: shapely.Geometry) -> shapely.Geometry | None:
    """Make valid and keep the polygonal part, or None."""
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    parts = [g for g in shapely.get_parts(geom) if isinstance(g, shapely.Polygon) and not g.is_empty]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)


def _relation_geometry(members: list[dict[str, Any]]) -> shapely.Geometry | None:
    lines = []
    for member in members:
        if member.get("type") != "way" or member.get("role", "outer") not in ("outer", "inner", ""):
            continue
        coords = _coords(member.get("geometry"))
        if coords is not None and len(coords) >= 2:
            lines.append(shapely.LineString(coords))
    if not lines:
        return None
    merged = shapely.ops.linemerge(lines)
    rings = [line for line in shapely.get_parts(merged) if line.is_ring]
    if len(rings) < len(shapely.get_parts(merged)):
        logger.debug("relation has unclosed member chains; they are ignored")
    polygons = [_polygonal(shapely.Polygon(ring)) for ring in rings]
    polygons = [p for p in polygons if p is not None]
    if not polygons:
        return None
    # Even-odd rule: nested rings alternate filled / hole whatever their role says.
    return _polygonal(reduce(shapely.symmetric_difference, polygons))


def parse_overpass(
    answer: dict[str, Any], source: str = "Overpass answer"
) -> list[tuple[str, int, shapely.Geometry]]:
    """Buildings of an ``out geom`` Overpass answer as (osm_type, osm_id, geometry).

    Ways become polygons when closed (>= 4 points, first == last); relations are built from
    their outer/inner member ways (merged into rings, even-odd fill so holes are kept).
    Invalid shapes are repaired with ``shapely.make_valid`` (polygonal part kept); what
    cannot be made a polygon is skipped and counted in the log.

    Args:
        answer: decoded JSON (see :func:`check_answer`).
        source: where the answer came from (the endpoint), for messages.

    Returns:
        Sorted by (type, id); geometries in (lon, lat).

    Raises:
        OverpassError: the ``remark`` reports a server-side error or timeout: the elements
            may be partial, so they are never taken as the complete (or empty) answer.
    """
    _check_remark(answer, source)
    out = []
    not_closed = no_coords = 0
    for element in answer.get("elements", []):
        kind = element.get("type")
        geom = None
        if kind == "way":
            coords = _coords(element.get("geometry"))
            if coords is None:
                no_coords += 1
                continue
            if len(coords) >= 4 and coords[0] == coords[-1]:
                geom = _polygonal(shapely.Polygon(coords))
        elif kind == "relation":
            members = [m for m in element.get("members", []) if m.get("type") == "way"]
            if members and all(_coords(m.get("geometry")) is None for m in members):
                no_coords += 1
                continue
            geom = _relation_geometry(element.get("members", []))
        else:
            continue
        if geom is None:
            not_closed += 1
            continue
        out.append((kind, int(element["id"]), geom))
    if not_closed:
        logger.info("%s: skipped %d OSM elements that are not closed polygons", source, not_closed)
    if no_coords:
        logger.warning(
            "%s: skipped %d OSM elements without inline coordinates (their nodes are missing from the "
            "answer; closed or not, their shape is unknown)",
            source,
            no_coords,
        )
    return sorted(out, key=lambda t: (_TYPE_CODE[t[0]], t[1]))


def building_ids(osm_types: list[str], osm_ids: list[int]) -> np.ndarray:
    """Stable unique int64 building ids derived from the OSM type and id.

    Args:
        osm_types: "way" or "relation" per building.
        osm_ids: the OSM ids.

    Returns:
        ``2 * osm_id`` for ways, ``2 * osm_id + 1`` for relations (OSM ids are < 2**40).
    """
    return np.array([2 * i + _TYPE_CODE[t] for t, i in zip(osm_types, osm_ids, strict=True)], dtype=np.int64)


def cache_key(endpoint: str, bbox: Bbox, date: str) -> str:
    """Name of the cached answer to a tile's query: sha256 of the endpoint and the query text
    without its server-side timeout (which changes how long the server tries, not the answer).

    Args:
        endpoint: the Overpass URL.
        bbox: the query box (west, south, east, north) in degrees.
        date: the snapshot date.

    Returns:
        64 hex digits.
    """
    return hashlib.sha256(f"{endpoint}\n{build_query(bbox, date, 0)}".encode()).hexdigest()


def _from_cache(path: Path, needed: int, name: str) -> list[tuple[str, int, shapely.Geometry]] | None:
    """The buildings of a cached answer, or None (and the file removed) if it is unusable now."""
    try:
        buildings = parse_overpass(check_answer(path.read_bytes(), str(path)), str(path))
    except (OSError, OverpassError) as err:
        logger.warning("%s: ignoring the cached answer %s (%s); asking the server again", name, path, err)
        path.unlink(missing_ok=True)
        return None
    if len(buildings) < needed:
        logger.warning(
            "%s: the cached answer %s has %d buildings, fewer than the %d now required; asking the server again",
            name, path, len(buildings), needed,
        )
        path.unlink()
        return None
    logger.info("%s: %d buildings from the cached answer %s", name, len(buildings), path)
    return buildings


def fetch_tile_buildings(
    tile_path: Path,
    cfg: OsmConfig,
    out_path: Path,
    min_expected: int | None = None,
    *,
    name: str | None = None,
    advice: str = "If the area is really unmapped, lower inria.osm.min_expected_buildings.",
) -> int:
    """Download the OSM buildings over one tile (or take them from the cache) and write them.

    Args:
        tile_path: GeoTIFF whose own CRS and extent give the query box.
        cfg: Overpass settings.
        out_path: GeoPackage to write (EPSG:4326; columns building_id, osm_type, osm_id),
            atomically.
        min_expected: overrides ``cfg.min_expected_buildings`` (e.g. 1 when the tile's
            building mask is not empty).
        name: the tile as messages name it (default: ``tile_path``); give it when
            ``tile_path`` is a temporary file.
        advice: the sentence that ends the message when too few buildings come back: what to
            change (name the setting that asked for them).

    Returns:
        The number of buildings written.

    Raises:
        cadalign.geo.tiles.TileError: the tile is missing or has no CRS.
        ValueError: the tile's CRS cannot be transformed to WGS84.
        cadalign.sources.http.DownloadError: HTTP failure after retries.
        OverpassError: error remark, malformed answer, or fewer buildings than expected.
    """
    name = str(tile_path) if name is None else name
    info = read_info(tile_path)
    bbox = tile_bbox_wgs84(
        info.crs, info.transform, info.width, info.height, tile=name, densify_pts=cfg.densify_pts
    )
    needed = cfg.min_expected_buildings if min_expected is None else min_expected
    cached = Path(cfg.cache_dir) / f"{cache_key(cfg.endpoint, bbox, cfg.date)}.json" if cfg.cache_dir else None
    buildings = _from_cache(cached, needed, name) if cached is not None and cached.is_file() else None
    if buildings is None:
        query = build_query(bbox, cfg.date, cfg.timeout_s)
        request = urllib.request.Request(
            cfg.endpoint,
            data=urllib.parse.urlencode({"data": query}).encode(),
            headers={"User-Agent": USER_AGENT},
            method="POST",
        )
        logger.info("%s: querying %s for buildings in %s at %s", name, cfg.endpoint, bbox, cfg.date)
        body = request_bytes(request, retries=cfg.retries, backoff_s=cfg.backoff_s, timeout_s=cfg.timeout_s + 30)
        buildings = parse_overpass(check_answer(body, cfg.endpoint), cfg.endpoint)
        if len(buildings) < needed:
            raise OverpassError(
                f"{name}: Overpass returned {len(buildings)} buildings for bbox {bbox} at {cfg.date}, "
                f"expected at least {needed}; the answer may be cut short or OSM lacks this area. "
                f"Retry later. {advice}"
            )
        if cached is not None:
            with atomic_path(cached) as tmp:
                tmp.write_bytes(body)
    types = [t for t, _, _ in buildings]
    ids = [i for _, i, _ in buildings]
    write_polygons(
        out_path,
        geometry_array([g for _, _, g in buildings]),
        building_ids(types, ids),
        "EPSG:4326",
        columns={"osm_type": np.array(types, dtype=object), "osm_id": np.array(ids, dtype=np.int64)},
    )
    logger.info("%s: %d buildings -> %s", name, len(buildings), out_path)
    return len(buildings)
