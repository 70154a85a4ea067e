"""Tests for the on-the-fly patch sampler (small patches so the file runs in seconds)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import shapely
import torch
from conftest import seeded_buildings

from cadalign.config import ConfigError, from_dict
from cadalign.noise import sample_field
from cadalign.patches import Field, PatchConfig, PatchDataset, PatchSampler, TileData
from cadalign.raster import downsample_image, rasterize_polygons, scale_geoms

SMALL = {"input_size": 60, "output_size": 20}  # margin 20, crop 89 px
# A per-crop field over 89 px is much rougher than production's over 316 px (S = 220);
# spreading the field over 320 px gives these small patches production-like smoothness.
SMOOTH = {**SMALL, "field_extent": 320.0}


def _tile(seed: int = 0, size: int = 160, n: int = 40, image: np.ndarray | None = None) -> TileData:
    """A seeded tile: rotated boxes, one building with a courtyard, one MultiPolygon."""
    rng = np.random.default_rng(seed)
    labels = seeded_buildings(rng, n, size)
    if image is None:
        image = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return TileData(image=image, labels=labels, ids=np.arange(len(labels)))


def _vertex_pairs(patch, cfg: PatchConfig, inset: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Label and misaligned input vertices (output-window frame), both inside the window."""
    labels = shapely.get_coordinates(patch.labels) - cfg.margin
    inputs = shapely.get_coordinates(patch.inputs) - cfg.margin
    inside = np.all((labels > inset) & (labels < cfg.output_size - inset), axis=1)
    inside &= np.all((inputs > inset) & (inputs < cfg.output_size - inset), axis=1)
    return labels[inside], inputs[inside]


ANGLES = (0.0, 0.3, math.pi / 2, 2.0, math.pi, 4.5)


@pytest.mark.parametrize(("angle", "flipped"), list(itertools.product(ANGLES, (False, True))))
def test_target_field_moves_inputs_onto_labels(angle: float, flipped: bool) -> None:
    """KEY: the target field, sampled at the transformed inputs, lands them on the labels."""
    cfg = PatchConfig(**SMOOTH, keep_prob=1.0)
    sampler = PatchSampler([_tile(n=80)], cfg)
    checked = 0
    for k in range(4):
        patch = sampler.draw(np.random.default_rng(k), angle=angle, flipped=flipped)
        assert patch.angle == angle and patch.flipped == flipped
        labels, inputs = _vertex_pairs(patch, cfg)
        moved = inputs + sample_field(patch.field_px, inputs)
        # exact up to the bilinear interpolation of the target raster between pixel centres (< 0.05 px)
        np.testing.assert_array_less(np.linalg.norm(moved - labels, axis=1), 0.05)
        # the normalised target is the same field, clipped like the tanh output
        np.testing.assert_allclose(patch.disp, np.clip(patch.field_px / cfg.max_displacement, -1, 1))
        checked += len(labels)
    assert checked > 20  # the check did look at vertices


def test_inputs_sit_where_the_field_moves_them_onto_the_labels_and_vectors_rotate() -> None:
    """In the tile frame each input vertex u solves u + F(u) = v for its label vertex v (to 1e-6 px,
    the field sampled by its own function); in the patch frame the target raster is the same field,
    rotated: a field whose vectors were only moved spatially misses."""
    cfg = PatchConfig(**SMOOTH, keep_prob=1.0)
    sampler = PatchSampler([_tile(n=80)], cfg)
    for angle, flipped in [(0.0, False), (2.0, True), (math.pi / 2, False), (4.5, True)]:
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        rot = rot @ np.diag([1.0, -1.0 if flipped else 1.0])
        checked = 0
        for k in range(3):
            patch = sampler.draw(np.random.default_rng(k), angle=angle, flipped=flipped)
            labels, inputs = (
                np.asarray(patch.centre) + (shapely.get_coordinates(g) - cfg.input_size / 2.0) @ rot.T
                for g in (patch.labels, patch.inputs)
            )
            np.testing.assert_allclose(inputs + patch.field(inputs), labels, atol=1e-5)
            labels_w, inputs_w = _vertex_pairs(patch, cfg)
            checked += len(labels_w)
            if angle == math.pi / 2 and len(labels_w):
                unrotated = np.stack([-patch.field_px[1], patch.field_px[0]])
                moves = np.linalg.norm(labels_w - inputs_w, axis=1)
                wrong = np.linalg.norm(sample_field(unrotated, inputs_w) - (labels_w - inputs_w), axis=1)
                assert moves.max() > 0.2
                np.testing.assert_array_less(moves, wrong)  # sqrt(2) |F| expected
        assert checked > 10


