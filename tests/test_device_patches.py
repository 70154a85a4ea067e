"""Tests of the device patch sampler: agreement with the exact path on the same draws,
determinism, resume, draw distributions, and training from it (tiny tiles, CPU)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import shapely
import torch
from conftest import seeded_buildings
from scipy import ndimage

from cadalign.config import ConfigError, from_dict
from cadalign.device_patches import DeviceSampler, jitter, orthogonal, step_generator
from cadalign.model import AlignNet, LossConfig, ModelConfig
from cadalign.noise import random_displacement_field
from cadalign.patches import PatchConfig, PatchSampler, TileData, tile_probabilities
from cadalign.train import TrainConfig, train

SMALL = {"input_size": 60, "output_size": 20}  # as tests/test_patches.py
SMOOTH = {**SMALL, "field_extent": 320.0, "field_scale": 2.0}  # production-like smoothness (see there)
NO_JITTER = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0}


def _tile(seed: int = 0, size: int = 160, n: int = 40, city: str = "") -> TileData:
    """Seeded buildings on a smooth random image (a real image is smooth at its own resolution)."""
    rng = np.random.default_rng(seed)
    labels = seeded_buildings(rng, n, size)
    noise = rng.uniform(0, 255, size=(size, size, 3))
    image = np.stack([ndimage.gaussian_filter(noise[..., c], 2.0) for c in range(3)], -1)
    image = np.clip((image - image.mean()) * 4 + 128, 0, 255).astype(np.uint8)
    return TileData(image=image, labels=labels, ids=np.arange(len(labels)), city=city)


def _pooled_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0.5, b > 0.5
    return float((a & b).sum() / (a | b).sum())


def _edge_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric mean distance (px) from the pixels of one edge raster to the other's."""
    a, b = a > 0.5, b > 0.5
    return max(ndimage.distance_transform_edt(~a)[b].mean(), ndimage.distance_transform_edt(~b)[a].mean())


def _same_draws(cfg: PatchConfig, n: int = 32) -> tuple[list, dict[str, torch.Tensor]]:
    tiles = [_tile()]
    exact = PatchSampler(tiles, cfg)
    patches = [exact.draw(np.random.default_rng(k)) for k in range(n)]
    device = DeviceSampler(tiles, cfg, batch_size=n)
    return patches, device.render(device.draws_of(patches))


def test_same_draws_agree_with_the_exact_path() -> None:
    """KEY: rendering the exact path's own draws gives its patches, up to resampling the burned labels.

    Measured here: pooled fill IoU 0.95 (input) and 0.97 (seg), edge IoU 0.85 / 0.89, mean edge
    distance <= 0.15 px in every patch, vertex pixels 0.99 of the exact path's, targets within
    2.4e-6 of the tanh range (one sample of the same field, float32 against float64), image within
    half a gray level.
    """
    cfg = PatchConfig(**SMOOTH, **NO_JITTER, keep_prob=1.0)
    patches, batch = _same_draws(cfg)
    polys, seg = batch["polys"].numpy(), batch["seg"].numpy()
    exact_polys = np.stack([p.polys for p in patches])
    exact_seg = np.stack([p.seg for p in patches])
    assert _pooled_iou(exact_polys[:, 0], polys[:, 0]) >= 0.93
    assert _pooled_iou(exact_seg[:, 1], seg[:, 1]) >= 0.95
    assert _pooled_iou(exact_polys[:, 1], polys[:, 1]) >= 0.8
    assert _pooled_iou(exact_seg[:, 2], seg[:, 2]) >= 0.85
    distances = [_edge_distance(p.polys[1], polys[i, 1]) for i, p in enumerate(patches) if p.polys[1].any()]
    assert len(distances) >= 30 and max(distances) <= 0.25
    # one vertex pixel per vertex, give or take the rotated grid (0 to 2 pixel centres per tile pixel)
    assert abs(polys[:, 2].sum() / exact_polys[:, 2].sum() - 1) < 0.05
    np.testing.assert_allclose(batch["disp"].numpy(), np.stack([p.disp for p in patches]), atol=1e-5)
    # bilinear either way; cv2 rounds to uint8 and weights in 1/32 steps
    np.testing.assert_allclose(batch["image"].numpy(), np.stack([p.image for p in patches]), atol=0.51 / 127.5)
    np.testing.assert_array_equal(batch["polys_out"].numpy(), polys[:, :, 20:40, 20:40])
    np.testing.assert_array_equal(seg.sum(1) >= 1, True)


