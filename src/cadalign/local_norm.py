"""GroupNorm with the statistics of a training-size window around each pixel.

A network with GroupNorm normalises each sample over its whole spatial extent, so the same
fully convolutional network run on one large window gives another field than on the small
windows it was trained on: the statistics of a 1000 px window are not those of a 120 px patch.
:func:`local_statistics` makes every GroupNorm layer normalise each pixel with the mean and
variance of the window that a training-size input would give that layer, centred on the pixel
(clamped inside the map at its borders, as a small window at an image edge is). On an input of
the training size itself the result is the plain GroupNorm's.

Box sums use cumulative sums in float64 (O(H W) whatever the window), on values centred by the
map's mean first, so E[x^2] - E[x]^2 does not cancel.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _box_mean(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Mean of every ``size`` box of the last two dims of ``x``, placed at the box centre.

    Returns a tensor of ``x``'s shape: positions whose centred box would leave the map take
    the nearest box that fits (replicate padding of the valid means).
    """
    kh, kw = size
    height, width = x.shape[-2:]
    c = F.pad(x.cumsum(-1), (1, 0))
    x = (c[..., kw:] - c[..., : width - kw + 1]) / kw
    c = F.pad(x.cumsum(-2), (0, 0, 1, 0))
    x = (c[..., kh:, :] - c[..., : height - kh + 1, :]) / kh
    pad = (kw // 2, kw - 1 - kw // 2, kh // 2, kh - 1 - kh // 2)
    return F.pad(x, pad, mode="replicate")


def local_group_norm(gn: nn.GroupNorm, x: Tensor, size: tuple[int, int]) -> Tensor:
    """``gn`` applied to ``x`` (B, C, H, W) with statistics over ``size`` windows around each pixel."""
    b, c, h, w = x.shape
    size = (min(size[0], h), min(size[1], w))
    if size == (h, w):
        return F.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)
    g = gn.num_groups
    xg = x.reshape(b, g, c // g, h, w)
    # Statistics in float64 on the (B, G, H, W) maps only; the full tensor stays in x's dtype,
    # centred per group first (a centre in float32 suffices against E[x^2] - E[x]^2 cancelling).
    xc = xg - xg.mean(dim=(2, 3, 4), keepdim=True)
    mean = _box_mean(xc.mean(2).double(), size)  # (B, G, H, W)
    square = _box_mean(xc.square().mean(2).double(), size)
    rstd = torch.rsqrt((square - mean * mean).clamp_min(0) + gn.eps).to(x.dtype)[:, :, None]
    mean = mean.to(x.dtype)[:, :, None]
    weight, bias = (None, None) if not gn.affine else (gn.weight[None, :, None, None], gn.bias[None, :, None, None])
    if torch.is_grad_enabled():
        y = ((xc - mean) * rstd).reshape(b, c, h, w)
        return y if weight is None else y * weight + bias
    y = xc.sub_(mean).mul_(rstd).reshape(b, c, h, w)  # inference (realignment): in place, no temporaries
    return y if weight is None else y.mul_(weight).add_(bias)


def _input_sizes(model: nn.Module, size_in: int) -> dict[nn.GroupNorm, tuple[int, int]]:
    """Spatial size of each GroupNorm layer's input when ``model`` runs on a ``size_in`` window."""
    sizes: dict[nn.GroupNorm, tuple[int, int]] = {}

    def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        sizes[module] = tuple(args[0].shape[-2:])

    layers = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    handles = [m.register_forward_pre_hook(record) for m in layers]
    cfg = model.cfg
    param = next(model.parameters())
    try:
        with torch.no_grad():
            image = torch.zeros(1, cfg.image_channels, size_in, size_in, dtype=param.dtype, device=param.device)
            polys = torch.zeros(1, cfg.poly_channels, size_in, size_in, dtype=param.dtype, device=param.device)
            model(image, polys)
    finally:
        for handle in handles:
            handle.remove()
    return sizes


@contextlib.contextmanager
def local_statistics(model: nn.Module, size_in: int) -> Iterator[int]:
    """Within the block, every GroupNorm of ``model`` uses the statistics of the window a
    ``size_in`` px input gives it, centred on each pixel. Yields the number of such layers."""
    sizes = _input_sizes(model, size_in)
    # The layers' forward is replaced for the block (an instance attribute shadows the class's
    # method), not post-processed by a forward hook, which would compute the plain GroupNorm first.
    for module, size in sizes.items():
        module.forward = functools.partial(local_group_norm, module, size=size)
    try:
        yield len(sizes)
    finally:
        for module in sizes:
            del module.forward
