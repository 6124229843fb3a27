"""Gather the results.json files of many runs into the paper's table (docs/method.md#published-numbers): Dice per organ,
averaged over folds, with the standard deviation over folds, per dataset and setting.

    python -m evaluation.summarize runs/ [--out runs/summary] [--baseline]

Writes ``<out>.md``, ``<out>.json`` and one figure per dataset, ``<out>_<dataset>.png`` (per-organ Dice over folds
with the published SSL-ALPNet values marked, :mod:`evaluation.summary_figure`). Label groups of one fold are merged
(group 0 gives the kidneys, group 1 liver and spleen); an organ found twice for the same fold/setting (e.g. an
evaluation run twice) is an error.

The printed table gives, per dataset and setting, every organ's Dice per fold and its mean ± std over folds next to
the published SSL-ALPNet value (:mod:`evaluation.published`), with a column saying which were re-run here (the
published organs that no results.json holds are listed as not re-run); a last table lists every published setting
with its mean here, if any.
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
from evaluation.published import PUBLISHED_SSL_ALPNET, published
from evaluation.summary_figure import write_figures
from util.atomic import write_text
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
            "n_folds": len(folds), "fold_means": dict(zip(folds, fold_means)),
            "published": published(dataset, setting),  # Dice in % (empty when none was published)
        }
    return summary


def _mean(vals: list[float]) -> float:
    return sum(vals) / len(vals) if vals else math.nan


def _std(vals: list[float]) -> float:
    if len(vals) < 2:
        return 0.0 if vals else math.nan
    m = _mean(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def _pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.2f}"


def _folds_text(folds: list[int]) -> str:
    return f"fold{'s' if len(folds) > 1 else ''} " + ", ".join(str(f) for f in folds)


def block_table(block: dict[str, Any]) -> list[str]:
    """The Markdown table of one dataset/setting: organ rows and a mean row; per-fold Dice, mean ± std (%) over
    the folds run here, the published value and whether (and on which folds) it was re-run here."""
    ref = block.get("published") or published(block["dataset"], block["setting"])
    ref_organs = [o for o in ref if o != "mean"]
    organs = ref_organs + [o for o in block["organs"] if o not in ref_organs]  # the paper's order first
    folds = sorted({int(f) for r in block["organs"].values() for f in r["folds"]})
    lines = ["| organ | " + " | ".join(f"fold {f}" for f in folds) + " | mean ± std (here) | published SSL-ALPNet "
             "| re-run here |", "|" + "---|" * (len(folds) + 4)]
    for organ in organs:
        row = block["organs"].get(organ)
        published_cell = f"{ref[organ]:.2f}" if organ in ref else "-"
        if row is None:
            cells = ["-"] * len(folds) + ["-", published_cell, "no"]
        else:
            by_fold = {int(f): v for f, v in row["folds"].items()}
            cells = [_pct(by_fold.get(f)) for f in folds]
            cells += [f"{_pct(row['mean'])} ± {_pct(row['std'])}", published_cell,
                      f"yes: {_folds_text(sorted(by_fold))}"]
        lines.append(f"| {organ} | " + " | ".join(cells) + " |")
    fold_means = {int(f): v for f, v in block.get("fold_means", {}).items()}
    run = [o for o in ref_organs if o in block["organs"]]
    if not ref_organs:
        status = f"yes: {block['n_folds']} complete folds (nothing published)"
    elif len(run) == len(ref_organs):
        status = f"yes: {len(run)} of {len(ref_organs)} organs, {block['n_folds']} complete folds"
    else:
        status = f"partial: {len(run)} of {len(ref_organs)} organs (means not comparable)"
    cells = [_pct(fold_means.get(f)) for f in folds]
    cells += [f"{_pct(block['mean'])} ± {_pct(block['std'])}", f"{ref['mean']:.2f}" if "mean" in ref else "-", status]
    lines.append("| **mean** | " + " | ".join(cells) + " |")
    return lines


def published_overview(summary: dict[str, Any]) -> list[str]:
    """One row per published dataset/setting (and per one run here without a published value): the published mean
    Dice, the mean here and whether it was re-run here."""
    here = {(b["dataset"], int(b["setting"])): b for b in summary.values()}
    lines = ["| dataset | setting | published SSL-ALPNet mean | mean here | re-run here |", "|---|---|---|---|---|"]
    for key in list(PUBLISHED_SSL_ALPNET) + sorted(k for k in here if k not in PUBLISHED_SSL_ALPNET):
        block = here.get(key)
        ref = PUBLISHED_SSL_ALPNET.get(key, {})
        mean = "-" if block is None else f"{_pct(block['mean'])} ({block['n_folds']} complete folds)"
        if block is None:
            status = "no"
        else:
            organs = [o for o in ref if o != "mean"]
            run = [o for o in organs if o in block["organs"]]
            status = "yes (not published)" if not organs else "yes" if len(run) == len(organs) else \
                f"partial: {len(run)} of {len(organs)} organs"
        lines.append(f"| {key[0]} | {key[1]} | {ref['mean']:.2f} | {mean} | {status} |" if "mean" in ref
                     else f"| {key[0]} | {key[1]} | - | {mean} | {status} |")
    return lines


def to_markdown(summary: dict[str, Any]) -> str:
    """One Markdown table per dataset/setting (:func:`block_table`: Dice (%) per fold, mean ± std over folds, the
    published value, re-run here or not), then the overview of the published settings."""
    parts = []
    for title, block in summary.items():
        parts.append(f"### {title} ({block['n_folds']} complete folds), Dice (%)\n")
        parts += block_table(block)
        parts.append("")
    parts.append("### Published SSL-ALPNet settings (ECCV'20 Table 1), mean Dice (%)\n")
    parts += published_overview(summary)
    return "\n".join(parts) + "\n"


def build_parser() -> OptionParser:
    """The options of ``python -m evaluation.summarize`` (docs/cli.md)."""
    parser = OptionParser(prog="python -m evaluation.summarize", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=existing_dir, help="folder searched recursively for results.json")
    parser.add_argument("--out", type=Path, default=None, help="output prefix (default <runs>/summary)")
    parser.add_argument("--baseline", action="store_true", help="summarise the intensity baseline instead")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: 0 when the table is written, 2 on a bad option or inconsistent result files."""
    args = build_parser().parse_args(argv)
    try:
        summary = summarize(collect(args.runs), use_baseline=args.baseline)
    except SummaryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or args.runs / "summary"
    md = to_markdown(summary)
    write_text(out.with_suffix(".md"), md)
    write_json(summary, out.with_suffix(".json"))
    figures = write_figures(summary, out)
    print(md)
    print(f"written: {out.with_suffix('.md')}, {out.with_suffix('.json')}, " + ", ".join(str(p) for p in figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