def test_same_draws_per_crop_field() -> None:
    """A rough per-crop field: the warped shapes bend where the exact ones keep straight edges
    between moved vertices (pooled input fill IoU 0.85 here); the targets still agree exactly."""
    cfg = PatchConfig(**SMALL, **NO_JITTER, keep_prob=1.0, field_scale=2.0)
    patches, batch = _same_draws(cfg, n=16)
    assert _pooled_iou(np.stack([p.polys[0] for p in patches]), batch["polys"][:, 0].numpy()) >= 0.8
    assert _pooled_iou(np.stack([p.seg[1] for p in patches]), batch["seg"][:, 1].numpy()) >= 0.95
    np.testing.assert_allclose(batch["disp"].numpy(), np.stack([p.disp for p in patches]), atol=1e-5)


def test_orthogonal_matches_the_exact_convention() -> None:
    """A = R(theta) diag(1, -1 if flipped): the flip negates the patch's dy before rotating."""
    rot = orthogonal(torch.tensor([0.0, 0.0, np.pi / 2]), torch.tensor([False, True, True]))
    expected = [[[1, 0], [0, 1]], [[1, 0], [0, -1]], [[0, 1], [1, 0]]]
    np.testing.assert_allclose(rot.numpy(), expected, atol=1e-7)


def test_jitter_matches_albumentations() -> None:
    """The same shift and factors as the exact path's pipeline, in both orders, within rounding."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    brightness = A.RandomBrightnessContrast(brightness_limit=0.25, contrast_limit=0.0, brightness_by_max=True, p=1.0)
    color = A.ColorJitter(brightness=0.0, contrast=0.2, saturation=0.2, hue=0.0, p=1.0)
    for shift, con, sat, con_first in [(0.2, 1.15, 0.85, True), (-0.1, 0.82, 1.2, False), (0.0, 1.0, 1.0, True)]:
        ref = brightness.apply(image, alpha=1.0, beta=shift * 255.0)  # beta scaled by the max, as its params are
        order = [0, 1, 2, 3] if con_first else [0, 2, 1, 3]
        ref = color.apply(ref, brightness=1.0, contrast=con, saturation=sat, hue=0.0, order=order)
        params = torch.tensor([[shift * 255.0, con, sat, float(con_first)]])
        ours = jitter(torch.from_numpy(image).permute(2, 0, 1)[None].float(), params)[0].permute(1, 2, 0)
        np.testing.assert_allclose(ours.numpy(), ref, atol=2.0)  # uint8 rounding or truncation at each of 3 stages


def test_batch_is_a_pure_function_of_seed_rank_and_step() -> None:
    """Same (seed, rank, step) -> the same bytes, whatever was drawn before (an exact resume)."""
    cfg = PatchConfig(**SMOOTH, keep_prob=0.5, seed=3)
    tiles = [_tile()]
    first = DeviceSampler(tiles, cfg, batch_size=4)
    history = [first.batch(step) for step in range(3)]
    fresh = DeviceSampler(tiles, cfg, batch_size=4).batch(2)
    for key, value in history[2].items():
        assert value.dtype == torch.float32
        assert value.numpy().tobytes() == fresh[key].numpy().tobytes(), key
    assert not torch.equal(history[0]["disp"], history[1]["disp"])
    other_rank = DeviceSampler(tiles, cfg, batch_size=4, rank=1).batch(2)
    assert not torch.equal(other_rank["disp"], fresh["disp"])
    shapes = {"image": (4, 3, 60, 60), "polys": (4, 3, 60, 60), "disp": (4, 2, 20, 20), "seg": (4, 4, 20, 20)}
    assert {k: tuple(fresh[k].shape) for k in shapes} == shapes
    assert fresh["image"].min() >= -1 and fresh["image"].max() <= 1 and fresh["disp"].abs().max() <= 1


def test_output_window_holds_a_label_vertex() -> None:
    """Every drawn centre puts a label vertex in the rotated output window (checked in numpy)."""
    cfg = PatchConfig(**SMOOTH)
    tile = _tile(n=12)  # sparse: many candidates are rejected
    sampler = DeviceSampler([tile], cfg, batch_size=64)
    draws = sampler.draw(step_generator(0, 0, 0, torch.device("cpu")))
    vertices = shapely.get_coordinates(tile.labels)
    for centre, angle, flipped in zip(draws.centre.numpy(), draws.angle.numpy(), draws.flipped.numpy()):
        cos, sin = np.cos(angle), np.sin(angle)
        rot = np.array([[cos, -sin], [sin, cos]]) @ np.diag([1.0, -1.0 if flipped else 1.0])
        local = (vertices - centre) @ rot
        assert np.any(np.all(np.abs(local) <= cfg.output_size / 2, axis=1))
    assert len(np.unique(draws.angle.numpy())) == 64 and 10 < draws.flipped.sum() < 54


def test_field_has_the_exact_paths_distribution() -> None:
    """Largest component exactly field_max; rms and roughness match noise.random_displacement_field's."""
    cfg = PatchConfig(**SMOOTH)
    sampler = DeviceSampler([_tile()], cfg, batch_size=64)
    field = sampler.draw(step_generator(0, 0, 0, torch.device("cpu"))).field.numpy()
    np.testing.assert_allclose(np.abs(field).max(axis=(2, 3)), cfg.field_max, rtol=1e-5)
    rng = np.random.default_rng(0)
    side = sampler.coarse_side
    exact = np.stack([random_displacement_field((side, side), cfg.field_max, cfg.n_bumps, rng, coarse_factor=1) for _ in range(64)])

    def stats(f: np.ndarray) -> tuple[float, float]:
        return float(f.std(axis=(2, 3)).mean()), float(np.abs(np.diff(f, axis=-1)).mean())

    (rms, rough), (rms_ref, rough_ref) = stats(field), stats(exact)
    assert abs(rms / rms_ref - 1) < 0.1 and abs(rough / rough_ref - 1) < 0.1, (rms, rms_ref, rough, rough_ref)


