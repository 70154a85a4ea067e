"""Tests of the per-vertex evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from cadalign import evaluate, noise
from cadalign.geo.polygons import geometry_array


def test_errors_match_by_id_and_vertex() -> None:
    truth = geometry_array([shapely.box(0, 0, 10, 10), shapely.box(20, 20, 30, 30)])
    labels = geometry_array([shapely.affinity.translate(truth[1], 3, 4), shapely.affinity.translate(truth[0], 1, 0)])
    # labels are listed in another order: matching is by id, not position
    errors, ids, stats = evaluate.vertex_errors(truth, np.array([1, 2]), labels, np.array([2, 1]))
    assert (stats.n_buildings, stats.n_vertices) == (2, 10)
    assert ids.tolist() == [1] * 5 + [2] * 5 and errors.tolist() == [1.0] * 5 + [5.0] * 5  # truth order


def _row(n: int, side: float = 40.0, gap: float = 2.0) -> np.ndarray:
    """``n`` equal squares in a row, ``gap`` px apart (a dense block)."""
    return geometry_array([shapely.box(k * (side + gap), 0, k * (side + gap) + side, side) for k in range(n)])


def test_ids_must_match_the_truth_one_to_one() -> None:
    truth, true_ids = _row(8), np.arange(1, 9)
    kw = {"where": "l.gpkg", "truth_where": "t.gpkg"}
    with pytest.raises(ValueError, match=r"^l\.gpkg: 7 \(ids 2, 3, 4, 5, 6, \.\.\.\) true buildings of t\.gpkg have no label"):
        evaluate.vertex_errors(truth, true_ids, truth[:1], true_ids[:1], **kw)
    # the ids of a tile shifted by one: one true building unlabelled, one label without truth
    with pytest.raises(ValueError, match=r"^l\.gpkg: 1 \(ids 1\) true buildings of t\.gpkg have no label"):
        evaluate.vertex_errors(truth, true_ids, truth, true_ids + 1, **kw)
    extra = geometry_array([*truth, shapely.box(0, 50, 10, 60)])
    with pytest.raises(ValueError, match=r"^l\.gpkg: 1 \(ids 99\) labels have no true building in t\.gpkg"):
        evaluate.vertex_errors(truth, true_ids, extra, np.r_[true_ids, 99], **kw)
    with pytest.raises(ValueError, match=r"^l\.gpkg: 1 \(ids 3\) building ids appear more than once"):
        evaluate.vertex_errors(truth, true_ids, extra, np.r_[true_ids, 3], **kw)
    with pytest.raises(ValueError, match=r"^t\.gpkg: 1 \(ids 1\) building ids appear more than once"):
        evaluate.vertex_errors(truth, np.r_[1, true_ids[1:-1], 1], truth, true_ids, **kw)
    simplified = geometry_array([shapely.Polygon([(0, 0), (10, 0), (10, 10)])])
    with pytest.raises(ValueError, match="^x.gpkg: building 1 has 4 vertices but the truth has 5"):
        evaluate.vertex_errors(truth[:1], np.array([1]), simplified, np.array([1]), where="x.gpkg")


def test_swapped_ids_are_refused() -> None:
    truth, true_ids = _row(4), np.array([11, 12, 13, 14])
    labels = shapely.transform(truth, lambda xy: xy + (1.5, -1.0))
    evaluate.vertex_errors(truth, true_ids, labels, true_ids, where="l.gpkg")  # honest: accepted
    swapped = true_ids[[0, 2, 1, 3]]
    with pytest.raises(ValueError, match=r"^l\.gpkg: the labels of buildings 1[23] and 1[23] look swapped: each lies "):
        evaluate.vertex_errors(truth, true_ids, labels, swapped, where="l.gpkg")


def test_honest_noise_in_a_dense_block_is_not_taken_for_a_swap() -> None:
    """The project's noise at twice the default amplitude, on rows of small equal houses 2 px apart."""
    truth = geometry_array([shapely.box(x, y, x + 24, y + 24) for y in range(0, 256, 26) for x in range(0, 256, 26)])
    ids = np.arange(1, len(truth) + 1)
    for seed in range(5):
        field = noise.random_displacement_field((256, 256), 48.0, 30, np.random.default_rng(seed))
        errors, _, stats = evaluate.vertex_errors(truth, ids, noise.misalign(truth, field), ids, tile_shape=(256, 256))
        assert stats.n_buildings == len(truth) and errors.max() > 26  # labels reach their neighbours


