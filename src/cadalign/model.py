"""The alignment network: a two-branch U-Net with valid convolutions, and its loss.

One :class:`AlignNet` corrects polygon misalignment of up to ``disp_max_px`` pixels at its
own resolution. It reads an image patch and the rasterized (misaligned) polygons of the same
patch and predicts, for the central output window, a displacement field (the move that
aligns the polygons to the image) and a segmentation of the aligned polygons.

Architecture (``depth = len(image_widths)`` resolution levels, 4 in the reference):

- Two encoder branches, one for the image and one for the polygon raster. Each level is two
  3x3 valid convolutions with ELU; a 2x2 max pool goes to the next level.
- At every level the two branch outputs are concatenated and fused by two more 3x3 valid
  convolutions (width ``image_widths[l] + poly_widths[l]``); the deepest fused level is the
  bottom of the U.
- A U-Net decoder goes back to level 0: a 2x2 stride-2 transposed convolution doubles the
  size, the fused skip of that level is centre-cropped to the same size and concatenated,
  then two 3x3 valid convolutions with ELU.
- 1x1 heads on decoder levels ``0 .. deep_supervision_levels - 1``: a displacement head
  (2 channels, tanh) and a segmentation head (4 logits) per level.

No padding anywhere, so every output pixel sees a full receptive field of real input, and no
batch norm. For the reference widths and depth a 220 px input gives a 100 px output: a
margin of 60 px on each side (:meth:`AlignNet.output_size`, :meth:`AlignNet.input_size`).

Deviations from the reference (Lydorn/mapalignment), on purpose: the reference had separate
decoders for the displacement and the segmentation; here one decoder is shared and only the
1x1 heads differ (half the decoder cost; the segmentation still acts as an auxiliary task on
shared features). The reference up-sampled bilinearly then applied a 'same' 3x3 convolution;
here a transposed 2x2 convolution keeps the network free of padding.
"""

from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

_CONVS_PER_BLOCK = 2  # two 3x3 valid convolutions per block: each block trims 2 px per side


@dataclass(frozen=True)
class ModelConfig:
    """Settings of :class:`AlignNet`."""

    # Widths of the image encoder per level; depth = len(image_widths) (4 in the reference).
    image_widths: tuple[int, ...] = (32, 64, 128, 256)
    # Widths of the polygon-raster encoder per level; fused width per level = sum of both.
    poly_widths: tuple[int, ...] = (16, 32, 64, 128)
    # tanh output x disp_max_px = displacement in pixels at the network's own resolution.
    disp_max_px: float = 4.0
    # Segmentation classes: background, fill, edge, vertex.
    n_seg_classes: int = 4
    # Decoder levels with output heads (0 = full resolution); the coarser ones are only
    # used by the deep-supervision loss. At most depth - 1.
    deep_supervision_levels: int = 3
    # Channels of the image input (RGB scaled to [-1, 1]).
    image_channels: int = 3
    # Channels of the polygon raster input (fill, edge, vertex).
    poly_channels: int = 3
    # Normalisation after each convolution: "none" as in the reference, or "group"
    # (GroupNorm, per sample, so per-sample gradients stay exact): much faster convergence
    # for the short CPU runs.
    norm: Literal["none", "group"] = "none"

    def validate(self) -> None:
        """Check widths and level counts.

        Raises:
            ValueError: naming the offending field.
        """
        if len(self.image_widths) != len(self.poly_widths):
            raise ValueError(
                f"image_widths has {len(self.image_widths)} levels but poly_widths has "
                f"{len(self.poly_widths)}; give both the same number of levels"
            )
        if len(self.image_widths) < 2:
            raise ValueError("image_widths needs at least 2 levels (one pooling step) for a U-Net")
        if min(self.image_widths + self.poly_widths) < 1:
            raise ValueError("image_widths and poly_widths must be positive")
        if not 1 <= self.deep_supervision_levels <= len(self.image_widths) - 1:
            raise ValueError(
                f"deep_supervision_levels={self.deep_supervision_levels} must be between 1 and "
                f"depth - 1 = {len(self.image_widths) - 1}"
            )
        if self.disp_max_px <= 0:
            raise ValueError(f"disp_max_px={self.disp_max_px} must be positive")
        if min(self.n_seg_classes, self.image_channels, self.poly_channels) < 1:
            raise ValueError("n_seg_classes, image_channels and poly_channels must be positive")

    @property
    def depth(self) -> int:
        """Number of resolution levels."""
        return len(self.image_widths)

    @property
    def fused_widths(self) -> tuple[int, ...]:
        """Width of the fused (and decoder) features per level."""
        return tuple(a + b for a, b in zip(self.image_widths, self.poly_widths, strict=True))


