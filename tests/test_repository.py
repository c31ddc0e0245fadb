"""What a fresh clone must hold: no committed symlinks (one pointing into a developer's worktree, ``data ->
/work/wt/...``, once broke ``make fmnist-data`` on every fresh clone)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tracked_symlinks(root: Path) -> list[str]:
    """Paths that git tracks as symlinks (mode 120000) under ``root``."""
    listing = subprocess.run(
        ["git", "ls-files", "-s"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    return [line.split("\t", 1)[1] for line in listing.splitlines() if line.startswith("120000 ")]


@pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout"
)
def test_the_repository_tracks_no_symlinks() -> None:
    assert tracked_symlinks(ROOT) == []


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_tracked_symlinks_finds_a_committed_link(tmp_path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "data").symlink_to("/elsewhere/data")
    git("add", "file.txt", "data")
    assert tracked_symlinks(tmp_path) == ["data"]
