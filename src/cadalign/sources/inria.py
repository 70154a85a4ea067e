"""The Inria Aerial Image Labeling dataset: locate or download it, copy out selected tiles.

Official distribution (registration at :data:`REGISTRATION_URL`): five split 7z volumes
``aerialimagelabeling.7z.001``..``.005`` under :data:`BASE_URL`. Together they hold
``NEW2-AerialImageDataset.zip`` (md5 :data:`ZIP_MD5`, as published by torchgeo), which holds
``AerialImageDataset/{train,test}/images/<city><n>.tif`` and ``train/gt/<city><n>.tif``
(0/255 building masks; the test cities have no public masks).

:func:`fetch_city` uses, in this order, ``InriaConfig.root`` (an extracted
``AerialImageDataset`` directory or the zip, no network), a verified zip already in
``download_dir``, or a fresh download of the volumes (resumable, see
:mod:`cadalign.sources.http`). It then copies only the requested tiles.

Split volumes: a split 7z is one archive cut into byte ranges, and py7zr cannot open
volumes itself; it needs one seekable file object. Its documentation pairs it with
``multivolumefile``, but that reader (a) picks up every ``<base>.*`` file next to the
volumes (a leftover ``.part`` download included) and (b) returns short reads at volume
boundaries, which py7zr does not retry, so the archive header is misread ("invalid header
data"). Concatenating the volumes into one file would cost another ~20 GB of disk. So the
volumes are read through :class:`ConcatReader`, an explicit list of files presented as one
read-only raw stream, wrapped in ``io.BufferedReader`` (which retries short reads).

Damaged volumes: each volume is checked as it arrives (its size against the server's
``Content-Length``, see :func:`cadalign.sources.http.download`; the first also against the 7z
start header's own CRC), and the archive's CRCs are checked while the zip is extracted into a
temporary file that becomes the zip only when every check passed. No per-volume checksum is
published, and the damage cannot be placed from the archive (the zip inside is incompressible,
so 7z stores it in raw chunks that only the CRC at the end of the member covers). So a damaged
archive is repaired by downloading the volumes again, once each, in order, and comparing: a
volume that differs from its fresh copy was damaged here; it is replaced, named in the log, and
the extraction retried. If every fresh copy equals the local one, the damage is on the server:
the error says so, names the volumes and what to do.
"""

from __future__ import annotations

import io
import json
import logging
import lzma
import os
import re
import shutil
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
import py7zr
import py7zr.exceptions
import rasterio.features
import shapely
import shapely.geometry

from cadalign.atomic import atomic_path, write_json
from cadalign.geo.polygons import geometry_array
from cadalign.sources.http import download, file_md5

logger = logging.getLogger(__name__)

TRAIN_CITIES = ("austin", "chicago", "kitsap", "tyrol-w", "vienna")
TEST_CITIES = ("bellingham", "bloomington", "innsbruck", "sfo", "tyrol-e")
TILES_PER_CITY = 36
BASE_URL = "https://files.inria.fr/aerialimagelabeling/"
REGISTRATION_URL = "https://project.inria.fr/aerialimagelabeling/"
PARTS = tuple(f"aerialimagelabeling.7z.{i:03d}" for i in range(1, 6))
ZIP_NAME = "NEW2-AerialImageDataset.zip"
ZIP_MD5 = "4b1acfe84ae9961edc1a6049f940380f"
DATASET_DIR = "AerialImageDataset"
SEVEN_ZIP_MAGIC = b"7z\xbc\xaf\x27\x1c"
# What a damaged archive raises in py7zr (the LZMA decoder's own error included).
_ARCHIVE_ERRORS = (
    lzma.LZMAError,
    EOFError,
    py7zr.exceptions.Bad7zFile,
    py7zr.exceptions.CrcError,
    py7zr.exceptions.DecompressionError,
)

_MD5_RE = re.compile(r"^[0-9a-f]{32}$")
_MANUAL_HINT = (
    f"Register at {REGISTRATION_URL}, download the archive by hand, extract {ZIP_NAME} "
    "and set inria.root to the zip (or to the extracted AerialImageDataset folder)."
)


