"""Tests of the draw stage: the study's figures from label sets and accuracy curves."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import pytest
from mlflow.tracking import MlflowClient

from cadalign.config import ConfigError
from cadalign.stages import draw
from cadalign.tracking import tracking_uri


def _run(study: dict[str, Path], out: Path, labels: list[str] | None = None) -> None:
    curves = []
    for name, acc in (("round0", "0.250000"), ("round1", "0.750000")):
        path = study["params"].parent / f"{name}.csv"
        path.write_text(f"tau,accuracy\n0.00,0.000000\n4.00,{acc}\n32.00,1.000000\n")
        curves.append(f"{name}={path}")
    draw.main(
        ["--params", str(study["params"]), "--cities-dir", str(study["cities"]),
         "--labels", *(labels or [f"truth={study['truth']}", f"round0={study['round0']}"]),
         "--curves", *curves, "--out-dir", str(out)]
    )


def _with_draw(study: dict[str, Path], section: str) -> dict[str, Path]:
    study["params"].write_text(study["params"].read_text() + section)
    return study


def test_draw_writes_both_figures_and_logs_them(train_study: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CADALIGN_STUDY", "draw-test")
    study = _with_draw(train_study, "draw: {tile: tinytown2, window: [0, 0, 64, 32]}\n")
    out = study["params"].parent / "figures"
    _run(study, out)
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "overlay.png"]
    overlay = mpimg.imread(out / "overlay.png")
    assert overlay.ndim == 3 and overlay.shape[1] > overlay.shape[0]  # the 64 x 32 px crop is wide
    assert mpimg.imread(out / "accuracy.png").ndim == 3
    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME", "cadalign"))
    (run,) = client.search_runs(
        [exp.experiment_id], filter_string="tags.`cadalign.study` = 'draw-test' and tags.`cadalign.stage` = 'draw'"
    )
    assert run.data.params == {"draw.tile": "tinytown2", "draw.window": "(0, 0, 64, 32)"}
    logged = sorted(a.path for a in client.list_artifacts(run.info.run_id, "figures"))
    assert logged == ["figures/accuracy.png", "figures/overlay.png"]


def test_a_tile_of_no_city_names_the_param(train_study: dict[str, Path]) -> None:
    study = _with_draw(train_study, "draw: {tile: tinytown9}\n")
    with pytest.raises(FileNotFoundError, match=r"draw.tile = 'tinytown9': no tile .*; pick one of tinytown1, tinytown2$"):
        _run(study, study["params"].parent / "figures")
    assert not (study["params"].parent / "figures").exists()


def test_the_tile_is_found_when_the_city_name_ends_in_digits(tmp_path: Path) -> None:
    for city, tile in (("zone2", "zone21"), ("zone", "zone2")):
        (tmp_path / city / "images").mkdir(parents=True)
        (tmp_path / city / "images" / f"{tile}.tif").touch()
    assert draw.find_tile(tmp_path, "zone21") == tmp_path / "zone2" / "images" / "zone21.tif"
    assert draw.find_tile(tmp_path, "zone2") == tmp_path / "zone" / "images" / "zone2.tif"
    (tmp_path / "zone" / "images" / "zone21.tif").touch()  # tile 21 of zone: the same name
    with pytest.raises(ValueError, match=r"draw.tile = 'zone21' names a tile of 2 cities .*; rename one"):
        draw.find_tile(tmp_path, "zone21")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("draw: {window: [0, 0, 64]}\n", r"draw: window = \[0, 0, 64\]; give \[x0, y0, width, height\]"),
        ("draw: {tile: tinytown}\n", r"draw: tile = 'tinytown'; name a tile as <city><number>"),
        ("draw: {tiles: tinytown1}\n", r"unknown key 'draw\.tiles'"),
    ],
)
def test_bad_draw_params_are_named(train_study: dict[str, Path], section: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _run(_with_draw(train_study, section), train_study["params"].parent / "figures")


def test_labels_must_be_name_path_pairs(train_study: dict[str, Path]) -> None:
    study = _with_draw(train_study, "draw: {tile: tinytown1}\n")
    with pytest.raises(ValueError, match=r"--labels 'truth': expected NAME=PATH"):
        _run(study, study["params"].parent / "figures", labels=["truth"])


def test_the_label_sets_come_from_rounds_in_params(train_study: dict[str, Path]) -> None:
    """--labels-dir / --eval-dir draw every label set of `rounds:`; a set missing on disk is named."""
    study = _with_draw(train_study, "draw: {tile: tinytown1, window: [0, 0, 64, 64]}\nrounds: {round1: round0}\n")
    root = study["params"].parent
    labels_dir, eval_dir = study["round0"].parent, root / "eval"
    for name in ("round0", "round1"):
        (eval_dir / name).mkdir(parents=True)
        (eval_dir / name / "accuracy.csv").write_text("tau,accuracy\n0.00,0.000000\n32.00,1.000000\n")
    args = ["--params", str(study["params"]), "--cities-dir", str(study["cities"]), "--truth", str(study["truth"]),
            "--labels-dir", str(labels_dir), "--eval-dir", str(eval_dir), "--out-dir", str(root / "figures")]
    with pytest.raises(Exception, match=r"round1/tinytown/tinytown1\.gpkg"):
        draw.main(args)  # round 1's labels are not there yet
    shutil.copytree(study["round0"], labels_dir / "round1")
    draw.main(args)
    assert sorted(p.name for p in (root / "figures").iterdir()) == ["accuracy.png", "overlay.png"]
    with pytest.raises(SystemExit):
        draw.main(args[:-4] + ["--labels", f"round0={study['round0']}", "--out-dir", str(root / "figures")])
