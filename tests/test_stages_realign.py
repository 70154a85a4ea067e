"""Tests of the realign stage on the tiny seeded city, with the initialize stage's networks."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import shapely
from studies import run_realign

from cadalign.align import realign as align
from cadalign.config import ConfigError, load_section
from cadalign.geo.polygons import read_polygons, write_polygons
from cadalign.stages import initialize, realign, train
from cadalign.train import load_model


@pytest.fixture
def networks(train_study: dict[str, Path]) -> dict[str, Path]:
    """The tiny study with seeded ds-2 and ds-1 networks where round 1's trained ones would be."""
    initialize.main(["--params", str(train_study["params"]), "--out", str(train_study["models"])])
    return train_study


def _coords(path: Path) -> np.ndarray:
    return shapely.get_coordinates(read_polygons(path).geometry.values)


def test_realign_keeps_ids_and_vertex_order(networks: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        run_realign(networks)
    assert "realign.device = cuda but CUDA is not available" in caplog.text
    for tile in ("tinytown1", "tinytown2"):
        before = read_polygons(networks["round0"] / "tinytown" / f"{tile}.gpkg")
        after = read_polygons(networks["round1"] / "tinytown" / f"{tile}.gpkg")
        assert after.crs == before.crs
        assert after["building_id"].tolist() == before["building_id"].tolist()
        n_before = shapely.get_num_coordinates(before.geometry.values)
        assert shapely.get_num_coordinates(after.geometry.values).tolist() == n_before.tolist()
        moved = np.abs(shapely.get_coordinates(after.geometry.values) - shapely.get_coordinates(before.geometry.values))
        assert moved.max() > 0  # the networks moved the vertices
        assert moved.max() <= 4.0 * 0.3 * (2 + 1) + 1e-6  # at most disp_max_px x sum(factors) px, in metres


def test_refine_passes_the_finest_network_again(networks: dict[str, Path]) -> None:
    run_realign(networks)
    chain = train.training_tiles(networks["cities"], networks["round1"], ["tinytown"])  # pixel coordinates
    networks["params"].write_text(networks["params"].read_text().replace("realign:\n", "realign:\n  refine: 1\n"))
    networks["round1"] = networks["round1"].with_name("refined")
    run_realign(networks)
    refined = train.training_tiles(networks["cities"], networks["round1"], ["tinytown"])
    # independently: the ds-1 network once more on the chain's output
    window = load_section(networks["params"], "realign", realign.RealignStageConfig).window
    net = load_model(networks["models"] / "ds1.pt")
    for t, r in zip(chain, refined, strict=True):
        again = shapely.get_coordinates(align({1: net}, t.image, t.labels, "cpu", window))
        np.testing.assert_allclose(shapely.get_coordinates(r.labels), again, atol=1e-3)
        assert np.abs(again - shapely.get_coordinates(t.labels)).max() > 0
    networks["params"].write_text(networks["params"].read_text().replace("refine: 1", "refine: -1"))
    with pytest.raises(ConfigError, match=r"params.yaml: realign: refine=-1 must be >= 0"):
        run_realign(networks)


def test_large_windows_write_the_labels_of_small_ones(networks: dict[str, Path]) -> None:
    """The tiny study's networks have no GroupNorm: one window per tile and symmetry, batched
    together, moves every vertex as the 16 px windows do (to float error)."""
    text = networks["params"].read_text()
    small = "window: {output_size: 16, batch_size: 4, progress: false}"
    large = "window: {output_size: auto, lattice: fit, window: tukey, overlap: 0.125, batch_size: 16, progress: false"
    networks["params"].write_text(text.replace(small, small.replace("{", "{symmetries: 2, ")))
    run_realign(networks)
    networks["params"].write_text(text.replace(small, large + ", symmetries: 2}"))
    networks["round1"] = networks["round1"].with_name("large")
    run_realign(networks)
    for path in sorted((networks["round0"] / "tinytown").glob("*.gpkg")):
        moved = _coords(networks["round1"].with_name("round1") / "tinytown" / path.name)
        assert np.abs(moved - _coords(path)).max() > 1e-3
        np.testing.assert_allclose(_coords(networks["round1"] / "tinytown" / path.name), moved, atol=1e-5)
    networks["params"].write_text(text.replace(small, small.replace("16", "auto")))
    with pytest.raises(ConfigError, match=r"params.yaml: realign.window: output_size=auto needs lattice=fit"):
        run_realign(networks)


def test_a_tile_without_polygons_is_written_empty(networks: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    empty = networks["round0"] / "tinytown" / "tinytown2.gpkg"
    crs = read_polygons(empty).crs
    write_polygons(empty, np.array([], dtype=object), np.array([], dtype=np.int64), crs)
    with caplog.at_level(logging.WARNING):
        run_realign(networks)
    assert f"{empty}: no polygon in this tile's labels" in caplog.text
    out = read_polygons(networks["round1"] / "tinytown" / "tinytown2.gpkg")
    assert len(out) == 0 and out.crs == crs
    moved = _coords(networks["round1"] / "tinytown" / "tinytown1.gpkg")
    assert np.abs(moved - _coords(networks["round0"] / "tinytown" / "tinytown1.gpkg")).max() > 0


def test_a_failed_rerun_keeps_the_labels_of_the_last_run(
    networks: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_realign(networks)
    first = {p.name: p.read_bytes() for p in (networks["round1"] / "tinytown").iterdir()}
    # other settings, so that a rerun's first tile would differ from the last run's
    networks["params"].write_text(networks["params"].read_text().replace("realign:\n", "realign:\n  refine: 1\n"))
    calls = []

    def fail_on_the_second_tile(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return align(*args, **kwargs)

    monkeypatch.setattr(realign, "realign", fail_on_the_second_tile)
    with pytest.raises(RuntimeError, match="killed"):
        run_realign(networks)
    assert {p.name: p.read_bytes() for p in (networks["round1"] / "tinytown").iterdir()} == first
    # no half-written folder or temporary sibling is left beside the labels
    assert sorted(p.name for p in networks["round1"].parent.iterdir()) == ["round0", "round1"]


def test_realign_without_models(train_study: dict[str, Path]) -> None:
    train_study["models"].mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no networks ds<f>.pt"):
        run_realign(train_study)
