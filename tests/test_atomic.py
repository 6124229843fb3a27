"""Tests for util/atomic.py: a file or folder appears complete under its name, or the old one stays."""

from __future__ import annotations

from pathlib import Path

import pytest

from util.atomic import atomic_file, atomic_folder, write_text


def test_atomic_file_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    write_text(target, "old")
    assert target.read_text() == "old"
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_file(target) as tmp:
            assert tmp.parent == target.parent and tmp.name.endswith("a.json") and tmp.name.startswith(".tmp-")
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["a.json"]
    with atomic_file(target, durable=True) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_atomic_folder_swaps_whole_folders(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        (tmp / "1.txt").write_text("first")
    assert [p.name for p in out.iterdir()] == ["1.txt"]
    with pytest.raises(ValueError):
        with atomic_folder(out) as tmp:
            (tmp / "2.txt").write_text("second")
            raise ValueError("stop")
    assert [p.name for p in out.iterdir()] == ["1.txt"]  # untouched
    with atomic_folder(out) as tmp:
        (tmp / "2.txt").write_text("second")
    assert [p.name for p in out.iterdir()] == ["2.txt"]  # replaced as a whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folder left
