"""Atomic outputs: a failed or killed write never leaves a half-written target."""

from __future__ import annotations

import json
import os
import time

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
