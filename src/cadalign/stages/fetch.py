"""DVC stage: get one city's tiles and true polygons from its source.

Writes the Inria layout under ``--out``, atomically as a whole folder:
``images/<city><n>.tif`` (RGB GeoTIFF), ``gt/<city><n>.tif`` (0/255 building mask) and
``polygons/<city><n>.gpkg`` (true building footprints with a CRS and ``building_id``).
An Inria city also gets ``osm/<city><n>.gpkg``: the OpenStreetMap buildings over the tile
(EPSG:4326, ids derived from the OSM ids), the real-world labels no one aligned by hand.

Sources (``cities.<name>.source`` in params.yaml), each configured by the params section
of the same name:

- ``synthetic``: the embedded generator (no download).
- ``inria``: the Inria Aerial Image Labeling dataset; the city name is the Inria city
  (training cities only: the controlled experiment needs the ground-truth masks). The
  true polygons are vectorised from the masks; the OSM buildings come from Overpass.
- ``files``: one's own GeoTIFF tiles and vector file of buildings (+ optional masks), named
  in the city's entry (:mod:`cadalign.sources.files`); the images are mapped to RGB uint8
  here, once, so every later stage reads the same pixels.

Usage::

    python -m cadalign.stages.fetch --params params.yaml --city synthville --out data/cities/synthville
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cadalign.atomic import atomic_path
from cadalign.config import CityConfig, ConfigError, FilesCityConfig, load_city, load_section
from cadalign.geo.polygons import from_pixels, write_polygons
from cadalign.geo.tiles import read_band
from cadalign.sources import files, inria, synthetic
from cadalign.sources.osm import OsmConfig, fetch_tile_buildings
from cadalign.stages.common import make_parser, setup_logging
from cadalign.tracking import stage_run

logger = logging.getLogger(__name__)

# Building ids of the vectorised truth: tile n, polygon k -> n * ID_STRIDE + k (as synthetic).
ID_STRIDE = 1_000_000


@dataclass(frozen=True)
class SyntheticConfig:
    """The ``synthetic`` section of params.yaml (shared by all synthetic cities)."""

    size: int = 1024  # tile side in px; 1024 keeps the CPU default fast, Inria tiles are 5000
    seed: int = 0  # combined with the city name, so cities differ
    epsg: int = 32616  # UTM zone 16N, a real projected CRS in metres
    pixel_size: float = 0.3  # m/px, as Inria

    def validate(self) -> None:
        """Raise ValueError on an unusable setting."""
        if self.size < 64:
            raise ValueError(f"size = {self.size}; set synthetic.size >= 64 px")
        if not self.pixel_size > 0:
            raise ValueError(f"pixel_size = {self.pixel_size}; set synthetic.pixel_size > 0 (m/px)")


@dataclass(frozen=True)
class OsmSourceConfig:
    """``inria.osm``: which OSM buildings a tile gets (see :class:`cadalign.sources.osm.OsmConfig`)."""

    endpoint: str = OsmConfig.endpoint
    date: str = OsmConfig.date
    min_expected_buildings: int = 0
    densify_pts: int = OsmConfig.densify_pts

    def validate(self) -> None:
        """Raise ValueError on an unusable setting."""
        OsmConfig(**dataclasses.asdict(self)).validate()


@dataclass(frozen=True)
class InriaSourceConfig:
    """The ``inria`` section of params.yaml: the keys that decide an Inria city's data.

    dvc.yaml tracks the section named by the city's source, so a change here refetches the
    Inria cities; how the data is downloaded (folders, retries, timeouts) is in the
    ``download`` section (:class:`DownloadConfig`), which is no DVC param.

    Attributes:
        root: an extracted ``AerialImageDataset`` folder (or its parent) or the
            ``NEW2-AerialImageDataset.zip`` already at hand; "" downloads the archive.
        zip_md5: expected md5 of the zip (:data:`cadalign.sources.inria.ZIP_MD5`).
        osm: which OSM buildings each tile gets (``inria.osm.*``).
        simplify_px: Douglas-Peucker tolerance (px) when vectorising the gt masks into the
            true polygons; 0 keeps the pixel staircase.
        require_osm_buildings: a tile whose gt mask shows buildings must get at least one
            OSM building; an empty answer there is far more likely a cut-short query than
            an unmapped area. Set false to accept such tiles (their ``osm/`` file is empty).
    """

    root: str = ""
    zip_md5: str = inria.ZIP_MD5
    osm: OsmSourceConfig = field(default_factory=OsmSourceConfig)
    simplify_px: float = 1.0  # about the gt's own edge noise; removes the staircase vertices
    require_osm_buildings: bool = True

    def validate(self) -> None:
        """Raise ValueError on an unusable setting."""
        inria.InriaConfig(zip_md5=self.zip_md5).validate()
        if not self.simplify_px >= 0:
            raise ValueError(f"simplify_px = {self.simplify_px}; set inria.simplify_px >= 0 (px)")


@dataclass(frozen=True)
class InriaDownload:
    """``download.inria``: where the Inria volumes come from and are kept, and how hard to try."""

    dir: str = ""  # the volumes and the zip (~40 GB); "" with inria.root "" is an error
    base_url: str = inria.BASE_URL
    parts: tuple[str, ...] = inria.PARTS
    retries: int = 5
    backoff_s: float = 5.0
    timeout_s: float = 120.0  # a slow mirror can stall for a while between chunks

    def validate(self) -> None:
        """Raise ValueError on an unusable setting."""
        inria.InriaConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k != "dir"}).validate()


@dataclass(frozen=True)
class OverpassDownload:
    """``download.overpass``: where Overpass answers are cached, and how hard to try."""

    cache: str = ""  # one file per tile query and snapshot date, shared by cities; "" = no cache
    retries: int = OsmConfig.retries
    backoff_s: float = OsmConfig.backoff_s
    timeout_s: int = OsmConfig.timeout_s

    def validate(self) -> None:
        """Raise ValueError on an unusable setting."""
        OsmConfig(retries=self.retries, backoff_s=self.backoff_s, timeout_s=self.timeout_s).validate()


@dataclass(frozen=True)
class DownloadConfig:
    """The ``download`` section: how real data is downloaded, never what it is.

    None of it is a DVC param of the fetch stage, so changing a folder, a retry count or a
    timeout refetches nothing; the keys that change the data are in the source's section.
    """

    inria: InriaDownload = field(default_factory=InriaDownload)
    overpass: OverpassDownload = field(default_factory=OverpassDownload)


def source_configs(cfg: InriaSourceConfig, dl: DownloadConfig) -> tuple[inria.InriaConfig, OsmConfig]:
    """The Inria and Overpass settings of the sources, from the ``inria`` and ``download`` sections."""
    archive = inria.InriaConfig(
        root=cfg.root,
        base_url=dl.inria.base_url,
        download_dir=dl.inria.dir,
        zip_md5=cfg.zip_md5,
        parts=dl.inria.parts,
        retries=dl.inria.retries,
        backoff_s=dl.inria.backoff_s,
        timeout_s=dl.inria.timeout_s,
    )
    osm = OsmConfig(
        **dataclasses.asdict(cfg.osm),
        timeout_s=dl.overpass.timeout_s,
        retries=dl.overpass.retries,
        backoff_s=dl.overpass.backoff_s,
        cache_dir=dl.overpass.cache,
    )
    return archive, osm


def fetch_synthetic(name: str, city: CityConfig, cfg: SyntheticConfig, out_dir: Path) -> list[Path]:
    """Generate a synthetic city into ``out_dir`` (written atomically as a whole).

    Args:
        name: the city name (file-name prefix; also seeds the generator with ``cfg.seed``).
        city: its entry of ``cities:`` (tiles, style).
        cfg: the ``synthetic`` section.
        out_dir: the city folder to (re)create.

    Returns:
        The written image paths.
    """
    seed = cfg.seed * 1_000_003 + zlib.crc32(name.encode())
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        written = synthetic.write_city(
            tmp, name, city.tiles, cfg.size, city.style, seed, epsg=cfg.epsg, pixel_size=cfg.pixel_size
        )
    return [out_dir / p.relative_to(tmp) for p in written]


def check_inria_city(name: str) -> None:
    """Refuse a city the controlled experiment cannot use, naming the valid ones.

    Args:
        name: the city name (a key of ``cities:`` whose source is ``inria``).

    Raises:
        cadalign.sources.inria.InriaError: ``name`` is a test city (no public masks) or not
            an Inria city at all.
    """
    training = list(inria.TRAIN_CITIES)
    if name in inria.TEST_CITIES:
        raise inria.InriaError(
            f"city {name!r} is an Inria test city: test cities have no public building masks, and the "
            f"study needs them for its true polygons. Use a training city: {training}"
        )
    if name not in inria.TRAIN_CITIES:
        raise inria.InriaError(
            f"unknown Inria city {name!r} in cities: (the key must be the Inria city name); "
            f"valid: {training} (test cities {list(inria.TEST_CITIES)} have no masks)"
        )


def vectorize_truth(gt_path: Path, out_path: Path, number: int, simplify_px: float) -> tuple[int, bool]:
    """Write the true polygons of one tile, vectorised from its gt mask, in the tile's CRS.

    Args:
        gt_path: the 0/255 mask GeoTIFF.
        out_path: GeoPackage to write (column ``building_id`` = number * 1e6 + k).
        number: the tile number n.
        simplify_px: simplification tolerance in pixels.

    Returns:
        (number of polygons, whether the mask holds any building pixel).

    Raises:
        ValueError: the mask holds values other than 0/255, or more polygons than the id
            scheme allows.
    """
    mask, info = read_band(gt_path)
    try:
        geoms = inria.mask_to_polygons(mask, tolerance_px=simplify_px)
    except ValueError as err:
        raise ValueError(f"{gt_path}: {err}") from err
    if len(geoms) >= ID_STRIDE:
        raise ValueError(
            f"{gt_path}: {len(geoms)} buildings, more than the {ID_STRIDE - 1} ids a tile can have"
        )
    ids = number * ID_STRIDE + np.arange(len(geoms), dtype=np.int64)
    geoms_crs, ids, crs = from_pixels(geoms, ids, info.transform, info.crs)
    write_polygons(out_path, geoms_crs, ids, crs)
    return len(geoms), bool((mask == 255).any())


def fetch_inria(
    name: str, city: CityConfig, cfg: InriaSourceConfig, out_dir: Path, download: DownloadConfig | None = None
) -> dict[str, int]:
    """Fetch one Inria training city into ``out_dir`` (written atomically as a whole).

    Copies the tiles' images and gt masks out of the dataset (see
    :func:`cadalign.sources.inria.fetch_city`), vectorises each mask into the true polygons
    and gets each tile's OSM buildings. What is slow to get is kept outside ``out_dir`` one
    piece at a time (the verified volumes and zip, each tile's Overpass answer), so a rerun
    after a failure on tile k redoes only the local copying and asks Overpass from tile k on.

    Args:
        name: the Inria city (a training city).
        city: its entry of ``cities:`` (tiles).
        cfg: the ``inria`` section.
        out_dir: the city folder to (re)create.
        download: the ``download`` section (default: its defaults).

    Returns:
        Counts for the logs: tiles, true buildings, OSM buildings.

    Raises:
        cadalign.sources.inria.InriaError: a test or unknown city, a bad tile number, a
            missing or damaged dataset.
        cadalign.sources.http.DownloadError: a download or Overpass request failed.
        cadalign.sources.osm.OverpassError: Overpass answered with an error or too few buildings.
    """
    check_inria_city(name)
    archive, osm = source_configs(cfg, download or DownloadConfig())
    counts = {"tiles": len(city.tiles), "buildings": 0, "osm_buildings": 0}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        inria.fetch_city(name, list(city.tiles), archive, tmp)
        for n in tqdm(city.tiles, desc=f"{name}: truth and OSM", unit="tile", disable=len(city.tiles) < 2):
            tile = f"{name}{n}"
            n_true, has_buildings = vectorize_truth(
                tmp / "gt" / f"{tile}.tif", tmp / "polygons" / f"{tile}.gpkg", n, cfg.simplify_px
            )
            needed = None  # None: inria.osm.min_expected_buildings applies
            advice = "If the area is really unmapped, lower inria.osm.min_expected_buildings."
            if has_buildings and cfg.require_osm_buildings:
                needed = max(1, cfg.osm.min_expected_buildings)
                advice = (
                    "Its gt mask shows buildings and inria.require_osm_buildings is true; if OSM really "
                    "lacks them, set inria.require_osm_buildings: false (the tile's osm/ file is then empty)."
                )
            n_osm = fetch_tile_buildings(
                tmp / "images" / f"{tile}.tif", osm, tmp / "osm" / f"{tile}.gpkg", needed,
                name=f"{name}: tile {tile}", advice=advice,
            )
            logger.info("%s: %d true polygons from the mask, %d OSM buildings", tile, n_true, n_osm)
            counts["buildings"] += n_true
            counts["osm_buildings"] += n_osm
    return counts


def fetch_files(name: str, city: FilesCityConfig, cfg: files.FilesConfig, out_dir: Path) -> dict[str, int]:
    """Write a city of one's own files into ``out_dir`` (atomically as a whole; see
    :func:`cadalign.sources.files.write_city`). Returns its counts for the logs."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        return files.write_city(name, city, cfg, tmp, ID_STRIDE)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point (see the module docstring)."""
    parser = make_parser("Fetch (or generate) one city's tiles and true polygons.")
    parser.add_argument("--city", required=True, help="city name (a key of cities: in params.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="output folder of the city")
    args = parser.parse_args(argv)
    setup_logging()
    city = load_city(args.params, args.city)
    cfg: Any
    if city.source == "synthetic":
        if city.style not in synthetic.STYLES:
            raise ConfigError(
                f"{args.params}: cities.{args.city}: style = {city.style!r} is not a synthetic style; "
                f"use one of {', '.join(synthetic.STYLES)}"
            )
        cfg = load_section(args.params, "synthetic", SyntheticConfig)
    elif city.source == "files":
        cfg = load_section(args.params, "files", files.FilesConfig)
    else:
        check_inria_city(args.city)  # before anything is logged or read
        cfg = load_section(args.params, "inria", InriaSourceConfig)
        download = load_section(args.params, "download", DownloadConfig)  # no DVC param: how, not what
    params = {"city": args.city, **dataclasses.asdict(city), city.source: dataclasses.asdict(cfg)}
    with stage_run(f"fetch@{args.city}", params) as run:
        if city.source == "synthetic":
            counts = {"tiles": len(fetch_synthetic(args.city, city, cfg, args.out))}
        elif city.source == "files":
            counts = fetch_files(args.city, city, cfg, args.out)
        else:
            counts = fetch_inria(args.city, city, cfg, args.out, download)
        run.log_metrics(counts)
    logger.info("%s: %s in %s", args.city, counts, args.out)


if __name__ == "__main__":
    main()
