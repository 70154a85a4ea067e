"""Atomic outputs: a failed or killed write never leaves a half-written target."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from cadalign.atomic import atomic_path, write_json


def test_write_json_round_trips(tmp_path):
    target = tmp_path / "out" / "metrics.json"
    write_json(target, {"median": 1.5})
    assert json.loads(target.read_text()) == {"median": 1.5}
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


def test_error_keeps_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "labels.gpkg"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(target) as tmp:
            assert tmp.suffix == ".gpkg" and tmp.parent == tmp_path
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["labels.gpkg"]


def test_directory_target_is_replaced_whole(tmp_path):
    target = tmp_path / "round1"
    target.mkdir()
    (target / "stale.pt").write_text("x")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "ds4.pt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["ds4.pt"]


def test_leftovers_of_killed_writes_are_removed_by_the_next_write(tmp_path):
    # what a SIGKILL during a write leaves: a temporary sibling, file or directory
    old = time.time() - 60
    killed_dir = tmp_path / ".round3.k1ll3d.tmp"
    killed_dir.mkdir()
    (killed_dir / "ds4.pt").write_text("partial")
    os.utime(killed_dir, (old, old))
    killed_file = tmp_path / ".metrics.k1ll3d.tmp.json"
    killed_file.write_text("{")
    os.utime(killed_file, (old, old))
    other = tmp_path / ".round30.k1ll3d.tmp"  # another output's leftover: not ours to remove
    other.mkdir()
    os.utime(other, (old, old))

    with atomic_path(tmp_path / "round3") as tmp:
        tmp.mkdir()
        (tmp / "ds4.pt").write_text("complete")
    assert not killed_dir.exists()
    assert killed_file.exists() and other.exists()

    write_json(tmp_path / "metrics.json", {})
    assert not killed_file.exists()
    assert other.exists()
    assert (tmp_path / "round3" / "ds4.pt").read_text() == "complete"


def _old_dir(tmp_path):
    target = tmp_path / "round1"
    target.mkdir()
    (target / "ds4.pt").write_text("old")
    return target


def _is_new(src) -> bool:
    """Is ``src`` the temporary directory that atomic_path renames in?"""
    return ".tmp" in Path(src).name


def _write_new(target):
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "ds4.pt").write_text("new")


def test_failed_rename_of_the_new_directory_keeps_the_old_one(tmp_path, monkeypatch):
    target = _old_dir(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if _is_new(src):  # the new one cannot be renamed in
            raise OSError("disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"):
        _write_new(target)
    assert (target / "ds4.pt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["round1"]


def test_a_kill_between_the_renames_loses_nothing(tmp_path, monkeypatch):
    """The process dies right after moving the old directory aside: nothing after runs."""
    target = _old_dir(tmp_path)
    real_replace, killed = os.replace, []

    def replace(src, dst):
        if killed or _is_new(src):  # dead from the rename of the new one on
            killed.append(src)
            raise SystemExit("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SystemExit):
        _write_new(target)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not target.exists()
    kept = [p for p in tmp_path.iterdir() if (p / "ds4.pt").is_file()]
    assert [(p / "ds4.pt").read_text() for p in kept] == ["old"]  # the old output survives, aside
    # the next write puts it back before it starts: a failing writer leaves the old one in place
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(target):
            raise RuntimeError("writer failed")
    assert (target / "ds4.pt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["round1"]


def test_a_failed_delete_of_the_old_directory_keeps_the_new_one(tmp_path, monkeypatch, caplog):
    target = _old_dir(tmp_path)

    def rmtree(path, *args, **kwargs):
        raise PermissionError(f"cannot remove {path}")

    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", rmtree)
        _write_new(target)
    assert (target / "ds4.pt").read_text() == "new"
    assert "could not remove" in caplog.text
    # the next write removes the old one it left aside
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "ds4.pt").write_text("newer")
    assert [p.name for p in tmp_path.iterdir()] == ["round1"]
    assert (target / "ds4.pt").read_text() == "newer"
