"""Label sets of a round: ``<labels>/<city>/<tile>.gpkg`` next to ``<cities>/<city>/images/<tile>.tif``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cadalign.geo.polygons import read_polygons, to_pixels
from cadalign.geo.tiles import Tile, read_tile

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class LabelledTile:
    """A tile with one label set in its pixel coordinates."""

    city: str
    name: str
    tile: Tile
    geoms: np.ndarray
    ids: np.ndarray


def label_files(labels_dir: Path, cities: Sequence[str]) -> list[Path]:
    """The ``<city>/<tile>.gpkg`` files of the study's cities in a label set, sorted.

    Folders of cities no longer in params.yaml are ignored.

    Raises:
        FileNotFoundError: if a city's folder is missing or holds no label file.
    """
    files = []
    for city in sorted(cities):
        found = sorted((Path(labels_dir) / city).glob("*.gpkg"))
        if not found:
            raise FileNotFoundError(
                f"no labels of city {city!r} under {labels_dir}/{city}/; run the stage that writes them (dvc repro)"
            )
        files += found
    return files


def load_labelled_tiles(cities_dir: Path, labels_dir: Path, cities: Sequence[str]) -> list[LabelledTile]:
    """Read every labelled tile of the study's cities in a label set, with its image.

    Raises:
        FileNotFoundError: if the label set is empty or an image is missing.
        ValueError: if no tile has any polygon (nothing to learn from or to realign).
    """
    out = []
    for path in label_files(labels_dir, cities):
        city, name = path.parent.name, path.stem
        tile = read_tile(Path(cities_dir) / city / "images" / f"{name}.tif")
        geoms, ids = to_pixels(read_polygons(path), tile.info.transform, tile.info.crs, where=str(path))
        if len(geoms) == 0:
            logger.warning("%s: no polygon in this tile's labels", path)
        out.append(LabelledTile(city=city, name=name, tile=tile, geoms=geoms, ids=ids))
    if not any(len(t.geoms) for t in out):
        raise ValueError(f"{labels_dir}: every label file is empty; the round has nothing to learn from")
    return out
