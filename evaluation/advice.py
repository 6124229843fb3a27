"""Warnings for scores that point to a data problem rather than to the model: an empty prediction, or a Dice below
0.3, for a (query scan, class) pair, with the checks most likely at fault ("Dice about 0.15 on CHAOS", asked of
CAT-Net's repository).

A trained ALPNet scores 0.6-0.85 on the paper's organs; far lower almost always means the support and the query
do not look alike to the network: opposite orientation, different intensity normalisation, or labels whose ids
are not the dataset's. ``validation.py`` logs these lines as warnings (never errors) after it scored a fold
(docs/troubleshooting.md#low-dice-warnings).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

LOW_DICE = 0.3  # below this a (scan, class) Dice is flagged


def check_list(data_dir: str, dataset: str) -> str:
    """The checks most likely at fault, most likely first, with the command of each (one line)."""
    return ("check, most likely first: (1) orientation: support and query scans must show the organs the same way "
            "(compare them with data_preprocessing.verify.show_scan, or reprocess both with the same pipeline); "
            "(2) intensity: images must be normalised as in training (CT windowed to [0, 255], MR clipped, the "
            "checkpoint's normaliser; docs/method.md#preprocessing); (3) class ids: labels must use the dataset's ids "
            f"(python -m data_preprocessing.verify --data-dir {data_dir} --dataset {dataset} lists the ids of each "
            "scan)")


def _count(value: Any) -> int:
    return 0 if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)


def low_dice_warnings(per_scan: Mapping[int, Mapping[int, Mapping[str, Any]]], class_names: Mapping[int, str],
                      data_dir: str, dataset: str, threshold: float = LOW_DICE) -> list[str]:
    """One line per scored (query scan, class) whose prediction is empty or whose 3D Dice is below ``threshold``,
    then one line with :func:`check_list`; no line when every pair is fine.

    Args:
        per_scan: ``{scan id: {class id: {"dice", "tp", "fp", "fn", ...}}}``
            (:attr:`evaluation.ep1_alp.FoldResult.per_scan`).
        class_names: class id -> name, used in the lines.
        data_dir, dataset: the evaluated folder and dataset, named in the command of the check list.
        threshold: Dice below this is flagged.

    Returns:
        The warning lines.
    """
    lines = []
    for sid in sorted(per_scan):
        for cid in sorted(per_scan[sid]):
            scores = per_scan[sid][cid]
            tp, fp, fn = (_count(scores.get(k)) for k in ("tp", "fp", "fn"))
            dice = scores.get("dice")
            name = class_names.get(cid, str(cid))
            sizes = f"{tp + fp} voxels predicted, {tp + fn} labelled"
            if tp + fp == 0 and tp + fn > 0:
                lines.append(f"query scan {sid}, {name}: empty prediction ({sizes})")
            elif dice is not None and not math.isnan(dice) and dice < threshold:
                lines.append(f"query scan {sid}, {name}: Dice {dice:.3f} < {threshold} ({sizes})")
    if lines:
        lines.append(f"{len(lines)} low score(s) above: {check_list(data_dir, dataset)}")
    return lines