@pytest.mark.parametrize("weight_by", ["area", "city"])
def test_tiles_are_drawn_with_the_configured_weights(weight_by: str) -> None:
    tiles = [_tile(0, 160, city="a"), _tile(1, 100, 20, city="a"), _tile(2, 120, 30, city="b")]
    cfg = PatchConfig(**SMALL, weight_by=weight_by, n_bumps=1, field_coarse_factor=64)  # a cheap field
    sampler = DeviceSampler(tiles, cfg, batch_size=3000)
    drawn = sampler.draw(step_generator(0, 0, 0, torch.device("cpu"))).tile.numpy()
    expected = tile_probabilities(np.array([160.0**2, 100.0**2, 120.0**2]), ["a", "a", "b"], weight_by)
    freq = np.bincount(drawn, minlength=3) / len(drawn)
    np.testing.assert_array_less(np.abs(freq - expected), 4 * np.sqrt(expected * (1 - expected) / len(drawn)))


def test_polygon_dropping_thins_the_input_only() -> None:
    """keep_prob drops whole polygons from the input raster; the seg target keeps them all."""
    tiles = [_tile(n=60)]
    full = DeviceSampler(tiles, PatchConfig(**SMOOTH, keep_prob=1.0), batch_size=32).batch(0)
    half = DeviceSampler(tiles, PatchConfig(**SMOOTH, keep_prob=0.5), batch_size=32).batch(0)
    torch.testing.assert_close(half["seg"], full["seg"])  # the same draws up to the keep mask
    assert torch.all(half["polys"] <= full["polys"])
    kept = half["polys"][:, 0].sum() / full["polys"][:, 0].sum()
    assert 0.3 < kept < 0.7, kept


def test_errors_and_the_config_key() -> None:
    empty = TileData(image=np.zeros((50, 50, 3), np.uint8), labels=np.array([], dtype=object), ids=np.array([]))
    with pytest.raises(ValueError, match="none of the 1 tiles has a label vertex"):
        DeviceSampler([empty], PatchConfig(**SMALL), batch_size=2)
    with pytest.raises(ConfigError, match=r"sampler: 'gpu' is not one of \['exact', 'device'\]"):
        from_dict(PatchConfig, {"sampler": "gpu"}, where="train.patches")
    assert from_dict(PatchConfig, {"sampler": "device"}, where="train.patches").sampler == "device"


def test_train_from_the_device_sampler_resumes_exactly(tmp_path: Path) -> None:
    """train() on the batch source; a run stopped at step 2 and resumed ends as an uninterrupted one."""
    model = ModelConfig(image_widths=(4, 8), poly_widths=(2, 4), deep_supervision_levels=1)
    cfg = PatchConfig(**SMOOTH, keep_prob=1.0)
    size = AlignNet(model).input_size(AlignNet(model).output_size(60))
    cfg = dataclasses.replace(cfg, input_size=size, output_size=AlignNet(model).output_size(size))
    source = DeviceSampler([_tile()], cfg, batch_size=2)
    opts = TrainConfig(steps=4, batch_size=2, lr=1e-3, checkpoint_every=2, log_every=1, compile=False, device="cpu")
    whole = train(model, LossConfig(), opts, source, tmp_path / "a.ckpt", tmp_path / "a.pt")
    assert np.isfinite(whole["loss"]["loss"])
    train(model, LossConfig(), dataclasses.replace(opts, steps=2), source, tmp_path / "b.ckpt", tmp_path / "b0.pt")
    resumed = train(model, LossConfig(), opts, source, tmp_path / "b.ckpt", tmp_path / "b.pt")
    assert resumed["start_step"] == 2
    a, b = whole["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
