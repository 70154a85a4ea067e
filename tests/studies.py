"""Tiny seeded data and studies shared by the tests (the fixtures in conftest.py build them).

- :func:`write_tiny_city`: a few 64x64 GeoTIFF tiles (UTM) with a handful of buildings.
- :func:`train_study`: a tiny city misaligned by the misalign stage, with settings for a few
  CPU training steps; :func:`run_train` and :func:`run_realign` call the stages on it.
- :func:`similarity_study`: labels at known offsets from the truth (plus a seeded shift per
  building), two seeded networks, and the analyze (with the explanation test) and compare
  stages run on them.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely
import torch
from affine import Affine
from rasterio import features

from cadalign.geo.polygons import from_pixels, geometry_array, write_polygons
from cadalign.geo.tiles import read_info, write_geotiff
from cadalign.model import AlignNet, ModelConfig
from cadalign.stages import analyze, compare, misalign, realign, train

TINY_EPSG = 32631  # UTM 31N
TINY_SIZE = 64


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


TINY_TRAIN = """
train:
  factors: [2, 1]
  input_size: 40
  model: {image_widths: [4, 8], poly_widths: [2, 4], deep_supervision_levels: 1}
  optim: {steps: 4, batch_size: 2, checkpoint_every: 2, log_every: 1, num_workers: 0, lr: 0.001}
  patches: {keep_prob: 1.0}
realign:
  device: cuda   # absent in CI: falls back to the CPU with a warning
  window: {output_size: 16, batch_size: 4, progress: false}
evaluate: {resamples: 200, seed: 0}
"""


def train_study(tmp_path: Path, tiny_city: Path) -> dict[str, Path]:
    """The tiny city's truth and noisy labels (misalign stage) and the paths of round 1."""
    params = tmp_path / "params.yaml"
    params.write_text(
        "cities:\n  tinytown: {source: synthetic, tiles: [1, 2]}\n"
        "noise: {max_displacement: 3.0, n_bumps: 30, seed: 4}\n" + TINY_TRAIN
    )
    paths = {
        "params": params,
        "cities": tiny_city.parent,
        "truth": tmp_path / "truth",
        "round0": tmp_path / "labels" / "round0",
        "models": tmp_path / "models" / "round1",
        "ckpt": tmp_path / "ckpt" / "round1",
        "log": tmp_path / "logs" / "round1.csv",
        "round1": tmp_path / "labels" / "round1",
    }
    misalign.main(
        ["--params", str(params), "--city", "tinytown", "--city-dir", str(tiny_city),
         "--truth-out", str(paths["truth"] / "tinytown"), "--labels-out", str(paths["round0"] / "tinytown"),
         "--fields-out", str(tmp_path / "noise" / "tinytown")]
    )
    return paths


def run_train(p: dict[str, Path], labels: str = "round0", init: Path | None = None, round_name: str = "round1") -> None:
    train.main(
        ["--params", str(p["params"]), "--round", round_name, "--cities-dir", str(p["cities"]),
         "--labels", str(p[labels]), "--out", str(p["models"]), "--checkpoints", str(p["ckpt"]), "--log", str(p["log"])]
        + (["--init", str(init)] if init is not None else [])
    )


def run_realign(p: dict[str, Path]) -> None:
    realign.main(
        ["--params", str(p["params"]), "--round", "round1", "--cities-dir", str(p["cities"]),
         "--labels", str(p["round0"]), "--models", str(p["models"]), "--out", str(p["round1"])]
    )


SIM_MODEL = ModelConfig(image_widths=(4, 8), poly_widths=(2, 4), deep_supervision_levels=1)
SIM_PARAMS = """
cities:
  tinytown: {source: synthetic, tiles: [1, 2]}
train:
  factors: [2, 1]
  input_size: 40
  model: {image_widths: [4, 8], poly_widths: [2, 4], deep_supervision_levels: 1}
similarity:
  ds: 1
  patch_size: 33       # not a valid input: rounded to 32 (output 8, margin 12)
  resamples: 200
  n_queries: 4
  k: 2
  chunk_size: 4
  device: cuda         # absent in CI: falls back to the CPU with a warning
"""
SIM_SIZE, SIM_MARGIN = 32, 12
# On the input grid (similarity.grid: input) of a 64 px tile at ds 1: (0,0), (32,0), (0,32) get
# a 4 px box inside their output region [12, 20]; (32,32) only a box crossing its output border.
SIM_GOOD = [(0, 0), (32, 0), (0, 32)]


def _truth_geoms() -> np.ndarray:
    boxes = [shapely.box(x + 14, y + 14, x + 18, y + 18) for x, y in SIM_GOOD]
    return geometry_array(boxes + [shapely.box(40, 40, 60, 60)])


def _write_labels(root: Path, cities: Path, shift: tuple[float, float], spread: float = 0.0, seed: int = 0) -> Path:
    """Truth moved by ``shift`` plus, per building, a seeded normal shift of ``spread`` px."""
    rng = np.random.default_rng(seed)
    for image in sorted((cities / "tinytown" / "images").glob("*.tif")):
        info = read_info(image)
        truth = _truth_geoms()
        per_building = np.repeat(rng.normal(0.0, spread, (len(truth), 2)), shapely.get_num_coordinates(truth), axis=0)
        geoms = shapely.transform(truth, lambda xy: xy + shift + per_building)
        ids = np.arange(len(geoms), dtype=np.int64)
        write_polygons(root / "tinytown" / f"{image.stem}.gpkg", *from_pixels(geoms, ids, info.transform, info.crs))
    return root


def _save_net(path: Path, seed: int) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = AlignNet(SIM_MODEL)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": net.state_dict(), "config": dataclasses.asdict(SIM_MODEL)}, path)


def run_analyze(s: dict[str, Path], name: str, labels: str, after: str) -> Path:
    out = s["root"] / "similarity" / name
    analyze.main(
        ["--params", str(s["params"]), "--round", name, "--cities-dir", str(s["cities"]),
         "--truth", str(s["truth"]), "--labels", str(s[labels]), "--labels-after", str(s[after]),
         "--models", str(s["root"] / "models" / name), "--out", str(out)]
    )
    return out


def similarity_study(root: Path) -> dict[str, Path]:
    """Two rounds of the analyze stage (seeded networks 0 and 1) and the compare stage on them."""
    cities = write_tiny_city(root / "cities").parent
    params = root / "params.yaml"
    params.write_text(SIM_PARAMS)
    s = {
        "root": root,
        "params": params,
        "cities": cities,
        "truth": _write_labels(root / "truth", cities, (0.0, 0.0)),
        "round0": _write_labels(root / "labels" / "round0", cities, (2.0, -2.0), 1.0, 1),
        "round1": _write_labels(root / "labels" / "round1", cities, (-0.5, 0.5), 0.5, 2),
        "round2": _write_labels(root / "labels" / "round2", cities, (0.2, 0.2), 0.3, 3),
    }
    _save_net(root / "models" / "round1" / "ds1.pt", 0)
    _save_net(root / "models" / "round2" / "ds1.pt", 1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    s["out1"] = run_analyze(s, "round1", "round0", "round1")
    s["out2"] = run_analyze(s, "round2", "round1", "round2")
    torch.set_num_threads(before)
    s["compare"] = root / "similarity" / "compare"
    compare.main(
        ["--rounds", f"round1={s['out1']}", f"round2={s['out2']}", "--out", str(s["compare"]),
         "--queries", "2"]
    )
    return s


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header, as dicts."""
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))
