"""Shared fixtures: an isolated MLflow store, a tiny seeded city on disk, the tiny studies of studies.py."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import shapely
import shapely.affinity
import torch
from studies import similarity_study as _similarity_study
from studies import train_study as _train_study
from studies import write_tiny_city


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``faults`` the tests the fault corpus of issue 26 names (tests/faults/test_fault_corpus.py)."""
    corpus = sys.modules.get("test_fault_corpus")
    if corpus is None:  # the corpus module itself was not collected
        path = Path(__file__).parent / "faults" / "test_fault_corpus.py"
        spec = importlib.util.spec_from_file_location("test_fault_corpus", path)
        corpus = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(corpus)
    named = {f"tests/{test}" for test in corpus.node_ids()}
    for item in items:
        if item.nodeid.split("[")[0] in named or item.nodeid.startswith("tests/faults/"):
            item.add_marker(pytest.mark.faults)


@pytest.fixture(autouse=True, scope="session")
def _mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Point MLflow at a throw-away SQLite store for the whole session."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    mp.setenv("CADALIGN_STUDY", "pytest")
    yield
    mp.undo()


@pytest.fixture
def one_thread() -> None:
    """One torch thread: on a shared 2-core machine, tiny models run far faster without contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_city(tmp_path: Path) -> Path:
    return write_tiny_city(tmp_path / "cities")


# Settings small enough for `dvc repro` of the whole study in tests (CPU, seconds per stage).
TINY_STUDY_PARAMS = """
noise: {max_displacement: 3.0, n_bumps: 30, seed: 1}
train:
  factors: [2, 1]
  input_size: 40
  model: {image_widths: [4, 8], poly_widths: [2, 4], deep_supervision_levels: 1}
  optim: {steps: 3, batch_size: 2, checkpoint_every: 3, log_every: 1, num_workers: 0}
  patches: {keep_prob: 1.0}
  warm_start: true
  grow: true
  round_factors: {round3: [2]}  # round 3 trains (and realigns with) ds 2 alone
realign:
  device: auto
  window: {output_size: 16, batch_size: 8, progress: false}
similarity: {ds: 2, patch_size: 88, patches_per_tile: 4, n_queries: 2, k: 2, chunk_size: 4, device: cpu}
evaluate: {resamples: 200, seed: 0}
rounds: {round1: round0, round2: round1, round3: round2}
"""


def make_dvc_project(root: Path, params: str) -> tuple[Path, Callable[..., str]]:
    """A scratch copy of the project (src, dvc.yaml) with ``params`` as params.yaml.

    Returns the folder and a ``dvc(*args) -> stdout`` runner that fails the test on error.
    """
    repo = Path(__file__).resolve().parents[1]
    proj = root / "proj"
    shutil.copytree(repo / "src", proj / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(repo / "dvc.yaml", proj / "dvc.yaml")
    (proj / "params.yaml").write_text(params)
    def dvc(*args: str) -> str:
        env = {**os.environ, "PYTHONPATH": str(proj / "src"), "CADALIGN_LOG_LEVEL": "WARNING"}
        done = subprocess.run(["dvc", *args], cwd=proj, env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    dvc("init", "--no-scm", "-q")
    return proj, dvc


def seeded_buildings(rng: np.random.Generator, n: int = 40, size: int = 160) -> np.ndarray:
    """Rotated boxes drawn from ``rng``, one building with a courtyard and one MultiPolygon."""
    geoms = []
    for _ in range(n):
        x, y = rng.uniform(5, size - 25, size=2)
        w, h = rng.uniform(5, 18, size=2)
        geoms.append(shapely.affinity.rotate(shapely.box(x, y, x + w, y + h), rng.uniform(0, 90)))
    courtyard = shapely.Polygon(shapely.box(60, 60, 90, 90).exterior, [shapely.box(70, 70, 80, 80).exterior])
    geoms.append(courtyard)
    geoms.append(shapely.MultiPolygon([shapely.box(100, 20, 110, 30), shapely.box(115, 20, 125, 30)]))
    return np.array(geoms, dtype=object)


def max_weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest absolute difference between two networks' weights (same architecture)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


@pytest.fixture
def train_study(tmp_path: Path, tiny_city: Path) -> dict[str, Path]:
    """The tiny city misaligned, with settings for a few training steps (studies.train_study)."""
    return _train_study(tmp_path, tiny_city)


@pytest.fixture(scope="session")
def similarity_study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two analysed rounds and their comparison (studies.similarity_study), built once."""
    return _similarity_study(tmp_path_factory.mktemp("sim"))
