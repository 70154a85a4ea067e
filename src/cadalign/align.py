"""Realignment inference: sliding-window displacement fields, blended, applied coarse to fine.

:func:`predict_field` runs one network over a whole image. The output windows (side ``O``)
sit on a lattice of stride ``round(O * (1 - overlap))`` that starts ``O - stride`` px before
the image, so every pixel, border pixels included, is covered by the same set of lattice
windows as an interior pixel. The image is reflect-padded so each window has its full input
context (``margin = (S - O) / 2`` around the output), the polygons are rasterized on the
padded grid, and overlapping outputs are blended with a smooth separable weight (Hann by
default, which with 50 % overlap sums to a constant), normalised by the weight sum: windows
never overwrite each other, and there are no seams. With ``symmetries`` > 1 the prediction is
repeated on flipped and transposed copies of the image and polygons (the dihedral group of the
square, whose elements the networks saw in training), each field is mapped back, its vectors
flipped or swapped with it, and the fields are averaged (test-time augmentation).

Large windows (``lattice: fit``): the networks are fully convolutional with valid
convolutions, so one large window gives the same field as many small ones at a fraction of
the cost (the input margin is paid once per window, not once per 64 px). The fewest windows
of at most ``output_size`` (``auto``: the largest whose activations fit ``memory_mb``) that
cover the image with ``overlap`` of a window in common are spread evenly inside it, and the
windows of all symmetries are batched together. GroupNorm layers (``train.model.norm:
group``) normalise over the window, so there the field depends slightly on the window size.
A CUDA out-of-memory error halves the batch, then the window, and says so in the log.

:func:`realign` chains networks over decreasing downsampling factors; each moves every
vertex by the field sampled bilinearly at the vertex (``shapely.transform``: structure,
vertex order and so ids are kept).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import shapely
import torch
from scipy import ndimage
from torch import nn
from tqdm import tqdm

from cadalign.local_norm import local_statistics
from cadalign.noise import sample_field
from cadalign.precision import autocast, autocast_dtype
from cadalign.raster import EDGE, downsample_image, rasterize_polygons, scale_geoms

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlignConfig:
    """How a network is slid over an image."""

    # O of each window (reference: 100); S = model.input_size(O). With lattice "fit", the
    # largest window (clipped to the image); "auto": the largest whose forward pass fits
    # memory_mb.
    output_size: int | Literal["auto"] = 100
    # Fraction of a window shared with the next one. 0.5 with the Hann window is an exact
    # partition of unity; larger overlaps average more predictions at more cost.
    overlap: float = 0.5
    # Window placement. "uniform" (reference): stride O * (1 - overlap) from before the image,
    # every pixel covered by the same number of windows. "fit": the fewest windows of at most
    # output_size covering the image, sharing at least overlap x output_size px, spread
    # evenly inside it; the symmetries' windows share batches.
    lattice: Literal["uniform", "fit"] = "uniform"
    batch_size: int = 8  # most windows per forward pass
    # Estimated activation memory of one forward pass, MB: caps the batch and the "auto" window.
    memory_mb: float = 1024.0
    # Blending weight across a window; "tukey" is flat with Hann ramps over the overlap
    # (a partition of unity for any overlap).
    window: Literal["hann", "triangle", "flat", "tukey"] = "hann"
    # Lowest weight of a window pixel, relative to its centre: the Hann window is ~0 at the
    # window edge, the floor keeps every covered pixel's weight sum positive.
    weight_floor: float = 0.01
    edge_width: float = 3.0  # edge band of the polygon raster, px; must match training
    progress: bool = True  # tqdm bar over windows
    # Dihedral transforms averaged per prediction: 1 (none), 2 (+ flip x), 4 (+ flip y, both
    # flips) or 8 (+ the transposes: all rotations and flips of the square). Costs that many
    # passes; averaging cancels the part of the output that does not follow the image.
    symmetries: int = 1
    # Gaussian sigma (full-resolution px) of a normalised convolution of each network's field,
    # weighted by the edge band of the current polygons (where the networks are trained to
    # answer): the misalignment is smooth, the networks' per-pixel error is not. 0: off.
    smooth_px: float = 0.0
    # bfloat16 autocast on CUDA, as the networks were trained (train.optim.amp); float32 on CPU
    amp: bool = True
    # torch.compile the forward pass (one compilation per window shape, shared by the
    # networks of one architecture); eager otherwise.
    compile: bool = False
    # GroupNorm statistics: "window", over the window the network runs on; an output size O,
    # each pixel normalised with those of the O px window centred on it (the training
    # patches' size), so large windows give the fields of small ones (cadalign.local_norm).
    norm_window: int | Literal["window"] = "window"

    def validate(self) -> None:
        """Check value ranges.

        Raises:
            ValueError: naming the offending key and the valid range.
        """
        if self.output_size == "auto":
            if self.lattice != "fit":
                raise ValueError("output_size=auto needs lattice=fit (uniform windows have a fixed size)")
        elif self.output_size < 1:
            raise ValueError(f"output_size={self.output_size} must be >= 1 or auto")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if not self.memory_mb > 0:
            raise ValueError(f"memory_mb={self.memory_mb} must be > 0 (MB of activations per forward pass)")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap={self.overlap} must be in [0, 1)")
        if not 0 < self.weight_floor <= 1:
            raise ValueError(f"weight_floor={self.weight_floor} must be in (0, 1]")
        if self.edge_width <= 0:
            raise ValueError(f"edge_width={self.edge_width} must be > 0")
        if self.symmetries not in (1, 2, 4, 8):
            raise ValueError(f"symmetries={self.symmetries} must be 1, 2, 4 or 8")
        if not self.smooth_px >= 0:
            raise ValueError(f"smooth_px={self.smooth_px} must be >= 0 px (0: no smoothing)")
        if self.norm_window != "window" and not (isinstance(self.norm_window, int) and self.norm_window >= 1):
            raise ValueError(f"norm_window={self.norm_window!r} must be 'window' or an output size >= 1 px")

    @property
    def stride(self) -> int:
        """Step between window origins of the uniform lattice, px."""
        if self.output_size == "auto":
            raise ValueError("output_size=auto has no fixed stride")
        return uniform_stride(self.output_size, self.overlap)


def uniform_stride(size: int, overlap: float) -> int:
    """Step between the origins of ``size`` px windows sharing ``overlap`` of a window, px."""
    return max(1, round(size * (1.0 - overlap)))


def window_weights(size: int, kind: str = "hann", floor: float = 0.01, ramp: int = 0) -> np.ndarray:
    """Separable blending weight of a square window, evaluated at pixel centres.

    Args:
        size: side of the window.
        kind: "hann" (sin^2), "triangle", "flat" or "tukey" (1 with sin^2 ramps of ``ramp`` px
            at both ends: windows overlapping by ``ramp`` px sum to 1).
        floor: minimum of the 1-D profile (> 0).
        ramp: length of each ramp of "tukey", px (0: flat).

    Returns:
        float64 (size, size) array in [floor^2, 1].

    Raises:
        ValueError: for an unknown kind.
    """
    t = (np.arange(size) + 0.5) / size
    if kind == "hann":
        profile = np.sin(np.pi * t) ** 2
    elif kind == "triangle":
        profile = 1.0 - np.abs(2.0 * t - 1.0)
    elif kind == "flat":
        profile = np.ones(size)
    elif kind == "tukey":
        ramp = min(ramp, size // 2)
        edge = np.sin(np.pi / 2 * (np.arange(ramp) + 0.5) / ramp) ** 2 if ramp else np.ones(0)
        profile = np.ones(size)
        profile[:ramp], profile[size - ramp :] = edge, edge[::-1]
    else:
        raise ValueError(f"window kind {kind!r} unknown; use 'hann', 'triangle', 'flat' or 'tukey'")
    profile = np.maximum(profile, floor)
    return np.outer(profile, profile)


def window_origins(length: int, size: int, stride: int) -> np.ndarray:
    """Origins of the windows along one axis of ``length`` px.

    The lattice starts at ``-(size - stride)`` and continues while a window starts inside
    the image, so each pixel in ``[0, length)`` is covered by every lattice window that
    contains it (the same number as far from the border).

    Args:
        length: image side along the axis, px.
        size: window (output) side, px.
        stride: step between windows, px (<= size for full coverage).

    Returns:
        int64 array of window starts (the first ones negative when windows overlap).
    """
    first = -(size - stride)
    count = -(-(length - first) // stride)  # ceil((length - first) / stride)
    return first + stride * np.arange(count, dtype=np.int64)


def fit_origins(length: int, size: int, overlap: int, period: int = 1) -> np.ndarray:
    """Origins of the fewest ``size`` px windows covering ``[0, length)`` with at least
    ``overlap`` px shared by neighbours, spread evenly from 0, on multiples of ``period``; one
    centred window when ``size >= length``.

    Args:
        length: image side along the axis, px.
        size: window (output) side, px.
        overlap: least overlap of neighbouring windows, px (<= size - period).
        period: origins are multiples of it: a U-Net of depth d pools on a 2^(d-1) px grid,
            so windows on the same grid compute the same function of the image.

    Returns:
        int64 array of window starts (the last window may end past the image).
    """
    if size >= length:
        return np.array([-((size - length) // 2 // period) * period], dtype=np.int64)
    last = -(-(length - size) // period)  # last origin, in periods
    step = (size - overlap) // period  # largest step, in periods
    count = 1 + -(-last // step)
    return period * np.round(np.linspace(0, last, count)).astype(np.int64)


def _period(model: nn.Module) -> int:
    """Pooling grid of an AlignNet-like model, px (1 for models without a depth)."""
    depth = getattr(getattr(model, "cfg", None), "depth", 1)
    return 2 ** (depth - 1)


def _fit_side(model: nn.Module, length: int, cap: int, overlap: int) -> int:
    """Least valid window side that covers ``length`` px with as few windows as ``cap`` px ones."""
    period = _period(model)
    count = len(fit_origins(length, cap, overlap, period))
    side = _valid_output(model, min(cap, -(-(length + (count - 1) * overlap) // count)))
    while side < cap and len(fit_origins(length, side, overlap, period)) > count:
        side = _valid_output(model, side + 1)
    return side


class _Blender:
    """Accumulates weighted window outputs on a canvas, then normalises."""

    def __init__(self, channels: int, shape: tuple[int, int], weights: np.ndarray) -> None:
        # float32: a full-resolution 5000 x 5000 tile needs 300 MB of accumulators
        self.total = np.zeros((channels, *shape), dtype=np.float32)
        self.weight = np.zeros(shape, dtype=np.float32)
        self.weights = weights.astype(np.float32)

    def add(self, output: np.ndarray, row: int, col: int) -> None:
        """Add one (C, O, O) window whose top-left output pixel is at (row, col)."""
        size = output.shape[-1]
        height, width = self.weight.shape
        r0, c0 = max(row, 0), max(col, 0)
        r1, c1 = min(row + size, height), min(col + size, width)
        if r0 >= r1 or c0 >= c1:
            return
        win = (slice(r0 - row, r1 - row), slice(c0 - col, c1 - col))
        weights = self.weights[win]
        self.total[:, r0:r1, c0:c1] += output[(slice(None), *win)] * weights
        self.weight[r0:r1, c0:c1] += weights

    def result(self) -> np.ndarray:
        if (self.weight <= 0).any():
            raise ValueError("some pixels are covered by no window; the window lattice is wrong")
        return self.total / self.weight


def blend_windows(
    outputs: np.ndarray,
    origins: np.ndarray,
    shape: tuple[int, int],
    kind: str = "hann",
    floor: float = 0.01,
) -> np.ndarray:
    """Blend square window outputs into one map, weighting and normalising (no overwrite).

    Args:
        outputs: (N, C, O, O) window outputs.
        origins: (N, 2) int (row, col) of each window's top-left pixel; may be outside the map.
        shape: (H, W) of the map.
        kind, floor: the weight window, see :func:`window_weights`.

    Returns:
        float32 (C, H, W): per pixel, the weighted mean of the windows covering it.

    Raises:
        ValueError: if some pixel is covered by no window.
    """
    outputs = np.asarray(outputs)
    blender = _Blender(outputs.shape[1], shape, window_weights(outputs.shape[-1], kind, floor))
    for output, (row, col) in zip(outputs, np.asarray(origins), strict=True):
        blender.add(output, int(row), int(col))
    return blender.result()


def _window_sizes(model: nn.Module, size_out: int) -> tuple[int, int]:
    """(S, margin) of the model for output windows of ``size_out`` px."""
    size_in = int(model.input_size(size_out))
    if int(model.output_size(size_in)) != size_out or (size_in - size_out) % 2:
        raise ValueError(
            f"realign.window.output_size={size_out} is not a valid output size of this model "
            f"(input {size_in} gives {model.output_size(size_in)}); pick one the model supports"
        )
    return size_in, (size_in - size_out) // 2


# Float32 activations held at once per input pixel, in widths of the first level: the skip,
# the upsampled features, their concatenation, a convolution and its normalisation.
_LIVE_WIDTHS = 6
_FALLBACK_CHANNELS = 64  # for models without an AlignNet config


def window_bytes(model: nn.Module, size_in: int) -> int:
    """Estimated peak activation memory of one ``size_in`` px window's forward pass, bytes."""
    cfg = getattr(model, "cfg", None)
    widths = getattr(cfg, "fused_widths", None)
    if widths:
        channels = _LIVE_WIDTHS * widths[0] + cfg.image_channels + cfg.poly_channels
    else:
        channels = _FALLBACK_CHANNELS
    return 4 * channels * size_in * size_in