def test_labels_outside_their_tile_are_refused() -> None:
    truth, true_ids = _row(3), np.array([1, 2, 3])
    near = shapely.transform(truth, lambda xy: xy + (0.0, -70.0))  # 30 px above the tile: noise can do that
    evaluate.vertex_errors(truth, true_ids, near, true_ids, tile_shape=(60, 130))
    far = shapely.transform(truth, lambda xy: xy + (1024.0, 0.0))  # the next tile's place
    with pytest.raises(ValueError, match=r"^l\.gpkg: 3 \(ids 1, 2, 3\) labels lie more than 64 px outside their 130 x 60 px tile"):
        evaluate.vertex_errors(truth, true_ids, far, true_ids, where="l.gpkg", tile_shape=(60, 130))


def test_curve_and_summary_against_direct_computation() -> None:
    rng = np.random.default_rng(0)
    errors = rng.exponential(5.0, size=1000)
    taus, curve = evaluate.accuracy_curve(errors)
    assert taus[0] == 0 and taus[-1] == 32 and len(taus) == 129
    for i in (0, 10, 40, 128):
        assert curve[i] == pytest.approx(np.mean(errors <= taus[i]))
    m = evaluate.summarize(errors)
    assert m["median_error_px"] == pytest.approx(np.median(errors))
    assert m["frac_within_4px"] == pytest.approx(np.mean(errors <= 4))
    # AUC of the normalised curve = mean over tau of the fraction (trapezoid on the grid)
    expect = np.mean([np.mean(np.minimum(errors, 32) <= t) for t in np.linspace(0, 32, 20001)])
    assert m["auc"] == pytest.approx(expect, abs=2e-3)
    with pytest.raises(ValueError, match="no vertices"):
        evaluate.summarize(np.array([]))


def test_bootstrap_draws_whole_buildings_within_each_city() -> None:
    # one city, buildings A (errors 1, 1) and B (3, 3, 3): a resample is AA, AB or BB with
    # probabilities 1/4, 1/2, 1/4, and only AA has a median of 1
    errors = np.array([1.0, 1.0, 3.0, 3.0, 3.0])
    medians = evaluate.cluster_bootstrap_medians(errors, np.array([7, 7, 8, 8, 8]), np.zeros(5), 4000, seed=0)
    assert medians.shape == (4000, 1) and set(np.unique(medians)) == {1.0, 3.0}
    assert np.mean(medians == 1.0) == pytest.approx(0.25, abs=0.03)
    # each building its own city: every resample keeps both, so the median never changes
    fixed = evaluate.cluster_bootstrap_medians(errors, np.array([7, 7, 8, 8, 8]), np.array([0, 0, 1, 1, 1]), 50, seed=0)
    np.testing.assert_array_equal(fixed, np.median(errors))
    # the same building id in two cities is two buildings
    two = evaluate.cluster_bootstrap_medians(errors, np.zeros(5), np.array(["a", "a", "b", "b", "b"]), 50, seed=0)
    np.testing.assert_array_equal(two, np.median(errors))
    again = evaluate.cluster_bootstrap_medians(errors, np.array([7, 7, 8, 8, 8]), np.zeros(5), 4000, seed=0)
    np.testing.assert_array_equal(medians, again)


def test_bootstrap_of_single_vertices_is_the_ordinary_bootstrap() -> None:
    rng = np.random.default_rng(1)
    errors = rng.exponential(3.0, size=301)
    ours = evaluate.cluster_bootstrap_medians(errors, np.arange(301), np.zeros(301), 3000, seed=2)[:, 0]
    naive = np.median(errors[rng.integers(301, size=(3000, 301))], axis=1)
    assert np.percentile(ours, [2.5, 50, 97.5]) == pytest.approx(np.percentile(naive, [2.5, 50, 97.5]), abs=0.12)


def test_paired_rows_share_each_draw() -> None:
    rng = np.random.default_rng(3)
    before = rng.exponential(3.0, size=40)
    buildings, cities = np.repeat(np.arange(10), 4), np.repeat(["a", "b"], 20)
    medians = evaluate.cluster_bootstrap_medians(np.stack([before, before + 0.5, before]), buildings, cities, 200, seed=4)
    np.testing.assert_allclose(medians[:, 1] - medians[:, 0], 0.5)
    np.testing.assert_array_equal(medians[:, 2], medians[:, 0])
    assert medians[:, 0].std() > 0
    assert evaluate.interval(np.arange(101.0)) == pytest.approx([2.5, 97.5])
    with pytest.raises(ValueError, match="no vertices"):
        evaluate.cluster_bootstrap_medians(np.array([]), np.array([]), np.array([]), 10, seed=0)
