"""The outputs DVC does not cache are kept in git, and git keeps nothing else under data/.

DVC deletes a stage's outputs before it runs; an uncached output (metrics, plots, figures)
has no copy in the DVC cache, so git is where `git checkout` restores it from. A file git
tracks under data/ that no stage writes any more is a stale result a reader would trust.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from dvc.repo import Repo

REPO = Path(__file__).resolve().parents[1]


def _tracked(under: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "--", under], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.fixture(scope="module")
def uncached() -> list[str]:
    """The study's uncached, non-persistent outputs, relative to the repository root."""
    with Repo(str(REPO)) as repo:
        outs = [o for o in repo.index.outs if not o.use_cache and not o.persist]
        return sorted(Path(o.fs_path).relative_to(REPO).as_posix() for o in outs)


def test_every_uncached_output_is_tracked_by_git(uncached: list[str]) -> None:
    assert uncached, "dvc.yaml has no uncached output: the test reads the wrong file"
    missing = [path for path in uncached if not _tracked(path)]
    assert missing == [], f"uncached outputs git does not keep (commit them after `dvc repro`): {missing}"


def test_git_keeps_no_stale_result_under_data(uncached: list[str]) -> None:
    def written(path: str) -> bool:
        return any(path == out or path.startswith(out + "/") for out in uncached)

    stale = [p for p in _tracked("data") if Path(p).name != ".gitignore" and not written(p)]
    assert stale == [], f"files under data/ that no stage writes any more: {stale}"
