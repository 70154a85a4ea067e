"""Tests of the evaluate stage: labels with known errors against the true polygons."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import shapely

from cadalign.evaluate import cluster_bootstrap_medians, read_vertex_table
from cadalign.geo.polygons import read_polygons, write_polygons
from cadalign.stages import evaluate


def _shifted_labels(study: dict[str, Path], out: Path, dx: float, dy: float) -> Path:
    """The true polygons moved by (dx, dy) px (0.3 m pixels; +y is down, i.e. south)."""
    for path in sorted((study["truth"] / "tinytown").glob("*.gpkg")):
        gdf = read_polygons(path)
        moved = shapely.transform(gdf.geometry.values, lambda xy: xy + (0.3 * dx, -0.3 * dy))
        write_polygons(out / "tinytown" / path.name, moved, gdf["building_id"].to_numpy(), gdf.crs)
    return out


def _run(study: dict[str, Path], labels: Path) -> tuple[Path, Path]:
    metrics, curve = study["root"] / "eval" / "metrics.json", study["root"] / "eval" / "accuracy.csv"
    evaluate.main(
        ["--params", str(study["params"]), "--name", "shifted", "--cities-dir", str(study["cities"]),
         "--truth", str(study["truth"]), "--labels", str(labels), "--metrics", str(metrics), "--curve", str(curve),
         "--errors", str(study["root"] / "eval" / "errors.csv")]
    )
    return metrics, curve


@pytest.fixture
def study(train_study: dict[str, Path]) -> dict[str, Path]:
    return {**train_study, "root": train_study["params"].parent}


def test_a_uniform_shift_scores_its_length_at_every_vertex(study: dict[str, Path]) -> None:
    metrics_path, curve_path = _run(study, _shifted_labels(study, study["root"] / "shifted", 2.94, 3.92))
    metrics = json.loads(metrics_path.read_text())
    n_true = sum(
        len(shapely.get_coordinates(read_polygons(p).geometry.values))
        for p in (study["truth"] / "tinytown").glob("*.gpkg")
    )
    n_buildings = sum(len(read_polygons(p)) for p in (study["truth"] / "tinytown").glob("*.gpkg"))
    assert metrics["n_vertices"] == metrics["cities"]["tinytown"]["n_vertices"] == n_true
    assert metrics["n_buildings"] == metrics["cities"]["tinytown"]["n_buildings"] == n_buildings
    for summary in (metrics, metrics["cities"]["tinytown"]):
        assert summary["median_error_px"] == pytest.approx(4.9, abs=1e-6)
        assert summary["mean_error_px"] == pytest.approx(4.9, abs=1e-6)
        assert (summary["frac_within_4px"], summary["frac_within_8px"]) == (0.0, 1.0)
    with curve_path.open() as fh:
        curve = {float(r["tau"]): float(r["accuracy"]) for r in csv.DictReader(fh)}
    assert curve[4.75] == 0.0 and curve[5.0] == 1.0 and curve[32.0] == 1.0
    # the area under a step at 4.9 of [0, 32], by the trapezoid rule on the 0.25 px grid
    assert metrics["auc"] == pytest.approx((32.0 - 5.0 + 0.125) / 32.0)
    assert summary["median_ci95_low_px"] == summary["median_ci95_high_px"] == pytest.approx(4.9, abs=1e-6)
    # the mask-based residual finds the whole-pixel translation nearest to (2.94, 3.92): (3, 4)
    offsets = metrics["mask_offset"]
    assert offsets["n_polygons"] == offsets["cities"]["tinytown"]["n_polygons"] == 8
    assert offsets["median_offset_px"] == pytest.approx(5.0)


def test_errors_csv_lists_every_vertex_and_the_interval_resamples_buildings(study: dict[str, Path]) -> None:
    metrics_path, _ = _run(study, study["round0"])
    table = read_vertex_table(study["root"] / "eval" / "errors.csv")
    # independently: the distance of each label vertex to the true vertex of the same id and index
    expected, where = [], []
    for path in sorted((study["truth"] / "tinytown").glob("*.gpkg")):
        truth = read_polygons(path).set_index("building_id")
        labels = read_polygons(study["round0"] / "tinytown" / path.name).set_index("building_id")
        for bid, geom in truth.geometry.items():
            d = shapely.get_coordinates(labels.geometry[bid]) - shapely.get_coordinates(geom)
            expected += list(np.hypot(d[:, 0], d[:, 1]) / 0.3)
            where += [(path.stem, bid, k) for k in range(len(d))]
    assert list(zip(table.tile, table.building_id, table.vertex, strict=True)) == where
    assert set(table.city) == {"tinytown"}
    np.testing.assert_allclose(table.error_px, expected, atol=1e-5)
    metrics = json.loads(metrics_path.read_text())
    assert metrics["median_error_px"] == pytest.approx(np.median(expected), abs=1e-5)
    medians = cluster_bootstrap_medians(table.error_px, table.building_id, table.city, 200, seed=0)
    low, high = np.percentile(medians, [2.5, 97.5])
    assert (metrics["median_ci95_low_px"], metrics["median_ci95_high_px"]) == pytest.approx((low, high))
    assert low < metrics["median_error_px"] < high


def test_the_truth_scores_zero(study: dict[str, Path]) -> None:
    metrics = json.loads(_run(study, study["truth"])[0].read_text())
    assert metrics["median_error_px"] == 0.0 and metrics["auc"] == 1.0 and metrics["frac_within_1px"] == 1.0


def test_a_missing_tile_names_the_file_and_writes_nothing(study: dict[str, Path]) -> None:
    labels = _shifted_labels(study, study["root"] / "shifted", 1.0, 0.0)
    (labels / "tinytown" / "tinytown2.gpkg").unlink()
    with pytest.raises(FileNotFoundError, match=r"labels missing for tile tinytown2: .*tinytown2\.gpkg; rerun the stage"):
        _run(study, labels)
    assert not (study["root"] / "eval").exists()


def test_empty_labels_and_other_polygons_are_refused(study: dict[str, Path]) -> None:
    labels = _shifted_labels(study, study["root"] / "shifted", 1.0, 0.0)
    for path in (labels / "tinytown").glob("*.gpkg"):
        write_polygons(path, np.array([], dtype=object), np.array([], dtype=np.int64), read_polygons(path).crs)
    with pytest.raises(ValueError, match=r"tinytown1\.gpkg: \d+ \(ids .*\) true buildings of .* have no label"):
        _run(study, labels)
    path = study["truth"] / "tinytown" / "tinytown1.gpkg"
    gdf = read_polygons(path)
    simpler = [g.envelope for g in gdf.geometry.values]  # other vertex counts than the truth's
    write_polygons(labels / "tinytown" / "tinytown1.gpkg", np.array(simpler, dtype=object), gdf["building_id"].to_numpy(), gdf.crs)
    with pytest.raises(ValueError, match=r"tinytown1\.gpkg: building \d+ has \d+ vertices but the truth has \d+"):
        _run(study, labels)


def test_a_missing_or_extra_building_names_the_file_and_writes_nothing(study: dict[str, Path]) -> None:
    labels = _shifted_labels(study, study["root"] / "shifted", 1.0, 0.0)
    path = labels / "tinytown" / "tinytown1.gpkg"
    gdf = read_polygons(path)
    ids = gdf["building_id"].to_numpy()
    write_polygons(path, gdf.geometry.values[1:], ids[1:], gdf.crs)
    truth = study["truth"] / "tinytown" / "tinytown1.gpkg"
    with pytest.raises(ValueError, match=rf"tinytown1\.gpkg: 1 \(ids {ids[0]}\) true buildings of .*tinytown1\.gpkg have no label"):
        _run(study, labels)
    extra = shapely.affinity.translate(gdf.geometry.values[0], 1.0, 0.0)
    write_polygons(path, np.array([*gdf.geometry.values, extra], dtype=object), np.r_[ids, 999], gdf.crs)
    with pytest.raises(ValueError, match=rf"{truth.name}: 1 \(ids 999\) labels have no true building in {truth}"):
        _run(study, labels)
    assert not (study["root"] / "eval").exists()


def test_swapped_ids_are_refused(study: dict[str, Path]) -> None:
    labels = _shifted_labels(study, study["root"] / "shifted", 1.0, 0.0)
    path = labels / "tinytown" / "tinytown1.gpkg"
    gdf = read_polygons(path)
    ids = gdf["building_id"].to_numpy().copy()
    counts = shapely.get_num_coordinates(gdf.geometry.values)
    a, b = next((i, j) for i in range(len(ids)) for j in range(i + 1, len(ids)) if counts[i] == counts[j])
    ids[[a, b]] = ids[[b, a]]
    write_polygons(path, gdf.geometry.values, ids, gdf.crs)
    with pytest.raises(ValueError, match=r"tinytown1\.gpkg: the labels of buildings \d+ and \d+ look swapped"):
        _run(study, labels)
