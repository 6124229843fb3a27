"""Gather the results.json files of many runs into the paper's table (docs/method.md#published-numbers): Dice per organ,
averaged over folds, with the standard deviation over folds, per dataset and setting.

    python -m evaluation.summarize runs/ [--out runs/summary] [--baseline]

Writes ``<out>.md``, ``<out>.json`` and one figure per dataset, ``<out>_<dataset>.png`` (per-organ Dice over folds
with the published SSL-ALPNet values marked, :mod:`evaluation.summary_figure`). Label groups of one fold are merged
(group 0 gives the kidneys, group 1 liver and spleen); an organ found twice for the same fold/setting (e.g. an
evaluation run twice) is an error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from dataloaders.niftiio import write_json
from evaluation.summary_figure import write_figures
from util.errors import ProjectError
from util.options import OptionParser, existing_dir


class SummaryError(ProjectError, ValueError):
    """Inconsistent or missing result files."""


def collect(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every ``results.json`` below ``root`` (sorted by path)."""
    found = sorted(root.rglob("results.json"))
    if not found:
        raise SummaryError(f"{root}: no results.json below this folder")
    out = []
    for path in found:
        try:
            out.append((path, json.loads(path.read_text())))
        except json.JSONDecodeError as err:
            raise SummaryError(f"{path}: malformed JSON ({err})") from None
    return out


def summarize(results: list[tuple[Path, dict[str, Any]]], use_baseline: bool = False) -> dict[str, Any]:
    """Table data: {"<dataset> setting <s>": {"organs": {name: {"mean", "std", "folds"}}, "mean": ..., ...}}.

    The organ mean (last column) is the unweighted mean of the per-organ fold means; its std is over the per-fold
    organ means of folds where every organ is present.
    """
    table: dict[tuple[str, int], dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    sources: dict[tuple[str, int, str, int], Path] = {}
    for path, res in results:
        block = res.get("baseline") if use_baseline else res
        if block is None:
            continue
        key = (res["dataset"], int(res["setting"]))
        names = res.get("class_names", {})
        for cid, dice in block["class_dice"].items():
            organ = names.get(cid, cid)
            src = (key[0], key[1], organ, int(res["fold"]))
            if src in sources:
                raise SummaryError(f"{organ} of {key[0]} setting {key[1]} fold {res['fold']} appears in both "
                                   f"{sources[src]} and {path}")
            sources[src] = path
            if dice is not None:
                table[key][organ][int(res["fold"])] = float(dice)
    summary: dict[str, Any] = {}
    for (dataset, setting), organs in sorted(table.items()):
        rows = {}
        for organ, per_fold in organs.items():
            vals = list(per_fold.values())
            rows[organ] = {"mean": _mean(vals), "std": _std(vals), "folds": dict(sorted(per_fold.items()))}
        folds = sorted(set.intersection(*(set(v) for v in organs.values())))
        fold_means = [_mean([organs[o][f] for o in organs]) for f in folds]
        summary[f"{dataset} setting {setting}"] = {
            "dataset": dataset, "setting": setting, "organs": rows,
            "mean": _mean([r["mean"] for r in rows.values()]), "std": _std(fold_means),
            "n_folds": len(folds),
        }
    return summary


def _mean(vals: list[float]) -> float:
    return sum(vals) / len(vals) if vals else math.nan


def _std(vals: list[float]) -> float:
    if len(vals) < 2:
        return 0.0 if vals else math.nan
    m = _mean(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def to_markdown(summary: dict[str, Any]) -> str:
    """One Markdown table per dataset/setting: Dice (%) mean ± std over folds."""
    parts = []
    for title, block in summary.items():
        organs = list(block["organs"])
        parts.append(f"### {title} ({block['n_folds']} complete folds)\n")
        parts.append("| " + " | ".join(organs) + " | mean |")
        parts.append("|" + "---|" * (len(organs) + 1))
        cells = [f"{100 * block['organs'][o]['mean']:.2f} ± {100 * block['organs'][o]['std']:.2f}" for o in organs]
        parts.append("| " + " | ".join(cells) + f" | {100 * block['mean']:.2f} ± {100 * block['std']:.2f} |\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = OptionParser(prog="python -m evaluation.summarize", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=existing_dir, help="folder searched recursively for results.json")
    parser.add_argument("--out", type=Path, default=None, help="output prefix (default <runs>/summary)")
    parser.add_argument("--baseline", action="store_true", help="summarise the intensity baseline instead")
    args = parser.parse_args(argv)
    try:
        summary = summarize(collect(args.runs), use_baseline=args.baseline)
    except SummaryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or args.runs / "summary"
    md = to_markdown(summary)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md)
    write_json(summary, out.with_suffix(".json"))
    figures = write_figures(summary, out)
    print(md)
    print(f"written: {out.with_suffix('.md')}, {out.with_suffix('.json')}, " + ", ".join(str(p) for p in figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