def test_preimage_converges_where_the_fixed_point_iteration_does_not() -> None:
    """A field steeper than 1 px/px that does not fold: Newton finds u + F(u) = v to 1e-6 px at every
    point; the fixed-point iteration u = v - F(u) is still off by more than 0.1 px after 50 steps."""
    side = 64
    yy, xx = np.mgrid[0:side, 0:side] + 0.5
    # a damped swirl: grad F at the centre is -0.6 I + 1.1 x (a rotation by 90 degrees), of norm 1.25, so
    # u = v - F(u) does not contract there; det(I + grad F) stays >= 0.59 over the grid (no fold)
    s_diag, s_rot = -0.6, 1.1
    field = np.stack([s_diag * (xx - 32) - s_rot * (yy - 32), s_rot * (xx - 32) + s_diag * (yy - 32)])
    field *= np.exp(-((xx - 32) ** 2 + (yy - 32) ** 2) / (2 * 12.0**2))[None]
    grid_field = Field(field, np.zeros(2), 1.0)
    v = np.random.default_rng(0).uniform(20, 44, size=(200, 2))
    u = grid_field.preimage(v)
    np.testing.assert_array_less(np.abs(u + grid_field(u) - v), 1e-6)
    plain = v - grid_field(v)
    for _ in range(50):
        plain = v - grid_field(plain)
    assert np.abs(plain + grid_field(plain) - v).max() > 0.1