class _ArchiveDamage(Exception):
    """Internal: the volumes fail the archive's own checks (message: py7zr's error)."""


class InriaError(ValueError):
    """The Inria data is missing, incomplete, unsafe to extract, or a request is invalid."""


@dataclass(frozen=True)
class InriaConfig:
    """Where the Inria dataset comes from.

    Attributes:
        root: an existing ``AerialImageDataset`` directory (or its parent) or the
            ``NEW2-AerialImageDataset.zip`` you already have; "" downloads the archive.
        base_url: folder URL holding the split 7z volumes (must end with "/").
        download_dir: where the volumes and the extracted zip are kept (~40 GB) when
            ``root`` is "".
        zip_md5: expected md5 of the inner zip.
        parts: file names of the volumes, in order.
        retries: download retries per volume (per stretch without progress).
        backoff_s: first wait between download retries, doubled each time.
        timeout_s: socket timeout per request.

    In params.yaml, ``root`` and ``zip_md5`` are keys of the ``inria`` section (they say
    which data); the others, which only say how to get it, are in ``download.inria``.
    """

    root: str = ""
    base_url: str = BASE_URL
    download_dir: str = ""
    zip_md5: str = ZIP_MD5
    parts: tuple[str, ...] = PARTS
    retries: int = 5
    backoff_s: float = 5.0
    timeout_s: float = 120.0  # a slow mirror can stall for a while between chunks

    def validate(self) -> None:
        """Raise ValueError on an unusable setting."""
        if not self.base_url.endswith("/"):
            raise ValueError(f"base_url {self.base_url!r} must end with '/'")
        if not _MD5_RE.match(self.zip_md5):
            raise ValueError(f"zip_md5 {self.zip_md5!r} is not 32 lowercase hex digits")
        if not self.parts or any("/" in p or "\\" in p or p in ("", ".", "..") for p in self.parts):
            raise ValueError(f"parts {self.parts!r} must be a non-empty list of plain file names")
        if self.retries < 0 or self.backoff_s < 0 or self.timeout_s <= 0:
            raise ValueError("retries and backoff_s must be >= 0 and timeout_s > 0")


class ConcatReader(io.RawIOBase):
    """Several files read as one seekable, read-only byte stream (split archive volumes)."""

    def __init__(self, paths: list[Path]) -> None:
        super().__init__()
        self._files: list[BinaryIO] = [Path(p).open("rb") for p in paths]
        sizes = [Path(p).stat().st_size for p in paths]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: int(self._starts[-1])}[whence]
        if base + offset < 0:
            raise OSError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        index = int(np.searchsorted(self._starts, self._pos, side="right")) - 1
        if index >= len(self._files):
            return 0
        fh = self._files[index]
        fh.seek(self._pos - int(self._starts[index]))
        n = fh.readinto(buffer)
        self._pos += n
        return n

    def close(self) -> None:
        for fh in self._files:
            fh.close()
        super().close()


def check_member_name(name: str, archive: Path) -> str:
    """Check that an archive member path stays inside the extraction folder.

    Args:
        name: the member name as stored in the archive.
        archive: the archive, for the message.

    Returns:
        ``name`` with "/" separators.

    Raises:
        InriaError: the name is absolute (``/x``, ``C:x``) or contains a ``..`` component.
    """
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix) or ".." in PurePosixPath(posix).parts:
        raise InriaError(
            f"{archive}: refusing member {name!r} (absolute path or '..'): the archive is "
            f"corrupt or malicious; delete it and get the official one from {REGISTRATION_URL}"
        )
    return posix


def _check_city_tiles(city: str, tiles: list[int]) -> None:
    if city not in TRAIN_CITIES + TEST_CITIES:
        raise InriaError(
            f"unknown Inria city {city!r}; valid: train {list(TRAIN_CITIES)}, test {list(TEST_CITIES)}"
        )
    bad = [t for t in tiles if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= TILES_PER_CITY]
    if not tiles or bad:
        raise InriaError(f"tiles for {city}: {bad or 'empty list'} invalid; use integers 1..{TILES_PER_CITY}")


