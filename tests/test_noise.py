"""Tests of the displacement-field noise model."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from cadalign import noise
from cadalign.geo.polygons import geometry_array


def test_field_is_deterministic_and_spans_amplitude() -> None:
    a = noise.random_displacement_field((96, 128), 12.0, 30, np.random.default_rng(5))
    b = noise.random_displacement_field((96, 128), 12.0, 30, np.random.default_rng(5))
    c = noise.random_displacement_field((96, 128), 12.0, 30, np.random.default_rng(6))
    assert a.shape == (2, 96, 128) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for comp in range(2):
        # min-max stretched on the coarse grid; bilinear upsampling stays within the range
        assert a[comp].max() <= 12.0 + 1e-4 and a[comp].min() >= -12.0 - 1e-4
        assert a[comp].max() > 9.0 and a[comp].min() < -9.0


def test_field_is_smooth() -> None:
    # bumps have a fixed size relative to the image (coordinates in [0, 1]), as in the reference
    field = noise.random_displacement_field((512, 512), 16.0, 30, np.random.default_rng(0))
    # neighbouring pixels differ by far less than the amplitude
    assert np.abs(np.diff(field, axis=2)).max() < 2.0
    assert np.abs(np.diff(field, axis=1)).max() < 2.0


@pytest.mark.parametrize("kwargs, match", [({"max_displacement": -1.0}, "max_displacement"), ({"n_bumps": 0}, "n_bumps")])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"shape": (8, 8), "max_displacement": 1.0, "n_bumps": 3, "rng": np.random.default_rng(0)} | kwargs
    with pytest.raises(ValueError, match=match):
        noise.random_displacement_field(**args)


def test_sample_field_matches_manual_bilinear() -> None:
    rng = np.random.default_rng(1)
    field = rng.normal(size=(2, 10, 12)).astype(np.float32)
    x, y = 4.3, 6.8  # pixel coordinates; centres are at +0.5
    c, r = x - 0.5, y - 0.5
    c0, r0 = int(np.floor(c)), int(np.floor(r))
    fc, fr = c - c0, r - r0
    expect = (
        field[:, r0, c0] * (1 - fr) * (1 - fc)
        + field[:, r0, c0 + 1] * (1 - fr) * fc
        + field[:, r0 + 1, c0] * fr * (1 - fc)
        + field[:, r0 + 1, c0 + 1] * fr * fc
    )
    np.testing.assert_allclose(noise.sample_field(field, np.array([[x, y]]))[0], expect, rtol=1e-6)
    # at a pixel centre the sample is the pixel's value
    np.testing.assert_allclose(noise.sample_field(field, np.array([[3.5, 2.5]]))[0], field[:, 2, 3], rtol=1e-6)


def test_misalign_preserves_structure_and_moves_by_field() -> None:
    poly = shapely.Polygon(shapely.box(10, 10, 30, 30).exterior, [shapely.box(15, 15, 20, 20).exterior.coords])
    multi = shapely.MultiPolygon([shapely.box(40, 40, 45, 45), shapely.box(50, 50, 55, 58)])
    geoms = geometry_array([poly, multi])
    field = noise.random_displacement_field((256, 256), 2.0, 10, np.random.default_rng(3))
    moved = noise.misalign(geoms, field)
    assert [g.geom_type for g in moved] == ["Polygon", "MultiPolygon"]
    assert len(moved[0].interiors) == 1
    np.testing.assert_array_equal(shapely.get_num_coordinates(moved), shapely.get_num_coordinates(geoms))
    before, after = shapely.get_coordinates(geoms), shapely.get_coordinates(moved)
    np.testing.assert_allclose(after, before - noise.sample_field(field, before))
    # correcting with the same field (sampled at the moved points) nearly undoes a smooth field
    back = shapely.get_coordinates(noise.realign(moved, field))
    assert np.abs(back - before).max() < 0.25
