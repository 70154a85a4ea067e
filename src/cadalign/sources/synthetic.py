"""Deterministic synthetic city: aerial-looking RGB tiles with exact building footprints.

This is the default, embedded data source: it needs no download and reproduces the Inria
layout (``images/``, ``gt/``) plus the "cadaster" polygons an OSM download would give
(``polygons/``). A tile is a small procedural city in one of three styles:

- ``dense``: a city centre, narrow streets, many medium buildings close together along the
  streets, some large courtyard blocks (polygons with a hole), paved ground.
- ``suburb``: wavy or straight streets, small houses set back in lawns, driveways, pools,
  many trees.
- ``industrial``: wide roads, few large halls with big flat (metal or concrete) roofs,
  aprons, parking lots with cars, dry grass.

Rendering (all numpy / OpenCV, pixel-centre convention of :mod:`cadalign.geo.tiles`):
multi-scale textured ground, road network with sidewalks, kerbs and dashed markings,
buildings as unions of rectangles (rectangle, L, T, courtyard) with gable, hip or flat roofs
lit by one sun, cast shadows along one direction that darken the ground but never roofs,
and trees (textured canopies with their own shadows) that may hide building edges. The
``mask`` is the footprint truth (trees do not remove mask pixels), rasterized from the
polygons with :func:`rasterio.features.rasterize`.

Bit-identical on any x86-64 CPU: array arithmetic uses only +, -, *, /, sqrt, floor and
comparisons, which IEEE 754 rounds exactly whatever SIMD kernel numpy picks. Sines and
cosines come from :func:`_sin` (a polynomial in those operations), blurs and upsampling
from :func:`_blur` and :func:`_upsample` (fixed-order sums in numpy), never from
``np.sin``/``np.hypot``/``np.arctan2``/``**`` or OpenCV's float filters, whose AVX2/AVX-512
kernels differ in the last bit. The few scalar libm results left (``atan2``, ``tan``,
``exp``) are rounded to :func:`_grid` before use. OpenCV only draws with integer
coordinates into uint8 masks (or with ``LINE_8`` into float images), which is exact.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import geopandas as gpd
import numpy as np
import shapely
from affine import Affine
from rasterio import features
from rasterio.crs import CRS
from rasterio.errors import CRSError
from tqdm import tqdm

from cadalign.config import check_name
from cadalign.geo.polygons import from_pixels, geometry_array, write_polygons
from cadalign.geo.tiles import write_geotiff

logger = logging.getLogger(__name__)

STYLES = ("dense", "suburb", "industrial")
MIN_SIZE = 64

# ---------------------------------------------------------------------------------------
# Style parameters. Lengths are in metres and converted with the tile's pixel size, so a
# tile at 0.3 m/px looks like an Inria tile.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Style:
    """Layout and look of one city style (lengths in metres)."""

    block: tuple[float, float]  # street spacing range
    asphalt: tuple[float, float]  # carriageway width range
    sidewalk: tuple[float, float]  # sidewalk width range (each side)
    wavy: float  # probability that a street family is wavy (sinusoidal)
    setback: tuple[float, float]  # distance from road edge to building front
    gap: float  # minimum distance between two buildings
    lot: tuple[float, float]  # frontage length of one building (along the street)
    depth: tuple[float, float]  # building depth (perpendicular to the street)
    shapes: tuple[float, float, float]  # probabilities of rectangle, L, T
    courtyards: float  # courtyard blocks per km of street
    fill: float  # extra random buildings per hectare, placed behind the frontage
    fill_size: tuple[float, float]  # side range of the extra buildings
    roofs: tuple[float, float, float]  # probabilities of gable, hip, flat
    palette: tuple[tuple[float, float, float], ...]  # roof base colours (RGB 0..1)
    height: tuple[float, float]  # building height range (sets the shadow length)
    trees: float  # trees per hectare
    tree_radius: tuple[float, float]  # canopy radius range
    ground: tuple[tuple[float, float, float], tuple[float, float, float]]  # two ground colours
    paved: float  # share of the ground that is paved (0 = all vegetation)
    parking: float  # parking lots per hectare
    pools: float  # probability that a house has a pool
    retry_step: float  # how far to move along the street after a blocked frontage lot


_TERRACOTTA = (0.62, 0.34, 0.26)
_BROWN_RED = (0.46, 0.27, 0.23)
_SLATE = (0.34, 0.35, 0.37)
_BROWN = (0.47, 0.39, 0.31)
_LIGHT_GREY = (0.70, 0.70, 0.68)
_WHITE = (0.86, 0.86, 0.84)
_BEIGE = (0.71, 0.65, 0.53)
_COPPER = (0.41, 0.55, 0.48)
_METAL = (0.60, 0.62, 0.64)
_DARK_GREY = (0.27, 0.27, 0.28)
_FLAT_PALETTE = (_LIGHT_GREY, _WHITE, _DARK_GREY, _BEIGE, _SLATE, _METAL)  # flat roofs of mostly pitched styles

_STYLES: dict[str, _Style] = {
    "dense": _Style(
        block=(50.0, 80.0), asphalt=(5.0, 7.5), sidewalk=(1.5, 2.5), wavy=0.0, setback=(0.3, 1.2),
        gap=0.6, lot=(10.0, 24.0), depth=(12.0, 20.0), shapes=(0.5, 0.3, 0.2), courtyards=2.0,
        fill=40.0, fill_size=(7.0, 18.0), roofs=(0.45, 0.2, 0.35),
        # repeated entries make a colour more common
        palette=(_TERRACOTTA,) * 3 + (_BROWN_RED,) * 2 + (_LIGHT_GREY,) * 2
        + (_SLATE, _BEIGE, _COPPER, _DARK_GREY, _BROWN),
        height=(8.0, 18.0), trees=12.0, tree_radius=(2.0, 4.0),
        ground=((0.58, 0.56, 0.52), (0.48, 0.47, 0.44)), paved=0.85, parking=0.0, pools=0.0, retry_step=2.0,
    ),
    "suburb": _Style(
        block=(65.0, 100.0), asphalt=(5.0, 7.0), sidewalk=(0.8, 1.5), wavy=0.6, setback=(4.0, 8.0),
        gap=3.0, lot=(13.0, 20.0), depth=(9.0, 13.0), shapes=(0.55, 0.35, 0.1), courtyards=0.0,
        fill=3.0, fill_size=(4.0, 7.0), roofs=(0.5, 0.4, 0.1),
        palette=(_TERRACOTTA, _BROWN_RED, _SLATE, _BROWN, _DARK_GREY, _LIGHT_GREY, _BEIGE),
        height=(4.0, 8.0), trees=90.0, tree_radius=(1.8, 5.0),
        ground=((0.33, 0.43, 0.22), (0.45, 0.47, 0.30)), paved=0.0, parking=0.0, pools=0.3, retry_step=8.0,
    ),
    "industrial": _Style(
        block=(110.0, 170.0), asphalt=(8.0, 11.0), sidewalk=(0.0, 1.0), wavy=0.0, setback=(4.0, 12.0),
        gap=6.0, lot=(35.0, 90.0), depth=(25.0, 55.0), shapes=(0.75, 0.2, 0.05), courtyards=0.0,
        fill=2.0, fill_size=(20.0, 45.0), roofs=(0.05, 0.0, 0.95),
        palette=(_LIGHT_GREY, _WHITE, _METAL, _DARK_GREY, _BEIGE, _SLATE),
        height=(7.0, 14.0), trees=6.0, tree_radius=(2.0, 4.0),
        ground=((0.55, 0.53, 0.40), (0.47, 0.45, 0.38)), paved=0.35, parking=4.0, pools=0.0, retry_step=10.0,
    ),
}

_GRASS = (0.34, 0.44, 0.22)
_ASPHALT = (0.30, 0.30, 0.31)
_CONCRETE = (0.66, 0.65, 0.62)
_POOL = (0.30, 0.62, 0.72)
_CARS = ((0.85, 0.85, 0.85), (0.12, 0.12, 0.13), (0.55, 0.12, 0.10), (0.20, 0.28, 0.50), (0.60, 0.60, 0.62))


@dataclass(frozen=True, eq=False)
class SyntheticTile:
    """One synthetic tile.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        mask: (H, W) uint8, 255 on building footprints, 0 elsewhere (like Inria's gt).
        polygons: 1-D object array of shapely Polygons in pixel coordinates, clipped to
            ``[0, W] x [0, H]``.
        ids: int64 building ids (1..N within the tile), unique, in polygon order.
        shadow_direction: unit vector (dx, dy) in pixels along which shadows are cast.
    """

    image: np.ndarray
    mask: np.ndarray
    polygons: np.ndarray
    ids: np.ndarray
    shadow_direction: tuple[float, float]


@dataclass
class _Building:
    """A building as a union of oriented rectangles (cx, cy, half-length, half-width, angle)."""

    footprint: shapely.Polygon
    parts: list[tuple[float, float, float, float, float]]
    roof: str
    colour: np.ndarray
    height: float


# ---------------------------------------------------------------------------------------
# Small geometry helpers
# ---------------------------------------------------------------------------------------


# Taylor coefficients of sin up to x**17: on [-pi/2, pi/2] the error is below 1e-13
_SIN_TAYLOR = tuple((-1) ** k / math.factorial(2 * k + 1) for k in range(9))
_GRID = 2.0**-32  # step that scalar libm results are rounded to (see _grid)


def _sin(x: np.ndarray | float) -> np.ndarray:
    """Sine (float64) from basic arithmetic only, so no CPU-specific SIMD or libm kernel is involved.

    ``np.sin`` dispatches to AVX2 or AVX-512 kernels whose results differ in the last bit.
    """
    x = np.asarray(x, np.float64)
    k = np.rint(x / math.pi)
    r = x - k * math.pi  # in [-pi/2, pi/2]; sin(x) = (-1)**k sin(r)
    r2 = r * r
    acc = np.full_like(r, _SIN_TAYLOR[-1])
    for coeff in reversed(_SIN_TAYLOR[:-1]):
        acc = acc * r2 + coeff
    return np.where(np.mod(k, 2) == 0, acc * r, -(acc * r))


def _cos(x: np.ndarray | float) -> np.ndarray:
    """Cosine (float64), see :func:`_sin`."""
    return _sin(np.asarray(x, np.float64) + math.pi / 2)


def _sincos(angle: float) -> tuple[float, float]:
    """(cos, sin) of a scalar angle as Python floats, see :func:`_sin`."""
    return float(_cos(angle)), float(_sin(angle))


def _grid(x: float) -> float:
    """Round a scalar libm result to a multiple of 2**-32, so its last bit (which may depend on the CPU) is lost."""
    return round(x / _GRID) * _GRID


def _rect_corners(cx: float, cy: float, hl: float, hw: float, angle: float) -> np.ndarray:
    """Corners (4, 2) of an oriented rectangle, long axis ``hl`` along ``angle``."""
    c, s = _sincos(angle)
    local = np.array([[-hl, -hw], [hl, -hw], [hl, hw], [-hl, hw]])
    return np.stack([cx + local[:, 0] * c - local[:, 1] * s, cy + local[:, 0] * s + local[:, 1] * c], axis=1)


def _cv_points(xy: np.ndarray) -> np.ndarray:
    """Pixel coordinates to OpenCV fixed-point (4 fractional bits); cv2 puts pixel centres on integers."""
    return np.round((np.asarray(xy, dtype=np.float64) - 0.5) * 16).astype(np.int32).reshape(-1, 1, 2)


def _fill_geom(mask: np.ndarray, geom: shapely.Geometry, value: int = 255) -> None:
    """Fill a (Multi)Polygon, holes included, into a uint8 mask in place."""
    rings = []
    for poly in getattr(geom, "geoms", [geom]):
        if poly.is_empty or not isinstance(poly, shapely.Polygon):
            continue
        rings.append(_cv_points(np.asarray(poly.exterior.coords)))
        rings.extend(_cv_points(np.asarray(r.coords)) for r in poly.interiors)
    if rings:
        cv2.fillPoly(mask, rings, value, lineType=cv2.LINE_8, shift=4)


def _cubic_weights(t: np.ndarray) -> list[np.ndarray]:
    """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractions ``t`` (Keys cubic, a = -0.75 as OpenCV)."""
    a = -0.75
    w0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    w1 = ((a + 2) * t - (a + 3)) * t * t + 1
    w2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
    return [w0, w1, w2, 1 - w0 - w1 - w2]


def _upsample(small: np.ndarray, cell: int, start: int, n: int, axis: int) -> np.ndarray:
    """Samples ``start .. start + n`` of ``small`` upsampled ``cell`` times along ``axis``.

    Cubic as ``cv2.INTER_CUBIC``, edges replicated, pixel-centre convention; a fixed-order sum
    in numpy instead of ``cv2.resize``, whose SIMD kernels differ per CPU.
    """
    pos = (np.arange(start, start + n) + 0.5) / cell - 0.5
    first = np.floor(pos).astype(np.int64)
    shape = [1] * small.ndim
    shape[axis] = n
    out = np.zeros(small.shape[:axis] + (n,) + small.shape[axis + 1 :], np.float32)
    for k, w in enumerate(_cubic_weights(pos - first)):
        taken = np.take(small, np.clip(first - 1 + k, 0, small.shape[axis] - 1), axis=axis)
        out += taken * w.astype(np.float32).reshape(shape)
    return out


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of the two first axes (float32, edges reflected as OpenCV's default).

    A fixed-order sum in numpy instead of ``cv2.GaussianBlur``, whose SIMD kernels differ per CPU.
    """
    radius = (round(8 * sigma + 1) | 1) // 2  # OpenCV's kernel size for float images
    weights = [math.exp(-0.5 * (i / sigma) * (i / sigma)) for i in range(-radius, radius + 1)]
    total = math.fsum(weights)
    weights = [np.float32(_grid(w / total)) for w in weights]
    for axis in (0, 1):
        pad = [(0, 0)] * image.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(image, pad, mode="reflect")
        out = np.zeros_like(image)
        for k, w in enumerate(weights):
            out += padded[(slice(None),) * axis + (slice(k, k + image.shape[axis]),)] * w
        image = out
    return image


def _fbm(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, ...]) -> np.ndarray:
    """Multi-scale value noise (zero mean, unit std), one octave per cell size (pixels)."""
    height, width = shape
    out = np.zeros(shape, np.float32)
    for cell in cells:
        small = rng.standard_normal((height // cell + 4, width // cell + 4)).astype(np.float32)
        oy, ox = rng.integers(0, cell, size=2)
        rows = _upsample(small, cell, int(oy), height, axis=0)
        out += _upsample(rows, cell, int(ox), width, axis=1) * math.sqrt(cell)
    return (out - out.mean()) / (out.std() + 1e-6)


def _blend(image: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    """``image = image * (1 - mask) + colour * mask`` in place; mask (H, W) float or (H, W, 3)."""
    m = mask[..., None] if mask.ndim == 2 else mask
    image *= 1.0 - m
    image += m * colour


# ---------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------


def _street_family(
    rng: np.random.Generator, size: int, margin: float, spacing: tuple[float, float], angle: float, wavy: bool
) -> list[shapely.LineString]:
    """Parallel (optionally wavy) centrelines covering the extended tile, at ``angle``."""
    centre = size / 2.0
    reach = size * 0.75 + margin  # half-extent that covers the extended tile at any angle
    c, s = _sincos(angle)
    lines = []
    offset = -reach + rng.uniform(0.2, 0.8) * spacing[0]
    while offset < reach:
        t = np.linspace(-reach, reach, 64 if wavy else 2)
        n = np.full_like(t, offset)
        if wavy:
            wavelength = rng.uniform(1.5, 3.0) * spacing[1]
            amplitude = rng.uniform(0.06, 0.12) * spacing[0]
            n = n + amplitude * _sin(2 * np.pi * t / wavelength + rng.uniform(0, 2 * np.pi))
        xs = centre + t * c - n * s
        ys = centre + t * s + n * c
        lines.append(shapely.LineString(np.stack([xs, ys], axis=1)))
        offset += rng.uniform(*spacing)
    return lines


class _Layout:
    """Rejection-sampled placement of non-overlapping footprints away from roads."""

    def __init__(self, roads: shapely.Geometry, gap: float) -> None:
        self.roads = roads
        shapely.prepare(self.roads)
        self.gap = gap
        self.bounds = np.zeros((0, 4))
        self.items: list[shapely.Geometry] = []  # footprints and obstacles (lots, pools, driveways)

    def free(self, geom: shapely.Geometry, road_clearance: float) -> bool:
        """Whether ``geom`` keeps ``gap`` from placed items and ``road_clearance`` from roads."""
        if road_clearance > 0:
            if shapely.dwithin(self.roads, geom, road_clearance):
                return False
        elif self.roads.intersects(geom):
            return False
        x0, y0, x1, y1 = geom.bounds
        g = self.gap
        b = self.bounds
        near = np.nonzero((b[:, 0] < x1 + g) & (b[:, 2] > x0 - g) & (b[:, 1] < y1 + g) & (b[:, 3] > y0 - g))[0]
        return not any(shapely.dwithin(self.items[i], geom, g) for i in near)

    def add(self, geom: shapely.Geometry) -> None:
        """Record a placed footprint or obstacle."""
        self.items.append(geom)
        self.bounds = np.concatenate([self.bounds, np.asarray(geom.bounds)[None]])


def _shape_parts(rng: np.random.Generator, style: _Style, length: float, depth: float, courtyard: bool) -> tuple[
    list[tuple[float, float, float, float]], np.ndarray, list[np.ndarray]
]:
    """Parts (x0, y0, x1, y1) in a local frame centred on 0, and the footprint rings.

    Returns:
        (parts, exterior ring (K, 2), hole rings): rectangles (4 vertices), L (6), T (8) or a
        courtyard block (4 + a 4-vertex hole), local x along the street.
    """
    hx, hy = length / 2.0, depth / 2.0
    if courtyard:
        t = min(rng.uniform(0.22, 0.32) * min(length, depth), 0.4 * min(length, depth))
        parts = [
            (-hx, -hy, hx, -hy + t),
            (-hx, hy - t, hx, hy),
            (-hx, -hy + t, -hx + t, hy - t),
            (hx - t, -hy + t, hx, hy - t),
        ]
        ext = np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]])
        hole = np.array([[-hx + t, -hy + t], [-hx + t, hy - t], [hx - t, hy - t], [hx - t, -hy + t]])
        return parts, ext, [hole]
    kind = rng.choice(3, p=np.asarray(style.shapes) / sum(style.shapes))
    if kind == 0:
        return [(-hx, -hy, hx, hy)], np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]]), []
    bar = rng.uniform(0.45, 0.65) * depth  # depth of the street-side wing
    arm = rng.uniform(0.3, 0.45) * length  # width of the wing going back
    if kind == 1:  # L: street wing + back wing on the left
        parts = [(-hx, -hy, hx, -hy + bar), (-hx, -hy + bar, -hx + arm, hy)]
        ext = np.array([[-hx, -hy], [hx, -hy], [hx, -hy + bar], [-hx + arm, -hy + bar], [-hx + arm, hy], [-hx, hy]])
    else:  # T: street wing + centred back wing
        c0 = rng.uniform(-0.15, 0.15) * length - arm / 2
        parts = [(-hx, -hy, hx, -hy + bar), (c0, -hy + bar, c0 + arm, hy)]
        ext = np.array(
            [[-hx, -hy], [hx, -hy], [hx, -hy + bar], [c0 + arm, -hy + bar],
             [c0 + arm, hy], [c0, hy], [c0, -hy + bar], [-hx, -hy + bar]]
        )
    if rng.random() < 0.5:  # mirror left/right
        parts = [(-x1, y0, -x0, y1) for x0, y0, x1, y1 in parts]
        ext = ext[::-1] * np.array([-1.0, 1.0])
    return parts, ext, []


