"""Rendering of a laid-out synthetic tile into an aerial-looking RGB image.

:func:`_render` paints bottom-up: textured ground, driveways and aprons, streets (sidewalks,
asphalt, kerbs, dashed markings, cars), parking lots, pools, building shadows (they darken
the ground, never roofs), sun-lit roofs, trees with their own shadows, then the camera
(slight blur, colour balance, sensor noise). Bit-exact helpers: :mod:`.exact`.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import shapely

from cadalign.sources.synthetic.exact import (
    _blend,
    _blur,
    _cos,
    _cv_points,
    _fbm,
    _fill_geom,
    _grid,
    _lobes,
    _rect_corners,
    _sin,
    _sincos,
)
from cadalign.sources.synthetic.layout import _Building, _Planner, _Streets
from cadalign.sources.synthetic.styles import _ASPHALT, _CARS, _CONCRETE, _GRASS, _POOL, _STYLES, _Style


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
