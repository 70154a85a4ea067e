"""Tests of the estimate_density stage (the similarity estimators on the sinusoid toy)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from cadalign.similarity.toy import loglog_slope
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
