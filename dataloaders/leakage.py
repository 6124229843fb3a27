"""Setting 2 stays leak-free whatever the config, and every run records what it actually excluded.

The rule (docs/method.md#settings-and-label-groups): in setting 2 a training slice holding >= 1 pixel of ANY test
class of the label group is never used. Two things can break it behind the user's back, and both are refused here
before training starts:

- ``exclude_cls_list`` that misses a test class of ``label_sets`` (e.g. overridden by hand);
- ``min_fg_data`` > 1: the exclusion reads ``classmap_<min_fg_data>.json``, which does not list slices holding
  1..min_fg_data-1 pixels of a class, so those slices would stay in training.

The lineages' leaky variant (drop only slices holding ALL excluded classes, docs/method.md#q8-leaky-exclusion) stays
available by name, ``exclusion_rule=all``, and is recorded as not leak-free.

:func:`exclusion_record` computes, from the label files and the slices the episode dataset can draw, how many
trainable slices hold each class; ``training.py`` stores it in the checkpoint and ``validation.py`` copies it into
``results.json`` with ``leak_free`` for the evaluated classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dataloaders.dataset_info import DatasetInfo
from util.errors import ConfigError


def check_setting2_config(config: Mapping[str, Any], info: DatasetInfo) -> None:
    """Refuse a setting-2 config that would keep training slices holding a test class.

    Args:
        config: the resolved run config (``setting``, ``label_sets``, ``exclude_cls_list``, ``exclusion_rule``,
            ``min_fg_data``).
        info: the dataset (test classes of each label group).

    Raises:
        ConfigError: naming the keys that make the run leaky, unless ``exclusion_rule="all"`` asks for the leaky
            variant by name.
    """
    if config["setting"] not in (1, 2):
        raise ConfigError(f"setting={config['setting']!r} must be 1 or 2")
    if config["setting"] != 2 or config["exclusion_rule"] == "all":
        return
    test = info.test_classes(config["label_sets"])
    missing = [c for c in test if c not in config["exclude_cls_list"]]
    problems = []
    if missing:
        problems.append(f"exclude_cls_list={list(config['exclude_cls_list'])} misses test classes "
                        f"{[info.labels[c] for c in missing]} of label_sets={config['label_sets']} (drop the "
                        f"exclude_cls_list override)")
    if config["min_fg_data"] != 1:
        problems.append(f"min_fg_data={config['min_fg_data']} excludes only slices with >= {config['min_fg_data']} "
                        f"pixels of a test class, so slices with fewer stay in training (use min_fg_data=1)")
    if problems:
        raise ConfigError("setting 2 would not be leak-free: " + "; ".join(problems)
                          + ". To run the leaky lineage variant anyway, pass exclusion_rule=all (recorded as leaky)")


def exclusion_record(slice_counts: Mapping[int, np.ndarray], scan_ids: Sequence[int], slice_scan: np.ndarray,
                     slice_z: np.ndarray, trainable: np.ndarray, info: DatasetInfo, excluded_classes: Sequence[int],
                     test_classes: Sequence[int], exclusion_rule: str) -> dict[str, Any]:
    """What the episode dataset really excludes, computed from the label files.

    Args:
        slice_counts: scan id -> (Z, C) per-slice pixel counts of every class in its label file.
        scan_ids: the dataset's training scans, in its order.
        slice_scan, slice_z: the dataset's slice table (position in ``scan_ids``, slice index), (N,) each.
        trainable: indices into the slice table of the slices episodes can be drawn from.
        info: the dataset (class names).
        excluded_classes: the classes the dataset was asked to exclude.
        test_classes: the test classes of the run's label group.
        exclusion_rule: ``"any"`` or ``"all"``.

    Returns:
        ``excluded_classes`` and ``test_classes`` (ids), ``exclusion_rule``, ``trainable_slices``,
        ``trainable_slices_holding`` (class name -> trainable slices with >= 1 pixel of it, every foreground
        class) and ``leak_free`` (no trainable slice holds a test class).
    """
    trainable = np.asarray(trainable, dtype=np.int64)
    n_classes = max(info.labels) + 1
    table = np.zeros((len(trainable), n_classes), dtype=np.int64)  # per trainable slice, pixels of each class
    for row, s in enumerate(trainable):
        counts = slice_counts[int(scan_ids[int(slice_scan[s])])][int(slice_z[s])]
        table[row, :min(len(counts), n_classes)] = counts[:n_classes]
    holding = {name: int((table[:, c] > 0).sum()) for c, name in info.labels.items() if c != 0}
    return {
        "excluded_classes": [int(c) for c in excluded_classes],
        "test_classes": [int(c) for c in test_classes],
        "exclusion_rule": exclusion_rule,
        "trainable_slices": int(len(trainable)),
        "trainable_slices_holding": holding,
        "leak_free": all(holding.get(info.labels[c], 0) == 0 for c in test_classes),
    }


def leak_free_for(record: Mapping[str, Any] | None, classes: Sequence[int], info: DatasetInfo) -> bool | None:
    """Whether no trainable slice of the training run held any of ``classes``; ``None`` without a record."""
    if not record:
        return None
    holding = record.get("trainable_slices_holding", {})
    return all(holding.get(info.labels[c], 0) == 0 for c in classes)


def dataset_exclusion_record(dataset: Any, slice_counts: Mapping[int, np.ndarray], info: DatasetInfo,
                             config: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`exclusion_record` of a :class:`~dataloaders.superpixel_dataset.SuperpixelEpisodeDataset`.

    The trainable slices are the dataset's eligible ones: compact sampling draws only those, and legacy sampling
    moves on or redraws until it reaches one of them (non-empty and not excluded).
    """
    return {"setting": int(config["setting"]), **exclusion_record(
        slice_counts, dataset.scan_ids, dataset.slice_scan, dataset.slice_z, dataset.eligible, info,
        dataset.exclude_classes, info.test_classes(config["label_sets"]), dataset.exclusion_rule)}
