"""Tests for util/provenance.py: the commit of this work tree, null without git or outside a repository, versions."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from util import provenance


def test_commit_of_this_work_tree_or_none_outside_one(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed here")
    head = subprocess.run(["git", "-C", str(provenance.PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    expected = head.stdout.strip() if head.returncode == 0 else None
    assert provenance.git_commit() == expected
    if expected is not None:
        assert re.fullmatch(r"[0-9a-f]{40}", expected) and provenance.git_dirty() in (True, False)
    assert provenance.git_commit(tmp_path) is None  # not a repository: None, not an error
    assert provenance.git_dirty(tmp_path) is None


def test_no_git_executable_gives_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a folder without git
    assert provenance.git_commit() is None and provenance.git_dirty() is None
    fake = tmp_path / "git"  # a git that fails
    fake.write_text("#!/bin/sh\nexit 128\n")
    fake.chmod(0o755)
    assert provenance.git_commit() is None


def test_software_versions_on_cpu() -> None:
    env = provenance.software_versions("cpu")
    assert env["python"] == platform.python_version() and env["torch"] == torch.__version__
    assert env["numpy"] == np.__version__ and env["device"] == "cpu"
    assert env["cuda"] is None and env["cudnn"] is None  # not used on CPU
    assert env["device_name"] == provenance.cpu_name() and env["device_name"]
    assert env["git_commit"] == provenance.git_commit()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_software_versions_on_cuda() -> None:
    env = provenance.software_versions("cuda:0")
    assert env["cuda"] == torch.version.cuda and env["cudnn"] == torch.backends.cudnn.version()
    assert env["device_name"] == torch.cuda.get_device_name(0)
