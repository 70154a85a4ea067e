"""Layout of a synthetic tile: streets, then building footprints placed along and between them.

:func:`_lay_streets` draws two roughly perpendicular families of (maybe wavy) streets over the
tile extended by a margin; :class:`_Planner` places courtyard blocks, street frontage (with
suburban driveways and pools), parking lots and back buildings, in that order, without
overlap (:class:`_Layout`); :func:`_footprints` clips the footprints to the tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import shapely

from cadalign.sources.synthetic.exact import _grid, _rect_corners, _sin, _sincos
from cadalign.sources.synthetic.styles import _FLAT_PALETTE, _STYLES, _Style


@dataclass
class _Building:
    """A building as a union of oriented rectangles (cx, cy, half-length, half-width, angle)."""

    footprint: shapely.Polygon
    parts: list[tuple[float, float, float, float, float]]
    roof: str
    colour: np.ndarray
    height: float


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