def _make_building(
    rng: np.random.Generator, style: _Style, px: float, cx: float, cy: float, angle: float,
    length: float, depth: float, courtyard: bool = False,
) -> _Building:
    """Build a footprint centred on (cx, cy), local x along ``angle`` (sizes in pixels)."""
    parts_local, ext, holes = _shape_parts(rng, style, length, depth, courtyard)
    c, s = _sincos(angle)

    def place(xy: np.ndarray) -> np.ndarray:
        return np.stack([cx + xy[:, 0] * c - xy[:, 1] * s, cy + xy[:, 0] * s + xy[:, 1] * c], axis=1)

    footprint = shapely.Polygon(place(ext), [place(h) for h in holes])
    parts = []
    for x0, y0, x1, y1 in parts_local:
        mx, my = (x0 + x1) / 2, (y0 + y1) / 2
        hx, hy = (x1 - x0) / 2, (y1 - y0) / 2
        pcx, pcy = cx + mx * c - my * s, cy + mx * s + my * c
        # the long axis of each part carries the ridge
        parts.append((pcx, pcy, hx, hy, angle) if hx >= hy else (pcx, pcy, hy, hx, angle + math.pi / 2))
    roof = str(rng.choice(["gable", "hip", "flat"], p=np.asarray(style.roofs) / sum(style.roofs)))
    if courtyard and roof == "hip":
        roof = "gable"
    palette = _FLAT_PALETTE if roof == "flat" and style.roofs[2] < 0.5 else style.palette
    base = np.asarray(palette[rng.integers(len(palette))], np.float32)
    colour = np.clip(base * rng.uniform(0.85, 1.12) + rng.normal(0, 0.008, 3), 0.05, 0.95).astype(np.float32)
    return _Building(footprint, parts, roof, colour, rng.uniform(*style.height) / px)


# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------


def _render_roof(
    image: np.ndarray, b: _Building, sun: np.ndarray, grain: np.ndarray, rng: np.random.Generator
) -> None:
    """Paint one building's roof: per part, pixel faces lit by the sun (``sun`` points to it)."""
    height, width = image.shape[:2]
    flat_tone = rng.uniform(0.97, 1.03)
    for cx, cy, hl, hw, angle in b.parts:
        corners = _rect_corners(cx, cy, hl, hw, angle)
        x0, y0 = np.floor(corners.min(axis=0)).astype(int)
        x1, y1 = np.ceil(corners.max(axis=0)).astype(int)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        if x1 <= x0 or y1 <= y0:
            continue
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
        c, s = _sincos(angle)
        u = (xs - cx) * c + (ys - cy) * s  # along the ridge
        v = -(xs - cx) * s + (ys - cy) * c  # across the ridge
        inside = (np.abs(u) <= hl) & (np.abs(v) <= hw)
        if not inside.any():
            continue
        du, dv = hl - np.abs(u), hw - np.abs(v)
        g = grain[y0:y1, x0:x1]
        if b.roof == "flat":
            edge = np.minimum(du, dv)
            shade = flat_tone * (1.0 + 0.03 * g)
            shade = np.where(edge < 1.5, 1.12, shade)  # parapet
            shade = np.where((edge >= 1.5) & (edge < 2.5), 0.9, shade)  # parapet inner shadow
            if hl > 40 and b.colour.mean() > 0.5 and rng.random() < 0.6:  # ribbed metal sheeting
                ribs = np.where(np.mod(np.floor(u / 2.2), 2) == 0, 1.0, -1.0)  # sign(sin(pi u / 2.2))
                shade = shade * (1.0 + 0.05 * ribs)
            elif hl > 12 and hw > 12:  # rooftop units, each with a small shadow
                su, sv = -3.0 * (sun[0] * c + sun[1] * s), -3.0 * (-sun[0] * s + sun[1] * c)
                for _ in range(min(int(rng.poisson(hl * hw / 600.0)), 12)):
                    bu, bv = rng.uniform(-hl + 5, hl - 5), rng.uniform(-hw + 5, hw - 5)
                    bh, bw = rng.uniform(1.5, 6.0, 2)
                    box = (np.abs(u - bu) <= bh) & (np.abs(v - bv) <= bw)
                    cast = (np.abs(u - su - bu) <= bh) & (np.abs(v - sv - bv) <= bw) & ~box
                    shade = np.where(box, 1.2, np.where(cast, shade * 0.7, shade))
        else:
            across = np.where(v >= 0, 1.0, -1.0)
            # face normal (horizontal part) of each pixel's roof plane, in image axes
            nx, ny = -s * across, c * across
            if b.roof == "hip":
                end = du < dv  # hip ends
                along = np.where(u >= 0, 1.0, -1.0)
                nx = np.where(end, c * along, nx)
                ny = np.where(end, s * along, ny)
            lit = nx * sun[0] + ny * sun[1]
            shade = 0.93 + 0.3 * lit
            dist = np.where((b.roof == "hip") & (du < dv), du, dv)
            courses = _sin(dist * (math.pi / 1.4)).astype(np.float32)
            shade = shade * (1.0 + 0.04 * courses) * (1.0 + 0.04 * g)  # tile courses
            ridge = (b.roof == "gable") & (np.abs(v) < 0.8)
            shade = np.where(ridge, shade * 1.08, shade)
        patch = image[y0:y1, x0:x1]
        patch[inside] = (b.colour[None, :] * shade[inside][:, None]).astype(np.float32)


