"""Smoke test of the benchmark suite with tiny sizes: every required JSON key, a table, the timing helper."""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

import pytest

import bench.__main__ as bench_cli
from bench.measure import BenchError, run_isolated, time_repeated
from bench.report import format_table
from bench.suite import PARTS, SuiteConfig, measure_train_step
from util.provenance import cpu_name, git_commit

REQUIRED = ("train_step_s", "episodes_per_s", "eval_s", "eval_naive_s", "eval_speedup_vs_naive",
            "pseudolabel_s_per_100_slices", "pseudolabel_speedup", "peak_rss_mb")


def tiny_config() -> SuiteConfig:
    """Everything at 64x64 with the light backbone; one repetition per timing."""
    cfg = SuiteConfig(device="cpu", quick=True, models={"paper": ("lite_gn", 64), "demo": ("lite_gn", 64)},
                      size=64, n_scans=6, n_slices=12, eval_fold=2, pipeline_workers=(0,), pipeline_episodes=4,
                      loop_steps=25, ratio_reps=1)
    cfg.reps_min, cfg.reps_max, cfg.budget_s = {"*": 1}, {"*": 1}, {"*": 0.0}
    return cfg


def test_quick_run_writes_every_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench_cli, "quick_config", lambda device: tiny_config())
    out = tmp_path / "results.json"
    assert bench_cli.main(["--quick", "--out", str(out), "--work-dir", str(tmp_path / "work")]) == 0
    res = json.loads(out.read_text())
    for key in REQUIRED:
        assert key in res, key
    assert set(res["train_step_s"]) == {"paper", "demo"}
    assert set(res["train_step_s"]["paper"]) == {"off", "bf16"}  # amp off and on (bf16 on CPU)
    assert set(res["episodes_per_s"]) == {"0"} and res["episodes_per_s"]["0"] > 0
    assert res["eval_speedup_vs_naive"] == pytest.approx(res["eval_naive_s"] / res["eval_s"])
    assert res["eval_same_dice"] is True
    fast, naive = res["measurements"]["eval.fast"], res["measurements"]["eval.naive"]
    assert naive["images_encoded"] == 2 * naive["scored_slices"]  # support + query for every slice
    assert fast["images_encoded"] < naive["images_encoded"]
    workers = res["pseudolabel_workers_all"]
    assert set(res["pseudolabel_s_per_100_slices"]) == {"1", str(workers)}
    assert res["pseudolabel_speedup"] == pytest.approx(
        res["measurements"]["pseudolabels.workers=1"]["seconds"]
        / res["measurements"][f"pseudolabels.workers={workers}"]["seconds"])
    # one peak-RSS figure per measurement, each a plausible process size
    assert set(res["peak_rss_mb"]) == set(res["measurements"])
    assert all(50 < v < 20000 for v in res["peak_rss_mb"].values())
    for key in ("device", "torch", "cpu_count", "load_avg_start", "load_avg_end", "command", "cpu", "cpu_features"):
        assert key in res["meta"], key
    # where the figures come from: the date, the commit (None outside a git work tree), the command as typed
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", res["meta"]["date"])
    assert res["meta"]["git_commit"] == git_commit() and res["meta"]["parts"] == list(PARTS)
    assert res["meta"]["command"] == f"python -m bench --quick --out {out} --work-dir {tmp_path / 'work'}"
    assert res["meta"]["cpu"] == cpu_name()
    # the real training loop around a one-layer encoder, and the paper step before vs after the host-sync-free step
    loop = res["measurements"]["loop.workers=0"]
    assert loop["steps_timed"] == 25 - 20 - 1 and loop["skipped_steps"] == 0 and loop["input_size"] == 64
    assert res["loop_steps_per_s"]["0"] == loop["steps_per_s"] > 0
    ratio = res["measurements"]["train_step.paper.legacy_vs_new"]
    assert res["train_step_ratio_legacy_vs_new"] == pytest.approx(ratio["legacy_s"] / ratio["new_s"])
    assert len(ratio["times_s"]["legacy"]) == len(ratio["times_s"]["new"]) == 1
    table = capsys.readouterr().out
    assert "training loop overhead (one-layer encoder, 64x64, 0 DataLoader workers)" in table
    assert "| evaluation speed-up vs naive |" in table and "episodes/s" in table
    assert format_table(res) in table
    assert sorted(p.name for p in (tmp_path / "work" / "phantom").glob("superpix-MIDDLE_*.nii.gz")) == \
        [f"superpix-MIDDLE_{i}.nii.gz" for i in range(6)]  # --work-dir keeps the phantom and its pseudolabels


