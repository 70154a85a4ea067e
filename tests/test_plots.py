"""Tests of the study's figures."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import shapely

from cadalign.geo.polygons import geometry_array
from cadalign.plots import plot_accuracy_curves, plot_overlay
from cadalign.stages.draw import read_curve


def test_accuracy_chart_and_curve_csv(tmp_path: Path) -> None:
    csv = tmp_path / "acc.csv"
    csv.write_text("tau,accuracy\n0.00,0.000000\n16.00,0.500000\n32.00,1.000000\n")
    taus, acc = read_curve(csv)
    np.testing.assert_array_equal(taus, [0, 16, 32])
    np.testing.assert_array_equal(acc, [0, 0.5, 1])
    out = plot_accuracy_curves({"round0": (taus, acc), "round1": (taus, acc**0.5)}, tmp_path / "a.png")
    image = mpimg.imread(out)
    assert image.ndim == 3 and image.shape[0] > 100 and not list(tmp_path.glob(".*tmp*"))


def test_overlay_draws_polygons_in_their_colours(tmp_path: Path) -> None:
    image = np.full((64, 64, 3), 128, dtype=np.uint8)
    layers = {"truth": geometry_array([shapely.box(10, 10, 50, 50)]), "round0": geometry_array([])}
    out = plot_overlay(image, layers, tmp_path / "o.png", colours={"truth": "red"})
    pixels = mpimg.imread(out)[..., :3]
    red = (pixels[..., 0] > 0.8) & (pixels[..., 1] < 0.3) & (pixels[..., 2] < 0.3)
    small = plot_overlay(image, {"truth": geometry_array([shapely.box(10, 10, 12, 12)])}, tmp_path / "s.png",
                         colours={"truth": "red"})
    red_small = (mpimg.imread(small)[..., :3] * [1, -1, -1] > [0.8, -0.3, -0.3]).all(axis=-1)
    # red grows with the outline's length (160 px vs 8 px of perimeter), beyond the legend's swatch
    assert red.sum() > 5 * red_small.sum() > 0
