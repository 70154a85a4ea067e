"""Tests of label sets on disk (cadalign.geo.labels): which files, read in pixel coordinates."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import shapely
from studies import tiny_polygons

from cadalign.geo.labels import label_files, load_labelled_tiles
from cadalign.geo.polygons import from_pixels, write_polygons
from cadalign.geo.tiles import TileError, read_info


def _write_labels(labels: Path, cities: Path, city: str = "tinytown", shift: float = 0.0) -> None:
    for image in sorted((cities / city / "images").glob("*.tif")):
        info = read_info(image)
        geoms = shapely.transform(tiny_polygons(), lambda xy: xy + shift)
        ids = np.arange(len(geoms), dtype=np.int64) + 7
        write_polygons(labels / city / f"{image.stem}.gpkg", *from_pixels(geoms, ids, info.transform, info.crs))


def test_label_files_lists_the_study_cities_only(tmp_path: Path, tiny_city: Path) -> None:
    labels = tmp_path / "labels"
    _write_labels(labels, tiny_city.parent)
    (labels / "oldtown").mkdir()
    (labels / "oldtown" / "oldtown1.gpkg").write_bytes(b"a city no longer in params.yaml")
    assert [p.relative_to(labels).as_posix() for p in label_files(labels, ["tinytown"])] == [
        "tinytown/tinytown1.gpkg",
        "tinytown/tinytown2.gpkg",
    ]
    with pytest.raises(FileNotFoundError, match=r"no labels of city 'newtown' under .*labels/newtown/; run the stage"):
        label_files(labels, ["tinytown", "newtown"])


def test_tiles_come_back_in_pixel_coordinates_with_their_images(tmp_path: Path, tiny_city: Path) -> None:
    labels = tmp_path / "labels"
    _write_labels(labels, tiny_city.parent, shift=1.5)
    tiles = load_labelled_tiles(tiny_city.parent, labels, ["tinytown"])
    assert [(t.city, t.name) for t in tiles] == [("tinytown", "tinytown1"), ("tinytown", "tinytown2")]
    want = shapely.get_coordinates(tiny_polygons()) + 1.5
    for t in tiles:
        assert t.tile.image.shape == (64, 64, 3)
        assert t.ids.tolist() == [7, 8, 9, 10]
        np.testing.assert_allclose(shapely.get_coordinates(t.geoms), want, atol=1e-6)


def test_empty_tiles_warn_and_an_empty_set_is_refused(
    tmp_path: Path, tiny_city: Path, caplog: pytest.LogCaptureFixture
) -> None:
    labels = tmp_path / "labels"
    _write_labels(labels, tiny_city.parent)
    files = label_files(labels, ["tinytown"])
    crs = read_info(tiny_city / "images" / "tinytown1.tif").crs
    write_polygons(files[0], np.array([], dtype=object), np.array([], dtype=np.int64), crs)
    with caplog.at_level(logging.WARNING):
        tiles = load_labelled_tiles(tiny_city.parent, labels, ["tinytown"])
    assert f"{files[0]}: no polygon in this tile's labels" in caplog.text
    assert [len(t.geoms) for t in tiles] == [0, 4]
    write_polygons(files[1], np.array([], dtype=object), np.array([], dtype=np.int64), crs)
    with pytest.raises(ValueError, match=r"every label file is empty; the round has nothing to learn from"):
        load_labelled_tiles(tiny_city.parent, labels, ["tinytown"])


def test_a_label_file_without_its_image_names_the_image(tmp_path: Path, tiny_city: Path) -> None:
    labels = tmp_path / "labels"
    _write_labels(labels, tiny_city.parent)
    (tiny_city / "images" / "tinytown2.tif").unlink()
    with pytest.raises(TileError, match=r"tinytown/images/tinytown2\.tif"):
        load_labelled_tiles(tiny_city.parent, labels, ["tinytown"])