def _valid_output(model: nn.Module, size: int) -> int:
    """Smallest valid output side of the model >= ``size``."""
    return int(model.output_size(model.input_size(size)))


def auto_output_size(model: nn.Module, memory_mb: float) -> int:
    """Largest valid output side whose single-window forward pass fits ``memory_mb``.

    Raises:
        ValueError: if not even the smallest window fits, naming realign.window.memory_mb.
    """
    budget = memory_mb * 2**20
    size_in = math.isqrt(int(budget // window_bytes(model, 1)))
    for s in range(size_in, 0, -1):
        try:
            size_out = int(model.output_size(s))
        except ValueError:
            continue
        if size_out >= 1 and (s - size_out) % 2 == 0 and window_bytes(model, s) <= budget:
            return size_out
    raise ValueError(
        f"realign.window.memory_mb={memory_mb} holds no window of this model; raise it or set output_size"
    )


@dataclass
class WindowLimits:
    """Caps learned from out-of-memory errors, kept across the passes and tiles of a run."""

    batch_size: int | None = None
    output_size: int | None = None


def _plan(model: nn.Module, cfg: AlignConfig, limits: WindowLimits, height: int, width: int) -> tuple[int, int]:
    """(output side, overlap px) of the windows over an ``height`` x ``width`` image."""
    cap = auto_output_size(model, cfg.memory_mb) if cfg.output_size == "auto" else cfg.output_size
    if limits.output_size is not None:
        cap = min(cap, limits.output_size)
    if cfg.lattice == "uniform":
        return cap, cap - uniform_stride(cap, cfg.overlap)
    cap = _valid_output(model, cap)
    overlap = min(math.ceil(cfg.overlap * cap), cap - _period(model))
    if overlap < 0:
        raise ValueError(f"realign.window.output_size={cap} is smaller than the model's pooling grid ({_period(model)} px)")
    return max(_fit_side(model, n, cap, overlap) for n in (height, width)), overlap


def _origins(model: nn.Module, cfg: AlignConfig, length: int, size: int, overlap: int) -> np.ndarray:
    if cfg.lattice == "uniform":
        return window_origins(length, size, size - overlap)
    return fit_origins(length, size, overlap, _period(model))


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an (H, W, 3) uint8 array, got {image.shape} {image.dtype}")
    if min(image.shape[:2]) < 2:
        raise ValueError(f"image must be at least 2 x 2 px to be reflect-padded, got {image.shape[:2]}")


def _transform_image(image: np.ndarray, t: int) -> np.ndarray:
    """Dihedral transform ``t`` of an (H, W, ...) array: bit 2 transpose, then bit 1 flip rows
    (y), then bit 0 flip columns (x)."""
    if t & 4:
        image = image.swapaxes(0, 1)
    if t & 2:
        image = image[::-1]
    if t & 1:
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


def _transform_geoms(geoms: np.ndarray, t: int, height: int, width: int) -> np.ndarray:
    """The polygons of an (height, width) image under :func:`_transform_image` ``t``."""

    def move(xy: np.ndarray) -> np.ndarray:
        h, w = height, width
        if t & 4:
            xy, h, w = xy[:, ::-1], w, h
        x = w - xy[:, 0] if t & 1 else xy[:, 0]
        y = h - xy[:, 1] if t & 2 else xy[:, 1]
        return np.column_stack([x, y])

    return shapely.transform(geoms, move)


def _untransform_field(field: np.ndarray, t: int) -> np.ndarray:
    """Map a (2, H', W') field predicted on :func:`_transform_image` ``t`` back to the image:
    the grid is undone and the (dx, dy) vectors are flipped or swapped with it."""
    if t & 1:
        field = field[:, :, ::-1] * np.array([-1, 1], dtype=field.dtype)[:, None, None]
    if t & 2:
        field = field[:, ::-1] * np.array([1, -1], dtype=field.dtype)[:, None, None]
    if t & 4:
        field = field.swapaxes(1, 2)[::-1]
    return field


def predict_field(
    model: nn.Module,
    image: np.ndarray,
    geoms_px: np.ndarray,
    device: torch.device | str,
    cfg: AlignConfig,
    limits: WindowLimits | None = None,
) -> np.ndarray:
    """Predict the displacement field of one network over a whole image.

    With ``cfg.symmetries`` > 1, the mean of the fields predicted on that many dihedral
    transforms of the image and polygons, each mapped back (vectors included).

    The model is moved to ``device`` and run in eval mode without gradients (under bfloat16
    autocast on CUDA with ``cfg.amp``, as in training); its previous train/eval mode is
    restored afterwards. A ``torch.OutOfMemoryError`` halves the batch and retries; at one
    window per batch, the windows are halved and the prediction restarts. The smaller sizes
    are kept in ``limits`` for later calls.

    Args:
        model: an AlignNet-like module: ``forward(image, polys).disp[0]`` (B, 2, O, O) in
            [-1, 1], ``input_size(O)``, ``output_size(S)``, ``cfg.disp_max_px``.
        image: (H, W, 3) uint8 image at the network's resolution.
        geoms_px: polygons in pixel coordinates of ``image``.
        device: where to run the model.
        cfg: window settings.
        limits: caps from earlier out-of-memory errors, updated here (default: none).

    Returns:
        float32 (2, H, W) displacement in px at this resolution (dx, dy), to be added to a
        misaligned vertex.

    Raises:
        ValueError: for a bad image, an output size the model does not support, or model
            outputs of another size than ``model.output_size`` promised.
        torch.OutOfMemoryError: if even one window of 16 px does not fit.
    """
    cfg.validate()
    _check_image(image)
    geoms = np.asarray(geoms_px, dtype=object).ravel()
    limits = WindowLimits() if limits is None else limits
    was_training = model.training
    model.to(device).eval()
    stats = contextlib.nullcontext()
    if cfg.norm_window != "window":
        stats = local_statistics(model, _window_sizes(model, cfg.norm_window)[0])
    try:
        with stats:
            while True:
                size_out, overlap = _plan(model, cfg, limits, *image.shape[:2])
                try:
                    return _predict_windows(model, image, geoms, device, cfg, (size_out, overlap), limits)
                except _WindowTooLarge:
                    smaller = _valid_output(model, size_out // 2)
                    if size_out // 2 < _MIN_OOM_WINDOW or smaller >= size_out:
                        raise torch.OutOfMemoryError(
                            f"one window of {size_out} px does not fit the device's memory; lower "
                            "realign.window.output_size or run on a larger device (realign.device)"
                        ) from None
                    logger.warning("out of memory with one %d px window per batch: retrying with %d px windows", size_out, smaller)
                    # a quarter of the memory per window: the batch may grow again
                    limits.output_size, limits.batch_size = smaller, None
    finally:
        model.train(was_training)


def smooth_field(field: np.ndarray, geoms_px: np.ndarray, sigma: float, edge_width: float = 3.0) -> np.ndarray:
    """Normalised convolution of a field, weighted by the edge band of the polygons.

    ``G(w f) / G(w)`` per component, with ``G`` a Gaussian of ``sigma`` px and ``w`` the
    polygons' edge raster: a weighted local mean of the field where the polygons' edges are,
    which a constant field passes unchanged. Pixels with no edge within reach of ``G`` keep
    their value.

    Args:
        field: (2, H, W) displacement field.
        geoms_px: the polygons the field was predicted for, pixel coordinates of ``field``.
        sigma: Gaussian sigma in px; 0 returns ``field``.
        edge_width: width of the edge band, px.

    Returns:
        float32 (2, H, W) smoothed field.
    """
    if sigma <= 0:
        return field
    weight = rasterize_polygons(geoms_px, field.shape[1:], edge_width=edge_width)[EDGE].astype(np.float32)
    norm = ndimage.gaussian_filter(weight, sigma, mode="constant")
    reached = norm > 1e-6
    out = field.astype(np.float32, copy=True)
    for c in range(2):
        out[c][reached] = ndimage.gaussian_filter(weight * field[c], sigma, mode="constant")[reached] / norm[reached]
    return out


_MIN_OOM_WINDOW = 16  # px: out-of-memory retries stop below this window side


class _WindowTooLarge(Exception):
    """Out of memory with a single window per batch."""


@dataclass
class _Pass:
    """The sliding-window pass over one dihedral transform of the image."""

    t: int
    padded: np.ndarray  # transformed image, reflect-padded so each window has its input margin
    polys: np.ndarray  # polygon raster of the padded grid
    first: tuple[int, int]  # (row, col) of the first window's output origin
    blender: _Blender


def _open_pass(
    image: np.ndarray,
    geoms: np.ndarray,
    t: int,
    lattice: tuple[np.ndarray, np.ndarray],
    size: tuple[int, int],
    weights: np.ndarray,
    edge_width: float,
) -> _Pass:
    """Transform ``t`` of the image and polygons, padded and rasterized for its windows."""
    (rows, cols), (size_out, margin) = lattice, size
    height, width = image.shape[:2]
    moved = _transform_geoms(geoms, t, height, width)
    image = _transform_image(image, t)
    height, width = image.shape[:2]
    # padded grid: output lattice from rows[0] with `margin` of input context around it
    top, left = margin - int(rows[0]), margin - int(cols[0])
    bottom, right = int(rows[-1]) + size_out + margin - height, int(cols[-1]) + size_out + margin - width
    padded = np.pad(image, ((top, bottom), (left, right), (0, 0)), mode="reflect")
    polys = rasterize_polygons(moved, padded.shape[:2], offset=(-left, -top), edge_width=edge_width)
    return _Pass(t, padded, polys, (int(rows[0]), int(cols[0])), _Blender(2, (height, width), weights))


def _disp(model: nn.Module, image: torch.Tensor, polys: torch.Tensor) -> torch.Tensor:
    return model(image, polys).disp[0]


@functools.cache
def _compiled_disp() -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    # the module is an argument, so networks of one architecture share the compiled code
    return torch.compile(_disp, dynamic=False)


def _predict_windows(
    model: nn.Module,
    image: np.ndarray,
    geoms: np.ndarray,
    device: torch.device | str,
    cfg: AlignConfig,
    plan: tuple[int, int],
    limits: WindowLimits,
) -> np.ndarray:
    """The sliding-window passes of :func:`predict_field` over every transform, averaged.

    Jobs run transform by transform; a transform's pass is opened at its first window and
    mapped back once its last window is blended, so at most the passes one batch spans are
    held. The uniform lattice batches each transform apart (as before large windows).
    """
    size_out, overlap = plan
    size_in, margin = _window_sizes(model, size_out)
    weights = window_weights(size_out, cfg.window, cfg.weight_floor, overlap)
    height, width = image.shape[:2]
    lattices = {}
    jobs: list[tuple[int, int, int]] = []
    for t in range(cfg.symmetries):
        h, w = (width, height) if t & 4 else (height, width)
        lattices[t] = _origins(model, cfg, h, size_out, overlap), _origins(model, cfg, w, size_out, overlap)
        jobs += [(t, int(r), int(c)) for r in lattices[t][0] for c in lattices[t][1]]
    left = {t: len(rows) * len(cols) for t, (rows, cols) in lattices.items()}
    memory_batch = int(cfg.memory_mb * 2**20 // window_bytes(model, size_in))
    batch = max(1, min(cfg.batch_size, memory_batch, limits.batch_size or cfg.batch_size))
    forward, disp_max = _compiled_disp() if cfg.compile else _disp, float(model.cfg.disp_max_px)
    passes: dict[int, _Pass] = {}
    total = np.zeros((2, height, width), dtype=np.float32)
    done = 0
    bar = tqdm(total=len(jobs), desc="windows", unit="win", disable=not cfg.progress)
    with torch.no_grad(), bar, autocast(device, autocast_dtype(device, cfg.amp)):
        while done < len(jobs):
            chunk = jobs[done : done + batch]
            if cfg.lattice == "uniform":
                chunk = [job for job in chunk if job[0] == chunk[0][0]]
            for t in dict.fromkeys(job[0] for job in chunk):
                if t not in passes:
                    passes[t] = _open_pass(image, geoms, t, lattices[t], (size_out, margin), weights, cfg.edge_width)
            try:
                disp = _run_batch(forward, model, passes, chunk, size_in, device) * disp_max
            except torch.OutOfMemoryError:
                disp = None
            if disp is None:  # outside the except block, so the failed batch's tensors are freed
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if batch == 1:
                    raise _WindowTooLarge
                logger.warning("out of memory with %d windows of %d px per batch: retrying with %d", batch, size_out, batch // 2)
                batch = limits.batch_size = batch // 2
                continue
            if disp.shape != (len(chunk), 2, size_out, size_out):
                raise ValueError(
                    f"model returned disp[0] of shape {disp.shape} for {size_in} px inputs, expected "
                    f"{(len(chunk), 2, size_out, size_out)}; its output_size() disagrees with forward()"
                )
            for output, (t, r, c) in zip(disp, chunk, strict=True):
                passes[t].blender.add(output, r, c)
                left[t] -= 1
                if not left[t]:
                    total += _untransform_field(passes.pop(t).blender.result(), t)
            done += len(chunk)
            bar.update(len(chunk))
    return total / cfg.symmetries


def _run_batch(
    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    model: nn.Module,
    passes: dict[int, _Pass],
    chunk: list[tuple[int, int, int]],
    size_in: int,
    device: torch.device | str,
) -> np.ndarray:
    """disp[0] of one batch of windows, (B, 2, O, O) in [-1, 1]."""
    crops = []
    for t, r, c in chunk:
        # the input window of output origin (r, c) starts at padded row r + top - margin
        # = r - first row (and likewise for columns)
        r0, c0 = r - passes[t].first[0], c - passes[t].first[1]
        crops.append((passes[t], slice(r0, r0 + size_in), slice(c0, c0 + size_in)))
    images = np.stack([p.padded[rs, cs] for p, rs, cs in crops]).transpose(0, 3, 1, 2)
    image_t = torch.from_numpy(images).to(device=device, dtype=torch.float32) / 127.5 - 1.0
    polys_t = torch.from_numpy(np.stack([p.polys[:, rs, cs] for p, rs, cs in crops])).to(device=device, dtype=torch.float32)
    return forward(model, image_t, polys_t).float().cpu().numpy()


def realign(
    models: Mapping[int, nn.Module],
    image: np.ndarray,
    geoms_px: np.ndarray,
    device: torch.device | str,
    cfg: AlignConfig,
    refine: int = 0,
    limits: WindowLimits | None = None,
) -> np.ndarray:
    """Realign polygons with a chain of networks, coarse to fine.

    For each downsampling factor ``ds`` in decreasing order: downsample the image by ``ds``
    (area averaging), scale the current polygons to it, predict the field, and move every
    vertex by the field sampled bilinearly at the vertex, scaled back to full resolution
    (``ds x D(v)`` when ``ds`` divides the image size). A vertex outside the image takes the
    field of the nearest border pixel. With ``cfg.smooth_px`` the field is first smoothed
    (:func:`smooth_field`, sigma ``smooth_px / ds`` at the network's resolution). ``refine``
    more passes of the finest network follow the chain, each on the polygons the last pass
    moved: a network corrects part of the misalignment it meets, so a second look at the
    smaller residual corrects more.

    Args:
        models: network per downsampling factor, e.g. ``{8: net8, 4: net4, 2: net2, 1: net1}``.
        image: (H, W, 3) uint8 full-resolution image.
        geoms_px: object array of shapely geometries in full-resolution pixel coordinates.
        device: where to run the models.
        cfg: window settings (shared by all levels).
        refine: extra passes of the finest network after the chain (>= 0).
        limits: caps from out-of-memory errors, shared by the passes (and by the calls that
            pass the same object); default: a fresh one.

    Returns:
        Object array of the moved geometries, same order, structure and vertex count.

    Raises:
        ValueError: if ``models`` is empty, a factor is not a positive integer or
            ``refine`` is negative, or for a bad image (see :func:`predict_field`).
    """
    if not models:
        raise ValueError("models is empty; pass at least one {downsampling factor: network}")
    if refine < 0:
        raise ValueError(f"refine={refine} must be >= 0 (extra passes of the finest network)")
    for ds in models:
        if isinstance(ds, bool) or not isinstance(ds, (int, np.integer)) or ds < 1:
            raise ValueError(f"downsampling factor {ds!r} must be a positive integer")
    _check_image(image)
    geoms = np.array(geoms_px, dtype=object).ravel()
    if len(geoms) == 0:
        logger.info("no polygons to realign")
        return geoms
    chain = sorted(models, reverse=True)
    limits = WindowLimits() if limits is None else limits
    for ds in chain + chain[-1:] * refine:
        small, (sx, sy) = downsample_image(image, int(ds))
        scaled = scale_geoms(geoms, sx, sy)
        field = predict_field(models[ds], small, scaled, device, cfg, limits)
        field = smooth_field(field, scaled, cfg.smooth_px * sx, cfg.edge_width)
        scale = np.array([sx, sy])
        before = shapely.get_coordinates(geoms)
        geoms = shapely.transform(geoms, lambda xy, f=field, s=scale: xy + sample_field(f, xy * s) / s)
        moved = np.linalg.norm(shapely.get_coordinates(geoms) - before, axis=1)
        if len(moved):
            logger.info(
                "ds=%d: vertices moved %.2f px on average, %.2f at most", ds, moved.mean(), moved.max()
            )
    return geoms
