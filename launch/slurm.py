"""Runs as one SLURM job array through submitit, requeued (and resumed) after a time-limit warning or pre-emption."""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from launch.runs import Run, SweepError, execute, log_of

STOP_GRACE_S = 120  # seconds a training gets to write its snapshot after SIGUSR1 (SLURM warns 120 s ahead)


class SweepJob:
    """The function submitit runs in each job of the array: :func:`execute` one run, checkpointable.

    On SLURM's warning signal (time limit or pre-emption) submitit calls :meth:`checkpoint` in the job's process:
    the running training gets SIGUSR1, writes a snapshot at its current step and exits (code 138); the job is then
    requeued with the same run, and ``resume=True`` continues it.
    """

    def __init__(self, out: Path, extra: Sequence[str]) -> None:
        self.out, self.extra = Path(out), list(extra)
        self._child: subprocess.Popen | None = None

    def __call__(self, run: Run) -> str:
        code = execute(run, self.out, self.extra, None, on_start=self._remember)
        if code != 0:
            raise RuntimeError(f"{run.name}: exit code {code} (log: {log_of(run, self.out)})")
        return run.name

    def _remember(self, proc: subprocess.Popen) -> None:
        self._child = proc

    def checkpoint(self, run: Run) -> Any:
        """Stop the running child with a snapshot (SIGUSR1), then ask submitit to requeue this run."""
        import submitit

        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGUSR1)
            try:
                child.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                child.kill()  # the latest periodic snapshot is still there to resume from
        return submitit.helpers.DelayedSubmission(SweepJob(self.out, self.extra), run)

    def __getstate__(self) -> dict[str, Any]:
        return {"out": self.out, "extra": self.extra, "_child": None}  # a process handle does not pickle


def parse_time(text: str) -> int:
    """``HH:MM:SS`` (or ``D-HH:MM:SS``) -> minutes, rounded up."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{2}):(\d{2})", text)
    if not match:
        raise SweepError(f"--time: {text!r} is not HH:MM:SS or D-HH:MM:SS")
    d, h, m, s = (int(g or 0) for g in match.groups())
    return max(1, -(-(((d * 24 + h) * 60 + m) * 60 + s) // 60))


def run_slurm(runs: Sequence[Run], out: Path, extra: Sequence[str], executor: Any,
              log: Callable[[str], None] = print) -> list[str]:
    """Submit ``runs`` as one job array of ``executor`` (a configured submitit executor); wait; return failures."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    jobs = executor.map_array(SweepJob(out, extra), list(runs))
    log(f"submitted {len(jobs)} jobs (ids {jobs[0].job_id} ... {jobs[-1].job_id}); logs in {executor.folder}")
    failures = []
    for job, run in zip(jobs, runs):
        try:
            job.result()
            log(f"done  {run.name} (job {job.job_id})")
        except (FailedJobError, UncompletedJobError) as err:  # the job's traceback is in its submitit log
            failures.append(f"{run.name}: job {job.job_id} failed: {str(err).strip().splitlines()[-1]} "
                            f"(log: {log_of(run, out)})")
            log(f"FAILED {run.name} (job {job.job_id})")
    return failures


def slurm_executor(out: Path, partition: str | None, time_limit: str, gpus_per_job: int) -> Any:
    """A submitit SLURM executor: one task per job, ``gpus_per_job`` GPUs, SLURM's warning signal 120 s before the
    limit (``slurm_signal_delay_s``; :meth:`SweepJob.checkpoint` then gives the training :data:`STOP_GRACE_S`)."""
    import submitit

    executor = submitit.AutoExecutor(folder=out / "slurm" / "%j", cluster="slurm")
    params: dict[str, Any] = {"timeout_min": parse_time(time_limit), "gpus_per_node": gpus_per_job,
                              "tasks_per_node": 1, "nodes": 1, "cpus_per_task": 8, "slurm_signal_delay_s": 120}
    if partition:
        params["slurm_partition"] = partition
    executor.update_parameters(**params)
    return executor