class AlignOutput(NamedTuple):
    """Network outputs, index = decoder level (0 = full resolution, then coarser).

    Attributes:
        disp: displacement fields (B, 2, H_l, W_l) after tanh, in [-1, 1]; channel 0 = dx
            (along columns), 1 = dy (along rows); multiply by ``disp_max_px`` for pixels.
        seg: segmentation logits (B, n_seg_classes, H_l, W_l).
    """

    disp: list[Tensor]
    seg: list[Tensor]


def _double_conv(in_ch: int, out_ch: int, norm: str = "none") -> nn.Sequential:
    """Two 3x3 valid convolutions, each followed by ELU (and GroupNorm before it if asked)."""
    layers: list[nn.Module] = []
    for i, o in ((in_ch, out_ch), (out_ch, out_ch)):
        layers.append(nn.Conv2d(i, o, 3))
        if norm == "group":
            layers.append(nn.GroupNorm(math.gcd(o, 8), o))
        layers.append(nn.ELU(inplace=True))
    return nn.Sequential(*layers)


def center_crop(x: Tensor, size: int) -> Tensor:
    """Crop the last two dimensions of ``x`` to ``size`` x ``size`` around the centre.

    Args:
        x: tensor (..., H, W) with H, W >= size and H - size, W - size even.
        size: side of the result.

    Returns:
        The central window, a view of ``x``.

    Raises:
        ValueError: if the crop would not be centred on whole pixels or is too large.
    """
    h, w = x.shape[-2:]
    if (h - size) % 2 or (w - size) % 2 or h < size or w < size:
        raise ValueError(f"cannot centre-crop {h}x{w} to {size}x{size} on whole pixels")
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