def _verify_zip(path: Path, md5: str, *, delete_bad: bool) -> None:
    """Check the zip's md5, remembering a success in ``<zip>.md5ok`` (size and mtime)."""
    stamp = path.with_name(path.name + ".md5ok")
    stat = path.stat()
    expected = {"md5": md5, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if stamp.is_file() and _read_stamp(stamp) == expected:
        return
    logger.info("checking md5 of %s (%.1f GB)", path, stat.st_size / 1e9)
    actual = file_md5(path)
    if actual != md5:
        if delete_bad:
            path.unlink()
        raise InriaError(
            f"{path}: md5 {actual}, expected {md5}"
            + ("; the bad file was deleted" if delete_bad else "")
            + ". If the download was damaged, delete the volumes in the download folder and rerun; "
            "if the official archive changed, check it and set inria.zip_md5 to the new md5."
        )
    try:
        write_json(stamp, expected)
    except OSError as err:
        logger.warning("cannot record the md5 check in %s (%s); it will be repeated next time", stamp, err)


def _read_stamp(stamp: Path) -> dict | None:
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable %s: %s", stamp, err)
        return None


def check_start_header(path: Path) -> str | None:
    """Check the 7z signature header at the start of the first volume against its own CRC.

    Args:
        path: the first volume (or a whole .7z file).

    Returns:
        None if it is sound, else what is wrong.
    """
    with path.open("rb") as fh:
        head = fh.read(32)
    if len(head) < 32 or not head.startswith(SEVEN_ZIP_MAGIC):
        return f"it does not start with the 7z signature (first bytes {head[:8]!r})"
    (stored,) = struct.unpack("<I", head[8:12])
    if zlib.crc32(head[12:32]) != stored:
        return "the CRC of its 7z start header does not match"
    return None


def _extract_zip_from_volumes(volumes: list[Path], dest: Path) -> None:
    """Extract :data:`ZIP_NAME` from the split 7z ``volumes`` into ``dest`` (atomic rename).

    Raises:
        _ArchiveDamage: the archive fails py7zr's checks (a decoder error, a CRC mismatch, a bad
            header); nothing is left at ``dest``.
    """
    with ConcatReader(volumes) as raw:
        try:
            with py7zr.SevenZipFile(io.BufferedReader(raw), "r") as archive:
                names = [check_member_name(n, volumes[0]) for n in archive.getnames()]
                matches = [n for n in names if PurePosixPath(n).name == ZIP_NAME]
                if not matches:
                    raise InriaError(
                        f"{volumes[0]}: no {ZIP_NAME} in the archive (members: {names[:10]}). {_MANUAL_HINT}"
                    )
                with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".extract-") as tmp:
                    logger.info("extracting %s from %d volumes", matches[0], len(volumes))
                    archive.extract(path=tmp, targets=[matches[0]])
                    Path(tmp, matches[0]).replace(dest)
        except _ARCHIVE_ERRORS as err:
            raise _ArchiveDamage(f"{type(err).__name__}: {err}") from err


def _redownload_differs(volume: Path, cfg: InriaConfig) -> bool:
    """Download ``volume`` again beside it; replace it if the fresh copy differs. True if it did."""
    fresh = volume.with_name(volume.name + ".again")
    fresh.unlink(missing_ok=True)
    logger.warning("%s: downloading it again to compare", volume)
    _get(cfg, volume.name, fresh)
    if file_md5(fresh) == file_md5(volume):
        fresh.unlink()
        return False
    os.replace(fresh, volume)
    logger.warning("%s differed from a fresh download: it was damaged and has been replaced", volume)
    return True


def _get(cfg: InriaConfig, name: str, dest: Path) -> Path:
    return download(
        cfg.base_url + name,
        dest,
        md5=None,  # no per-volume checksum is published; 7z CRCs and the zip md5 cover them
        retries=cfg.retries,
        backoff_s=cfg.backoff_s,
        timeout_s=cfg.timeout_s,
        hint=_MANUAL_HINT,
    )


