"""Label noise: smooth random displacement fields, and moving polygon vertices with them.

The model follows the study's reference: per image and per component, a sum of signed
Gaussian bumps on a coarse grid with coordinates in [0, 1], min-max stretched to [-1, 1],
scaled to the maximum displacement and upsampled bilinearly to the image size.

Fields are float32 arrays of shape ``(2, H, W)`` in pixels, channel 0 = dx (along columns),
channel 1 = dy (along rows), sampled at pixel centres. Polygons are shapely geometries in
pixel coordinates (x = column, y = row, origin at the top-left corner of the top-left pixel),
so the value at pixel ``(r, c)`` applies at the point ``(c + 0.5, r + 0.5)``.

A misaligned vertex is ``v - D(v)``; the correction of a misaligned vertex is ``v + D(v)``.
Both keep the geometry structure, ids and vertex order (``shapely.transform``).
"""

from __future__ import annotations

import logging
import math

import cv2
import numpy as np
import shapely
from scipy import ndimage

logger = logging.getLogger(__name__)

BUMP_VARIANCE = 0.002
"""Scale of each bump's covariance (coordinates in [0, 1]), as in the reference."""


def _random_spd(rng: np.random.Generator) -> np.ndarray:
    """A random symmetric positive-definite 2x2 matrix with eigenvalues in [0.2, 1]."""
    angle = rng.uniform(0.0, math.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return rot @ np.diag(rng.uniform(0.2, 1.0, size=2)) @ rot.T


def _bump_sum(points: np.ndarray, n_bumps: int, rng: np.random.Generator) -> np.ndarray:
    """Sum of ``n_bumps`` signed Gaussian bumps evaluated at ``points`` (N, 2) in [0, 1]^2."""
    total = np.zeros(len(points))
    for _ in range(n_bumps):
        centre = rng.uniform(0.0, 1.0, size=2)
        inv_cov = np.linalg.inv(BUMP_VARIANCE * _random_spd(rng))
        sign = (-1.0, 1.0)[rng.integers(2)]  # the draw of rng.choice((-1.0, 1.0)), a fifth of its cost
        dx, dy = points[:, 0] - centre[0], points[:, 1] - centre[1]
        quad = inv_cov[0, 0] * dx * dx + 2.0 * inv_cov[0, 1] * dx * dy + inv_cov[1, 1] * dy * dy
        total += sign * np.exp(-0.5 * quad)
    return total


def random_displacement_field(
    shape: tuple[int, int],
    max_displacement: float,
    n_bumps: int,
    rng: np.random.Generator,
    coarse_factor: int = 4,
) -> np.ndarray:
    """Draw a smooth random displacement field.

    Args:
        shape: (H, W) of the image the field covers.
        max_displacement: largest absolute value of each component, in pixels (>= 0).
        n_bumps: number of signed Gaussian bumps per component (>= 1).
        rng: random generator; the field is a deterministic function of its state.
        coarse_factor: the bumps are evaluated on a grid ``coarse_factor`` times coarser,
            then upsampled bilinearly.

    Returns:
        float32 array (2, H, W) in pixels; each component spans exactly
        [-max_displacement, max_displacement] on the coarse grid.

    Raises:
        ValueError: on a negative amplitude, no bumps or an empty shape.
    """
    height, width = shape
    if height < 1 or width < 1:
        raise ValueError(f"field shape must be positive, got {shape}")
    if not max_displacement >= 0:
        raise ValueError(
            f"max_displacement must be >= 0 px, got {max_displacement}; set a non-negative amplitude"
        )
    if n_bumps < 1:
        raise ValueError(f"n_bumps must be >= 1, got {n_bumps}")
    if coarse_factor < 1:
        raise ValueError(f"coarse_factor must be >= 1, got {coarse_factor}")
    ch, cw = max(2, math.ceil(height / coarse_factor)), max(2, math.ceil(width / coarse_factor))
    ys, xs = np.meshgrid(np.linspace(0.0, 1.0, ch), np.linspace(0.0, 1.0, cw), indexing="ij")
    points = np.stack([xs.ravel(), ys.ravel()], axis=1)
    field = np.empty((2, height, width), dtype=np.float32)
    for comp in range(2):
        values = _bump_sum(points, n_bumps, rng)
        span = values.max() - values.min()
        if span > 0:
            values = 2.0 * (values - values.min()) / span - 1.0
        else:
            values = np.zeros_like(values)
        coarse = (values * max_displacement).reshape(ch, cw).astype(np.float32)
        field[comp] = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)
    return field


def sample_field(field: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinearly sample a (2, H, W) field at points ``xy`` (N, 2) in pixel coordinates.

    Points outside the pixel-centre grid take the value of the nearest edge. The field is
    read as float64: pass it as float64 to sample it many times without a copy per call.

    Returns:
        float64 array (N, 2): (dx, dy) at each point.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if len(xy) == 0:
        return np.zeros((0, 2))
    coords = np.stack([xy[:, 1] - 0.5, xy[:, 0] - 0.5])  # (row, col) array indices
    return np.stack(
        [ndimage.map_coordinates(np.asarray(field[c], np.float64), coords, order=1, mode="nearest") for c in range(2)],
        axis=1,
    )


def misalign(geoms: np.ndarray, field: np.ndarray) -> np.ndarray:
    """Move every vertex ``v`` to ``v - D(v)`` (the noise model). Structure and order kept."""
    return shapely.transform(np.asarray(geoms, dtype=object), lambda xy: xy - sample_field(field, xy))


def realign(geoms: np.ndarray, field: np.ndarray) -> np.ndarray:
    """Move every vertex ``v`` to ``v + D(v)`` (a correction). Structure and order kept."""
    return shapely.transform(np.asarray(geoms, dtype=object), lambda xy: xy + sample_field(field, xy))