class AlignNet(nn.Module):
    """Two-branch U-Net predicting displacement and segmentation (see the module docstring).

    Args:
        cfg: network settings; validated here.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        fused = cfg.fused_widths
        img_in = (cfg.image_channels,) + cfg.image_widths[:-1]
        poly_in = (cfg.poly_channels,) + cfg.poly_widths[:-1]
        self.image_encoder = nn.ModuleList(
            _double_conv(i, o, cfg.norm) for i, o in zip(img_in, cfg.image_widths, strict=True)
        )
        self.poly_encoder = nn.ModuleList(
            _double_conv(i, o, cfg.norm) for i, o in zip(poly_in, cfg.poly_widths, strict=True)
        )
        self.fuse = nn.ModuleList(_double_conv(w, w, cfg.norm) for w in fused)
        # up[l] / decoder[l] produce decoder level l from level l + 1 (l = 0 .. depth - 2).
        decoded = range(cfg.depth - 1)
        self.up = nn.ModuleList(nn.ConvTranspose2d(fused[lv + 1], fused[lv], 2, stride=2) for lv in decoded)
        self.decoder = nn.ModuleList(_double_conv(2 * fused[lv], fused[lv], cfg.norm) for lv in decoded)
        supervised = range(cfg.deep_supervision_levels)
        self.disp_heads = nn.ModuleList(nn.Conv2d(fused[lv], 2, 1) for lv in supervised)
        self.seg_heads = nn.ModuleList(nn.Conv2d(fused[lv], cfg.n_seg_classes, 1) for lv in supervised)

    def forward(self, image: Tensor, polys: Tensor) -> AlignOutput:
        """Predict displacement and segmentation for the central window of the patch.

        Args:
            image: (B, image_channels, S, S) float in [-1, 1].
            polys: (B, poly_channels, S, S) float in {0, 1} (fill, edge, vertex).

        Returns:
            :class:`AlignOutput`; ``disp[0]`` is (B, 2, O, O) with O = ``output_size(S)``.

        Raises:
            ValueError: if the shapes disagree or S is not a valid input size.
        """
        if image.shape[0] != polys.shape[0] or image.shape[-2:] != polys.shape[-2:]:
            raise ValueError(
                f"image {tuple(image.shape)} and polys {tuple(polys.shape)} differ in batch or size"
            )
        if image.shape[-1] != image.shape[-2]:
            raise ValueError(f"patches must be square, got {tuple(image.shape[-2:])}")
        self.output_size(image.shape[-1])  # raises with a hint if the size is not valid
        x_img, x_poly = image, polys
        skips = []
        for level in range(self.cfg.depth):
            if level:
                x_img, x_poly = F.max_pool2d(x_img, 2), F.max_pool2d(x_poly, 2)
            x_img = self.image_encoder[level](x_img)
            x_poly = self.poly_encoder[level](x_poly)
            skips.append(self.fuse[level](torch.cat([x_img, x_poly], dim=1)))
        x = skips[-1]
        disp: list[Tensor] = [image.new_empty(0)] * self.cfg.deep_supervision_levels
        seg: list[Tensor] = [image.new_empty(0)] * self.cfg.deep_supervision_levels
        for level in reversed(range(self.cfg.depth - 1)):
            x = self.up[level](x)
            x = self.decoder[level](torch.cat([x, center_crop(skips[level], x.shape[-1])], dim=1))
            if level < self.cfg.deep_supervision_levels:
                disp[level] = torch.tanh(self.disp_heads[level](x))
                seg[level] = self.seg_heads[level](x)
        return AlignOutput(disp=disp, seg=seg)

    def level_output_sizes(self, input_size: int) -> list[int]:
        """Output sizes of decoder levels 0 .. depth - 2 for a square input of ``input_size``.

        Args:
            input_size: side of the input patch in pixels.

        Returns:
            Sizes of the decoder outputs, level 0 (full resolution) first.

        Raises:
            ValueError: if a pooling step meets an odd size, a skip crop would not be centred
                on whole pixels, or a size drops below 1. The message names the nearest
                valid sizes.
        """
        sizes = self._sizes(input_size)
        if sizes is None:
            step = 2 ** (self.cfg.depth - 1)  # valid sizes recur with this period
            below = [s for s in range(max(1, input_size - step), input_size) if self._sizes(s)]
            above = next(s for s in range(input_size + 1, input_size + 64 * step) if self._sizes(s))
            raise ValueError(
                f"patch size {input_size} is not a valid input for a network of depth "
                f"{self.cfg.depth} (valid convolutions and 2x2 pooling need exact sizes); "
                f"use input_size(...) to pick one, e.g. {below[-1:] + [above]}"
            )
        return sizes

    def _sizes(self, input_size: int) -> list[int] | None:
        """Decoder output sizes, or None if ``input_size`` is not valid."""
        trim = 2 * _CONVS_PER_BLOCK  # pixels lost by one double convolution
        branch, fused = input_size, []
        for level in range(self.cfg.depth):
            if level:
                if branch % 2:
                    return None
                branch //= 2
            branch -= trim
            fused.append(branch - trim)
        sizes, x = [], fused[-1]
        if x < 1:
            return None
        for level in reversed(range(self.cfg.depth - 1)):
            x *= 2
            if fused[level] < x or (fused[level] - x) % 2:
                return None
            x -= trim
            if x < 1:
                return None
            sizes.insert(0, x)
        return sizes

    def output_size(self, input_size: int) -> int:
        """Side of the full-resolution output for a square input of ``input_size``.

        For the reference widths and depth (4 levels): 220 -> 100, a margin of 60 px per
        side; in general output = input - 2 x margin, valid inputs every 2^(depth-1) px.

        Args:
            input_size: side of the input patch in pixels.

        Returns:
            Side of ``disp[0]``.

        Raises:
            ValueError: if ``input_size`` is not a valid input size.
        """
        return self.level_output_sizes(input_size)[0]

    def input_size(self, output_size: int) -> int:
        """Smallest valid input size whose output is at least ``output_size``.

        The output equals ``output_size`` exactly when that size is attainable (for the
        reference: 100 -> 220); otherwise it is the next attainable size above.

        Args:
            output_size: wanted side of ``disp[0]`` (>= 1).

        Returns:
            The smallest valid input side.

        Raises:
            ValueError: if ``output_size`` < 1.
        """
        if output_size < 1:
            raise ValueError(f"output_size={output_size} must be >= 1")
        size = output_size  # the output is never larger than the input
        while True:  # the output grows with the input; valid inputs recur periodically
            sizes = self._sizes(size)
            if sizes is not None and sizes[0] >= output_size:
                return size
            size += 1

    def disp_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters that ``disp[0]`` depends on (for the gradient-similarity analysis).

        Returns:
            (name, parameter) pairs: everything except the segmentation heads and the
            displacement heads of the coarser decoder levels, in ``named_parameters`` order.
        """
        excluded = ("seg_heads.",) + tuple(
            f"disp_heads.{level}." for level in range(1, self.cfg.deep_supervision_levels)
        )
        return [(name, p) for name, p in self.named_parameters() if not name.startswith(excluded)]