def _download_volume(cfg: InriaConfig, ddir: Path, name: str, first: bool) -> Path:
    """Download one volume (size checked by :func:`download`); the first is checked against its
    7z start header at once and, if damaged, deleted and downloaded once more."""
    path = _get(cfg, name, ddir / name)
    if not first:
        return path
    problem = check_start_header(path)
    if problem is not None:
        logger.warning("%s: %s; deleting it and downloading it again", path, problem)
        path.unlink()
        problem = check_start_header(_get(cfg, name, path))
        if problem is not None:
            path.unlink()
            raise InriaError(
                f"{path}: {problem}, twice in a row (deleted): {cfg.base_url + name} does not serve "
                f"the 7z archive; check download.inria.base_url and download.inria.parts. {_MANUAL_HINT}"
            )
    return path


def _extract_checked(volumes: list[Path], zip_path: Path, cfg: InriaConfig) -> None:
    """Extract the zip; on damage download the volumes again once each, in order, replacing one
    that differs and retrying at once; raise naming the volumes if the damage stays."""
    todo = list(volumes)
    replaced: list[str] = []
    while True:
        try:
            _extract_zip_from_volumes(volumes, zip_path)
            return
        except _ArchiveDamage as err:
            damage = err
        logger.warning("%s: the 7z archive fails its checks (%s)", volumes[0].parent, damage)
        while todo:
            volume = todo.pop(0)
            if _redownload_differs(volume, cfg):
                replaced.append(volume.name)
                break
        else:
            names = ", ".join(v.name for v in volumes)
            done = f"; {', '.join(replaced)} differed and were replaced" if replaced else ""
            raise InriaError(
                f"{volumes[0].parent}: the 7z archive is damaged ({damage}). Each volume ({names}) was "
                f"downloaded again once{done}, and the copies here now equal those on {cfg.base_url}: "
                f"the damage is in the server's copy (or it changed). Delete the volumes to try again "
                f"later. {_MANUAL_HINT}"
            )


def locate_dataset(cfg: InriaConfig) -> Path:
    """Find (or download and extract) the dataset.

    Args:
        cfg: where to look / what to download.

    Returns:
        Either the ``AerialImageDataset`` directory (holding ``train``/``test``) or the
        verified ``NEW2-AerialImageDataset.zip``.

    Raises:
        FileNotFoundError: ``cfg.root`` is set but does not exist.
        InriaError: neither root nor download_dir set, bad md5, unsafe or incomplete archive.
        cadalign.sources.http.DownloadError: a volume could not be downloaded.
    """
    if cfg.root:
        root = Path(cfg.root)
        if root.is_dir():
            dataset = root / DATASET_DIR if (root / DATASET_DIR).is_dir() else root
            if not any((dataset / split).is_dir() for split in ("train", "test")):
                raise InriaError(f"{root}: no train/ or test/ folder; point inria.root at AerialImageDataset")
            return dataset
        if root.is_file():
            if not zipfile.is_zipfile(root):
                raise InriaError(
                    f"{root}: not a zip file; point inria.root at {ZIP_NAME} or the extracted folder"
                )
            _verify_zip(root, cfg.zip_md5, delete_bad=False)
            return root
        raise FileNotFoundError(f"inria.root {root} does not exist; fix the path or set it to '' to download")
    if not cfg.download_dir:
        raise InriaError(
            f"set inria.root (existing data) or download.inria.dir (to download). {_MANUAL_HINT}"
        )
    ddir = Path(cfg.download_dir)
    zip_path = ddir / ZIP_NAME
    if zip_path.is_file():
        _verify_zip(zip_path, cfg.zip_md5, delete_bad=True)
        return zip_path
    volumes = [_download_volume(cfg, ddir, name, first=k == 0) for k, name in enumerate(cfg.parts)]
    _extract_checked(volumes, zip_path, cfg)
    _verify_zip(zip_path, cfg.zip_md5, delete_bad=True)
    return zip_path


def _zip_index(zf: zipfile.ZipFile, path: Path) -> dict[str, zipfile.ZipInfo]:
    """Members keyed by their path below ``AerialImageDataset/`` (all names checked)."""
    index = {}
    for info in zf.infolist():
        name = check_member_name(info.filename, path)
        parts = PurePosixPath(name).parts
        if DATASET_DIR in parts:
            parts = parts[parts.index(DATASET_DIR) + 1 :]
        index["/".join(parts)] = info
    return index


