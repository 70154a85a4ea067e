"""Atomic file output: write to a temporary sibling, then rename over the target.

A reader (or a rerun of an interrupted stage) never sees a half-written file: either the
old file, or the complete new one. A write that was killed (SIGKILL, power loss) leaves its
temporary sibling behind; the next successful write of the same path removes it.
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` on success.

    The temporary name keeps the suffix of ``path`` so format drivers that look at the
    extension (GDAL, GeoPackage) behave. On error the temporary file is removed and the
    previous ``path`` (if any) is left untouched. Works for files and directories.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # let the writer create it (some drivers refuse to overwrite)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _remove_leftovers(path, started)


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
