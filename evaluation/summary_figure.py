"""Figure of a :func:`evaluation.summarize.summarize` table: per-organ Dice over folds, one PNG per dataset.

Each setting of the dataset is one panel: a box plot and the individual fold values (a strip plot, jittered
horizontally) per organ, in %, with the published SSL-ALPNet value of that organ (docs/method.md#published-numbers,
:mod:`evaluation.published`) drawn as a red bar. Matplotlib with the Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from evaluation.published import published
from util.atomic import atomic_file


def dataset_blocks(summary: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Group the summary's blocks by dataset: {dataset: [block, ...] sorted by setting}."""
    out: dict[str, list[dict[str, Any]]] = {}
    for block in summary.values():
        out.setdefault(block["dataset"], []).append(block)
    return {k: sorted(v, key=lambda b: b["setting"]) for k, v in sorted(out.items())}


def panel_data(dataset: str, block: dict[str, Any]) -> tuple[list[str], list[list[float]], dict[str, float]]:
    """What one panel draws: organ names, per-organ fold Dice (%), and the published Dice (%) of those organs.

    Args:
        dataset: registry name (``SABS``, ``CHAOST2``, ``CMR``, ...).
        block: one value of the summary (``organs`` -> ``folds`` fractions, ``setting``).

    Returns:
        ``(organs, values, marks)``; ``marks`` holds only the organs with a published value (none for the phantom).
    """
    organs = list(block["organs"])
    values = [[100 * v for v in block["organs"][o]["folds"].values()] for o in organs]
    ref = published(dataset, block["setting"])
    return organs, values, {o: ref[o] for o in organs if o in ref}


def write_figures(summary: dict[str, Any], prefix: Path, seed: int = 0) -> list[Path]:
    """Write ``<prefix>_<dataset>.png`` for every dataset of ``summary``.

    Args:
        summary: output of :func:`evaluation.summarize.summarize` (Dice as fractions in [0, 1]).
        prefix: output path prefix, e.g. ``runs/summary``.
        seed: seed of the horizontal jitter of the fold points.

    Returns:
        The written paths, in dataset order.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    paths = []
    for dataset, blocks in dataset_blocks(summary).items():
        fig, axes = plt.subplots(1, len(blocks), figsize=(1.6 + 1.4 * max(len(b["organs"]) for b in blocks)
                                                          * len(blocks), 4.2), squeeze=False)
        for ax, block in zip(axes[0], blocks):
            organs, values, marks = panel_data(dataset, block)
            ax.boxplot(values, widths=0.5, showfliers=False)
            ax.set_xticks(range(1, len(organs) + 1), organs)
            for i, vals in enumerate(values, start=1):
                ax.scatter(i + rng.uniform(-0.12, 0.12, len(vals)), vals, s=18, color="tab:blue", zorder=3,
                           label="fold" if i == 1 else None)
            for n, (organ, value) in enumerate(marks.items()):
                i = organs.index(organ) + 1
                ax.hlines(value, i - 0.3, i + 0.3, colors="tab:red", linewidth=2.5, zorder=4,
                          label=None if n else "SSL-ALPNet (published)")
            ax.set_title(f"{dataset} setting {block['setting']} ({block['n_folds']} complete folds)")
            ax.set_ylabel("Dice (%)")
            ax.set_ylim(0, 100)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        path = Path(f"{prefix}_{dataset}.png")
        with atomic_file(path) as tmp:  # a crash leaves no half-written figure
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        paths.append(path)
    return paths
