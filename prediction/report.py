"""Pictures and the one-page report of ``predict.py``: outline overlays and a self-contained ``report.html``.

- :func:`write_query_overlay` draws one picture per query: an axial slice through each class and a coronal view,
  every class in its own colour, the reference (``--query-label``) as yellow outlines, and the support slices each
  class was compared with; slices are shown the same way up for every scan (the processed grid is LPS-oriented,
  ``data_preprocessing.geometry``: anterior at the top, the patient's right on the image's left);
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
from scipy import ndimage

from util.atomic import atomic_file, write_text


def outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a (H, W) bool mask: the mask minus its 4-connected erosion."""
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1), border_value=0)


#: Colours of the classes, in the order they are asked for (RGB 0..255); more classes cycle through them.
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60))
REFERENCE_COLOUR = (255, 225, 25)  # outlines of the reference labels (--query-label)


def _grey(image2d: np.ndarray, lo: float, hi: float) -> np.ndarray:
    g = np.clip((image2d - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def _paint(rgb: np.ndarray, labels2d: np.ndarray, ref2d: np.ndarray | None, ids: list[int]) -> np.ndarray:
    """Fill each class (40 % opacity) and outline it in its colour; reference outlines in yellow."""
    out = rgb.astype(np.float32)
    for i, cid in enumerate(ids):
        colour = np.array(PALETTE[i % len(PALETTE)], np.float32)
        m = labels2d == cid
        out[m] = 0.6 * out[m] + 0.4 * colour
        out[outline(m)] = colour
    out = out.astype(np.uint8)
    if ref2d is not None:
        for cid in ids:
            out[outline(ref2d == cid)] = REFERENCE_COLOUR
    return out


def axial_picks(labels: np.ndarray, ref: np.ndarray | None, ids: list[int]) -> list[int]:
    """One axial slice per class: the middle of the slices where the prediction holds it (the reference's when the
    prediction is empty); the volume's middle slice when neither does. Duplicates removed, order kept."""
    picks = []
    for cid in ids:
        for vol in (labels, ref):
            if vol is not None and (vol == cid).any():
                zs = np.flatnonzero((vol == cid).any(axis=(1, 2)))
                picks.append(int(zs[len(zs) // 2]))
                break
        else:
            picks.append(labels.shape[0] // 2)
    return list(dict.fromkeys(picks))


def write_query_overlay(image: np.ndarray, labels: np.ndarray, ref: np.ndarray | None, classes: dict[str, int],
                        spacing_zyx: tuple[float, float, float], path: Path,
                        supports: list[tuple[np.ndarray, np.ndarray]] | None = None,
                        support_slices: dict[int, list[list[int]]] | None = None) -> list[int]:
    """One picture of one query holding every class in its own colour.

    Top row: an axial slice through each class (:func:`axial_picks`) and one coronal view through the organs' centre
    row, stretched to the physical slice spacing so the z extent reads in mm. Bottom row (when ``supports`` are
    given): for each class, the middle one of the support slices the query was compared with, with that support's
    label of the class. Prediction: filled colour and outline; reference (``ref``): yellow outline.

    Args:
        image: (Z, H, W) processed query image (shown with its 1..99th percentile window).
        labels: (Z, H, W) int predicted labels (the ids of ``classes``).
        ref: (Z, H, W) int reference labels on the same grid, or ``None``.
        classes: class name -> id, in the legend's order.
        spacing_zyx: (dz, dy, dx) mm of the processed grid.
        path: PNG to write (atomically).
        supports: [(raw support image (Z, H, W), support label (Z, H, W))] on the processed grid.
        support_slices: class id -> per support, the support slices used.

    Returns:
        The axial slices shown, left to right.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ids = list(classes.values())
    zs = axial_picks(labels, ref, ids)
    lo, hi = np.percentile(image, [1, 99])
    fg = np.isin(labels, ids) | (np.isin(ref, ids) if ref is not None else False)
    row = int(np.flatnonzero(fg.any(axis=(0, 2))).mean()) if fg.any() else image.shape[1] // 2
    shown_support = []
    if supports and support_slices:
        for i, cid in enumerate(ids):
            used = support_slices.get(cid) or []
            if used and used[0]:
                z = used[0][len(used[0]) // 2]
                shown_support.append((i, cid, z))
    n_top = len(zs) + 1
    n_cols = max(n_top, len(shown_support))
    n_rows = 2 if shown_support else 1
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.6 * n_cols, 2.9 * n_rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, z in enumerate(zs):
        axes[0, k].imshow(_paint(_grey(image[z], lo, hi), labels[z], None if ref is None else ref[z], ids))
        axes[0, k].set_title(f"axial z={z}", fontsize=8)
    cor = _paint(_grey(image[:, row, :], lo, hi), labels[:, row, :], None if ref is None else ref[:, row, :], ids)
    aspect = spacing_zyx[0] / spacing_zyx[2]
    axes[0, len(zs)].imshow(cor[::-1], aspect=aspect)  # superior at the top
    axes[0, len(zs)].set_title(f"coronal row {row} ({labels.shape[0]} slices, {spacing_zyx[0]:g} mm)", fontsize=8)
    for k, (_, cid, z) in enumerate(shown_support):
        img, lab = supports[0]
        s_lo, s_hi = np.percentile(img, [1, 99])
        panel = _paint(_grey(img[z], s_lo, s_hi), np.where(lab[z] == cid, cid, 0), None, ids)
        axes[1, k].imshow(panel)
        name = next(n for n, c in classes.items() if c == cid)
        axes[1, k].set_title(f"support slice {z} ({name})", fontsize=8)
    handles = [Patch(color=np.array(PALETTE[i % len(PALETTE)]) / 255, label=n) for i, n in enumerate(classes)]
    if ref is not None:
        handles.append(Patch(color=np.array(REFERENCE_COLOUR) / 255, label="reference (outline)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
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
                _cell(c.get("dice")), _cell(c.get("hd95_mm"), 1),
                esc(", ".join(str(v) for v in c.get("estimated_range", []))))) + "</tr>")
        data = base64.b64encode((out_dir / q["overlay"]).read_bytes()).decode("ascii")
        reg = "; ".join(f"support {i}: correlation {r['score']:.2f}, overlap {r['overlap_mm']:.0f} mm"
                        for i, r in enumerate(q.get("registration", [])))
        figures.append(f'<figure><img alt="{esc(qname)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{esc(qname)}: axial slices {', '.join(str(z) for z in q['overlay_slices'])}"
                       f"{'; ' + esc(reg) if reg else ''}</figcaption></figure>")
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
in-plane spacing: {esc(str(summary.get("spacing", "")))}<br>
method: {esc(summary["rule"])}</p>
<table><tr><th>query</th><th>class</th><th>label id</th><th>volume (ml)</th><th>slices</th><th>Dice</th>
<th>HD95 (mm)</th><th>allowed range (processed slices)</th></tr>
{chr(10).join(rows)}
</table>
<p class="meta">Dice and HD95 only with <code>--query-label</code>; slices: slices of the query file (array axis 0)
holding the class. Overlays: processed grid (LPS: anterior up, the patient's right on the left); one colour per
class (legend), reference outlines in yellow; bottom row: the support slice each class was compared with.</p>
{chr(10).join(figures)}
</body></html>
"""
    write_text(path, page)
    return path
