"""Tests of the sinusoid toy (cadalign.similarity.toy) and its stage (estimate_density)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cadalign.config import ConfigError, from_dict
from cadalign.similarity.toy import ToyConfig, loglog_slope, make_data, make_mlp
from cadalign.stages import estimate_density

TINY = {
    "n_samples": 48,
    "frequencies": [1, 2, 4],
    "n_runs": 2,
    "hidden_width": 8,
    "hidden_layers": 2,
    "steps": 30,
    "batch_size": 16,
    "lr": 0.01,
    "taus": [0.5, 0.9],
    "alphas": [2],
    "grad_chunk": 20,
}


def test_make_data_is_on_the_circle_with_the_sinusoid_target() -> None:
    alpha, x, y = make_data(100, 4.0, np.random.default_rng(3))
    assert np.all(np.diff(alpha) >= 0) and alpha.min() >= 0 and alpha.max() < 1
    np.testing.assert_allclose(x.norm(dim=1).numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(y[:, 0].numpy(), np.sin(8 * np.pi * alpha), atol=1e-6)
    again, _, _ = make_data(100, 16.0, np.random.default_rng(3))
    np.testing.assert_array_equal(alpha, again)  # the frequency does not change the samples


def test_mlp_shape_and_seeded_init() -> None:
    a = make_mlp(64, 6, torch.Generator().manual_seed(1))
    b = make_mlp(64, 6, torch.Generator().manual_seed(1))
    linears = [m for m in a if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2, 64)] + [(64, 64)] * 5 + [(64, 1)]
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_loglog_slope_of_power_law() -> None:
    f = np.array([2.0, 4.0, 8.0, 16.0])
    assert loglog_slope(f, 3000 / f) == pytest.approx(-1.0)
    assert math.isnan(loglog_slope(f, np.array([1.0, 0.0, 1.0, 1.0])))


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="taus"):
        from_dict(ToyConfig, {"taus": [1.5]}, "params.yaml: toy")
    with pytest.raises(ConfigError, match="toy.n_run"):
        from_dict(ToyConfig, {"n_run": 3}, "params.yaml: toy")


def test_stage_runs_tiny_and_writes_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"toy": TINY}))
    out, plots = tmp_path / "out", tmp_path / "plots"
    estimate_density.main(["--params", str(params), "--out-dir", str(out), "--plots-dir", str(plots)])

    metrics = json.loads((out / "metrics.json").read_text())
    keys = {"N_S", "N_tau_0.5", "N_tau_0.9", "N_alpha_2"}
    assert set(metrics["median"]) == keys
    assert set(metrics["median"]["N_S"]) == {"f1", "f2", "f4"}
    per_sample = np.load(out / "per_sample.npz")
    assert per_sample["N_S"].shape == (3, 48) and per_sample["alpha"].shape == (48,)
    # the summary is the median over samples of the stored per-sample medians
    assert metrics["median"]["N_S"]["f2"] == pytest.approx(float(np.median(per_sample["N_S"][1])))
    # counts are bounded by the set size and at least the sample itself (self counted)
    assert np.all(per_sample["N_tau_0.9"] >= 1) and np.all(per_sample["N_tau_0.9"] <= 48)
    slope = loglog_slope(np.array([2.0, 4.0]), np.median(per_sample["N_S"][1:], axis=1))
    assert metrics["slope"]["N_S"] == pytest.approx(slope)
    with (plots / "counts.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["f"] for r in rows] == ["1", "2", "4"] and set(rows[0]) == {"f"} | keys
    assert (plots / "counts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "mlflow.db").is_file()