@dataclass(frozen=True)
class LossConfig:
    """Weights of :func:`alignment_loss` (reference values as defaults)."""

    disp_weight: float = 100.0  # coefficient of the displacement term
    seg_weight: float = 50.0  # coefficient of the segmentation term
    # Per-pixel weights of the displacement L2 from the INPUT raster: fill, edge, vertex
    # (background 0); a pixel in several channels gets the sum.
    disp_raster_weights: tuple[float, ...] = (0.1, 1.0, 10.0)
    # Class weights of the segmentation cross-entropy: background, fill, edge, vertex.
    seg_class_weights: tuple[float, ...] = (0.05, 0.1, 1.0, 10.0)
    # Deep supervision: steps at which the level coefficients change (piecewise constant).
    level_boundaries: tuple[int, ...] = (2500, 5000, 7500)
    # Coefficient of decoder level l (row l) in each interval; the weight moves to level 0
    # by step 7,500. Rows past the model's deep_supervision_levels are dropped and the
    # remaining coefficients renormalised to sum 1.
    level_coefs: tuple[tuple[float, ...], ...] = (
        (0.50, 0.75, 0.90, 1.00),
        (0.35, 0.20, 0.10, 0.00),
        (0.15, 0.05, 0.00, 0.00),
    )

    def validate(self) -> None:
        """Check weight counts and the coefficient table.

        Raises:
            ValueError: naming the offending field.
        """
        if len(self.disp_raster_weights) != 3:
            raise ValueError("disp_raster_weights needs 3 values: fill, edge, vertex")
        if min(self.disp_raster_weights + self.seg_class_weights) < 0:
            raise ValueError("disp_raster_weights and seg_class_weights must be >= 0")
        if list(self.level_boundaries) != sorted(set(self.level_boundaries)):
            raise ValueError(f"level_boundaries {self.level_boundaries} must be strictly increasing")
        for row in self.level_coefs:
            if len(row) != len(self.level_boundaries) + 1:
                raise ValueError(
                    f"each level_coefs row needs len(level_boundaries) + 1 = "
                    f"{len(self.level_boundaries) + 1} values, got {row}"
                )
            if min(row) < 0:
                raise ValueError(f"level_coefs must be >= 0, got {row}")
        if not self.level_coefs:
            raise ValueError("level_coefs needs at least one row (level 0)")

    def coefs_at(self, step: int, n_levels: int) -> list[float]:
        """Deep-supervision coefficients of levels 0 .. n_levels - 1 at ``step``.

        Args:
            step: training step (0-based).
            n_levels: number of supervised levels of the model.

        Returns:
            Coefficients summing to 1 (or all 0 if the selected values are all 0).

        Raises:
            ValueError: if the table has fewer rows than ``n_levels``.
        """
        if n_levels > len(self.level_coefs):
            raise ValueError(
                f"the model supervises {n_levels} levels but loss.level_coefs has "
                f"{len(self.level_coefs)} rows; add rows or lower model.deep_supervision_levels"
            )
        interval = bisect.bisect_right(self.level_boundaries, step)
        coefs = [self.level_coefs[level][interval] for level in range(n_levels)]
        total = sum(coefs)
        return [c / total for c in coefs] if total > 0 else coefs


