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

``--dataset`` is a registry name or the path of a dataset description file (``python -m data_preprocessing.prepare``
writes one); a file reaches every training and test as ``dataset=<file>``.
``--devices`` runs one run per device at a time, the others wait in a queue: GPU indices (``CUDA_VISIBLE_DEVICES``
is set per run; each below this machine's GPU count) or ``cpu`` (several ``cpu`` entries share the cores; each run
gets cores / entries threads).
``--slurm`` submits one job array through submitit, one GPU per job (one training process; ``--gpus-per-job`` above 1
is refused, as ``--partition``, ``--time`` and ``--gpus-per-job`` without ``--slurm``); SLURM warns a job before its
time limit or pre-emption, submitit then calls :meth:`launch.slurm.SweepJob.checkpoint`, which makes the training
write a snapshot at its current step (SIGUSR1, ``engine.preemption``) and requeues the job, which resumes it.
The work is done by the :mod:`launch` package; this module is the command line.
Exit code: 0 when every run finished, 1 when some failed (their logs are named), 2 on bad arguments.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from launch.local import run_local
from launch.runs import SweepError, parse_devices, parse_folds, plan_runs
from launch.slurm import run_slurm, slurm_executor
from util.options import OptionParser, int_at_least, positive_int

DEFAULT_TIME = "24:00:00"


def build_parser() -> OptionParser:
    """The sweep's options (the words after ``with`` are split off before parsing)."""
    parser = OptionParser(prog="python -m launch.sweep", description=__doc__.split("\n")[0],
                          epilog="Everything after 'with' goes to every training and test run.")
    parser.add_argument("--dataset", required=True,
                        help="CHAOST2, SABS, CMR, PHANTOM, or the path of a dataset description file")
    parser.add_argument("--settings", type=int, nargs="+", choices=(1, 2), default=[1, 2])
    parser.add_argument("--folds", nargs="+", default=["0-4"], help="fold numbers or ranges (default 0-4)")
    parser.add_argument("--label-sets", type=int_at_least(0), nargs="+", default=None,
                        help="label groups to test (default: all of the dataset's groups)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--devices", help="GPU indices (0,1,2,3) or cpu entries (cpu,cpu): one run per entry at a time")
    where.add_argument("--slurm", action="store_true", help="submit a job array through submitit")
    parser.add_argument("--partition", default=None, help="SLURM partition (--slurm only)")
    parser.add_argument("--time", default=None,
                        help=f"SLURM time limit per job (HH:MM:SS, default {DEFAULT_TIME}; --slurm only)")
    parser.add_argument("--gpus-per-job", type=positive_int, default=None,
                        help="GPUs per SLURM job: 1 (the default; one training process per job; --slurm only)")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"), help="output root (default runs/sweep)")
    return parser


def main(argv: Sequence[str] | None = None, executor: Any = None) -> int:
    """The command line; ``executor`` replaces the SLURM executor with ``--slurm`` (tests: submitit's local one)."""
    from dataloaders.dataset_info import DatasetDescriptionError, get_dataset_info
    from evaluation import summarize

    args_in = list(sys.argv[1:] if argv is None else argv)
    extra = args_in[args_in.index("with") + 1:] if "with" in args_in else []
    parser = build_parser()
    args = parser.parse_args(args_in[:args_in.index("with")] if "with" in args_in else args_in)
    if not args.slurm:
        given = [opt for opt, value in (("--partition", args.partition), ("--time", args.time),
                                         ("--gpus-per-job", args.gpus_per_job)) if value is not None]
        if given:
            parser.error(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --slurm (--devices runs one "
                         f"run per device entry)")
    if args.gpus_per_job is not None and args.gpus_per_job > 1:
        parser.error(f"--gpus-per-job {args.gpus_per_job}: a job runs one training process, which uses one GPU; "
                     f"multi-GPU jobs are not supported (use --gpus-per-job 1, or examples/train_ddp.sh for one "
                     f"DDP training)")
    try:
        info = get_dataset_info(args.dataset)
        groups = list(range(len(info.label_groups)))
        label_sets = groups if args.label_sets is None else args.label_sets
        bad = [g for g in label_sets if g not in groups]
        if bad:
            raise SweepError(f"--label-sets {bad}: {info.name} has label groups {groups}")
        described = Path(args.dataset)
        dataset_file = str(described.resolve()) if described.is_file() else None  # else a registry name
        runs = plan_runs(info.name, sorted(set(args.settings)), parse_folds(args.folds), label_sets, dataset_file)
        devices = []
        if args.devices:
            gpu_entries = any(d.strip() != "cpu" for d in args.devices.split(","))
            n_gpus = None
            if gpu_entries:
                import torch

                n_gpus = torch.cuda.device_count()
            devices = parse_devices(args.devices, n_gpus)
        if args.slurm and executor is None:
            executor = slurm_executor(args.out, args.partition, args.time or DEFAULT_TIME, args.gpus_per_job or 1)
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
