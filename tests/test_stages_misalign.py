"""End-to-end tests of the misalign and evaluate stages on a tiny seeded city."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely

from cadalign.config import ConfigError
from cadalign.geo.polygons import PolygonError, read_polygons, to_pixels
from cadalign.geo.tiles import read_info
from cadalign.noise import sample_field
from cadalign.stages import evaluate as evaluate_stage
from cadalign.stages import misalign


def write_params(tmp_path: Path, amplitude: float = 3.0, extra: str = "") -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(
        "cities:\n  tinytown: {source: synthetic, tiles: [1, 2]}\nevaluate: {resamples: 200, seed: 0}\n"
        f"noise:\n  max_displacement: {amplitude}\n  n_bumps: 30\n  seed: 4\n{extra}"
    )
    return path


def run_misalign(tmp_path: Path, city_dir: Path, params: Path) -> dict[str, Path]:
    out = {k: tmp_path / k / "tinytown" for k in ("truth", "labels", "fields")}
    misalign.main(
        ["--params", str(params), "--city", "tinytown", "--city-dir", str(city_dir),
         "--truth-out", str(out["truth"]), "--labels-out", str(out["labels"]), "--fields-out", str(out["fields"])]
    )
    return out


def test_misalign_then_evaluate_matches_field(tmp_path: Path, tiny_city: Path) -> None:
    out = run_misalign(tmp_path, tiny_city, write_params(tmp_path))
    assert sorted(p.name for p in out["labels"].glob("*.gpkg")) == ["tinytown1.gpkg", "tinytown2.gpkg"]
    metrics_path, curve_path = tmp_path / "eval" / "metrics.json", tmp_path / "eval" / "acc.csv"
    evaluate_stage.main(
        ["--params", str(tmp_path / "params.yaml"), "--name", "round0", "--cities-dir", str(tiny_city.parent), "--truth", str(tmp_path / "truth"),
         "--labels", str(tmp_path / "labels"), "--metrics", str(metrics_path), "--curve", str(curve_path),
         "--errors", str(tmp_path / "eval" / "errors.csv")]
    )
    metrics = json.loads(metrics_path.read_text())
    # Independent computation: read the written fields, sample them at the true vertices with
    # rasterio's own sampler (nearest pixel) and take the norm; noise moved each vertex by -D(v).
    norms = []
    for n in (1, 2):
        info = read_info(tiny_city / "images" / f"tinytown{n}.tif")
        truth, _ = to_pixels(read_polygons(out["truth"] / f"tinytown{n}.gpkg"), info.transform, info.crs)
        xy = shapely.get_coordinates(truth)
        with rasterio.open(out["fields"] / f"tinytown{n}.tif") as src:
            assert src.count == 2 and src.dtypes[0] == "float32" and src.crs == info.crs
            world = [info.transform @ (x, y) for x, y in xy]
            d = np.array(list(src.sample(world)))
        norms.append(np.hypot(d[:, 0], d[:, 1]))
    norms = np.concatenate(norms)
    assert metrics["n_vertices"] == len(norms)
    assert metrics["median_error_px"] == pytest.approx(np.median(norms), rel=0.1)
    assert 0 < metrics["median_error_px"] <= 3.0 * np.sqrt(2)
    lines = curve_path.read_text().splitlines()
    assert lines[0] == "tau,accuracy" and len(lines) == 130 and lines[-1].endswith("1.000000")


def test_misalign_is_deterministic_and_rerunnable(tmp_path: Path, tiny_city: Path) -> None:
    params = write_params(tmp_path)
    first = run_misalign(tmp_path / "a", tiny_city, params)
    second = run_misalign(tmp_path / "b", tiny_city, params)
    again = run_misalign(tmp_path / "a", tiny_city, params)  # rerun over existing outputs
    a = read_polygons(first["labels"] / "tinytown1.gpkg").geometry
    b = read_polygons(second["labels"] / "tinytown1.gpkg").geometry
    c = read_polygons(again["labels"] / "tinytown1.gpkg").geometry
    assert a.geom_equals_exact(b, tolerance=0).all() and a.geom_equals_exact(c, tolerance=0).all()


def test_negative_amplitude_is_rejected(tmp_path: Path, tiny_city: Path) -> None:
    with pytest.raises(ConfigError, match="noise.max_displacement >= 0"):
        run_misalign(tmp_path, tiny_city, write_params(tmp_path, amplitude=-2.0))
    assert not (tmp_path / "labels").exists()  # nothing half-written


def test_unknown_noise_key(tmp_path: Path, tiny_city: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'noise.sigma'"):
        run_misalign(tmp_path, tiny_city, write_params(tmp_path, extra="  sigma: 3\n"))


def test_missing_labels_named(tmp_path: Path, tiny_city: Path) -> None:
    run_misalign(tmp_path, tiny_city, write_params(tmp_path))
    (tmp_path / "labels" / "tinytown" / "tinytown2.gpkg").unlink()
    with pytest.raises(FileNotFoundError, match="tinytown2.gpkg"):
        evaluate_stage.main(
            ["--params", str(tmp_path / "params.yaml"), "--name", "r", "--cities-dir", str(tiny_city.parent), "--truth", str(tmp_path / "truth"),
             "--labels", str(tmp_path / "labels"), "--metrics", str(tmp_path / "m.json"), "--curve", str(tmp_path / "c.csv"),
             "--errors", str(tmp_path / "e.csv")]
        )


def test_a_tile_whose_polygons_all_fall_outside_is_refused(tmp_path: Path, tiny_city: Path) -> None:
    """Polygons fetched for a tile that all miss it point to a CRS mistake (issue 26 item 7), not
    to a tile without buildings: moved far away by rewriting tile 2's georeferencing."""
    with rasterio.open(tiny_city / "images" / "tinytown2.tif", "r+") as dst:
        t = dst.transform
        dst.transform = rasterio.Affine(t.a, t.b, t.c + 10000.0, t.d, t.e, t.f)
    polygons = tiny_city / "polygons" / "tinytown2.gpkg"
    with pytest.raises(PolygonError, match=re.escape(f"{polygons}: none of its 4 polygons falls inside its tile; their CRS is EPSG:4326, the tile's EPSG:32631")):
        run_misalign(tmp_path, tiny_city, write_params(tmp_path))
    assert not (tmp_path / "truth" / "tinytown").exists()


def test_renoise_adds_a_second_field(tmp_path: Path, tiny_city: Path) -> None:
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    base = run_misalign(tmp_path / "a", tiny_city, write_params(tmp_path / "a", amplitude=2.0))
    renoised = run_misalign(
        tmp_path / "b", tiny_city, write_params(tmp_path / "b", amplitude=2.0, extra="  renoise_displacement: 2.0\n")
    )
    with rasterio.open(renoised["fields"] / "tinytown1.tif") as src:
        assert src.count == 4 and src.descriptions[2] == "renoise_dx_px"
        extra = src.read((3, 4))
    a = read_polygons(base["labels"] / "tinytown1.gpkg")
    b = read_polygons(renoised["labels"] / "tinytown1.gpkg")
    info = read_info(tiny_city / "images" / "tinytown1.tif")
    (ga, _), (gb, _) = to_pixels(a, info.transform, info.crs), to_pixels(b, info.transform, info.crs)
    xa = shapely.get_coordinates(ga)
    # the re-noised labels are the first labels moved once more by the second field
    np.testing.assert_allclose(shapely.get_coordinates(gb), xa - sample_field(extra, xa), atol=1e-6)
