"""The README's benchmark figures equal the committed JSON of the run each row names (bench/results/), and every
committed run records where it came from; docs/performance.md's tables are the suite's own table of the JSON they
name.

A README row reads ``| what | figures | `<file>.json` | `key/path`, ... |``: the figures of the result cell, in order,
are the values at the listed key paths (``/`` between the levels) of ``bench/results/<file>.json``, printed with the
decimals shown (thousands separators allowed). A row not measured yet names the command that measures it in place of
the file, and shows no figure.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from bench.report import format_table
from tests.reliability_fixtures import REPO

RESULTS = REPO / "bench" / "results"
HEADER = "| measurement | result | run (`bench/results/`) | JSON keys |"
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def readme_rows(text: str) -> list[list[str]]:
    """The cells of each row of the README's benchmark table (the table under :data:`HEADER`)."""
    lines = text.splitlines()
    assert lines.count(HEADER) == 1, "the README's benchmark table (its header row) is missing or twice"
    start = lines.index(HEADER) + 2  # header and separator
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def value_at(data: dict[str, Any], path: str) -> Any:
    """The value at ``a/b/c`` of a JSON object."""
    value: Any = data
    for part in path.split("/"):
        assert isinstance(value, dict) and part in value, f"no key {part!r} on the path {path!r}"
        value = value[part]
    return value


def check_row(cells: list[str], folder: Path = RESULTS) -> int:
    """Assert that the figures of one README row equal its JSON values; returns the number of figures checked."""
    what, result, run, keys = cells
    figures = NUMBER.findall(result)
    files = re.findall(r"`([^`]+\.json)`", run)
    if not files:  # not measured yet: the row names the command and shows no figure
        assert run.startswith("to be re-measured: `python -m bench"), (what, run)
        assert not figures, f"{what}: figures without a JSON file"
        return 0
    assert len(files) == 1, (what, run)
    data = json.loads((folder / files[0]).read_text())
    paths = re.findall(r"`([^`]+)`", keys)
    assert len(paths) == len(figures) >= 1, f"{what}: {len(figures)} figures {figures} but keys {paths}"
    for figure, path in zip(figures, paths):
        value = value_at(data, path)
        decimals = len(figure.split(".")[1]) if "." in figure else 0
        assert f"{value:.{decimals}f}" == figure.replace(",", ""), \
            f"{what}: {figure} in the README, {value} at {path} of {files[0]}"
    return len(figures)


def test_every_readme_benchmark_figure_equals_its_json() -> None:
    rows = readme_rows((REPO / "README.md").read_text())
    assert len(rows) >= 5
    checked = sum(check_row(cells) for cells in rows)
    assert checked >= 10


def test_a_figure_that_differs_from_its_json_is_caught(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"eval_s": 1.356, "predict_peak_rss_mb": {"demo": 2211.3}}))
    good = ["eval", "1.36 s, 2,211 MB", "`run.json`", "`eval_s`, `predict_peak_rss_mb/demo`"]
    assert check_row(good, tmp_path) == 2
    with pytest.raises(AssertionError, match="1.37 in the README"):
        check_row(["eval", "1.37 s, 2,211 MB", *good[2:]], tmp_path)
    with pytest.raises(AssertionError, match="2 figures"):
        check_row(["eval", "1.36 s, 2,211 MB", "`run.json`", "`eval_s`"], tmp_path)
    with pytest.raises(AssertionError, match="no key 'paper'"):
        check_row(["eval", "1.36 s", "`run.json`", "`eval_s/paper`"], tmp_path)
    assert check_row(["predict", "not measured", "to be re-measured: `python -m bench --only predict`", ""]) == 0
    with pytest.raises(AssertionError, match="figures without a JSON file"):
        check_row(["predict", "19.8 s", "to be re-measured: `python -m bench --only predict`", ""])


def test_every_committed_run_records_its_provenance() -> None:
    files = sorted(RESULTS.glob("*.json"))
    assert files, "no committed benchmark run"
    for path in files:
        meta = json.loads(path.read_text())["meta"]
        assert re.match(r"\d{4}-\d\d-\d\d", meta["date"]) and path.name.startswith(meta["date"][:10]), path.name
        assert meta["cpu"] and meta["torch"] and meta["command"].startswith("python -m bench"), path.name
        assert "git_commit" in meta and (meta["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}",
                                                                                      meta["git_commit"])), path.name
        assert ("_quick" in path.name) == bool(meta["quick"]), path.name
    assert not (REPO / "bench" / "results.json").exists()  # one file per run, under bench/results/


def test_performance_page_tables_are_the_tables_of_the_runs_it_names() -> None:
    page = (REPO / "docs" / "performance.md").read_text()
    named = sorted(set(re.findall(r"bench/results/([\w.-]+\.json)", page)))
    assert named, "docs/performance.md names no committed run"
    for name in named:
        assert (RESULTS / name).is_file(), f"docs/performance.md names {name}, which is not committed"
        table = format_table(json.loads((RESULTS / name).read_text()))
        assert table in page, f"the table of {name} (bench.report.format_table) is not on docs/performance.md"
