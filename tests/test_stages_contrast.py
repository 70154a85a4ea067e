"""Tests of the contrast stage: the change of the median error between label sets, paired."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely

from cadalign.evaluate import cluster_bootstrap_medians, read_vertex_table
from cadalign.geo.polygons import read_polygons, write_polygons
from cadalign.stages import contrast, evaluate


@pytest.fixture
def study(train_study: dict[str, Path]) -> dict[str, Path]:
    return {**train_study, "root": train_study["params"].parent}


def _shifted(study: dict[str, Path], name: str, dx: float, dy: float) -> Path:
    """The true polygons moved by (dx, dy) px, as a label set."""
    out = study["root"] / "labels" / name
    for path in sorted((study["truth"] / "tinytown").glob("*.gpkg")):
        gdf = read_polygons(path)
        moved = shapely.transform(gdf.geometry.values, lambda xy: xy + (0.3 * dx, -0.3 * dy))
        write_polygons(out / "tinytown" / path.name, moved, gdf["building_id"].to_numpy(), gdf.crs)
    return out


def _errors(study: dict[str, Path], name: str, labels: Path) -> Path:
    folder = study["root"] / "eval" / name
    evaluate.main(
        ["--params", str(study["params"]), "--name", name, "--cities-dir", str(study["cities"]),
         "--truth", str(study["truth"]), "--labels", str(labels), "--metrics", str(folder / "metrics.json"),
         "--curve", str(folder / "accuracy.csv"), "--errors", str(folder / "errors.csv")]
    )
    return folder / "errors.csv"


def _contrast(study: dict[str, Path], errors: dict[str, Path]) -> dict:
    out = study["root"] / "eval" / "changes" / "metrics.json"
    contrast.main(
        ["--params", str(study["params"]), "--errors", *(f"{k}={v}" for k, v in errors.items()), "--metrics", str(out)]
    )
    return json.loads(out.read_text())


def test_uniform_shifts_change_by_the_difference_of_their_lengths(study: dict[str, Path]) -> None:
    errors = {
        "far": _errors(study, "far", _shifted(study, "far", 2.94, 3.92)),  # 4.9 px at every vertex
        "near": _errors(study, "near", _shifted(study, "near", 0.6, 0.8)),  # 1.0 px
        "exact": _errors(study, "exact", study["truth"]),
    }
    changes = _contrast(study, errors)
    assert list(changes) == ["far_to_near", "near_to_exact"]
    for key, (before, after) in {"far_to_near": (4.9, 1.0), "near_to_exact": (1.0, 0.0)}.items():
        for entry in (changes[key], changes[key]["cities"]["tinytown"]):
            assert entry["median_before_px"] == pytest.approx(before, abs=1e-5)
            assert entry["median_change_px"] == pytest.approx(after - before, abs=1e-5)
            assert entry["ci95_low_px"] == pytest.approx(after - before, abs=1e-5)
            assert entry["ci95_high_px"] == pytest.approx(after - before, abs=1e-5)
            assert entry["share_fell"] == 1.0


def test_the_interval_pairs_the_same_buildings(study: dict[str, Path]) -> None:
    noisy = _errors(study, "round0", study["round0"])
    better = _errors(study, "half", _shifted(study, "half", 0.5, 0.0))
    change = _contrast(study, {"round0": noisy, "half": better})["round0_to_half"]
    a, b = read_vertex_table(noisy), read_vertex_table(better)
    medians = cluster_bootstrap_medians(np.stack([a.error_px, b.error_px]), a.building_id, a.city, 200, seed=0)
    deltas = medians[:, 1] - medians[:, 0]
    assert change["median_change_px"] == pytest.approx(np.median(b.error_px) - np.median(a.error_px))
    assert [change["ci95_low_px"], change["ci95_high_px"]] == pytest.approx(np.percentile(deltas, [2.5, 97.5]))
    assert change["share_fell"] == pytest.approx(np.mean(deltas < 0))
    assert change["ci95_low_px"] < change["ci95_high_px"]


def test_other_vertices_and_bad_arguments_are_refused(study: dict[str, Path]) -> None:
    full = _errors(study, "full", study["round0"])
    lines = full.read_text().splitlines()
    part = full.with_name("part.csv")
    part.write_text("\n".join(line for line in lines if ",tinytown2," not in line) + "\n")
    with pytest.raises(ValueError, match=r"part\.csv and .*errors\.csv score other vertices"):
        _contrast(study, {"full": full, "part": part})
    with pytest.raises(ValueError, match=r"--errors names 1 label set\(s\); give at least two"):
        _contrast(study, {"full": full})
    with pytest.raises(ValueError, match=r"--errors 'full': expected NAME=PATH"):
        contrast.main(["--params", str(study["params"]), "--errors", "full", "x=y", "--metrics", str(part)])
    part.write_text(lines[0] + "\n" + lines[1] + ",extra\n")
    with pytest.raises(ValueError, match=r"part\.csv: line 2 has 6 fields, expected 5; rerun the evaluate stage"):
        _contrast(study, {"full": full, "part": part})
    assert not (study["root"] / "eval" / "changes").exists()


def test_eval_dir_takes_the_label_sets_from_rounds_in_params(study: dict[str, Path]) -> None:
    """With --eval-dir the label sets are those of `rounds:` (the input first), not a list given."""
    eval_dir = study["root"] / "eval"
    _errors(study, "round0", study["round0"])
    _errors(study, "round1", _shifted(study, "round1", 0.6, 0.8))
    _errors(study, "round2", study["truth"])
    _errors(study, "round9", study["truth"])  # an earlier study's round, not in params: ignored
    study["params"].write_text(study["params"].read_text() + "rounds: {round2: round1, round1: round0}\n")
    out = study["root"] / "changes" / "metrics.json"
    contrast.main(["--params", str(study["params"]), "--eval-dir", str(eval_dir), "--metrics", str(out)])
    changes = json.loads(out.read_text())
    assert list(changes) == ["round0_to_round1", "round1_to_round2"]
    assert changes["round1_to_round2"]["median_after_px"] == 0.0
    (eval_dir / "round2" / "errors.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"round2/errors\.csv"):
        contrast.main(["--params", str(study["params"]), "--eval-dir", str(eval_dir), "--metrics", str(out)])
