"""The paper's runs in parallel: train, then test, every (setting, label group, fold) of a dataset; then the table.

    python -m launch.sweep --dataset CHAOST2 --settings 1 2 --folds 0-4 --devices 0,1,2,3
    python -m launch.sweep --dataset PHANTOM --settings 1 --folds 0 1 --label-sets 0 --devices cpu,cpu with demo
    python -m launch.sweep --dataset SABS --settings 1 2 --folds 0-4 --slurm --partition gpu --time 24:00:00

A *run* is one training and the tests of its model (docs/method.md#settings-and-label-groups, as in
``examples/test_ssl_*.sh``): setting 1 trains one model per fold (``label_sets=0``) that is tested on every label group
of ``--label-sets``; setting 2 trains one model per label group and fold (the group's organs excluded) and tests it on
that group. Folders::

    <out>/<DATASET>/setting<s>/sets_<g>/fold<k>/           training run_dir: snapshots/, train_log.json, train.log
    <out>/<DATASET>/setting<s>/sets_<g>/fold<k>/eval_sets_<t>/   test of label group t: results.json, test.log
    <out>/summary.md, summary.json                          python -m evaluation.summarize <out>

Runs whose tests all wrote ``results.json`` are skipped; the others train with ``resume=True`` (an interrupted
run continues from its latest snapshot, a finished training is not repeated) and are tested from their latest
snapshot. The words after ``with`` are passed to every training and test (e.g. ``with demo n_steps=20``).

``--devices`` runs one run per device at a time, the others wait in a queue: GPU indices (``CUDA_VISIBLE_DEVICES``
is set per run) or ``cpu`` (several ``cpu`` entries share the cores; each run gets cores / entries threads).
``--slurm`` submits one job array through submitit (one GPU per job by default); SLURM warns a job before its
time limit or pre-emption, submitit then calls :meth:`launch.slurm.SweepJob.checkpoint`, which makes the training
write a snapshot at its current step (SIGUSR1, ``engine.preemption``) and requeues the job, which resumes it.
The work is done by the :mod:`launch` package; this module is the command line.
Exit code: 0 when every run finished, 1 when some failed (their logs are named), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from launch.local import run_local
from launch.runs import SweepError, parse_devices, parse_folds, plan_runs
from launch.slurm import run_slurm, slurm_executor


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__.split("\n")[0],
                                     epilog="Everything after 'with' goes to every training and test run.")
    parser.add_argument("--dataset", required=True, help="CHAOST2, SABS, CMR, PHANTOM")
    parser.add_argument("--settings", type=int, nargs="+", choices=(1, 2), default=[1, 2])
    parser.add_argument("--folds", nargs="+", default=["0-4"], help="fold numbers or ranges (default 0-4)")
    parser.add_argument("--label-sets", type=int, nargs="+", default=None,
                        help="label groups to test (default: all of the dataset's groups)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--devices", help="GPU indices (0,1,2,3) or cpu entries (cpu,cpu): one run per entry at a time")
    where.add_argument("--slurm", action="store_true", help="submit a job array through submitit")
    parser.add_argument("--partition", default=None, help="SLURM partition")
    parser.add_argument("--time", default="24:00:00", help="SLURM time limit per job (HH:MM:SS, default 24:00:00)")
    parser.add_argument("--gpus-per-job", type=int, default=1, help="GPUs per SLURM job (default 1)")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"), help="output root (default runs/sweep)")
    return parser


def main(argv: Sequence[str] | None = None, executor: Any = None) -> int:
    """The command line; ``executor`` replaces the SLURM executor with ``--slurm`` (tests: submitit's local one)."""
    from dataloaders.dataset_info import DatasetDescriptionError, get_dataset_info
    from evaluation import summarize

    args_in = list(sys.argv[1:] if argv is None else argv)
    extra = args_in[args_in.index("with") + 1:] if "with" in args_in else []
    args = build_parser().parse_args(args_in[:args_in.index("with")] if "with" in args_in else args_in)
    try:
        info = get_dataset_info(args.dataset)
        groups = list(range(len(info.label_groups)))
        label_sets = groups if args.label_sets is None else args.label_sets
        bad = [g for g in label_sets if g not in groups]
        if bad:
            raise SweepError(f"--label-sets {bad}: {info.name} has label groups {groups}")
        runs = plan_runs(info.name, sorted(set(args.settings)), parse_folds(args.folds), label_sets)
        devices = parse_devices(args.devices) if args.devices else []
        if any(d != "cpu" for d in devices):
            import torch

            if int(max(d for d in devices if d != "cpu")) >= torch.cuda.device_count():
                raise SweepError(f"--devices {args.devices}: this machine has {torch.cuda.device_count()} CUDA "
                                 f"devices (use --devices cpu,cpu without GPUs)")
        if args.slurm and executor is None:
            executor = slurm_executor(args.out, args.partition, args.time, args.gpus_per_job)
    except (SweepError, DatasetDescriptionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out
    todo = [r for r in runs if not r.finished(out)]
    print(f"{len(runs)} runs of {info.name} in {out}: {len(runs) - len(todo)} finished (skipped), {len(todo)} to do")
    failures = []
    if todo:
        failures = run_slurm(todo, out, extra, executor) if args.slurm else run_local(todo, out, extra, devices)
    if any(r.finished(out) for r in runs):
        summarize.main([str(out), "--out", str(out / "summary")])
    if failures:
        print(f"error: {len(failures)} of {len(runs)} runs failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