def _shadow_mask(
    shape: tuple[int, int], buildings: list[_Building], direction: np.ndarray, sun_factor: float
) -> np.ndarray:
    """Union of each part swept along the shadow direction by its height (uint8 0/255)."""
    mask = np.zeros(shape, np.uint8)
    for b in buildings:
        offset = direction * b.height * sun_factor
        for part in b.parts:
            corners = _rect_corners(*part)
            hull = cv2.convexHull(np.concatenate([corners, corners + offset]).astype(np.float32))
            cv2.fillConvexPoly(mask, _cv_points(hull.reshape(-1, 2)), 255, lineType=cv2.LINE_8, shift=4)
    return mask


def _draw_trees(
    image: np.ndarray, rng: np.random.Generator, centres: np.ndarray, radii: np.ndarray,
    direction: np.ndarray, sun_factor: float, grain: np.ndarray,
) -> None:
    """Tree shadows (darken everything below), then textured, sun-lit canopies on top."""
    height, width = image.shape[:2]
    shadow = np.zeros((height, width), np.uint8)
    tree_h = radii * rng.uniform(1.6, 2.4, len(radii))
    for (x, y), r, h in zip(centres, radii, tree_h, strict=True):
        sx, sy = np.array([x, y]) + direction * h * sun_factor
        cv2.circle(shadow, (int(round(sx * 16 - 8)), int(round(sy * 16 - 8))), int(r * 16), 255, -1, cv2.LINE_8, 4)
    sh = _blur(shadow.astype(np.float32) / 255.0, 1.2)
    image *= (1.0 - 0.5 * sh)[..., None]
    greens = np.array([[0.20, 0.30, 0.13], [0.26, 0.34, 0.16], [0.17, 0.25, 0.12], [0.30, 0.36, 0.20]], np.float32)
    for (x, y), r in zip(centres, radii, strict=True):
        x0, y0 = max(int(x - r * 1.3) - 1, 0), max(int(y - r * 1.3) - 1, 0)
        x1, y1 = min(int(x + r * 1.3) + 2, width), min(int(y + r * 1.3) + 2, height)
        if x1 <= x0 or y1 <= y0:
            continue
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
        dx, dy = (xs - x) / r, (ys - y) / r
        rho2 = dx * dx + dy * dy
        rho = np.sqrt(rho2)
        wave = _lobes(dx, dy, rho, int(rng.integers(3, 7)), rng.uniform(0, 6.3))
        lobes = 1.0 + 0.12 * wave + 0.08 * grain[y0:y1, x0:x1]
        inside = rho <= lobes
        if not inside.any():
            continue
        # a dome lit from the sun: brighter on the sun side, darker at the rim
        lit = 0.85 - 0.35 * (dx * direction[0] + dy * direction[1]) - 0.25 * rho2
        tex = 1.0 + 0.22 * grain[y0:y1, x0:x1] * _cos(rho * 5.0).astype(np.float32)
        colour = greens[rng.integers(len(greens))] * rng.uniform(0.85, 1.15)
        patch = image[y0:y1, x0:x1]
        patch[inside] = colour[None, :] * np.clip(lit * tex, 0.3, 1.6)[inside][:, None]


