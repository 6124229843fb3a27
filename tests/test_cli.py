"""util/cli.py on a toy Sacred experiment: exit codes, the ``error:`` line, the observer's record, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from sacred import Experiment
from sacred.observers import FileStorageObserver

from dataloaders.niftiio import DataFormatError
from util.cli import EXIT_FAILURE, EXIT_OK, EXIT_SIGTERM, EXIT_USER_ERROR, run_cli


def _toy(tmp_path: Path, what: str) -> Experiment:
    ex = Experiment("toy", save_git_info=False)
    ex.observers.append(FileStorageObserver(str(tmp_path / "obs")))

    @ex.config
    def cfg():
        n = 1  # noqa: F841

    @ex.main
    def main(n: int) -> int:
        if what == "project":
            raise DataFormatError("/data/image_3.nii.gz: truncated or corrupt gzip stream")
        if what == "bug":
            raise KeyError("a bug")
        if what == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        return n

    return ex


def _status(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "obs" / "1" / "run.json").read_text())


def test_project_error_is_one_line_and_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(_toy(tmp_path, "project"), ["toy.py"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "error: /data/image_3.nii.gz: truncated or corrupt gzip stream"
    assert "Traceback" not in err
    record = _status(tmp_path)
    assert record["status"] == "FAILED" and "DataFormatError" in "".join(record["fail_trace"])


def test_other_errors_keep_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(_toy(tmp_path, "bug"), ["toy.py"]) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'a bug'" in err and "error: " not in err
    assert _status(tmp_path)["status"] == "FAILED"


def test_debug_flag_raises_the_exception_itself(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="image_3"):
        run_cli(_toy(tmp_path, "project"), ["toy.py", "--debug"])


def test_config_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(_toy(tmp_path, "ok"), ["toy.py", "with", "m=3"]) == EXIT_USER_ERROR
    assert "Added new config entry that is not used anywhere" in capsys.readouterr().err


def test_success_and_sigterm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(_toy(tmp_path / "a", "ok"), ["toy.py"]) == EXIT_OK
    before = signal.getsignal(signal.SIGTERM)
    assert run_cli(_toy(tmp_path, "sigterm"), ["toy.py"]) == EXIT_SIGTERM
    assert "interrupted (SIGTERM); snapshots written so far are complete: continue with resume=True" in \
        capsys.readouterr().err
    assert _status(tmp_path)["status"] == "INTERRUPTED"
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is only installed for the run
