"""``python -m launch.sweep``: the run plan, two tiny runs in parallel on ``cpu,cpu``, skipping finished runs, resuming
an interrupted one through the SLURM path (submitit's LocalExecutor: real job processes on this machine)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import submitit

from data_preprocessing import prepare
from launch import runs as plan
from launch import sweep
from launch.slurm import SweepJob, parse_time
from tests.reliability_fixtures import TINY32

TINY_RUN = [*TINY32, "n_steps=4", "lr_milestones=[2]", "save_snapshot_every=2"]


def test_plan_and_argument_parsing() -> None:
    runs = plan.plan_runs("CHAOST2", [1, 2], plan.parse_folds(["0-4"]), [0, 1])
    assert len(runs) == 5 * (1 + 2)  # per fold: one setting-1 model, one setting-2 model per label group
    assert sum(len(r.test_sets) for r in runs) == 5 * 4  # every (setting, group, fold) is tested once
    assert runs[0] == plan.Run("CHAOST2", 1, 0, 0, (0, 1)) and runs[1] == plan.Run("CHAOST2", 2, 0, 0, (0,))
    out = Path("runs/sweep")
    assert runs[2].train_dir(out) == out / "CHAOST2" / "setting2" / "sets_1" / "fold0"
    assert runs[2].test_dir(out, 1) == out / "CHAOST2" / "setting2" / "sets_1" / "fold0" / "eval_sets_1"
    assert plan.parse_folds(["0", "2-3", "2"]) == [0, 2, 3]
    assert plan.parse_devices("0,1,3") == ["0", "1", "3"] and plan.parse_devices("cpu,cpu") == ["cpu", "cpu"]
    assert parse_time("24:00:00") == 1440 and parse_time("1-00:00:30") == 1441
    for bad in (lambda: plan.parse_folds(["4-1"]), lambda: plan.parse_devices("gpu0"),
                lambda: parse_time("90")):
        with pytest.raises(plan.SweepError):
            bad()


@pytest.mark.parametrize(("args", "message"), [
    (["--dataset", "CHAOST2", "--devices", "cpu", "--label-sets", "7"], "error: --label-sets [7]: CHAOST2 has label "
                                                                        "groups [0, 1]"),
    (["--dataset", "CHAOST2", "--devices", "cpu", "--folds", "x"], "error: --folds: 'x' is not a fold number or a "
                                                                   "range like 0-4"),
])
def test_bad_arguments_are_one_line_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert sweep.main(args) == 2
    assert capsys.readouterr().err.strip() == message


def test_checkpoint_stops_the_training_with_a_snapshot_signal_and_requeues() -> None:
    job = SweepJob(Path("runs/x"), ["demo"])
    # stands in for training.py: SIGUSR1 -> snapshot -> exit 128 + SIGUSR1 (engine.preemption)
    child = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                              "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(128 + signal.SIGUSR1))\n"
                              "print('ready', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    job._remember(child)
    run = plan.Run("PHANTOM", 1, 0, 0, (0,))
    again = job.checkpoint(run)
    assert child.returncode == 128 + signal.SIGUSR1
    assert isinstance(again, submitit.helpers.DelayedSubmission) and again.args == (run,)
    assert again.function.out == job.out and again.function.extra == ["demo"]


def _results(out: Path) -> dict[int, dict]:
    return {k: json.loads((out / "PHANTOM" / "setting1" / "sets_0" / f"fold{k}" / "eval_sets_0" / "results.json")
                          .read_text()) for k in (0, 1)}


def test_two_runs_in_parallel_skip_and_resume_through_submitit(tiny_phantom: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    argv = ["--dataset", "PHANTOM", "--settings", "1", "--folds", "0-1", "--label-sets", "0", "--out", str(out),
            "with", "demo", f"data_dir={tiny_phantom}", *TINY_RUN]
    assert sweep.main(["--devices", "cpu,cpu", *argv]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"2 runs of PHANTOM in {out}: 0 finished (skipped), 2 to do"
    # both runs started before either finished: one run per device entry, at the same time
    assert {printed[1][:14], printed[2][:14]} == {"[cpu#0] start ", "[cpu#1] start "}
    assert sum("done  PHANTOM setting 1 sets_0 fold" in line for line in printed) == 2
    results = _results(out)
    for k, res in results.items():
        assert res["fold"] == k and res["setting"] == 1 and res["checkpoint_step"] == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["PHANTOM setting 1"]["n_folds"] == 2
    assert "### PHANTOM setting 1 (2 complete folds)" in "\n".join(printed) and (out / "summary.md").is_file()
    fold1 = out / "PHANTOM" / "setting1" / "sets_0" / "fold1"
    assert "starting from step 0" in (fold1 / "train.log").read_text()

    # again: nothing left to do, the table is printed again
    train_log = (fold1 / "train.log").read_text()
    assert sweep.main(["--devices", "cpu", *argv]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"2 runs of PHANTOM in {out}: 2 finished (skipped), 0 to do\n")
    assert "### PHANTOM setting 1 (2 complete folds)" in printed
    assert (fold1 / "train.log").read_text() == train_log  # no process was started

    # fold 1 "interrupted" after its snapshot at step 2: the SLURM path (as job array) resumes and tests it
    (fold1 / "snapshots" / "4.pth").unlink()
    (fold1 / "eval_sets_0" / "results.json").unlink()
    executor = submitit.LocalExecutor(folder=tmp_path / "jobs")
    executor.update_parameters(timeout_min=30)
    assert sweep.main(["--slurm", *argv], executor=executor) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"2 runs of PHANTOM in {out}: 1 finished (skipped), 1 to do\n")
    assert "done  PHANTOM setting 1 sets_0 fold 1 (job " in printed
    assert f"resumed from {fold1 / 'snapshots' / '2.pth'} at step 2" in (fold1 / "train.log").read_text()
    again = _results(out)
    assert again[1]["checkpoint_step"] == 4 and again[0] == results[0]


def test_devices_are_gpu_indices_compared_as_integers(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # a 4-GPU machine
    assert sweep.main(["--dataset", "CHAOST2", "--devices", "2,10"]) == 2  # as strings, max("2", "10") is "2"
    assert capsys.readouterr().err.strip() == ("error: --devices 2,10: GPU 10 is beyond this machine's 4 CUDA "
                                               "devices (indices 0-3)")
    assert plan.parse_devices("0,3,cpu", n_gpus=4) == ["0", "3", "cpu"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert sweep.main(["--dataset", "CHAOST2", "--devices", "0"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --devices 0: this machine has no CUDA device; use --devices "
                                               "cpu,cpu")


@pytest.mark.parametrize(("args", "message"), [
    (["--slurm", "--gpus-per-job", "2"], "error: --gpus-per-job 2: a job runs one training process, which uses one "
                                         "GPU; multi-GPU jobs are not supported"),
    (["--devices", "cpu", "--time", "01:00:00"], "error: --time needs --slurm (--devices runs one run per device "
                                                 "entry)"),
    (["--devices", "cpu", "--partition", "gpu", "--gpus-per-job", "1"], "error: --partition, --gpus-per-job need "
                                                                        "--slurm"),
    (["--devices", "cpu", "--bogus"], "error: unrecognized arguments: --bogus (see python -m launch.sweep --help)"),
])
def test_slurm_options_are_refused_where_they_cannot_act(args: list[str], message: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        sweep.main(["--dataset", "PHANTOM", "--out", str(tmp_path / "out"), *args])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert not (tmp_path / "out").exists()


def test_a_prepared_folder_sweeps_through_its_description_file(tiny_phantom: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``--dataset DIR/dataset.json5`` of ``data_preprocessing.prepare``: every run gets ``dataset=<file>``."""
    own = tmp_path / "own"
    images = [str(tiny_phantom / f"image_{i}.nii.gz") for i in range(6)]
    labels = [str(tiny_phantom / f"label_{i}.nii.gz") for i in range(6)]  # paired by order
    assert prepare.main(["--images", *images, "--labels", *labels, "--modality", "MR", "--out", str(own), "--name",
                         "OWN", "--spacing", "5.0", "--size", "64", "--mr-clip-percentile", "100", "--folds", "2",
                         "--no-progress"]) == 0
    description = own / "dataset.json5"
    out = tmp_path / "sweep"
    capsys.readouterr()
    assert sweep.main(["--dataset", str(description), "--settings", "1", "--folds", "0-1", "--devices", "cpu,cpu",
                       "--out", str(out), "with", "demo", *TINY_RUN, "eval_classes=None"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"2 runs of OWN in {out}: 0 finished (skipped), 2 to do\n")
    for k in (0, 1):
        run_dir = out / "OWN" / "setting1" / "sets_0" / f"fold{k}"
        command = (run_dir / "train.log").read_text().splitlines()[0]
        assert f" with dataset={description.resolve()} setting1 " in command  # a file, not a named config
        assert "path.log_dir" not in command  # TINY_RUN turns the observer off: no key that cannot act
        res = json.loads((run_dir / "eval_sets_0" / "results.json").read_text())
        assert res["dataset"] == "OWN" and res["fold"] == k and res["checkpoint_step"] == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["OWN setting 1"]["n_folds"] == 2 and (out / "summary.md").is_file()
