"""Every command-line tool checks its options before any work (util/options.py): one out-of-range option per CLI
gives exit code 2, a single ``error:`` line naming the option, and nothing written."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

import bench.__main__ as bench_cli
from data_preprocessing import chaos, class_slice_index, cmr, phantom, pseudolabel, sabs, verify
from evaluation import baseline, summarize
from launch import demo
from tests.cli_tools import TOOLS, tool_module
from tests.reliability_fixtures import script


def _cases(tmp: Path) -> list[tuple[str, Callable, list[str], str]]:
    out, raw, nowhere = str(tmp / "out"), str(tmp), str(tmp / "nowhere")
    return [
        ("phantom", phantom.main, ["--out", out, "--n-slices-min", "8"],
         r"argument --n-slices-min: must be >= 12, got 8"),
        ("phantom_range", phantom.main, ["--out", out, "--n-slices-min", "20", "--n-slices-max", "14"],
         r"--n-slices-min 20 is larger than --n-slices-max 14"),
        ("pseudolabel", pseudolabel.main, ["--dataset", "PHANTOM", "--data-dir", out, "--workers", "0"],
         r"argument --workers: must be >= 1, got 0"),
        ("class_slice_index", class_slice_index.main, ["--dataset", "PHANTOM", "--data-dir", out, "--min-fg", "0"],
         r"argument --min-fg: must be >= 1, got 0"),
        ("verify", verify.main, ["--dataset", "PHANTOM", "--data-dir", nowhere],
         rf"argument --data-dir: {re.escape(nowhere)}: no such folder"),
        ("chaos", chaos.main, ["--raw", raw, "--out", out, "--workers", "0"], r"argument --workers: must be >= 1"),
        ("sabs", sabs.main, ["--raw", raw, "--out", out, "--workers", "-2"], r"argument --workers: must be >= 1"),
        ("cmr", cmr.main, ["--raw", raw, "--out", out, "--workers", "0"], r"argument --workers: must be >= 1"),
        ("baseline", baseline.main, ["--dataset", "PHANTOM", "--fold", "9"],
         r"--fold 9 is out of range: PHANTOM has \d+ folds"),
        ("baseline_pct", baseline.main, ["--dataset", "PHANTOM", "--high-pct", "120"],
         r"argument --high-pct: must be in \[0, 100\], got 120"),
        ("summarize", summarize.main, [nowhere], rf"argument runs: {re.escape(nowhere)}: no such folder"),
        ("bench", bench_cli.main, ["--device", "tpu", "--out", str(tmp / "bench.json")],
         r"--device must be cpu or cuda\[:index\], got 'tpu'"),
        ("demo", demo.main, ["--steps", "0", "--out", out, "--data-dir", str(tmp / "data")],
         r"argument --steps: must be >= 1, got 0"),
    ]


CASE_IDS = [c[0] for c in _cases(Path("/x"))]


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_out_of_range_option_stops_before_any_work(index: int, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    name, main, argv, message = _cases(tmp_path)[index]
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert re.search(message, lines[0]), lines[0]
    assert lines[0].endswith("--help)")  # points at the usage
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created
    assert captured.out == ""


def test_phantom_real_script(tmp_path: Path) -> None:
    proc = script(["-m", "data_preprocessing.phantom", "--out", str(tmp_path / "ph"), "--n-slices-min", "8"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: argument --n-slices-min: must be >= 12, got 8 (see python -m "
                                   "data_preprocessing.phantom --help)")
    assert not (tmp_path / "ph").exists()


@pytest.mark.parametrize("prog", sorted(TOOLS))
def test_unknown_option_is_one_error_line_for_every_tool(prog: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Every tool's command line (its ``main``) with its required arguments and one unknown option."""
    monkeypatch.chdir(tmp_path)  # the required arguments name relative paths: nothing may appear here
    with pytest.raises(SystemExit) as stop:
        tool_module(prog).main([*TOOLS[prog][1], "--no-such-option"])
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"error: unrecognized arguments: --no-such-option (see {prog} --help)"]
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("prog", ["python predict.py", "python -m data_preprocessing.prepare",
                                  "python -m launch.sweep"])
def test_unknown_option_real_script(prog: str, tmp_path: Path) -> None:
    """The three tools that used to print argparse's two-line usage error, as real interpreters."""
    command = prog.split()[1:]  # "predict.py" or "-m", "<module>"
    required = [str(tmp_path / a) if a in ("o", "c.pth") else a for a in TOOLS[prog][1]]
    proc = script([*command, *required, "--no-such-option"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: unrecognized arguments: --no-such-option (see {prog} --help)"]
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


def test_argparse_tools_do_not_import_sacred() -> None:
    """Only the Sacred scripts load Sacred: importing it costs a second and prints setuptools' pkg_resources warning
    on stderr, which the argparse tools (predict.py, prepare, ...) must not show to their users."""
    import subprocess
    import sys

    modules = sorted({module for module, _ in TOOLS.values()})
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(sorted(m for m in sys.modules if m == 'sacred' or m.startswith('sacred.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip() == "[]", f"a tool imports Sacred: {done.stdout.strip()[:200]}"
    assert "pkg_resources" not in done.stderr
