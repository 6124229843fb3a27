"""Side-by-side table of evaluation protocols and whole-volume methods over folds, from ``validation.py`` runs.

    python -m evaluation.compare_protocols --runs runs/whole_volume --out docs/results/whole_volume_phantom.json

Reads ``<runs>/<row>_fold<k>/results.json`` for every row (``ep1_alp``, ``registered``, ``atlas``, ``body``, or any
other run-folder prefix) and fold, and writes one JSON (per row: Dice per fold, the mean over folds, per-class means,
and for EP2 rows the share of (query, class) pairs whose predicted z-range lies within 3 slices of the true one) and
prints the Markdown table. Rows are the prefixes found, in the order given by ``--rows``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from util.atomic import write_text
from util.errors import EXIT_USER_ERROR, ProjectError, error_line
from util.options import OptionParser, existing_dir

ROWS = ("ep1_alp", "registered", "atlas", "body")
_RUN = re.compile(r"^(?P<row>.+)_fold(?P<fold>\d+)$")


class CompareError(ProjectError, ValueError):
    """Missing or inconsistent result files (the message names the folder)."""


def collect(runs: Path, rows: tuple[str, ...] = ROWS) -> dict[str, Any]:
    """Read the runs' ``results.json`` into the table's JSON (module docstring).

    Raises:
        CompareError: no run folder, a run without results.json, or rows with different folds.
    """
    found: dict[str, dict[int, dict[str, Any]]] = {}
    for folder in sorted(p for p in runs.iterdir() if p.is_dir()):
        m = _RUN.match(folder.name)
        if not m or m.group("row") not in rows:
            continue
        path = folder / "results.json"
        if not path.is_file():
            raise CompareError(f"{path}: missing (did the validation run finish?)")
        found.setdefault(m.group("row"), {})[int(m.group("fold"))] = json.loads(path.read_text())
    if not found:
        raise CompareError(f"{runs}: no run folder named <row>_fold<k> for rows {list(rows)}")
    folds = {row: sorted(v) for row, v in found.items()}
    if len({tuple(f) for f in folds.values()}) != 1:
        raise CompareError(f"{runs}: the rows cover different folds: {folds}")
    out: dict[str, Any] = {"folds": next(iter(folds.values())), "rows": {}}
    for row in (r for r in rows if r in found):
        res = found[row]
        first = next(iter(res.values()))
        classes = [str(c) for c in first["classes"]]
        names = first.get("class_names", {})
        per_fold = {str(f): r["mean_dice"] for f, r in sorted(res.items())}
        shares = [r.get("z_range_within_3_slices") for r in res.values()]
        pairs = [v for r in res.values() for v in (r.get("z_ranges") or {}).values()]
        ok = [v["predicted"] is not None and abs(v["predicted"][0] - v["true"][0]) <= 3
              and abs(v["predicted"][1] - v["true"][1]) <= 3 for v in pairs]
        out["rows"][row] = {
            "protocol": first["protocol"], "method": first.get("ep2_method"),
            "mean_dice": float(np.mean(list(per_fold.values()))), "fold_dice": per_fold,
            "class_dice": {names.get(c, c): float(np.mean([r["class_dice"][c] for r in res.values()]))
                           for c in classes},
            "z_range_within_3_slices": float(np.mean(ok)) if ok else None,
            "z_range_pairs": len(pairs) if pairs else None,
            "checkpoints": {str(f): r["checkpoint"] for f, r in sorted(res.items())},
            "per_fold_z_share": {str(f): s for f, s in zip(sorted(res), shares)} if any(s is not None for s in shares)
            else None,
        }
    return out


def table(data: dict[str, Any]) -> str:
    """The Markdown table of :func:`collect`'s JSON: Dice (%) per fold, mean, and the z-range share."""
    folds = data["folds"]
    lines = ["| row | " + " | ".join(f"fold {f}" for f in folds) + " | mean | z-range within 3 slices |",
             "|" + "---|" * (len(folds) + 3)]
    for row, r in data["rows"].items():
        z = r["z_range_within_3_slices"]
        lines.append(f"| {row} | " + " | ".join(f"{100 * r['fold_dice'][str(f)]:.1f}" for f in folds)
                     + f" | **{100 * r['mean_dice']:.1f}** | " + ("n/a (GT range)" if z is None else f"{z:.2f}")
                     + " |")
    return "\n".join(lines)


def build_parser() -> OptionParser:
    """The options of ``python -m evaluation.compare_protocols`` (docs/cli.md)."""
    parser = OptionParser(prog="python -m evaluation.compare_protocols", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=existing_dir, required=True, help="folder of <row>_fold<k> validation runs")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help=f"run-folder prefixes (default: {list(ROWS)})")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line: 0 done, 2 with one ``error:`` line on bad input."""
    args = build_parser().parse_args(argv)
    try:
        data = collect(Path(args.runs), tuple(args.rows))
    except ProjectError as err:
        print(error_line(err), file=sys.stderr)
        return EXIT_USER_ERROR
    print(table(data))
    if args.out is not None:
        write_text(args.out, json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