def _lobes(dx: np.ndarray, dy: np.ndarray, rho: np.ndarray, k: int, phase: float) -> np.ndarray:
    """``sin(k * atan2(dy, dx) + phase)`` (float32) by de Moivre's formula, without ``np.arctan2``."""
    safe = np.where(rho > 0, rho, 1.0)
    c1, s1 = np.where(rho > 0, dx / safe, 1.0), dy / safe
    c, s = c1, s1
    for _ in range(k - 1):  # (c + i s) <- (c + i s)(c1 + i s1)
        c, s = c * c1 - s * s1, s * c1 + c * s1
    cp, sp = _sincos(phase)
    return (s * cp + c * sp).astype(np.float32)


def _dashes(line: shapely.LineString, dash: float) -> list[np.ndarray]:
    """Dashed pieces of a centreline as point arrays (dash on, dash off)."""
    pieces = []
    s = dash / 2
    while s + dash < line.length:
        pts = shapely.line_interpolate_point(line, np.linspace(s, s + dash, 4))
        pieces.append(shapely.get_coordinates(pts))
        s += 2 * dash
    return pieces


def _draw_car(image: np.ndarray, rng: np.random.Generator, x: float, y: float, angle: float, px: float) -> None:
    """A car seen from above: a coloured box with a darker windscreen band."""
    colour = np.asarray(_CARS[rng.integers(len(_CARS))], np.float32) * rng.uniform(0.9, 1.1)
    body = _rect_corners(x, y, 2.2 / px, 0.9 / px, angle)
    # OpenCV draws LINE_AA as LINE_8 into float images: say so, it is the exact integer path
    cv2.fillConvexPoly(image, _cv_points(body), colour.tolist(), lineType=cv2.LINE_8, shift=4)
    c, s = _sincos(angle)
    wx, wy = x + 0.6 / px * c, y + 0.6 / px * s
    glass = _rect_corners(wx, wy, 0.45 / px, 0.75 / px, angle)
    cv2.fillConvexPoly(image, _cv_points(glass), (colour * 0.35).tolist(), lineType=cv2.LINE_8, shift=4)


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


def _check_args(size: int, style: str, seed: int, pixel_size: float) -> None:
    if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ValueError(f"size={size!r}: must be an integer >= {MIN_SIZE} pixels; pass a larger size")
    if style not in _STYLES:
        raise ValueError(f"style={style!r}: unknown style; use one of {STYLES}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}: must be a non-negative integer")
    if not (isinstance(pixel_size, (int, float)) and 0.05 <= pixel_size <= 5.0):
        raise ValueError(f"pixel_size={pixel_size!r}: must be a number of metres per pixel in [0.05, 5]")


@dataclass(frozen=True)
class _Streets:
    """The street network of a tile (pixel units)."""

    centrelines: list[shapely.LineString]
    half_widths: list[float]  # half carriageway width of each centreline
    sidewalk: float  # sidewalk width on each side
    asphalt: shapely.Geometry  # union of the carriageways
    street: shapely.Geometry  # carriageways plus sidewalks
    angle: float  # orientation of the grid (radians)


def _lay_streets(rng: np.random.Generator, st: _Style, size: int, px: float, margin: float) -> _Streets:
    """Two roughly perpendicular families of (maybe wavy) streets over the extended tile."""
    work_box = shapely.box(-margin, -margin, size + margin, size + margin)
    angle = rng.uniform(-np.pi / 4, np.pi / 4) if rng.random() < 0.7 else rng.choice([0.0, np.pi / 2])
    spacing = (st.block[0] / px, st.block[1] / px)
    family_a = _street_family(rng, size, margin, spacing, angle, rng.random() < st.wavy)
    spacing_b = (spacing[0] * 1.2, spacing[1] * 1.5)  # rectangular rather than square blocks
    family_b = _street_family(rng, size, margin, spacing_b, angle + np.pi / 2, rng.random() < st.wavy)
    centrelines = [ln for ln in family_a + family_b if ln.intersects(work_box)]
    half_widths = [rng.uniform(*st.asphalt) / px / 2 for _ in centrelines]
    sidewalk = rng.uniform(*st.sidewalk) / px
    asphalt = shapely.union_all(
        [ln.buffer(h, cap_style="flat") for ln, h in zip(centrelines, half_widths, strict=True)]
    )
    street = asphalt.buffer(sidewalk) if sidewalk > 0.5 else asphalt
    return _Streets(centrelines, half_widths, sidewalk, asphalt, street, float(angle))


def _frame(line: shapely.LineString, s: float) -> tuple[np.ndarray, np.ndarray]:
    """Point and unit tangent of ``line`` at distance ``s`` along it."""
    p = line.interpolate(s)
    q = line.interpolate(min(s + 1.0, line.length - 1e-6))
    t = np.array([q.x - p.x, q.y - p.y])
    return np.array([p.x, p.y]), t / (math.hypot(*t) + 1e-9)  # not np.linalg.norm: BLAS kernels vary per CPU


