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

:func:`realign` chains networks over decreasing downsampling factors; each moves every
vertex by the field sampled bilinearly at the vertex (``shapely.transform``: structure,
vertex order and so ids are kept).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import shapely
import torch
from scipy import ndimage
from torch import nn
from tqdm import tqdm

from cadalign.geo.rasterize import EDGE, rasterize_polygons
from cadalign.noise import sample_field
from cadalign.patches import downsample_image, scale_geoms
from cadalign.precision import autocast, autocast_dtype

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlignConfig:
    """How a network is slid over an image."""

    output_size: int = 100  # O of each window (reference: 100); S = model.input_size(O)
    # Fraction of a window shared with the next one. 0.5 with the Hann window is an exact
    # partition of unity; larger overlaps average more predictions at more cost.
    overlap: float = 0.5
    batch_size: int = 8  # windows per forward pass
    window: Literal["hann", "triangle", "flat"] = "hann"  # blending weight across a window
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

    def validate(self) -> None:
        """Check value ranges.

        Raises:
            ValueError: naming the offending key and the valid range.
        """
        if self.output_size < 1 or self.batch_size < 1:
            raise ValueError(f"output_size={self.output_size} and batch_size={self.batch_size} must be >= 1")
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

    @property
    def stride(self) -> int:
        """Step between window origins, px."""
        return max(1, round(self.output_size * (1.0 - self.overlap)))


def window_weights(size: int, kind: str = "hann", floor: float = 0.01) -> np.ndarray:
    """Separable blending weight of a square window, evaluated at pixel centres.

    Args:
        size: side of the window.
        kind: "hann" (sin^2), "triangle" or "flat".
        floor: minimum of the 1-D profile (> 0).

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
    else:
        raise ValueError(f"window kind {kind!r} unknown; use 'hann', 'triangle' or 'flat'")
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


def _window_sizes(model: nn.Module, cfg: AlignConfig) -> tuple[int, int]:
    """(S, margin) of the model for output windows of ``cfg.output_size``."""
    size_in = int(model.input_size(cfg.output_size))
    if int(model.output_size(size_in)) != cfg.output_size or (size_in - cfg.output_size) % 2:
        raise ValueError(
            f"align.output_size={cfg.output_size} is not a valid output size of this model "
            f"(input {size_in} gives {model.output_size(size_in)}); pick one the model supports"
        )
    return size_in, (size_in - cfg.output_size) // 2


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
) -> np.ndarray:
    """Predict the displacement field of one network over a whole image.

    With ``cfg.symmetries`` > 1, the mean of the fields predicted on that many dihedral
    transforms of the image and polygons, each mapped back (vectors included).

    The model is moved to ``device`` and run in eval mode without gradients (under bfloat16
    autocast on CUDA with ``cfg.amp``, as in training); its previous train/eval mode is
    restored afterwards.

    Args:
        model: an AlignNet-like module: ``forward(image, polys).disp[0]`` (B, 2, O, O) in
            [-1, 1], ``input_size(O)``, ``output_size(S)``, ``cfg.disp_max_px``.
        image: (H, W, 3) uint8 image at the network's resolution.
        geoms_px: polygons in pixel coordinates of ``image``.
        device: where to run the model.
        cfg: window settings.

    Returns:
        float32 (2, H, W) displacement in px at this resolution (dx, dy), to be added to a
        misaligned vertex.

    Raises:
        ValueError: for a bad image, an output size the model does not support, or model
            outputs of another size than ``model.output_size`` promised.
    """
    cfg.validate()
    _check_image(image)
    geoms = np.asarray(geoms_px, dtype=object).ravel()
    height, width = image.shape[:2]
    total = np.zeros((2, height, width), dtype=np.float32)
    for t in range(cfg.symmetries):
        field = _predict_windows(model, _transform_image(image, t), _transform_geoms(geoms, t, height, width), device, cfg)
        total += _untransform_field(field, t)
    return total / cfg.symmetries


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


def _predict_windows(
    model: nn.Module, image: np.ndarray, geoms: np.ndarray, device: torch.device | str, cfg: AlignConfig
) -> np.ndarray:
    """One sliding-window pass of :func:`predict_field` (no transform)."""
    size_in, margin = _window_sizes(model, cfg)
    size_out, stride = cfg.output_size, cfg.stride
    height, width = image.shape[:2]
    rows, cols = window_origins(height, size_out, stride), window_origins(width, size_out, stride)
    # padded grid: output lattice from -(O - stride) with `margin` of input context around it
    top, left = margin - int(rows[0]), margin - int(cols[0])
    bottom, right = int(rows[-1]) + size_out + margin - height, int(cols[-1]) + size_out + margin - width
    padded = np.pad(image, ((top, bottom), (left, right), (0, 0)), mode="reflect")
    polys = rasterize_polygons(
        geoms,
        padded.shape[:2],
        offset=(-left, -top),
        edge_width=cfg.edge_width,
    )
    disp_max = float(model.cfg.disp_max_px)
    origins = [(int(r), int(c)) for r in rows for c in cols]
    blender = _Blender(2, (height, width), window_weights(size_out, cfg.window, cfg.weight_floor))

    was_training = model.training
    model.to(device).eval()
    try:
        bar = tqdm(total=len(origins), desc="windows", unit="win", disable=not cfg.progress)
        with torch.no_grad(), bar, autocast(device, autocast_dtype(device, cfg.amp)):
            for start in range(0, len(origins), cfg.batch_size):
                batch = origins[start : start + cfg.batch_size]
                # the input window of output origin (r, c) starts at padded row r + top - margin
                # = r - rows[0] (and likewise for columns)
                starts = [(r - int(rows[0]), c - int(cols[0])) for r, c in batch]
                crops = [(slice(r, r + size_in), slice(c, c + size_in)) for r, c in starts]
                images = np.stack([padded[rs, cs] for rs, cs in crops]).transpose(0, 3, 1, 2)
                image_t = torch.from_numpy(images).to(device=device, dtype=torch.float32) / 127.5 - 1.0
                polys_t = torch.from_numpy(np.stack([polys[:, rs, cs] for rs, cs in crops])).to(
                    device=device, dtype=torch.float32
                )
                disp = model(image_t, polys_t).disp[0].float().cpu().numpy() * disp_max
                if disp.shape != (len(batch), 2, size_out, size_out):
                    raise ValueError(
                        f"model returned disp[0] of shape {disp.shape} for {size_in} px inputs, expected "
                        f"{(len(batch), 2, size_out, size_out)}; its output_size() disagrees with forward()"
                    )
                for output, (r, c) in zip(disp, batch, strict=True):
                    blender.add(output, r, c)
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return blender.result()


def realign(
    models: Mapping[int, nn.Module],
    image: np.ndarray,
    geoms_px: np.ndarray,
    device: torch.device | str,
    cfg: AlignConfig,
    refine: int = 0,
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
    for ds in chain + chain[-1:] * refine:
        small, (sx, sy) = downsample_image(image, int(ds))
        scaled = scale_geoms(geoms, sx, sy)
        field = predict_field(models[ds], small, scaled, device, cfg)
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
