"""`dvc repro` of the whole study on a tiny synthetic city, as a user runs it (slow: ~1-2 min)."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY_STUDY_PARAMS, make_dvc_project


@pytest.mark.slow
def test_dvc_repro_whole_study(tmp_path, monkeypatch) -> None:
    params = (
        "cities:\n  minitown: {source: synthetic, style: dense, tiles: [1]}\n"
        "synthetic: {size: 384, seed: 0}\n"
        "draw: {tile: minitown1, window: [0, 0, 384, 384]}\n" + TINY_STUDY_PARAMS
    )
    proj, dvc = make_dvc_project(tmp_path, params)
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    dvc("repro")
    for k in range(4):
        metrics = json.loads((proj / "data" / "eval" / f"round{k}" / "metrics.json").read_text())
        assert metrics["n_vertices"] > 0 and 0 <= metrics["auc"] <= 1
    shown = json.loads(dvc("metrics", "show", "--json"))
    assert "data/eval/round3/metrics.json" in json.dumps(shown)
    for fig in ("accuracy.png", "overlay.png"):
        assert (proj / "data" / "figures" / fig).read_bytes()[:4] == b"\x89PNG"
    assert (proj / "data" / "models" / "round3" / "ds1.pt").is_file()
    # train.grow: round 1 starts from the coarsest network only
    assert [p.name for p in (proj / "data" / "models" / "round0").iterdir()] == ["ds2.pt"]
    compare = json.loads((proj / "data" / "similarity" / "compare" / "metrics.json").read_text())
    assert set(compare) == {"round1", "round2", "round3"}
    assert all(compare[r]["n_patches"] > 0 for r in compare)
    # a second repro has nothing to do
    assert "Data and pipelines are up to date" in dvc("repro") or "didn't change" in dvc("status")
    # the MLflow mirror: every stage run nested under one study run
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("cadalign")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    study = [r for r in runs if r.data.tags.get("cadalign.role") == "study"]
    stages = {r.info.run_name for r in runs if r.data.tags.get("cadalign.role") == "stage"}
    assert len(study) == 1
    assert {"fetch@minitown", "misalign@minitown", "train@round1", "realign@round3", "evaluate@round3", "draw",
            "analyze@round2", "compare"} <= stages
    train3 = next(r for r in runs if r.info.run_name == "train@round3")
    assert train3.data.tags["mlflow.parentRunId"] == study[0].info.run_id
    assert client.get_metric_history(train3.info.run_id, "ds1.loss")  # per-step losses