class _Planner:
    """Places courtyard blocks, street frontage, parking lots and back buildings, in that order."""

    def __init__(
        self, rng: np.random.Generator, style: str, size: int, px: float, margin: float, streets: _Streets
    ) -> None:
        self.rng, self.style, self.st = rng, style, _STYLES[style]
        self.size, self.px, self.margin = size, px, margin
        self.streets = streets
        self.work_box = shapely.box(-margin, -margin, size + margin, size + margin)
        self.layout = _Layout(streets.street, gap=self.st.gap / px)
        self.buildings: list[_Building] = []
        self.driveways: list[shapely.Geometry] = []
        self.parking: list[shapely.Geometry] = []
        self.pools: list[shapely.Geometry] = []

    def metres(self, r: tuple[float, float]) -> float:
        """A random length in pixels drawn from a range in metres."""
        return self.rng.uniform(*r) / self.px

    def try_add(self, b: _Building, clearance: float) -> bool:
        """Keep ``b`` if it is free (no overlap, ``clearance`` from the streets)."""
        if not b.footprint.intersects(self.work_box) or not self.layout.free(b.footprint, clearance):
            return False
        self.layout.add(b.footprint)
        self.buildings.append(b)
        return True

    def _visible(self, line: shapely.LineString) -> tuple[float, float]:
        """Start (distance along ``line``) and length of its part inside the extended tile."""
        clipped = line.intersection(self.work_box)
        if clipped.is_empty:
            return 0.0, 0.0
        return line.project(shapely.Point(shapely.get_coordinates(clipped)[0])), clipped.length

    def courtyards(self) -> None:
        """Large perimeter blocks with an inner courtyard (a polygon hole), along streets."""
        rng, st, streets = self.rng, self.st, self.streets
        street_km = sum(ln.intersection(self.work_box).length for ln in streets.centrelines) * self.px / 1000
        for _ in range(int(rng.poisson(st.courtyards * street_km))):
            k = int(rng.integers(len(streets.centrelines)))
            line, half = streets.centrelines[k], streets.half_widths[k]
            lo, length_in = self._visible(line)
            for _attempt in range(6):
                p, t = _frame(line, rng.uniform(lo, lo + max(length_in - 1.0, 0.0)))
                normal = np.array([-t[1], t[0]]) * rng.choice([-1.0, 1.0])
                length, depth = rng.uniform(24, 42) / self.px, rng.uniform(22, 36) / self.px
                c = p + normal * (half + streets.sidewalk + self.metres(st.setback) + depth / 2)
                ang = _grid(math.atan2(t[1], t[0]))
                b = _make_building(rng, st, self.px, c[0], c[1], ang, length, depth, courtyard=True)
                if self.try_add(b, self.metres(st.setback) * 0.5):
                    break

    def frontage(self) -> None:
        """Buildings along both sides of every street, facing it; driveways and pools in suburbs."""
        rng, st, px, streets = self.rng, self.st, self.px, self.streets
        for line, half in zip(streets.centrelines, streets.half_widths, strict=True):
            start, visible = self._visible(line)
            for side in (-1.0, 1.0):
                s = start + rng.uniform(0, st.lot[1] / px)
                while s < start + visible:
                    length, depth = self.metres(st.lot), self.metres(st.depth)
                    if self.style == "suburb" and rng.random() < 0.3:  # gable end facing the street
                        length, depth = depth, length
                    p, t = _frame(line, s)
                    normal = np.array([-t[1], t[0]]) * side
                    setback = self.metres(st.setback)
                    c = p + normal * (half + streets.sidewalk + setback + depth / 2)
                    jitter = rng.normal(0, 0.02) if self.style != "dense" else 0.0
                    # local y points away from the street, so L and T wings go to the back
                    ang = _grid(math.atan2(t[1], t[0])) + (0.0 if side > 0 else np.pi) + jitter
                    if self.try_add(_make_building(rng, st, px, c[0], c[1], ang, length, depth), 0.5 * setback):
                        self._garden(p, t, normal, c, half, setback, length, depth, ang)
                        s += length + rng.uniform(st.gap, st.gap * 2 + 1.0) / px
                    else:  # blocked (corner, neighbour): move on a little and try again
                        s += st.retry_step / px

    def _garden(
        self, p: np.ndarray, t: np.ndarray, normal: np.ndarray, c: np.ndarray, half: float,
        setback: float, length: float, depth: float, ang: float,
    ) -> None:
        """Suburban extras of a new house: a driveway to the street and maybe a pool behind."""
        rng, px = self.rng, self.px
        if self.style == "suburb" and rng.random() < 0.8:
            end = rng.choice([-1.0, 1.0]) * (length / 2 - 1.6 / px)
            a = p + t * end + normal * half
            axis = shapely.LineString([a, a + normal * (self.streets.sidewalk + setback)])
            way = axis.buffer(1.5 / px, cap_style="flat")
            self.driveways.append(way)
            self.layout.add(way)
        if rng.random() < self.st.pools:
            pc = c + normal * (depth / 2 + rng.uniform(3.0, 6.0) / px)
            half_length, half_width = rng.uniform(2.5, 5) / px, rng.uniform(1.5, 2.5) / px
            pool = shapely.Polygon(_rect_corners(pc[0], pc[1], half_length, half_width, ang))
            if self.layout.free(pool, 0.5 / px):
                self.pools.append(pool)
                self.layout.add(pool)

    def parking_lots(self) -> None:
        """Asphalt parking lots (industrial) in free space, aligned with the grid."""
        rng, px = self.rng, self.px
        area_ha = (self.size * px) * (self.size * px) / 1e4  # not ** (libm pow)
        wanted = max(1, int(self.st.parking * area_ha))
        for _ in range(int(rng.poisson(self.st.parking * area_ha)) * 4):
            if len(self.parking) >= wanted:
                break
            cx, cy = rng.uniform(0, self.size, 2)
            turn = rng.choice([0, np.pi / 2])
            half_length, half_width = rng.uniform(10, 25) / px, rng.uniform(6, 11) / px
            lot = shapely.Polygon(_rect_corners(cx, cy, half_length, half_width, self.streets.angle + turn))
            if self.layout.free(lot, 1.0 / px):
                self.parking.append(lot)
                self.layout.add(lot)

    def back_buildings(self) -> None:
        """Extra buildings anywhere free (courtyards of blocks, back gardens): sheds, annexes."""
        rng, st, size, margin = self.rng, self.st, self.size, self.margin
        side = (size + 2 * margin) * self.px
        wanted = int(rng.poisson(st.fill * side * side / 1e4))
        for _ in range(wanted * 3):
            if wanted <= 0:
                break
            cx, cy = rng.uniform(-margin, size + margin, 2)
            a, b = self.metres(st.fill_size), self.metres(st.fill_size)
            turn = rng.choice([0.0, np.pi / 2])
            ang = self.streets.angle + turn + (rng.normal(0, 0.05) if rng.random() < 0.8 else rng.uniform(0, np.pi))
            building = _make_building(rng, st, self.px, cx, cy, ang, max(a, b), min(a, b))
            if self.try_add(building, self.metres(st.setback)):
                wanted -= 1