def _level_windows(pred_size: int, out_size: int, factor: int) -> tuple[int, int, int]:
    """Align a level's prediction grid with the full-resolution target window.

    The prediction of a coarser level covers ``pred_size * factor`` full-resolution pixels
    centred on the target window of ``out_size`` pixels. Returns the cells of the prediction
    that lie entirely inside the target window, and where they start in the target.

    Returns:
        (first prediction cell, first target pixel, number of cells).

    Raises:
        ValueError: if the grids cannot be aligned on whole pixels.
    """
    excess = pred_size * factor - out_size
    if excess % 2:
        raise ValueError(f"level output {pred_size} x {factor} and target {out_size} are not co-centred")
    margin = excess // 2  # full-resolution pixels of the prediction left of the target window
    first = max(-(-margin // factor), 0)
    last = min((out_size + margin) // factor - 1, pred_size - 1)
    if last < first:
        raise ValueError(
            f"the {out_size} px output window holds no whole cell of the 1/{factor} resolution "
            "level; use larger patches or lower model.deep_supervision_levels"
        )
    return first, first * factor - margin, last - first + 1


def alignment_loss(
    out: AlignOutput,
    target_disp: Tensor,
    target_seg: Tensor,
    input_polys_crop: Tensor,
    step: int,
    cfg: LossConfig,
) -> tuple[Tensor, dict[str, float]]:
    """Multi-task, deep-supervised loss of the reference.

    Per level ``l`` (factor ``f = 2**l``): the full-resolution targets and the input raster
    are cropped to the part of the window covered by whole cells of that level's output and
    area-downsampled by ``f`` (average pooling); the level's output is cropped to the same
    cells (both crops are centred). Then

    - disp_l = sum_px w * ||pred - target||^2 / sum_px w, with w = fill * 0.1 + edge * 1 +
      vertex * 10 from the input raster (0 where no polygon), summed over the batch;
    - seg_l = mean over batch, classes and pixels of class_weight * sigmoid cross-entropy.

    loss = disp_weight * sum_l c_l disp_l + seg_weight * sum_l c_l seg_l, with the
    coefficients c_l of :meth:`LossConfig.coefs_at` at ``step``. Computed in float32.

    Args:
        out: network output.
        target_disp: (B, 2, O, O) target displacement in [-1, 1] (pixels / disp_max_px).
        target_seg: (B, n_seg_classes, O, O) target segmentation in {0, 1}.
        input_polys_crop: (B, 3, O, O) the input polygon raster cropped to the output window.
        step: training step, selects the deep-supervision coefficients.
        cfg: loss weights.

    Returns:
        The scalar loss, and its terms as floats: ``loss``, ``disp``, ``seg`` (level-weighted
        sums before the task weights) and ``disp_l{l}``, ``seg_l{l}`` per level.

    Raises:
        ValueError: if shapes disagree.
    """
    size = out.disp[0].shape[-1]
    for name, t, ch in (
        ("target_disp", target_disp, 2),
        ("target_seg", target_seg, len(cfg.seg_class_weights)),
        ("input_polys_crop", input_polys_crop, len(cfg.disp_raster_weights)),
    ):
        if t.shape[1] != ch or t.shape[-2:] != out.disp[0].shape[-2:]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected (B, {ch}, {size}, {size})")
    coefs = cfg.coefs_at(step, len(out.disp))
    as_f32 = {"device": target_disp.device, "dtype": torch.float32}
    raster_w = torch.tensor(cfg.disp_raster_weights, **as_f32).view(1, -1, 1, 1)
    class_w = torch.tensor(cfg.seg_class_weights, **as_f32).view(1, -1, 1, 1)
    disp_terms, seg_terms = [], []
    for level, (disp, seg) in enumerate(zip(out.disp, out.seg, strict=True)):
        factor = 2**level
        first, start, n = _level_windows(disp.shape[-1], size, factor)
        pred_win = slice(first, first + n)
        tgt_win = slice(start, start + n * factor)

        def down(t: Tensor, win: slice = tgt_win, f: int = factor) -> Tensor:
            t = t[..., win, win].float()
            return F.avg_pool2d(t, f) if f > 1 else t

        weight = (down(input_polys_crop) * raster_w).sum(dim=1)
        sq_err = (disp[..., pred_win, pred_win].float() - down(target_disp)).square().sum(dim=1)
        disp_terms.append((weight * sq_err).sum() / weight.sum().clamp_min(1e-12))
        bce = F.binary_cross_entropy_with_logits(
            seg[..., pred_win, pred_win].float(), down(target_seg), reduction="none"
        )
        seg_terms.append((bce * class_w).mean())
    disp_loss = sum(c * t for c, t in zip(coefs, disp_terms, strict=True))
    seg_loss = sum(c * t for c, t in zip(coefs, seg_terms, strict=True))
    loss = cfg.disp_weight * disp_loss + cfg.seg_weight * seg_loss
    names = ["loss", "disp", "seg"] + [f"{k}_l{lv}" for k in ("disp", "seg") for lv in range(len(coefs))]
    values = torch.stack([loss, disp_loss, seg_loss, *disp_terms, *seg_terms]).detach().tolist()
    return loss, dict(zip(names, values, strict=True))
