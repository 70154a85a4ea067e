"""Tests of the per-vertex evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from cadalign import evaluate
from cadalign.geo.polygons import geometry_array


def test_errors_match_by_id_and_vertex() -> None:
    truth = geometry_array([shapely.box(0, 0, 10, 10), shapely.box(20, 20, 30, 30)])
    labels = geometry_array([shapely.affinity.translate(truth[1], 3, 4), shapely.affinity.translate(truth[0], 1, 0)])
    # labels are listed in another order: matching is by id, not position
    errors, stats = evaluate.vertex_errors(truth, np.array([1, 2]), labels, np.array([2, 1]))
    assert stats.n_vertices == 10 and stats.n_missing == 0
    assert sorted(errors.tolist()) == [1.0] * 5 + [5.0] * 5


def test_missing_building_and_bad_vertex_count() -> None:
    truth = geometry_array([shapely.box(0, 0, 10, 10), shapely.box(20, 20, 30, 30)])
    errors, stats = evaluate.vertex_errors(truth, np.array([1, 2]), truth[:1], np.array([1]))
    assert stats.n_missing == 1 and len(errors) == 5
    simplified = geometry_array([shapely.Polygon([(0, 0), (10, 0), (10, 10)])])
    with pytest.raises(ValueError, match="building 1 has 4 vertices but the truth has 5"):
        evaluate.vertex_errors(truth[:1], np.array([1]), simplified, np.array([1]), where="x.gpkg")


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