def _footprints(buildings: list[_Building], size: int) -> list[shapely.Polygon]:
    """Footprints clipped to the tile box; a building cut in two by the border gives two."""
    tile_box = shapely.box(0, 0, size, size)
    polys: list[shapely.Polygon] = []
    for b in buildings:
        clipped = b.footprint.intersection(tile_box)
        for part in getattr(clipped, "geoms", [clipped]):
            if not isinstance(part, shapely.Polygon) or part.area < 4.0:
                continue
            simple = shapely.remove_repeated_points(part, 0.25)  # clipping can leave near-duplicates
            polys.append(simple if simple.is_valid else part)
    return polys


def _render(
    rng: np.random.Generator, style: str, shape: tuple[int, int], px: float, streets: _Streets,
    plan: _Planner, direction: np.ndarray, sun_factor: float,
) -> np.ndarray:
    """Paint the tile bottom-up: ground, paving, streets, shadows, roofs, trees, camera."""
    st = _STYLES[style]
    grain = _fbm(rng, shape, (2, 3))
    image = _render_ground(rng, st, shape, px)
    concrete = np.asarray(_CONCRETE, np.float32) * (1 + 0.03 * grain[..., None])
    if plan.driveways:
        lay = np.zeros(shape, np.uint8)
        _fill_geom(lay, shapely.union_all(plan.driveways))
        _blend(image, lay.astype(np.float32) / 255.0, concrete)
    if style == "industrial":  # concrete aprons around halls
        apron = np.zeros(shape, np.uint8)
        for b in plan.buildings:
            _fill_geom(apron, b.footprint.buffer(rng.uniform(3, 10) / px, join_style="mitre"))
        _blend(image, apron.astype(np.float32) / 255.0, concrete * 0.92 * (1 + 0.01 * grain[..., None]))

    _render_streets(image, rng, shape, streets, grain, px)
    for lot in plan.parking:
        _render_parking(image, rng, lot, grain, px)
    if plan.pools:  # a light concrete rim, then the water
        lay = np.zeros(shape, np.uint8)
        _fill_geom(lay, shapely.union_all([pool.buffer(0.6 / px, join_style="mitre") for pool in plan.pools]))
        _blend(image, lay.astype(np.float32) / 255.0, concrete * 1.1)
        lay[:] = 0
        _fill_geom(lay, shapely.union_all(plan.pools))
        _blend(image, lay.astype(np.float32) / 255.0, np.asarray(_POOL, np.float32) * (1 + 0.05 * grain[..., None]))

    # building shadows darken the ground only: roofs are painted afterwards
    shadow = _shadow_mask(shape, plan.buildings, direction, sun_factor).astype(np.float32) / 255.0
    shadow = _blur(shadow, 0.8)
    bluish = 1.0 + np.array([0.0, 0.0, 0.06], np.float32) * shadow[..., None]  # skylight in the shade
    image *= (1.0 - 0.55 * shadow)[..., None] * bluish
    for b in plan.buildings:
        _render_roof(image, b, -direction, grain, rng)

    # trees anywhere but on carriageways and deep inside buildings, so some hide roof edges
    n_trees = int(rng.poisson(st.trees * (shape[0] * px) * (shape[1] * px) / 1e4))
    tree_xy = rng.uniform(0, shape[0], (n_trees * 2, 2))
    radii = rng.uniform(*st.tree_radius, n_trees * 2) / px
    cores = shapely.union_all([b.footprint.buffer(-3.0 / px) for b in plan.buildings] or [shapely.Point()])
    keep = ~shapely.contains_xy(cores, tree_xy[:, 0], tree_xy[:, 1])
    keep &= ~shapely.contains_xy(streets.asphalt, tree_xy[:, 0], tree_xy[:, 1])
    tree_xy, radii = tree_xy[keep][:n_trees], radii[keep][:n_trees]
    if len(tree_xy):
        _draw_trees(image, rng, tree_xy, radii, direction, sun_factor, grain)

    # camera: slight blur, colour balance, sensor noise
    image = _blur(image, 0.6)
    image *= rng.uniform(0.98, 1.02, 3).astype(np.float32)[None, None]
    image += rng.normal(0, 0.012, image.shape).astype(np.float32)
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


def generate_tile(size: int, style: str, seed: int, pixel_size: float = 0.3) -> SyntheticTile:
    """Generate one square synthetic aerial tile and its building footprints.

    Args:
        size: tile side in pixels (>= 64).
        style: one of :data:`STYLES` ("dense", "suburb", "industrial").
        seed: non-negative integer; the same seed gives byte-identical output.
        pixel_size: ground sampling distance in metres per pixel (sets the scale of
            streets, buildings and trees).

    Returns:
        A :class:`SyntheticTile`.

    Raises:
        ValueError: if an argument is out of range (the message names it).
    """
    _check_args(size, style, seed, pixel_size)
    rng = np.random.default_rng(seed)
    px = float(pixel_size)
    margin = 40.0 / px  # the layout extends past the tile so buildings can be cut by its border

    # one sun per tile; shadows point away from it, longer for a lower sun
    azimuth = rng.uniform(0, 2 * np.pi)
    direction = np.array(_sincos(azimuth))
    sun_factor = _grid(1.0 / math.tan(math.radians(rng.uniform(52.0, 68.0))))  # shadow length / height

    streets = _lay_streets(rng, _STYLES[style], size, px, margin)
    plan = _Planner(rng, style, size, px, margin, streets)
    plan.courtyards()  # first: they need the most room
    plan.frontage()
    plan.parking_lots()
    plan.back_buildings()

    polys = _footprints(plan.buildings, size)
    shape = (size, size)
    if polys:
        mask = features.rasterize(
            ((p, 255) for p in polys), out_shape=shape, transform=Affine.identity(), fill=0, dtype="uint8"
        )
    else:
        mask = np.zeros(shape, np.uint8)
    image = _render(rng, style, shape, px, streets, plan, direction, sun_factor)
    logger.debug("synthetic %s tile seed=%d: %d buildings", style, seed, len(polys))
    return SyntheticTile(
        image=image, mask=mask, polygons=geometry_array(polys), ids=np.arange(1, len(polys) + 1, dtype=np.int64),
        shadow_direction=(float(direction[0]), float(direction[1])),
    )


