"""Command line of the benchmark suite: ``python -m bench [--device cpu|cuda] [--quick] [--only PARTS] [--out PATH]``.

Prints a Markdown table and writes the results as JSON, one file per run, by default under ``bench/results/``
named for the run (``<date>_<device>_<quick|full>[_<parts>].json``). The JSON's ``meta`` records the date, the
host's CPU model, torch's version, the git commit and the command line, so that a figure quoted in the README or
the docs can name the file it comes from (tests/test_bench_results.py checks the README's table against them).
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

from bench.measure import BenchError
from bench.report import describe_machine, format_table
from bench.suite import PARTS, full_config, quick_config, run_suite
from dataloaders.niftiio import write_json
from util.options import OptionParser

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def default_out(device: str, quick: bool, parts: tuple[str, ...], folder: Path = RESULTS_DIR,
                today: datetime.date | None = None) -> Path:
    """``<folder>/<date>_<device>_<quick|full>[_<parts>].json``, with ``_2``, ``_3``, ... for a later run of the
    same day: an earlier run's file is never overwritten.

    Args:
        device: ``cpu`` or ``cuda[:index]`` (the index is left out of the name).
        quick: the ``--quick`` preset.
        parts: the measurements run; named only when they are not all of them.
        folder: where the file goes.
        today: the date in the name (default: today, UTC).
    """
    day = (today or datetime.datetime.now(datetime.UTC).date()).isoformat()
    stem = f"{day}_{device.split(':')[0]}_{'quick' if quick else 'full'}"
    if tuple(parts) != PARTS:
        stem += "_" + "-".join(parts)
    path, n = folder / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}_{n}.json"
    return path


def parse_parts(text: str) -> tuple[str, ...]:
    """argparse type of ``--only``: comma-separated names of :data:`bench.suite.PARTS`, kept in the suite's order."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown part(s) {unknown or [text]}; choose from {','.join(PARTS)}")
    return tuple(p for p in PARTS if p in names)


def build_parser() -> OptionParser:
    """The options of ``python -m bench`` (docs/cli.md)."""
    parser = OptionParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:<index> (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="few repetitions, small phantom (< 3 min on 2 cores)")
    parser.add_argument("--only", type=parse_parts, default=",".join(PARTS), metavar="PARTS",
                        help=f"comma-separated measurements to run (default: all of {','.join(PARTS)})")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default: bench/results/<date>_<device>_<quick|full>[_<parts>].json)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="scratch folder for the phantom (default: a temporary folder, removed afterwards)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the suite; returns the exit code (2 on a benchmark error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device must be cpu or cuda[:index], got {args.device!r}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"error: --device {args.device}: CUDA is not available here (use --device cpu)", file=sys.stderr)
            return 2
    cfg = quick_config(args.device) if args.quick else full_config(args.device)
    cfg.parts = args.only
    try:
        results = run_suite(cfg, work_dir=args.work_dir, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results["meta"]["command"] = shlex.join(["python", "-m", "bench", *argv])
    out = args.out or default_out(args.device, args.quick, args.only)
    write_json(results, out)
    print(f"\n{describe_machine(results)}\n\n{format_table(results)}\n\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
