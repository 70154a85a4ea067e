"""MLflow mirror of the pipeline's DVC metrics, parameters and figures.

DVC's metric and plot files are the source of truth; each stage also logs them to MLflow so
runs can be browsed with ``mlflow ui``. All stage runs of one study are nested under a study
run (tag ``cadalign.study``), found or created on first use.

- Tracking URI: ``MLFLOW_TRACKING_URI``, default ``sqlite:///mlflow.db`` (relative to the
  working directory, the repository root under ``dvc repro``).
- Experiment: ``MLFLOW_EXPERIMENT_NAME``, default ``cadalign``.
- Study: ``CADALIGN_STUDY``, default ``default``.
- Only rank 0 logs (``RANK`` unset or ``0``); other ranks get a run that does nothing.
- The experiment is tagged as model development (``mlflow.experimentKind``), so MLflow 3's UI
  opens it on its runs rather than on the GenAI overview.
- A stage run that a kill left RUNNING is marked KILLED when the same stage of the study
  starts again, so the UI never shows a stage as still running after it died.

The client API is used directly (no global active run), so a failing stage marks its run
FAILED and never leaves a dangling active run behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
STUDY_TAG = "cadalign.study"
ROLE_TAG = "cadalign.role"
STAGE_TAG = "cadalign.stage"
KIND_TAG = "mlflow.experimentKind"
KIND = "custom_model_development"  # MLflow 3's value for classic training experiments
_MAX_PARAM = 6000


def tracking_uri() -> str:
    """The tracking URI in use: ``MLFLOW_TRACKING_URI`` or the repository's SQLite file."""
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def is_rank_zero() -> bool:
    """True unless this process is a non-zero rank of a distributed run."""
    return int(os.environ.get("RANK", "0")) == 0


def _leaves(mapping: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every non-mapping value of nested mappings."""
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _leaves(value, prefix=f"{name}.")
        else:
            yield name, value


def flatten(params: Mapping[str, Any]) -> dict[str, str]:
    """Flatten nested mappings to dotted keys with string values (MLflow params)."""
    return {key: str(value)[:_MAX_PARAM] for key, value in _leaves(params)}


def flatten_numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Flatten nested metric mappings to dotted keys, keeping numeric values only."""
    return {
        key: float(value)
        for key, value in _leaves(metrics)
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class StageRun:
    """Logging handle of one stage run; every method is a no-op when ``run_id`` is None.

    ``study`` is the handle of the study run the stage is nested under (None on other ranks),
    for the few things a stage logs for the whole study (the per-round headline).
    """

    def __init__(self, client: MlflowClient | None, run_id: str | None, study: StageRun | None = None) -> None:
        self.client = client
        self.run_id = run_id
        self.study = study

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.run_id is None or not params:
            return
        items = [Param(k, v) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.run_id is None or not metrics:
            return
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in flatten_numbers(metrics).items()]
        for start in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[start : start + 500])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.run_id is None:
            return
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_figure(self, path: str | Path) -> None:
        """Log a saved figure (PNG/SVG) under ``figures/``."""
        self.log_artifact(path, "figures")

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.run_id is None:
            return
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))


def _artifact_root(uri: str) -> str | None:
    """Artifacts next to a SQLite database file, so tests and users keep them together."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.parent.resolve() / "mlartifacts").as_uri()
    return None


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, artifact_location=_artifact_root(uri), tags={KIND_TAG: KIND})
    if KIND_TAG not in exp.tags:  # stores made before the tag existed
        client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
    return exp.experiment_id


def _mark_killed(client: MlflowClient, experiment_id: str, study: str, stage: str) -> None:
    """Mark runs of ``stage`` in ``study`` that are still RUNNING as KILLED (their process died:
    a stage runs once at a time, and a live one finishes or fails its own run)."""
    found = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{STUDY_TAG}` = '{study}' and tags.`{STAGE_TAG}` = '{stage}' and attributes.status = 'RUNNING'"
        ),
        max_results=100,
    )
    for run in found:
        logger.warning("MLflow run %s (%s) was left RUNNING by a killed stage; marking it KILLED", stage, run.info.run_id)
        client.set_terminated(run.info.run_id, "KILLED")


def compute_tags() -> dict[str, str]:
    """What a run's numbers depend on beyond params and code: torch's version, the CPU code path
    its kernels take (AVX2 and AVX-512 round differently), its thread count, and the GPU if any.
    Runs that differ in these differ by rounding (README, docs/results.md)."""
    tags = {
        "cadalign.torch": torch.__version__,
        "cadalign.cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cadalign.threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        tags["cadalign.gpu"] = torch.cuda.get_device_name()
    return tags


def _study_run_id(client: MlflowClient, experiment_id: str, study: str) -> str:
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{STUDY_TAG}` = '{study}' and tags.`{ROLE_TAG}` = 'study'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"study:{study}", tags={STUDY_TAG: study, ROLE_TAG: "study"})
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any], study: str | None = None) -> Iterator[StageRun]:
    """Open an MLflow run for one stage, nested under the study run, and log ``params``.

    Args:
        stage: stage name shown in the UI (e.g. ``train@2``).
        params: the stage's resolved configuration (nested mappings are flattened).
        study: study name; default ``CADALIGN_STUDY`` or ``default``.

    Yields:
        A :class:`StageRun`. On an exception the run is marked FAILED and the error re-raised.
    """
    if not is_rank_zero():
        yield StageRun(None, None)
        return
    uri = tracking_uri()
    study = study or os.environ.get("CADALIGN_STUDY", "default")
    client = MlflowClient(tracking_uri=uri)
    exp_id = _experiment_id(client, os.environ.get("MLFLOW_EXPERIMENT_NAME", "cadalign"), uri)
    parent = _study_run_id(client, exp_id, study)
    _mark_killed(client, exp_id, study, stage)
    run = client.create_run(
        exp_id,
        run_name=stage,
        tags={"mlflow.parentRunId": parent, STUDY_TAG: study, ROLE_TAG: "stage", STAGE_TAG: stage, **compute_tags()},
    )
    handle = StageRun(client, run.info.run_id, study=StageRun(client, parent))
    logger.info("MLflow run %s (%s) in %s", stage, run.info.run_id, uri)
    try:
        handle.log_params(params)
        yield handle
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")