def test_image_follows_the_geometry_under_rotation_and_flip() -> None:
    """A tile whose image is its own label mask: the warped image matches the moved labels."""
    size = 160
    base = _tile(size=size)
    mask = rasterize_polygons(base.labels, (size, size))[0]
    image = np.repeat((mask * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    tile = TileData(image=image, labels=base.labels, ids=base.ids)
    cfg = PatchConfig(**SMALL, brightness=0.0, contrast=0.0, saturation=0.0)
    sampler = PatchSampler([tile], cfg)
    for angle, flipped in [(0.0, False), (0.7, True), (3.0, False), (5.0, True)]:
        patch = sampler.draw(np.random.default_rng(3), angle=angle, flipped=flipped)
        seen = patch.image[0] > 0
        burned = rasterize_polygons(patch.labels, (cfg.input_size, cfg.input_size))[0] > 0
        iou = (seen & burned).sum() / max((seen | burned).sum(), 1)
        assert iou > 0.85, (angle, flipped, iou)


def test_image_is_resampled_exactly_through_the_patch_transform() -> None:
    """Image value = 0.6 x tile coordinate: at each moved vertex it reads the vertex's origin."""
    size = 400
    base = _tile(size=size, n=60)
    centres = 0.6 * (np.arange(size) + 0.5)
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[:, :, 0] = np.round(centres)[None, :]  # x
    image[:, :, 1] = np.round(centres)[:, None]  # y
    tile = TileData(image=image, labels=base.labels, ids=base.ids)
    cfg = PatchConfig(**SMALL, brightness=0.0, contrast=0.0, saturation=0.0)
    sampler = PatchSampler([tile], cfg)
    errors = []
    transforms = [(0.0, False), (0.4, True), (2.5, False), (4.0, True), (1.0, False)]
    for k, (angle, flipped) in enumerate(transforms * 4):
        patch = sampler.draw(np.random.default_rng(k), angle=angle, flipped=flipped)
        moved = shapely.get_coordinates(patch.labels)
        origin = shapely.get_coordinates(base.labels[patch.indices])
        inside = np.all((moved > 1) & (moved < cfg.input_size - 1), axis=1)
        values = (patch.image[:2] + 1.0) * 127.5  # back to 0..255
        errors.append(sample_field(values, moved[inside]) - 0.6 * origin[inside])
    errors = np.concatenate(errors)
    assert len(errors) > 150
    assert np.abs(errors).max() < 1.0  # rounding of the tile image and of cv2's fixed point
    assert np.abs(errors.mean(axis=0)).max() < 0.1  # no sub-pixel bias (0.5 px would give 0.3)


def test_output_window_holds_a_true_vertex_and_ranges() -> None:
    cfg = PatchConfig(**SMALL)
    dataset = PatchDataset([_tile()], cfg)
    sampler = dataset.sampler
    size, out, m = cfg.input_size, cfg.output_size, cfg.margin
    for k in range(12):
        patch = sampler.draw(dataset.generator(k))
        coords = shapely.get_coordinates(patch.labels)
        assert np.any(np.all((coords >= m) & (coords <= m + out), axis=1))
        sample = patch.as_tensors()
        shapes = {
            "image": (3, size, size),
            "polys": (3, size, size),
            "disp": (2, out, out),
            "seg": (4, out, out),
        }
        for name, shape in shapes.items():
            assert sample[name].shape == shape and sample[name].dtype == torch.float32
        assert sample["image"].min() >= -1 and sample["image"].max() <= 1
        assert sample["image"].max() - sample["image"].min() > 0.5  # not a blank image
        assert sample["disp"].abs().max() <= 1
        seg = sample["seg"]
        assert torch.equal(seg[0], 1 - seg[1:].amax(dim=0))
        assert torch.equal(sample["polys_out"], sample["polys"][:, m : m + out, m : m + out])


def test_polygon_dropping_input_only() -> None:
    keep = 0.3
    cfg = PatchConfig(**SMALL, keep_prob=keep)
    sampler = PatchSampler([_tile()], cfg)
    kept = total = 0
    for k in range(30):
        patch = sampler.draw(np.random.default_rng(100 + k))
        kept += int(patch.kept.sum())
        total += len(patch.kept)
        size, out, m = cfg.input_size, cfg.output_size, cfg.margin
        np.testing.assert_array_equal(patch.polys, rasterize_polygons(patch.inputs[patch.kept], (size, size)))
        everything = rasterize_polygons(patch.labels, (out, out), offset=(m, m))
        np.testing.assert_array_equal(patch.seg[1:], everything)  # all labels in the target
    assert total > 300
    sigma = math.sqrt(keep * (1 - keep) / total)
    assert abs(kept / total - keep) < 4 * sigma


def test_deterministic_per_seed_worker_and_stream() -> None:
    tiles = [_tile(0), _tile(1)]
    cfg = PatchConfig(**SMALL)
    first = list(itertools.islice(iter(PatchDataset(tiles, cfg)), 3))
    again = list(itertools.islice(iter(PatchDataset(tiles, cfg)), 3))
    for a, b in zip(first, again, strict=True):
        for name in a:
            assert torch.equal(a[name], b[name])
    dataset = PatchDataset(tiles, cfg)
    assert torch.equal(dataset.sample(2)["image"], first[2]["image"])
    others = [
        dataset.sample(0, worker=1),
        PatchDataset(tiles, PatchConfig(**SMALL, seed=1)).sample(0),
        PatchDataset(tiles, cfg, rank=1).sample(0),
        PatchDataset(tiles, cfg, stream=5).sample(0),
    ]
    for other in others:
        assert not torch.equal(other["disp"], first[0]["disp"])


def test_field_extent_gives_smoother_fields() -> None:
    """A field spanning a larger extent varies less over the patch than a per-crop field."""
    rough = PatchSampler([_tile()], PatchConfig(**SMALL))
    smooth = PatchSampler([_tile()], PatchConfig(**SMALL, field_extent=1000.0))

    def mean_gradient(sampler: PatchSampler) -> float:
        fields = [sampler.draw(np.random.default_rng(k)).field_px for k in range(6)]
        grads = [np.abs(np.diff(field, axis=2)).mean() for field in fields]
        return float(np.mean(grads))

    assert mean_gradient(smooth) < 0.5 * mean_gradient(rough)


def test_field_scale_widens_the_field_and_clips_the_target() -> None:
    """field_scale multiplies the random field; the target keeps the tanh normaliser and clips."""
    base = PatchConfig(**SMOOTH, keep_prob=1.0)
    wide = PatchConfig(**SMOOTH, keep_prob=1.0, field_scale=3.0)
    assert wide.field_max == 3.0 * wide.max_displacement
    narrow, broad = PatchSampler([_tile(n=80)], base), PatchSampler([_tile(n=80)], wide)
    clipped = 0
    for k in range(4):
        a, b = (s.draw(np.random.default_rng(k), angle=0.3, flipped=True) for s in (narrow, broad))
        np.testing.assert_allclose(b.field_px, 3.0 * a.field_px, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b.disp, np.clip(b.field_px / wide.max_displacement, -1, 1))
        clipped += int((np.abs(b.field_px) > wide.max_displacement).sum())
        labels, inputs = _vertex_pairs(b, wide)
        np.testing.assert_allclose(sample_field(b.field_px, inputs), labels - inputs, atol=0.1)
    assert clipped > 0  # some target values were beyond the tanh range
    with pytest.raises(ConfigError, match="field_scale"):
        from_dict(PatchConfig, {"field_scale": 0.0}, "params.yaml: patches")


def test_weight_by_city_draws_each_city_equally() -> None:
    """Three tiles of city a (two 160 px, one 80 px) and one of city b: by area b gets 160^2 /
    (3 x 160^2 + 80^2) = 0.31 of the draws; by city it gets half, and a splits its half by area."""
    tiles = [
        dataclasses.replace(_tile(seed=0), city="a"),
        dataclasses.replace(_tile(seed=1), city="a"),
        dataclasses.replace(_tile(seed=2, size=80, n=10), city="a"),
        dataclasses.replace(_tile(seed=3), city="b"),
    ]
    area = PatchSampler(tiles, PatchConfig(**SMALL))
    np.testing.assert_allclose(area.tile_prob, np.array([4, 4, 1, 4]) / 13)
    by_city = PatchSampler(tiles, PatchConfig(**SMALL, weight_by="city"))
    np.testing.assert_allclose(by_city.tile_prob, [2 / 9, 2 / 9, 1 / 18, 1 / 2])
    drawn = np.bincount([by_city.draw(np.random.default_rng(k)).tile for k in range(400)], minlength=4)
    # binomial: 400 draws of p = 0.5 -> sd 10; of 2/9 -> sd 8.3
    assert abs(drawn[3] - 200) < 40 and abs(drawn[0] - 400 * 2 / 9) < 34
    with pytest.raises(ConfigError, match=r"patches\.weight_by: 'tile' is not one of \['area', 'city'\]"):
        from_dict(PatchConfig, {"weight_by": "tile"}, "params.yaml: patches")


def test_downsample_area_average_and_label_scale() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    small, (sx, sy) = downsample_image(image, 4)
    assert small.shape == (16, 24, 3) and (sx, sy) == (0.25, 0.25)
    block_mean = image.reshape(16, 4, 24, 4, 3).mean(axis=(1, 3))
    assert np.abs(small - block_mean).max() <= 0.5 + 1e-9
    geoms = np.array([shapely.box(8, 4, 40, 20)], dtype=object)
    assert shapely.equals(scale_geoms(geoms, sx, sy)[0], shapely.box(2, 1, 10, 5))
    with pytest.raises(ValueError, match="ds=0"):
        downsample_image(image, 0)


def test_downsampled_sampler_uses_scaled_labels() -> None:
    tile = _tile(size=320)
    sampler = PatchSampler([tile], PatchConfig(**SMALL, ds=2))
    assert sampler.tiles[0].image.shape == (160, 160, 3)
    np.testing.assert_allclose(sampler.tiles[0].vertices, shapely.get_coordinates(tile.labels) / 2)


def test_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="must be even"):
        from_dict(PatchConfig, {"input_size": 60, "output_size": 25}, "params.yaml: patches")
    with pytest.raises(ConfigError, match="unknown key 'patches.keep'"):
        from_dict(PatchConfig, {"keep": 0.1}, "params.yaml: patches")
    with pytest.raises(ConfigError, match="keep_prob"):
        from_dict(PatchConfig, {"keep_prob": 0.0}, "params.yaml: patches")
    no_labels = np.array([], dtype=object)
    empty = TileData(np.zeros((50, 50, 3), np.uint8), no_labels, np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="none of the 1 tiles has a label vertex"):
        PatchSampler([empty], PatchConfig(**SMALL))
    gray = TileData(np.zeros((50, 50), np.uint8), _tile().labels, _tile().ids)
    with pytest.raises(ValueError, match=r"tile 0: image must be \(H, W, 3\) uint8"):
        PatchSampler([gray], PatchConfig(**SMALL))
    # a tile without labels next to a labelled one is skipped, never sampled
    sampler = PatchSampler([empty, _tile()], PatchConfig(**SMALL))
    assert {sampler.draw(np.random.default_rng(k)).tile for k in range(5)} == {1}
