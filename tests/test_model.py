"""Tests of the alignment network and its loss (tiny widths, tiny inputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cadalign.config import ConfigError, from_dict
from cadalign.model import AlignNet, AlignOutput, LossConfig, ModelConfig, alignment_loss

TINY2 = ModelConfig(image_widths=(4, 8), poly_widths=(2, 4), deep_supervision_levels=1)
TINY3 = ModelConfig(image_widths=(3, 4, 5), poly_widths=(2, 2, 3), deep_supervision_levels=2)


def _inputs(size: int, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    polys = (torch.rand(batch, 3, size, size, generator=g) > 0.7).float()
    return image, polys


@pytest.mark.parametrize(("cfg", "size"), [(TINY2, 32), (TINY2, 44), (TINY3, 60), (TINY3, 68)])
def test_forward_shapes_match_output_size(cfg: ModelConfig, size: int) -> None:
    torch.manual_seed(0)
    model = AlignNet(cfg)
    out = model(*_inputs(size))
    sizes = model.level_output_sizes(size)
    assert sizes[0] == model.output_size(size)
    assert len(out.disp) == len(out.seg) == cfg.deep_supervision_levels
    for level, (disp, seg) in enumerate(zip(out.disp, out.seg, strict=True)):
        assert disp.shape == (2, 2, sizes[level], sizes[level])
        assert seg.shape == (2, cfg.n_seg_classes, sizes[level], sizes[level])


def test_reference_geometry_is_220_in_100_out() -> None:
    reference = AlignNet(ModelConfig())
    assert reference.output_size(220) == 100
    assert reference.input_size(100) == 220
    assert reference.level_output_sizes(220) == [100, 52, 28]
    # Same depth with 1-channel widths: the real forward pass has the same geometry.
    thin = AlignNet(ModelConfig(image_widths=(1, 1, 1, 1), poly_widths=(1, 1, 1, 1)))
    out = thin(*_inputs(220, batch=1))
    assert [d.shape[-1] for d in out.disp] == [100, 52, 28]


@pytest.mark.parametrize("cfg", [TINY2, TINY3, ModelConfig()])
def test_input_size_is_smallest_valid_input(cfg: ModelConfig) -> None:
    model = AlignNet(cfg)
    for wanted in (1, 7, 12, 25, 100):
        brute = None
        for s in range(1, 400):
            try:
                if model.output_size(s) >= wanted:
                    brute = s
                    break
            except ValueError:
                continue
        assert model.input_size(wanted) == brute


def test_invalid_input_size_raises_with_hint() -> None:
    model = AlignNet(ModelConfig())
    with pytest.raises(ValueError, match=r"patch size 221 is not a valid input.*\[220, 228\]"):
        model.output_size(221)
    with pytest.raises(ValueError, match="not a valid input"):
        model(*_inputs(221, batch=1))
    with pytest.raises(ValueError, match="output_size=0"):
        model.input_size(0)


def test_disp_is_tanh_bounded_and_saturates() -> None:
    torch.manual_seed(1)
    model = AlignNet(TINY2)
    with torch.no_grad():
        model.disp_heads[0].weight.mul_(1e4)
        disp = model(*_inputs(32)).disp[0]
    assert disp.abs().max() <= 1.0
    assert disp.abs().max() > 0.999  # the head reaches the bounds: a tanh, not a clamp or linear


def test_disp_parameters_are_exactly_those_disp0_depends_on() -> None:
    torch.manual_seed(2)
    model = AlignNet(TINY3)
    included = {name for name, _ in model.disp_parameters()}
    assert not any(n.startswith(("seg_heads.", "disp_heads.1.")) for n in included)
    model(*_inputs(60)).disp[0].sum().backward()
    for name, p in model.named_parameters():
        grad_norm = 0.0 if p.grad is None else p.grad.abs().sum().item()
        if name in included:
            assert grad_norm > 0, name
        else:
            assert grad_norm == 0, name


def test_config_validation_messages() -> None:
    with pytest.raises(ValueError, match="same number of levels"):
        ModelConfig(image_widths=(4, 8), poly_widths=(2,)).validate()
    with pytest.raises(ValueError, match="deep_supervision_levels=2 must be between 1 and depth - 1 = 1"):
        AlignNet(ModelConfig(image_widths=(4, 8), poly_widths=(2, 4), deep_supervision_levels=2))
    with pytest.raises(ConfigError, match="level_coefs row"):
        from_dict(LossConfig, {"level_coefs": [[1.0, 0.0]]}, where="params.yaml: loss")
    mapping = {"image_widths": [4, 8], "poly_widths": [2, 4], "deep_supervision_levels": 1}
    cfg = from_dict(ModelConfig, mapping, where="t")
    assert cfg.image_widths == (4, 8) and cfg.fused_widths == (6, 12)


def test_level_coefficients_shift_to_level_0() -> None:
    cfg = LossConfig()
    assert cfg.coefs_at(0, 3) == pytest.approx([0.5, 0.35, 0.15])
    assert cfg.coefs_at(2500, 3) == pytest.approx([0.75, 0.2, 0.05])
    assert cfg.coefs_at(7499, 3) == pytest.approx([0.9, 0.1, 0.0])
    assert cfg.coefs_at(7500, 3) == pytest.approx([1.0, 0.0, 0.0])
    assert cfg.coefs_at(0, 2) == pytest.approx([0.5 / 0.85, 0.35 / 0.85])
    assert cfg.coefs_at(0, 1) == pytest.approx([1.0])
    with pytest.raises(ValueError, match="supervises 4 levels"):
        cfg.coefs_at(0, 4)


def _numpy_single_level_loss(pred, tgt, logits, seg, raster, cfg: LossConfig) -> float:
    """Independent float64 computation of the reference loss for one output level."""
    w = cfg.disp_raster_weights[0] * raster[:, 0] + cfg.disp_raster_weights[1] * raster[:, 1]
    w = w + cfg.disp_raster_weights[2] * raster[:, 2]
    disp = (w * ((pred - tgt) ** 2).sum(axis=1)).sum() / w.sum()
    bce = np.maximum(logits, 0) - logits * seg + np.log1p(np.exp(-np.abs(logits)))
    seg_term = (bce * np.asarray(cfg.seg_class_weights)[None, :, None, None]).mean()
    return cfg.disp_weight * disp + cfg.seg_weight * seg_term


def test_single_level_loss_matches_numpy() -> None:
    rng = np.random.default_rng(3)
    b, o = 2, 5
    pred = np.tanh(rng.normal(size=(b, 2, o, o)))
    tgt = rng.uniform(-1, 1, size=(b, 2, o, o))
    logits = rng.normal(scale=3, size=(b, 4, o, o))
    seg = (rng.random((b, 4, o, o)) > 0.5).astype(float)
    raster = (rng.random((b, 3, o, o)) > 0.6).astype(float)
    raster[0, :, 0, 0] = [1, 1, 1]  # a pixel in all three channels gets the summed weight
    cfg = LossConfig()

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.float32)

    loss, terms = alignment_loss(
        AlignOutput([t(pred)], [t(logits)]), t(tgt), t(seg), t(raster), step=123, cfg=cfg
    )
    expected = _numpy_single_level_loss(pred, tgt, logits, seg, raster, cfg)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert terms["loss"] == pytest.approx(expected, rel=1e-5)
    assert set(terms) == {"loss", "disp", "seg", "disp_l0", "seg_l0"}


def test_background_pixels_do_not_weigh_on_displacement() -> None:
    b, o = 1, 4
    pred = torch.zeros(b, 2, o, o)
    tgt = torch.zeros(b, 2, o, o)
    tgt[..., 0, 0] = 1.0  # error only where the raster is empty
    raster = torch.zeros(b, 3, o, o)
    raster[:, 1, 2, 2] = 1.0
    seg = torch.zeros(b, 4, o, o)
    _, terms = alignment_loss(AlignOutput([pred], [seg]), tgt, seg, raster, 0, LossConfig())
    assert terms["disp"] == 0.0
    _, empty = alignment_loss(AlignOutput([pred], [seg]), tgt, seg, torch.zeros_like(raster), 0, LossConfig())
    assert empty["disp"] == 0.0  # no polygon in the window: no displacement loss, no NaN


def test_coarse_level_targets_are_aligned_area_averages() -> None:
    """A level-1 prediction equal to the 2x2 mean of the true field has zero error."""
    g = torch.Generator().manual_seed(4)
    model = AlignNet(TINY3)
    sizes = model.level_output_sizes(68)  # co-centred outputs of two levels
    o, p1 = sizes[0], sizes[1]
    full = torch.rand(1, 2, 2 * p1, 2 * p1, generator=g) * 2 - 1  # field over level 1's window
    margin = (2 * p1 - o) // 2
    target = full[..., margin : margin + o, margin : margin + o]
    level1 = F.avg_pool2d(full, 2)
    raster = torch.ones(1, 3, o, o)
    seg_t = torch.zeros(1, 4, o, o)
    segs = [torch.full((1, 4, o, o), -20.0), torch.full((1, 4, p1, p1), -20.0)]
    cfg = LossConfig()
    _, terms = alignment_loss(AlignOutput([target, level1], segs), target, seg_t, raster, 0, cfg)
    assert terms["disp_l0"] == 0.0
    assert terms["disp_l1"] < 1e-12
    shifted = torch.roll(level1, shifts=1, dims=-1)
    _, terms_shifted = alignment_loss(AlignOutput([target, shifted], segs), target, seg_t, raster, 0, cfg)
    assert terms_shifted["disp_l1"] > 1e-3
    assert terms["seg_l1"] == pytest.approx(terms["seg_l0"], rel=1e-6)  # same logits and empty targets


def test_loss_rejects_mismatched_shapes() -> None:
    out = AlignOutput([torch.zeros(1, 2, 4, 4)], [torch.zeros(1, 4, 4, 4)])
    with pytest.raises(ValueError, match=r"target_disp has shape \(1, 2, 5, 5\)"):
        alignment_loss(
            out, torch.zeros(1, 2, 5, 5), torch.zeros(1, 4, 4, 4), torch.zeros(1, 3, 4, 4), 0, LossConfig()
        )
