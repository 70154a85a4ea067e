"""Shared fixtures: an isolated MLflow store and a tiny seeded city on disk."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
import shapely.affinity
import torch
from affine import Affine
from rasterio import features

from cadalign.geo.polygons import from_pixels, geometry_array, write_polygons
from cadalign.geo.tiles import write_geotiff

TINY_EPSG = 32631  # UTM 31N
TINY_SIZE = 64


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


def tiny_polygons() -> np.ndarray:
    """A handful of buildings in pixel coordinates of a 64x64 tile: boxes, an L, a courtyard."""
    return geometry_array(
        [
            shapely.box(4, 4, 20, 16),
            shapely.Polygon([(30, 6), (50, 6), (50, 14), (38, 14), (38, 26), (30, 26)]),
            shapely.Polygon(shapely.box(8, 34, 30, 56).exterior, [shapely.box(14, 40, 24, 50).exterior.coords]),
            shapely.box(40, 36, 58, 58),
        ]
    )


def write_tiny_city(root: Path, city: str = "tinytown", n_tiles: int = 2, seed: int = 0) -> Path:
    """Write a seeded tiny city (Inria layout) and return its folder."""
    rng = np.random.default_rng(seed)
    city_dir = root / city
    for n in range(1, n_tiles + 1):
        transform = Affine(0.3, 0, 500000.0 + (n - 1) * TINY_SIZE * 0.3, 0, -0.3, 5000000.0)
        image = rng.integers(60, 120, size=(3, TINY_SIZE, TINY_SIZE), dtype=np.uint8)
        geoms = tiny_polygons()
        ids = np.arange(len(geoms), dtype=np.int64) + 100 * n
        mask = features.rasterize(((g, 255) for g in geoms), out_shape=(TINY_SIZE, TINY_SIZE), dtype="uint8")
        image[:, mask > 0] = 200
        write_geotiff(city_dir / "images" / f"{city}{n}.tif", image, transform, TINY_EPSG)
        write_geotiff(city_dir / "gt" / f"{city}{n}.tif", mask, transform, TINY_EPSG)
        proj, ids, crs = from_pixels(geoms, ids, transform, f"EPSG:{TINY_EPSG}")
        wgs = gpd.GeoSeries(list(proj), crs=f"EPSG:{TINY_EPSG}").to_crs(4326)
        write_polygons(city_dir / "polygons" / f"{city}{n}.gpkg", geometry_array(list(wgs.values)), ids, 4326)
    return city_dir


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
realign:
  device: auto
  window: {output_size: 16, batch_size: 8, progress: false}
similarity: {ds: 2, patch_size: 88, patches_per_tile: 4, n_queries: 2, k: 2, chunk_size: 4, device: cpu}
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
