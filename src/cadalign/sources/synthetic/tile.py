"""One synthetic tile: its arguments checked, its seed, its layout rendered, its footprint mask."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from affine import Affine
from rasterio import features

from cadalign.geo.polygons import geometry_array
from cadalign.sources.synthetic.exact import _grid, _sincos
from cadalign.sources.synthetic.layout import _footprints, _lay_streets, _Planner
from cadalign.sources.synthetic.render import _render
from cadalign.sources.synthetic.styles import _STYLES, STYLES

logger = logging.getLogger(__name__)

MIN_SIZE = 64


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


def _check_args(size: int, style: str, seed: int, pixel_size: float) -> None:
    if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ValueError(f"size={size!r}: must be an integer >= {MIN_SIZE} pixels; pass a larger size")
    if style not in _STYLES:
        raise ValueError(f"style={style!r}: unknown style; use one of {STYLES}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}: must be a non-negative integer")
    if not (isinstance(pixel_size, (int, float)) and 0.05 <= pixel_size <= 5.0):
        raise ValueError(f"pixel_size={pixel_size!r}: must be a number of metres per pixel in [0.05, 5]")


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
