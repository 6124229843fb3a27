"""Command line of the benchmark suite: ``python -m bench [--device cpu|cuda] [--quick] [--out PATH]``.

Prints a Markdown table and writes the results as JSON (default ``bench/results.json``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.measure import BenchError
from bench.report import describe_machine, format_table
from bench.suite import full_config, quick_config, run_suite
from dataloaders.niftiio import write_json
from util.options import OptionParser

DEFAULT_OUT = Path(__file__).resolve().parent / "results.json"


def main(argv: list[str] | None = None) -> int:
    """Run the suite; returns the exit code (2 on a benchmark error)."""
    parser = OptionParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:<index> (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="few repetitions, small phantom (< 3 min on 2 cores)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default: {DEFAULT_OUT})")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="scratch folder for the phantom (default: a temporary folder, removed afterwards)")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device must be cpu or cuda[:index], got {args.device!r}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"error: --device {args.device}: CUDA is not available here (use --device cpu)", file=sys.stderr)
            return 2
    cfg = quick_config(args.device) if args.quick else full_config(args.device)
    try:
        results = run_suite(cfg, work_dir=args.work_dir, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    command = "python -m bench" + (f" --device {args.device}" if args.device != "cpu" else "") + \
        (" --quick" if args.quick else "")
    results["meta"]["command"] = command
    write_json(results, args.out)
    print(f"\n{describe_machine(results)}\n\n{format_table(results)}\n\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