def _render_ground(rng: np.random.Generator, st: _Style, shape: tuple[int, int], px: float) -> np.ndarray:
    """Textured ground: vegetation/soil mix at several scales, paved share for dense styles."""
    cells = tuple(max(2, round(c / px)) for c in (0.6, 1.8, 7.2, 28.8))  # octave sizes in metres
    broad = _fbm(rng, shape, cells[2:])
    fine = _fbm(rng, shape, cells[:2])
    a, b = (np.asarray(c, np.float32) for c in st.ground)
    t = np.clip(0.5 + 0.35 * broad, 0, 1)[..., None]
    image = a * (1 - t) + b * t
    grass = np.asarray(_GRASS, np.float32)
    patches = _fbm(rng, shape, (max(2, round(30 / px)),))
    if st.paved > 0:
        veg = np.clip((patches - (2.2 * st.paved - 0.6)) * 1.5, 0, 1)[..., None]  # green patches in paved ground
        image = image * (1 - veg) + grass * veg
    else:
        soil = np.clip((patches - 1.6) * 1.2, 0, 0.8)[..., None]
        image = image * (1 - soil) + np.asarray((0.50, 0.43, 0.33), np.float32) * soil
    image = image * (1.0 + 0.07 * fine[..., None] + 0.05 * broad[..., None])
    return image.astype(np.float32)


def _render_streets(
    image: np.ndarray, rng: np.random.Generator, shape: tuple[int, int], streets: _Streets, grain: np.ndarray,
    px: float,
) -> None:
    """Sidewalks, asphalt (with wear), kerbs, dashed centre markings and a few cars."""
    centrelines, half_asphalt, asphalt = streets.centrelines, streets.half_widths, streets.asphalt
    lay = np.zeros(shape, np.uint8)
    _fill_geom(lay, streets.street)
    _blend(image, lay.astype(np.float32) / 255.0, np.asarray(_CONCRETE, np.float32) * (1 + 0.04 * grain[..., None]))
    lay[:] = 0
    _fill_geom(lay, asphalt)
    wear = _fbm(rng, shape, (max(2, round(4 / px)), max(2, round(15 / px))))
    tone = np.asarray(_ASPHALT, np.float32) * rng.uniform(0.85, 1.15)
    _blend(image, lay.astype(np.float32) / 255.0, tone * (1 + 0.06 * wear[..., None] + 0.04 * grain[..., None]))
    kerb = np.zeros(shape, np.uint8)
    for poly in getattr(asphalt, "geoms", [asphalt]):
        rings = [poly.exterior, *poly.interiors]
        cv2.polylines(kerb, [_cv_points(np.asarray(r.coords)) for r in rings], True, 255, 1, cv2.LINE_AA, 4)
    _blend(image, kerb.astype(np.float32) / 255.0 * 0.6, np.asarray((0.22, 0.22, 0.22), np.float32))
    marks = np.zeros(shape, np.uint8)
    for i, ln in enumerate(centrelines):
        if half_asphalt[i] * px < 2.4:
            continue
        pieces = _dashes(ln, 3.0 / px)
        thickness = max(1, int(round(0.15 / px)))
        cv2.polylines(marks, [_cv_points(p) for p in pieces], False, 255, thickness, cv2.LINE_AA, 4)
    # no markings inside crossings: erase within the other streets' carriageways
    crossings = np.zeros(shape, np.uint8)
    for i, a in enumerate(centrelines):
        for j in range(i + 1, len(centrelines)):
            hit = a.intersection(centrelines[j])
            if not hit.is_empty:
                _fill_geom(crossings, hit.buffer(max(half_asphalt[i], half_asphalt[j]) * 1.3))
    marks[crossings > 0] = 0
    _blend(image, marks.astype(np.float32) / 255.0 * 0.85, np.asarray((0.88, 0.88, 0.84), np.float32))
    for i, ln in enumerate(centrelines):
        for _ in range(int(rng.poisson(ln.length * px / 60.0))):
            s = rng.uniform(0, ln.length - 1.0)
            p, q = ln.interpolate(s), ln.interpolate(s + 1.0)
            ang = _grid(math.atan2(q.y - p.y, q.x - p.x))
            lane = half_asphalt[i] * 0.5 * rng.choice([-1.0, 1.0])
            c, s = _sincos(ang)
            x, y = p.x - s * lane, p.y + c * lane
            if 0 <= x < shape[1] and 0 <= y < shape[0] and crossings[int(y), int(x)] == 0:
                _draw_car(image, rng, x, y, ang, px)


def _render_parking(
    image: np.ndarray, rng: np.random.Generator, lot: shapely.Polygon, grain: np.ndarray, px: float
) -> None:
    """A parking lot: asphalt, two rows of painted stalls, cars in some of them."""
    shape = image.shape[:2]
    lay = np.zeros(shape, np.uint8)
    _fill_geom(lay, lot)
    tone = np.asarray(_ASPHALT, np.float32) * 1.05
    _blend(image, lay.astype(np.float32) / 255.0, tone * (1 + 0.05 * grain[..., None]))
    corners = np.asarray(lot.exterior.coords)[:4]
    e0, e1 = corners[1] - corners[0], corners[3] - corners[0]
    along = e0 / math.hypot(*e0)
    width = math.hypot(*e1)
    across = e1 / width
    stall, depth = 2.6 / px, min(5.0 / px, width / 2)
    lines = []
    n = int(math.hypot(*e0) // stall)
    for row_start in (0.0, width - depth):
        for k in range(n + 1):
            a = corners[0] + along * k * stall + across * row_start
            lines.append(np.stack([a, a + across * depth]))
    marks = np.zeros(shape, np.uint8)
    cv2.polylines(marks, [_cv_points(line) for line in lines], False, 255, 1, cv2.LINE_AA, 4)
    _blend(image, marks.astype(np.float32) / 255.0 * 0.8, np.asarray((0.85, 0.85, 0.82), np.float32))
    ang = _grid(math.atan2(across[1], across[0]))
    for row_start in (0.0, width - depth):
        for k in range(n):
            if rng.random() < 0.55:
                c = corners[0] + along * (k + 0.5) * stall + across * (row_start + depth / 2)
                _draw_car(image, rng, c[0], c[1], ang, px)


def tile_seed(seed: int, n: int) -> int:
    """Seed of tile ``n`` of a city generated with ``seed`` (independent streams per tile).

    Args:
        seed: the city's non-negative base seed.
        n: the tile number.

    Returns:
        A non-negative integer seed for :func:`generate_tile`, derived with
        :class:`numpy.random.SeedSequence` (entropy ``seed``, spawn key ``(n,)``).
    """
    return int(np.random.SeedSequence(entropy=seed, spawn_key=(n,)).generate_state(1, dtype=np.uint64)[0])


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
