"""Pictures and the one-page report of ``predict.py``: outline overlays and a self-contained ``report.html``.

- :func:`overlay_slices` picks a few slices through a class (where the prediction, else the reference, has it);
- :func:`write_overlay` draws them side by side, the processed slice in grey, the prediction's outline in red and
  the reference's (``--query-label``) in green, slices shown the same way up for every scan (the processed grid is
  LPS-oriented, ``data_preprocessing.geometry``: anterior at the top, the patient's right on the image's left);
- :func:`write_report` writes one HTML page holding the table of ``predictions.json`` and every overlay embedded
  as base64 PNG, readable in a browser with no server and no other file.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from util.atomic import atomic_file, write_text


def overlay_slices(pred: np.ndarray, ref: np.ndarray | None, n: int = 3) -> list[int]:
    """Up to ``n`` slice indices spread over the class's extent: positions 1/(n+1) .. n/(n+1) of the slices where
    the prediction holds the class (the reference's when the prediction is empty; the middle slice if both are).

    Args:
        pred: (Z, H, W) bool prediction.
        ref: (Z, H, W) bool reference or ``None``.
        n: number of slices.
    """
    for mask in (pred, ref):
        if mask is not None and mask.any():
            zs = np.flatnonzero(mask.any(axis=(1, 2)))
            picks = [int(zs[min(len(zs) - 1, int(len(zs) * (i + 1) / (n + 1)))]) for i in range(n)]
            return list(dict.fromkeys(picks))
    return [pred.shape[0] // 2]


def outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a (H, W) bool mask: the mask minus its 4-connected erosion."""
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1), border_value=0)


def write_overlay(image: np.ndarray, pred: np.ndarray, ref: np.ndarray | None, path: Path, n: int = 3) -> list[int]:
    """Draw the overlay PNG of one class of one query: the slices of :func:`overlay_slices` side by side.

    Drawn with numpy and written by SimpleITK's PNG writer (no plotting library: a few ms per picture).

    Args:
        image: (Z, H, W) processed image (any intensity range; shown with its 1..99th percentile window).
        pred: (Z, H, W) bool prediction on the same grid (outline in red, drawn last).
        ref: (Z, H, W) bool reference on the same grid (outline in green), or ``None``.
        path: PNG to write (written under a temporary name, then renamed).
        n: number of slices.

    Returns:
        The slice indices shown, left to right.
    """
    zs = overlay_slices(pred, ref, n)
    lo, hi = np.percentile(image, [1, 99])
    scale = max(1, 256 // max(image.shape[1:]))  # small grids are enlarged (nearest neighbour)
    panels = []
    for z in zs:
        grey = np.clip((image[z] - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        for mask, colour in ((ref, (52, 199, 89)), (pred, (255, 59, 48))):
            if mask is not None:
                rgb[outline(mask[z])] = colour
        panels.append(np.kron(rgb, np.ones((scale, scale, 1), np.uint8)))
        panels.append(np.zeros((panels[-1].shape[0], 4, 3), np.uint8))  # a black gap between slices
    picture = np.ascontiguousarray(np.concatenate(panels[:-1], axis=1))
    with atomic_file(path) as tmp:
        sitk.WriteImage(sitk.GetImageFromArray(picture, isVector=True), str(tmp))
    return zs


def _cell(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def write_report(summary: dict[str, Any], out_dir: Path, path: Path) -> Path:
    """Write the self-contained HTML report of a ``predictions.json`` summary.

    Args:
        summary: the ``predictions.json`` content (``queries`` -> name -> ``classes`` -> class -> values,
            with ``overlay`` paths relative to ``out_dir``).
        out_dir: folder the overlay paths are relative to (their PNG bytes are embedded).
        path: the HTML file to write (temporary name, then renamed).
    """
    esc = html.escape
    rows, figures = [], []
    for qname, q in summary["queries"].items():
        for cname, c in q["classes"].items():
            rows.append("<tr>" + "".join(f"<td>{x}</td>" for x in (
                esc(qname), esc(cname), _cell(c["label_id"]), _cell(c["volume_ml"], 1), _cell(c["n_slices"]),
                _cell(c.get("dice")), _cell(c.get("hd95_mm"), 1))) + "</tr>")
            png = (out_dir / c["overlay"]).read_bytes()
            data = base64.b64encode(png).decode("ascii")
            figures.append(f'<figure><img alt="{esc(qname)} {esc(cname)}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{esc(qname)}: {esc(cname)}, processed slices "
                           f"{', '.join(str(z) for z in c['overlay_slices'])}</figcaption></figure>")
    supports = ", ".join(esc(s["image"]) for s in summary["supports"])
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>predict.py report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #bbb; padding: 0.3em 0.7em; text-align: right; }}
td:first-child, td:nth-child(2), th {{ text-align: left; }}
figure {{ display: inline-block; margin: 0.5em; }} img {{ max-width: 100%; }}
.meta {{ color: #555; font-size: 0.9em; }}
</style></head><body>
<h1>Few-shot segmentation report</h1>
<p class="meta">checkpoint {esc(str(summary["checkpoint"]))}<br>support: {supports}<br>
rule: {esc(summary["rule"])}</p>
<table><tr><th>query</th><th>class</th><th>label id</th><th>volume (ml)</th><th>slices</th><th>Dice</th>
<th>HD95 (mm)</th></tr>
{chr(10).join(rows)}
</table>
<p class="meta">Dice and HD95 only with <code>--query-label</code>; slices: slices of the query file (array axis 0)
holding the class. Overlays: processed grid (LPS, axial), red = prediction, green = reference.</p>
{chr(10).join(figures)}
</body></html>
"""
    write_text(path, page)
    return path
