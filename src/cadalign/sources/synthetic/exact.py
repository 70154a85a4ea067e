"""Arithmetic and drawing of the synthetic city that give the same bits on any x86-64 CPU.

Array arithmetic here uses only +, -, *, /, sqrt, floor and comparisons, which IEEE 754
rounds exactly whatever SIMD kernel numpy picks: sines and cosines come from :func:`_sin` (a
polynomial in those operations), blurs and upsampling from :func:`_blur` and
:func:`_upsample` (fixed-order sums in numpy), never from ``np.sin``/``np.hypot``/
``np.arctan2``/``**`` or OpenCV's float filters, whose AVX2/AVX-512 kernels differ in the
last bit. The few scalar libm results the generator uses (``atan2``, ``tan``, ``exp``) are
rounded to :func:`_grid` first. OpenCV only draws with integer coordinates into uint8 masks
(:func:`_cv_points`, :func:`_fill_geom`) or with ``LINE_8`` into float images, which is exact.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import shapely

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


def _lobes(dx: np.ndarray, dy: np.ndarray, rho: np.ndarray, k: int, phase: float) -> np.ndarray:
    """``sin(k * atan2(dy, dx) + phase)`` (float32) by de Moivre's formula, without ``np.arctan2``."""
    safe = np.where(rho > 0, rho, 1.0)
    c1, s1 = np.where(rho > 0, dx / safe, 1.0), dy / safe
    c, s = c1, s1
    for _ in range(k - 1):  # (c + i s) <- (c + i s)(c1 + i s1)
        c, s = c * c1 - s * s1, s * c1 + c * s1
    cp, sp = _sincos(phase)
    return (s * cp + c * sp).astype(np.float32)


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
