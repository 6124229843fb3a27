"""The one Dice-table formatter: per-class and mean Dice of one or more methods, as a Markdown table in percent.

Used by ``validation.py`` (ALPNet next to the intensity baseline) and ``python -m evaluation.baseline``; the input
rows are the JSON dicts of :meth:`evaluation.ep1_alp.FoldResult.to_json_dict` (``class_dice`` keyed by class id
strings, ``mean_dice``; ``None`` or NaN for an undefined value).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def percent(x: float | None) -> str:
    """``0.7518`` -> ``"75.18"``; ``None`` or NaN -> ``"n/a"``."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def dice_table(rows: Mapping[str, Mapping[str, Any] | None], classes: Sequence[int],
               class_names: Mapping[int, str]) -> str:
    """A Markdown table: one row per method (``None`` rows are left out), one column per class, then the mean.

    Args:
        rows: method name -> result dict (``class_dice`` {class id string: fraction}, ``mean_dice``).
        classes: class ids, in column order.
        class_names: class id -> column title.

    Returns:
        The table, Dice in percent with two decimals (3D Dice per scan, averaged over scans, as the paper reports).
    """
    lines = ["| method | " + " | ".join(class_names[c] for c in classes) + " | mean |",
             "|" + "---|" * (len(classes) + 2)]
    for name, res in rows.items():
        if res is None:
            continue
        cells = [percent(res["class_dice"].get(str(c))) for c in classes]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {percent(res['mean_dice'])} |")
    return "\n".join(lines)
