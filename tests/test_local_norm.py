"""GroupNorm with window statistics (cadalign.local_norm), against plain GroupNorm on crops."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cadalign.align import AlignConfig, predict_field
from cadalign.local_norm import local_group_norm, local_statistics
from cadalign.model import AlignNet, ModelConfig


def _gn() -> nn.GroupNorm:
    gn = nn.GroupNorm(2, 6)
    with torch.no_grad():
        gn.weight.copy_(torch.linspace(0.5, 2.0, 6))
        gn.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    return gn


@pytest.mark.parametrize("pixel", [(10, 12), (0, 0), (24, 3), (17, 29)])
def test_each_pixel_is_normalised_as_the_crop_around_it(pixel: tuple[int, int]) -> None:
    """Interior pixels: the crop centred on them; border pixels: the nearest crop inside the map."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 25, 30, generator=gen) * 3 + torch.linspace(0, 5, 30)  # a trend: stats vary
    gn, (kh, kw) = _gn(), (9, 8)
    out = local_group_norm(gn, x, (kh, kw))
    i, j = pixel
    top = min(max(i - kh // 2, 0), 25 - kh)
    left = min(max(j - kw // 2, 0), 30 - kw)
    crop = gn(x[:, :, top : top + kh, left : left + kw])
    torch.testing.assert_close(out[:, :, i, j], crop[:, :, i - top, j - left], rtol=1e-5, atol=1e-5)


def test_a_window_as_large_as_the_map_is_plain_group_norm() -> None:
    x = torch.randn(1, 6, 12, 12, generator=torch.Generator().manual_seed(1))
    gn = _gn()
    assert torch.equal(local_group_norm(gn, x, (12, 12)), gn(x))
    assert torch.equal(local_group_norm(gn, x, (40, 40)), gn(x))


def _net() -> AlignNet:
    torch.manual_seed(0)
    return AlignNet(ModelConfig(image_widths=(4, 8), poly_widths=(2, 4), deep_supervision_levels=1, norm="group"))


def test_on_a_training_size_input_the_network_is_unchanged() -> None:
    net = _net().eval()
    size = net.input_size(16)
    gen = torch.Generator().manual_seed(2)
    image, polys = torch.rand(1, 3, size, size, generator=gen), torch.rand(1, 3, size, size, generator=gen)
    with torch.no_grad():
        plain = net(image, polys).disp[0]
        with local_statistics(net, size) as layers:
            local = net(image, polys).disp[0]
        after = net(image, polys).disp[0]
    assert layers == sum(isinstance(m, nn.GroupNorm) for m in net.modules()) > 0
    torch.testing.assert_close(local, plain, rtol=1e-5, atol=1e-6)
    assert torch.equal(after, plain)  # the layers' own forward is back


def test_large_windows_with_window_statistics_differ_from_plain_ones() -> None:
    """norm_window reaches the network: on one large window it changes the field."""
    net = _net()
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (72, 72, 3), dtype=np.uint8)
    image[:, 36:] //= 4  # a dark half: window statistics differ from the whole image's
    base = dict(output_size=56, lattice="fit", overlap=0.25, window="tukey", progress=False)
    plain = predict_field(net, image, np.array([], dtype=object), "cpu", AlignConfig(**base))
    local = predict_field(net, image, np.array([], dtype=object), "cpu", AlignConfig(**base, norm_window=16))
    assert plain.shape == local.shape == (2, 72, 72)
    assert np.abs(plain - local).max() > 1e-3


@pytest.mark.parametrize("bad", [0, -3, "local", 2.5])
def test_norm_window_must_be_window_or_a_size(bad: object) -> None:
    with pytest.raises(ValueError, match="norm_window"):
        AlignConfig(norm_window=bad).validate()  # type: ignore[arg-type]
