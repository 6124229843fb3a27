"""Where a result came from: software versions, the device, the CPU model and the project's git commit.

Recorded in ``results.json`` by ``validation.py`` and in every benchmark JSON (``python -m bench``), so that a
number can be traced to the code and the machine that produced it ("my numbers differ from the paper"). Nothing
here may fail a run: git may be missing, or the code may not sit in a git work tree (an installed copy, an
exported archive); the commit is then ``None``.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

# The project's root: the folder above util/ (a git work tree in a clone, anything else in an installed copy).
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _git(args: list[str], folder: Path) -> str | None:
    """stdout of ``git -C folder <args>``, stripped; ``None`` when git is missing, fails or hangs."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # a status query must not take the index lock
    try:
        proc = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10,
                              env=env)
    except (OSError, subprocess.SubprocessError):  # no git executable, not runnable, or timed out
        return None
    if proc.returncode != 0:  # not a repository, unsafe ownership, or another git error
        return None
    return proc.stdout.strip()


def git_commit(folder: str | Path | None = None) -> str | None:
    """The full commit id checked out in ``folder`` (default: the project's root); ``None`` when unknown."""
    out = _git(["rev-parse", "--verify", "HEAD"], Path(folder) if folder is not None else PROJECT_ROOT)
    return out if out and len(out) >= 40 else None


def git_dirty(folder: str | Path | None = None) -> bool | None:
    """Whether tracked files differ from the commit (untracked files ignored); ``None`` when unknown."""
    out = _git(["status", "--porcelain", "--untracked-files=no"],
               Path(folder) if folder is not None else PROJECT_ROOT)
    return None if out is None else bool(out)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else :func:`platform.processor`, else the machine type."""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def software_versions(device: str = "cpu", folder: str | Path | None = None) -> dict[str, Any]:
    """Versions, device and commit of a run.

    Args:
        device: the torch device the run used (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        folder: the work tree whose commit is recorded (default: the project's root).

    Returns:
        ``python``, ``torch``, ``numpy``, ``cuda`` and ``cudnn`` (the versions torch uses; ``None`` unless the
        device is CUDA), ``device`` (as given), ``device_name`` (the GPU's name on CUDA, else the CPU model),
        ``git_commit`` and ``git_dirty`` (``None`` when git or the repository is absent).
    """
    import numpy
    import torch

    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda and torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(torch.device(device)) if cuda else cpu_name(),
        "git_commit": git_commit(folder),
        "git_dirty": git_dirty(folder),
    }