def test_cuda_without_cuda_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert bench_cli.main(["--device", "cuda", "--quick"]) == 2
    assert capsys.readouterr().err.strip() == "error: --device cuda: CUDA is not available here (use --device cpu)"


def test_time_repeated_respects_counts_and_budget() -> None:
    calls: list[int] = []
    times = time_repeated(lambda: calls.append(1), "cpu", warmup=2, reps_min=3, reps_max=6, budget_s=0.0)
    assert len(times) == 3 and len(calls) == 5  # 2 warm-up + reps_min (the budget is already spent)
    times = time_repeated(lambda: calls.append(1), "cpu", warmup=0, reps_min=1, reps_max=4, budget_s=1e9)
    assert len(times) == 4
    with pytest.raises(BenchError):
        time_repeated(lambda: None, "cpu", warmup=0, reps_min=0, reps_max=1, budget_s=1.0)


def test_train_step_options_in_process() -> None:
    res = run_isolated(measure_train_step, "lite_gn", 64, "cpu", batch_size=2, channels_last=True, warmup=0,
                       reps_min=2, reps_max=2, budget_s=0.0, isolate=False)
    assert res["median_s"] > 0 and len(res["times_s"]) == 2 and res["peak_rss_mb"] > 50
    assert res["batch_size"] == 2 and res["channels_last"] and res["amp"] == "off"


def test_only_runs_the_selected_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_cli, "quick_config", lambda device: tiny_config())
    out = tmp_path / "only.json"
    assert bench_cli.main(["--quick", "--only", "eval,pipeline", "--out", str(out), "--work-dir",
                           str(tmp_path / "work")]) == 0
    res = json.loads(out.read_text())
    assert res["meta"]["parts"] == ["pipeline", "eval"]  # the suite's order
    assert set(res["measurements"]) == {"pipeline.workers=0", "eval.fast", "eval.naive"}
    assert "eval_s" in res and "episodes_per_s" in res
    for key in ("train_step_s", "pseudolabel_speedup", "loop_steps_per_s", "predict_s"):
        assert key not in res, key
    # the pipeline reads superpixels: they were generated (untimed) although pseudolabels were not measured
    assert len(list((tmp_path / "work" / "phantom").glob("superpix-MIDDLE_*.nii.gz"))) == 6
    assert "| episode pipeline alone, 0 DataLoader workers |" in format_table(res)


def test_only_refuses_unknown_parts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench_cli.main(["--only", "eval,warp"])
    assert exit_info.value.code == 2
    assert "argument --only: unknown part(s) ['warp']; choose from " + ",".join(PARTS) in capsys.readouterr().err


def test_default_output_is_one_new_file_per_run(tmp_path: Path) -> None:
    day = datetime.date(2026, 12, 5)
    first = bench_cli.default_out("cpu", True, PARTS, folder=tmp_path, today=day)
    assert first == tmp_path / "2026-12-05_cpu_quick.json"
    first.write_text("{}")
    assert bench_cli.default_out("cpu", True, PARTS, folder=tmp_path, today=day).name == "2026-12-05_cpu_quick_2.json"
    assert bench_cli.default_out("cuda:1", False, ("predict",), folder=tmp_path, today=day).name == \
        "2026-12-05_cuda_full_predict.json"
    assert bench_cli.RESULTS_DIR == Path(bench_cli.__file__).resolve().parent / "results"
