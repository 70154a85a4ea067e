"""Tests of the compare stage on two rounds of the analyze stage (studies.similarity_study)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from cadalign.stages import compare
from studies import read_rows


def test_compare_overlays_all_rounds(similarity_study: dict[str, Path]) -> None:
    out = similarity_study["compare"]
    rows = read_rows(out / "summary.csv")
    assert [r["round"] for r in rows] == ["round1", "round2"]
    per_round = [json.loads((similarity_study[k] / "metrics.json").read_text()) for k in ("out1", "out2")]
    assert [float(r["N_S_median"]) for r in rows] == pytest.approx([m["N_S_median"] for m in per_round])
    assert set(json.loads((out / "metrics.json").read_text())) == {"round1", "round2", "changes"}
    folders = {"round1": "out1", "round2": "out2", "round3": "out1"}
    rounds = {n: compare.load_round(similarity_study[k]) for n, k in folders.items()}
    fig = compare.ns_distribution_figure({n: r.n_s for n, r in rounds.items()}, 6)
    assert [len(ax.lines) for ax in fig.axes[:1]] == [3]
    hists = {n: r.hist for n, r in rounds.items()}
    fig = compare.query_hist_figure(hists, rounds["round1"].queries.tolist(), 2)
    assert len(fig.axes[0].patches) == 3  # one step outline per round
    for name in ("ns_distribution.png", "query_hist.png"):
        assert matplotlib.image.imread(out / name).ndim == 3


def test_compare_refuses_other_patches(similarity_study: dict[str, Path]) -> None:
    one = compare.load_round(similarity_study["out1"])
    other = dataclasses.replace(one, patches=one.patches[::-1])
    with pytest.raises(ValueError, match="other patches"):
        compare.check_same_patches({"round1": one, "round2": other})


def test_paired_change_equals_hand_bootstrap(similarity_study: dict[str, Path]) -> None:
    """The change of the median N_S: the same resampled patches in both rounds (seed 0, stream 4, 200 draws)."""
    a, b = (np.array([float(r["N_S"]) for r in read_rows(similarity_study[k] / "counts.csv")]) for k in ("out1", "out2"))
    idx = np.random.default_rng([0, 4]).integers(len(a), size=(200, len(a)))
    boot = np.median(b[idx], axis=1) - np.median(a[idx], axis=1)
    (row,) = read_rows(similarity_study["compare"] / "changes.csv")
    assert (row["from"], row["to"]) == ("round1", "round2")
    assert float(row["change"]) == pytest.approx(np.median(b) - np.median(a), abs=1e-9)
    assert [float(row["change_lo"]), float(row["change_hi"])] == pytest.approx(np.percentile(boot, [2.5, 97.5]), abs=1e-9)
    metrics = json.loads((similarity_study["compare"] / "metrics.json").read_text())
    assert metrics["changes"]["round1_to_round2"]["change"] == pytest.approx(float(row["change"]))


def test_compare_refuses_other_bootstrap_settings(similarity_study: dict[str, Path]) -> None:
    one = compare.load_round(similarity_study["out1"])
    other = dataclasses.replace(one, metrics={**one.metrics, "bootstrap_seed": 7.0})
    with pytest.raises(ValueError, match=r"rerun every analyze stage with the same similarity\.resamples and similarity\.seed"):
        compare.median_changes({"round1": one, "round2": other})
