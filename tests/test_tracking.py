"""Tests of the MLflow mirror (a throw-away SQLite store, see conftest)."""

from __future__ import annotations

import os

import pytest
import torch
from mlflow.tracking import MlflowClient

from cadalign.tracking import flatten, flatten_numbers, stage_run, tracking_uri


def test_flatten() -> None:
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}
    assert flatten_numbers({"a": {"b": 1, "s": "x", "t": True}, "e": 2.5}) == {"a.b": 1.0, "e": 2.5}


def test_runs_nest_under_one_study_and_failures_are_marked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CADALIGN_STUDY", "nesting-test")
    with stage_run("one", {"x": {"y": 3}}) as run:
        run.log_metrics({"m": 1.5, "nested": {"k": 2}}, step=4)
    with pytest.raises(RuntimeError, match="boom"), stage_run("two", {}):
        raise RuntimeError("boom")
    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME", "cadalign"))
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`cadalign.study` = 'nesting-test'")
    by_name = {r.info.run_name: r for r in runs}
    study = by_name["study:nesting-test"]
    assert by_name["one"].data.tags["mlflow.parentRunId"] == study.info.run_id
    assert by_name["one"].data.params == {"x.y": "3"}
    assert by_name["one"].data.metrics == {"m": 1.5, "nested.k": 2.0}
    assert client.get_metric_history(by_name["one"].info.run_id, "m")[0].step == 4
    assert by_name["one"].info.status == "FINISHED" and by_name["two"].info.status == "FAILED"


def test_a_stage_run_records_what_its_rounding_depends_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CADALIGN_STUDY", "compute-tags")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with stage_run("one", {}):
            pass
    finally:
        torch.set_num_threads(before)
    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME", "cadalign"))
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`cadalign.stage` = 'one' and tags.`cadalign.study` = 'compute-tags'")
    tags = run.data.tags
    assert tags["cadalign.torch"] == torch.__version__
    assert tags["cadalign.cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert tags["cadalign.threads"] == "1"
    assert ("cadalign.gpu" in tags) == torch.cuda.is_available()


def test_non_zero_rank_logs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("CADALIGN_STUDY", "rank-test")
    with stage_run("quiet", {"a": 1}) as run:
        run.log_metrics({"m": 1.0})
        assert run.run_id is None
    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name("cadalign")
    if exp is not None:
        assert not client.search_runs([exp.experiment_id], filter_string="tags.`cadalign.study` = 'rank-test'")
