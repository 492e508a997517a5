"""Atomic writes: all or nothing, and files as readable as a plain open() makes them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from netforge.atomic import atomic_path, atomic_write


def test_success_replaces_and_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "w.caffemodel"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as handle:
            handle.write(b"half")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["w.caffemodel"]
    with atomic_write(target) as handle:
        handle.write(b"new")
    assert target.read_bytes() == b"new"


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "a") as handle:
            handle.write(b"x")
        with atomic_path(tmp_path / "b") as tmp:
            tmp.write_bytes(b"y")
    finally:
        os.umask(previous)
    for name in ("a", "b"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
