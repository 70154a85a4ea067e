"""Atomic file output: write to a temporary sibling, then rename over the target.

A reader (or a rerun of an interrupted stage) never sees a half-written file: either the
old file, or the complete new one. A write that was killed (SIGKILL, power loss) leaves its
temporary sibling behind; the next successful write of the same path removes it.

A directory cannot be renamed over a non-empty one, so replacing a directory takes three
renames-or-deletes: the old one is renamed aside (``.<name>.aside``), the new one renamed in,
then the old one deleted. A kill between the first two leaves the old one aside: the next
write of the same path renames it back before it starts (and deletes an aside left after the
second step), so no output is ever lost. One writer per path at a time.

A write that fails on a full disk raises ``OSError(ENOSPC)`` naming the path, whatever the
writer reported: GDAL's GeoPackage driver, for one, says "no such table: gpkg_contents" when
SQLite could not write its tables. A failure is taken for a full disk when its cause is
ENOSPC or when the disk has less than :data:`FULL_BYTES` free at that moment.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FULL_BYTES = 1 << 20
"""Free bytes under which a failed write is reported as a full disk (the writer's own error is chained)."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` on success.

    The temporary name keeps the suffix of ``path`` so format drivers that look at the
    extension (GDAL, GeoPackage) behave. On error the temporary file is removed and the
    previous ``path`` (if any) is left untouched. Works for files and directories.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    started = time.time()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # let the writer create it (some drivers refuse to overwrite)
    aside = _aside(path)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            os.replace(path, aside)  # kept until the new one is in place
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(aside, path)
                raise
        else:
            os.replace(tmp, path)
    except BaseException as err:
        full = isinstance(err, Exception) and _disk_full(err, path.parent)  # before the partial file is freed
        _remove(tmp)
        if full:
            raise OSError(
                errno.ENOSPC, f"no space left on device writing {path}; free space there and rerun (the writer said: {err})",
                str(path),
            ) from err
        raise
    if aside.exists():
        try:
            shutil.rmtree(aside)
        except OSError as err:  # the new output is in place: the next write removes the old one
            logger.warning("could not remove %s, the previous %s (%s); the next write retries", aside, path, err)
    _remove_leftovers(path, started)


def _disk_full(err: BaseException, folder: Path) -> bool:
    """Whether the failed write ``err`` ran out of disk: ENOSPC in its chain of causes, or
    under :data:`FULL_BYTES` left free on ``folder``'s file system (False for the error of a
    nested write that already said so)."""
    if isinstance(err, OSError) and str(err.strerror).startswith("no space left on device writing"):
        return False  # a nested write already named its path
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free < FULL_BYTES
    except OSError:
        return False


def _aside(path: Path) -> Path:
    """Where the previous directory at ``path`` waits while the new one is renamed in."""
    return path.with_name(f".{path.name}.aside")


def _recover(path: Path) -> None:
    """Finish a directory replacement that a kill interrupted (see the module docstring)."""
    aside = _aside(path)
    if not aside.exists():
        return
    if os.path.lexists(path):
        logger.info("removing %s, the previous %s left by an interrupted write", aside, path)
        _remove(aside)
    else:
        logger.warning("restoring %s from %s, moved aside by an interrupted write", path, aside)
        os.replace(aside, path)


def _remove(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def _remove_leftovers(path: Path, before: float) -> None:
    """Remove temporary siblings of ``path`` that killed writes left, older than ``before``.

    Younger ones may belong to a write still in progress and are kept.
    """
    for leftover in path.parent.glob(f".{glob.escape(path.stem)}.*.tmp{glob.escape(path.suffix)}"):
        try:
            stale = leftover.lstat().st_mtime < before
        except FileNotFoundError:  # removed meanwhile by its own writer
            continue
        if stale:
            logger.info("removing %s, left by an interrupted write of %s", leftover, path)
            _remove(leftover)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
