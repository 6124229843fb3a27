"""Atomic writes: a file or a folder appears complete under its final name, or not at all.

Every writer of the project goes through these two helpers: the content is written under a temporary sibling name
(same folder, so the final rename never crosses a file system) and renamed over the target with ``os.replace``,
which POSIX makes atomic. A crash, even SIGKILL, leaves the previous file or no file, never a truncated one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_sibling(path: str | Path, kind: str = "tmp") -> Path:
    """``<folder>/.<kind>-<pid>-<name>``: a hidden name beside ``path``, unique per process."""
    path = Path(path)
    return path.with_name(f".{kind}-{os.getpid()}-{path.name}")


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` in one rename.

    The writer may pass the yielded path to any library (``sitk.WriteImage``, ``torch.save``, ``savefig``); the
    temporary name keeps the target's suffix, so format detection by extension still works. On an exception the
    temporary file is removed and ``path`` is left as it was.

    Args:
        path: the final file; its folder is created if missing.
        durable: fsync the file and its folder too, so that the new content also survives a power cut (used for
            checkpoints; a plain rename is atomic for other processes without it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_folder(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder to fill; on success it becomes ``out`` (replacing a previous ``out``).

    The previous folder is moved aside first and deleted only after the new one is in place, so at every moment
    ``out`` is either the old complete folder or the new complete one. On an exception the temporary folder is
    deleted and ``out`` is untouched.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    old = temporary_sibling(out, "old")
    try:
        yield tmp
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
