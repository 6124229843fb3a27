"""Plumbing shared by the benchmark pipelines (``chaos``, ``sabs``, ``cmr``): the steps every pipeline ends with
(class map, superpixel pseudolabels, verification) and the command-line options they share.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from data_preprocessing.class_slice_index import write_classmap
from data_preprocessing.pseudolabel import generate_pseudolabels
from data_preprocessing.verify import VerifyReport, verify_dataset
from dataloaders.dataset_info import DatasetInfo
from dataloaders.niftiio import write_json
from util.options import OptionParser, int_at_least

FINAL_STEPS = ("classmap", "superpixels", "verify")


def run_final_steps(out_dir: str | Path, info: DatasetInfo, steps: Sequence[str], workers: int = 1,
                    legacy_superpixels: bool = False, expect_hw: Sequence[int] | None = None,
                    expect_spacing: Sequence[float | None] | None = None, report_path: str | Path | None = None,
                    progress: bool = True) -> VerifyReport | None:
    """The steps every pipeline ends with, in order: class map, superpixel pseudolabels, verification.

    Args:
        out_dir: processed folder.
        info: dataset description.
        steps: which of ``FINAL_STEPS`` to run (others are ignored).
        workers: processes for the superpixels.
        legacy_superpixels: the original's superpixel numbering (docs/method.md#q2-superpixel-numbering).
        expect_hw, expect_spacing: passed to :func:`verify_dataset`.
        report_path: also write the verification report there as JSON.
        progress: tqdm bars.

    Returns:
        The verification report, or ``None`` when ``"verify"`` is not among ``steps``.
    """
    out_dir = Path(out_dir)
    if "classmap" in steps:
        path = write_classmap(out_dir, info, min_fg=1, progress=progress)
        print(f"wrote {path}")
    if "superpixels" in steps:
        generate_pseudolabels(out_dir, info, workers=workers, legacy=legacy_superpixels, progress=progress)
    if "verify" not in steps:
        return None
    report = verify_dataset(out_dir, info, expect_hw=expect_hw, expect_spacing=expect_spacing, progress=progress)
    print(report.table())
    if report_path is not None:
        write_json(report.to_dict(), report_path)
        print(f"wrote {report_path}")
    return report


def pipeline_parser(prog: str, description: str, steps: Sequence[str], raw_help: str,
                    parity_help: str | None, scans: bool = True) -> OptionParser:
    """Argument parser shared by the dataset pipelines (``--raw``, ``--out``, ``--steps``, ``--verify-only`` ...);
    ``--parity`` when ``parity_help`` is given, ``--scans`` when ``scans``."""
    parser = OptionParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", type=Path, default=None, help=raw_help)
    parser.add_argument("--out", type=Path, required=True, help="processed output folder (created if needed)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder of the intermediate files between steps (default: OUT/intermediate)")
    parser.add_argument("--steps", default=",".join(steps),
                        help=f"comma-separated steps to run, in this order: {','.join(steps)} (default: all)")
    parser.add_argument("--verify-only", action="store_true", help="only print the verification table of OUT")
    parser.add_argument("--keep-intermediate", action="store_true",
                        help="keep the intermediate files when one run does both of the first two steps "
                             "(otherwise they are deleted once the second step has used them)")
    if scans:
        parser.add_argument("--scans", default=None, help="comma-separated scan ids to convert (default: all found)")
    parser.add_argument("--workers", type=int_at_least(1), default=os.cpu_count() or 1,
                        help="processes for the superpixel step (default: all cores)")
    parser.add_argument("--report", type=Path, default=None, help="also write the verification report as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    if parity_help is not None:
        parser.add_argument("--parity", action="store_true", help=parity_help)
    return parser


def parse_steps(args: argparse.Namespace, steps: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """Validated step list (``--verify-only`` means ``verify``); ``--raw`` is required by the first step."""
    if args.verify_only:
        return ["verify"]
    chosen = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in steps]
    if unknown or not chosen:
        parser.error(f"unknown steps {unknown}; choose from {','.join(steps)}")
    if steps[0] in chosen and args.raw is None:
        parser.error(f"--raw is required for the step '{steps[0]}'")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    return [s for s in steps if s in chosen]


def parse_scan_list(text: str | None, parser: argparse.ArgumentParser) -> list[int] | None:
    """``--scans 1,2,5`` -> ``[1, 2, 5]``."""
    if text is None:
        return None
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--scans expects comma-separated integers, got {text!r}")
    if not ids:
        parser.error("--scans needs at least one id")
    return ids


def remove_intermediate(work: Path, names: Sequence[str]) -> None:
    """Delete the named intermediate files of a full run, then ``work`` itself if it is left empty."""
    for name in names:
        path = work / name
        if path.is_file():
            path.unlink()
    if work.is_dir() and not any(work.iterdir()):
        shutil.rmtree(work)
    print(f"removed the intermediate files in {work} (keep them with --keep-intermediate)")
