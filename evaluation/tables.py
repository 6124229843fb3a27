"""The one Dice-table formatter: per-class and mean Dice of one or more methods, as a Markdown table in percent.

Used by ``validation.py`` (ALPNet next to the intensity baseline) and ``python -m evaluation.baseline``; the input
rows are the JSON dicts of :meth:`evaluation.ep1_alp.FoldResult.to_json_dict` (``class_dice`` keyed by class id
strings, ``mean_dice``; ``None`` or NaN for an undefined value). :func:`labelled_rows` puts the 3D Dice (the
paper's) and the mean per-slice Dice of each method on two labelled rows.
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
        The table, Dice in percent with two decimals (the ``class_dice``/``mean_dice`` of each row: the 3D Dice per
        scan averaged over scans, as the paper reports, unless the row is a per-slice row of :func:`labelled_rows`).
    """
    lines = ["| method | " + " | ".join(class_names[c] for c in classes) + " | mean |",
             "|" + "---|" * (len(classes) + 2)]
    for name, res in rows.items():
        if res is None:
            continue
        cells = [percent(res["class_dice"].get(str(c))) for c in classes]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {percent(res['mean_dice'])} |")
    return "\n".join(lines)


THREE_D, PER_SLICE = "3D Dice (paper)", "mean per-slice Dice"


def labelled_rows(rows: Mapping[str, Mapping[str, Any] | None]) -> dict[str, Mapping[str, Any] | None]:
    """Each method's row twice, labelled: ``"<method>, 3D Dice (paper)"`` then ``"<method>, mean per-slice Dice"``.

    Args:
        rows: method name -> result dict; a dict without ``class_dice_per_slice`` (written before it existed)
            gives its 3D row only, a ``None`` row gives none.

    Returns:
        Rows for :func:`dice_table`.
    """
    out: dict[str, Mapping[str, Any] | None] = {}
    for name, res in rows.items():
        if res is None:
            continue
        out[f"{name}, {THREE_D}"] = res
        if "class_dice_per_slice" in res:
            out[f"{name}, {PER_SLICE}"] = {"class_dice": res["class_dice_per_slice"],
                                            "mean_dice": res.get("mean_dice_per_slice")}
    return out
