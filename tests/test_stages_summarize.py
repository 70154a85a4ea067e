"""Tests of the summarize stage (the study's headline metrics, mirrored to the MLflow study run),
of the rounds settings it follows, and of the MLflow conventions it relies on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cadalign.config import ConfigError
from cadalign.settings.rounds import label_order, read_rounds
from cadalign.stages import summarize
from cadalign.tracking import KIND, KIND_TAG, STAGE_TAG, STUDY_TAG, stage_run

ROUNDS = {"round1": "round0", "round2": "round1", "round3": "round2"}


def _eval_metrics(median: float) -> dict:
    return {
        "median_error_px": median, "median_ci95_low_px": median - 0.1, "median_ci95_high_px": median + 0.1,
        "auc": 1 - median / 32, "frac_within_2px": 0.2, "frac_within_4px": 0.5, "frac_within_8px": 0.9,
        "n_vertices": 87, "cities": {"a": {"median_error_px": median}},
    }


def _study(root: Path, rounds: dict[str, str], medians: dict[str, float]) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    params = root / "params.yaml"
    params.write_text("rounds:\n" + "".join(f"  {k}: {v}\n" for k, v in rounds.items()))
    for name, median in medians.items():
        (root / "eval" / name).mkdir(parents=True)
        (root / "eval" / name / "metrics.json").write_text(json.dumps(_eval_metrics(median)))
        if name in rounds:
            (root / "sim" / name).mkdir(parents=True)
            (root / "sim" / name / "metrics.json").write_text(json.dumps({"N_S_median": 10 + median, "n_patches": 30}))
    return {"params": params, "eval": root / "eval", "sim": root / "sim", "out": root / "metrics"}


def _run(study: dict[str, Path], *extra: str) -> None:
    summarize.main(
        ["--params", str(study["params"]), "--eval-dir", str(study["eval"]), "--similarity-dir", str(study["sim"]),
         "--out", str(study["out"]), *extra]
    )


@pytest.fixture
def mlflow_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_headline_files_follow_the_rounds_and_hold_the_evaluate_and_analyze_numbers(tmp_path, mlflow_db) -> None:
    medians = {"round0": 7.0, "round1": 2.5, "round2": 2.0, "round3": 1.75}
    study = _study(tmp_path, ROUNDS, medians)
    _run(study)
    assert sorted(p.name for p in study["out"].iterdir()) == [f"round{k}.json" for k in range(4)]
    for name, median in medians.items():
        row = json.loads((study["out"] / f"{name}.json").read_text())
        expected = _eval_metrics(median)
        assert row["median_px"] == median
        assert (row["ci_low"], row["ci_high"]) == (median - 0.1, median + 0.1)
        assert row["auc"] == expected["auc"]
        assert [row["frac_2px"], row["frac_4px"], row["frac_8px"]] == [0.2, 0.5, 0.9]
        # the input labels have no network, so no neighbour count
        assert row.get("median_ns") == (None if name == "round0" else 10 + median)


def test_the_study_run_holds_one_series_point_per_round_and_a_rerun_adds_none(tmp_path, mlflow_db) -> None:
    medians = {"round0": 7.0, "round1": 2.5, "round2": 2.0, "round3": 1.75}
    study = _study(tmp_path, ROUNDS, medians)
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "overlay.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    _run(study, "--figures", str(figures))
    _run(study, "--figures", str(figures))
    client = MlflowClient(mlflow_db)
    exp = client.get_experiment_by_name("cadalign")
    assert exp.tags[KIND_TAG] == KIND  # MLflow 3's UI opens it on its runs
    runs = client.search_runs([exp.experiment_id])
    study_run = next(r for r in runs if r.data.tags.get("cadalign.role") == "study")
    history = client.get_metric_history(study_run.info.run_id, "median_px")
    assert sorted((m.step, m.value) for m in history) == [(0, 7.0), (1, 2.5), (2, 2.0), (3, 1.75)]
    assert [m.step for m in client.get_metric_history(study_run.info.run_id, "median_ns")] == [1, 2, 3]
    assert [a.path for a in client.list_artifacts(study_run.info.run_id, "figures")] == ["figures/overlay.png"]
    stages = [r for r in runs if r.data.tags.get(STAGE_TAG) == "summarize"]
    assert len(stages) == 2 and all(r.data.tags["mlflow.parentRunId"] == study_run.info.run_id for r in stages)


def test_a_two_round_and_a_four_round_study_need_only_params(tmp_path, mlflow_db) -> None:
    two = _study(tmp_path / "two", {"round1": "round0", "round2": "round1"}, {"round0": 5, "round1": 3, "round2": 2})
    _run(two)
    assert sorted(p.stem for p in two["out"].iterdir()) == ["round0", "round1", "round2"]
    four = {"round1": "round0", "round2": "round1", "round3": "round2", "round4": "round3"}
    study = _study(tmp_path / "four", four, {f"round{k}": 5 - k for k in range(5)})
    study["out"].mkdir()
    (study["out"] / "round9.json").write_text("{}")  # left by an earlier study with other rounds
    _run(study)
    assert sorted(p.stem for p in study["out"].iterdir()) == [f"round{k}" for k in range(5)]


def test_a_missing_metrics_file_names_the_file_and_the_stage(tmp_path, mlflow_db) -> None:
    study = _study(tmp_path, ROUNDS, {"round0": 7.0, "round1": 2.5, "round2": 2.0})
    with pytest.raises(FileNotFoundError, match=r"eval/round3/metrics.json is missing; run `dvc repro evaluate@round3`"):
        _run(study)
    (study["sim"] / "round2" / "metrics.json").write_text(json.dumps({"n_patches": 30}))
    (study["eval"] / "round3").mkdir()
    (study["eval"] / "round3" / "metrics.json").write_text(json.dumps(_eval_metrics(1.0)))
    (study["sim"] / "round3").mkdir()
    (study["sim"] / "round3" / "metrics.json").write_text(json.dumps({"N_S_median": 1.0}))
    with pytest.raises(KeyError, match=r"sim/round2/metrics.json has no 'N_S_median'.*rerun analyze@round2"):
        _run(study)


def test_label_order_puts_the_input_first_and_each_round_after_its_labels() -> None:
    assert label_order(ROUNDS) == ["round0", "round1", "round2", "round3"]
    # listed out of order, and a second round trained on the input (a tree, not a chain)
    assert label_order({"b": "a", "a": "input", "c": "input"}) == ["input", "a", "c", "b"]
    with pytest.raises(ConfigError, match=r"rounds \{x: y, y: x\} train on labels that no earlier round writes"):
        label_order({"x": "y", "y": "x"})
    with pytest.raises(ConfigError, match="a cycle"):
        label_order({"round1": "round1"})


def test_read_rounds_refuses_a_missing_mapping_and_unsafe_names(tmp_path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("noise: {seed: 1}\n")
    with pytest.raises(ConfigError, match="'rounds' must be a non-empty mapping"):
        read_rounds(params)
    params.write_text("rounds: {../x: round0}\n")
    with pytest.raises(ConfigError, match=r"invalid round name \(rounds\) '\.\./x'"):
        read_rounds(params)


def test_a_stage_run_left_running_by_a_kill_is_marked_killed_on_the_next_start(tmp_path, mlflow_db) -> None:
    with stage_run("evaluate@round1", {}) as other, stage_run("train@round1", {}) as first:
        client = first.client
        client.update_run(first.run_id, "RUNNING")  # what a SIGKILL leaves: the run never terminated
        with stage_run("train@round1", {}) as second:
            assert client.get_run(first.run_id).info.status == "KILLED"
            assert client.get_run(second.run_id).info.status == "RUNNING"
            assert client.get_run(other.run_id).info.status == "RUNNING"  # another stage is left alone
    assert client.get_run(second.run_id).info.status == "FINISHED"