def _wanted(city: str, tiles: list[int], out_dir: Path) -> Iterator[tuple[str, Path]]:
    """(relative member path, output path) for each requested file."""
    split = "train" if city in TRAIN_CITIES else "test"
    for n in tiles:
        yield f"{split}/images/{city}{n}.tif", out_dir / "images" / f"{city}{n}.tif"
        if split == "train":
            yield f"train/gt/{city}{n}.tif", out_dir / "gt" / f"{city}{n}.tif"


def _copy(src: BinaryIO, size: int, dst: Path) -> None:
    if dst.is_file() and dst.stat().st_size == size:
        logger.info("%s already present", dst)
        return
    with atomic_path(dst) as tmp, tmp.open("wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)


def fetch_city(city: str, tiles: list[int], cfg: InriaConfig, out_dir: Path) -> list[Path]:
    """Copy the requested tiles of one city into ``out_dir/images`` (and ``out_dir/gt``).

    Args:
        city: an Inria city (see :data:`TRAIN_CITIES`, :data:`TEST_CITIES`).
        tiles: tile numbers 1..36.
        cfg: data source settings.
        out_dir: output folder; files land in ``images/<city><n>.tif`` and, for train
            cities, ``gt/<city><n>.tif``, each written atomically (present ones of the right
            size are kept).

    Returns:
        The output paths, image then gt per tile.

    Raises:
        InriaError: unknown city, bad tile number, tiles missing from the data, unsafe
            archive member, bad md5.
        FileNotFoundError: ``cfg.root`` does not exist.
        cadalign.sources.http.DownloadError: the download failed.
    """
    _check_city_tiles(city, tiles)
    if city in TEST_CITIES:
        logger.info("%s is a test city: the dataset has no public building masks; copying images only", city)
    source = locate_dataset(cfg)
    wanted = list(_wanted(city, tiles, Path(out_dir)))
    if source.is_dir():
        missing = [rel for rel, _ in wanted if not (source / rel).is_file()]
        if missing:
            raise InriaError(f"{source}: missing {missing}; the extracted dataset is incomplete")
        for rel, dst in wanted:
            with (source / rel).open("rb") as src:
                _copy(src, (source / rel).stat().st_size, dst)
        return [dst for _, dst in wanted]
    with zipfile.ZipFile(source) as zf:
        index = _zip_index(zf, source)
        missing = [rel for rel, _ in wanted if rel not in index]
        if missing:
            raise InriaError(
                f"{source}: no members {missing}; the zip is incomplete or not the Inria dataset"
            )
        for rel, dst in wanted:
            with zf.open(index[rel]) as src:  # zipfile checks each member's CRC at the end
                _copy(src, index[rel].file_size, dst)
    logger.info("copied %d files of %s to %s", len(wanted), city, out_dir)
    return [dst for _, dst in wanted]


def mask_to_polygons(mask: np.ndarray, tolerance_px: float = 1.0) -> np.ndarray:
    """Vectorise a 0/255 building mask into simplified polygons in pixel coordinates.

    Connected building regions (4-connectivity) become polygons with their holes
    (``rasterio.features.shapes``, identity transform, so x = column, y = row from the
    top-left corner), then are simplified by Douglas-Peucker with topology preserved.

    Args:
        mask: (H, W) array with values 0 (background) and 255 (building).
        tolerance_px: Douglas-Peucker tolerance in pixels (0 keeps the pixel staircase).

    Returns:
        1-D object array of shapely Polygons.

    Raises:
        ValueError: if the mask is not 2-D or holds values other than 0 and 255.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    values = np.unique(mask)
    if not np.isin(values, (0, 255)).all():
        raise ValueError(f"mask must hold only 0 and 255 (Inria gt convention), found {values[:10].tolist()}")
    if tolerance_px < 0:
        raise ValueError(f"tolerance_px must be >= 0, got {tolerance_px}")
    binary = (mask == 255).astype(np.uint8)
    shapes = rasterio.features.shapes(binary, mask=binary.astype(bool))
    polygons = [shapely.geometry.shape(geom) for geom, _ in shapes]
    out = geometry_array(polygons)
    if tolerance_px > 0 and len(out):
        out[:] = shapely.simplify(out, tolerance_px, preserve_topology=True)
    return out
