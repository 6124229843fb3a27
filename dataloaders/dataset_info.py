"""Dataset registry: the single source of truth for label maps, evaluated classes, label groups and folds.

Every dataset, built-in or a user's own, is described by one JSON/JSON5 file. The built-in ones live in
``dataloaders/datasets/<NAME>.json5`` (CHAOST2, SABS, CMR, PHANTOM); a user's file is loaded with
:func:`get_dataset_info` given its path. Scripts look every dataset-dependent value up here and never branch on
dataset names.

Description file keys (see ``dataloaders/datasets/*.json5`` and docs/data-format.md):

- ``name`` (str), ``modality`` ("CT" | "MR"), ``data_dir`` (str, default folder of the processed files),
- ``labels`` ({"<id>": "<NAME>"}, must include 0),
- ``eval_classes`` (list of ids scored by the protocol, ``pa_all`` in the original; empty only when ``labels``
  names no foreground class),
- ``label_groups`` (list of id lists; group g trains with ``label_groups[g]`` and tests on the rest of
  ``eval_classes``; optional, default: one group per evaluated class),
- ``scan_ids`` (optional fixed, sorted id list; otherwise ids are discovered in the data folder),
- ``folds``: ``{"sep": [...]}`` (the original's separators over positions of the circular id list),
  ``{"n_folds": k}`` (automatic, equal-sized, optionally ``"seed"`` to shuffle first), or an explicit list
  ``[{"queries": [...], "support": [...]}, ...]`` of scan ids (``{"queries": [], "support": []}``: a
  training-only fold, every scan trains and nothing is evaluated),
- ``body_threshold`` (float, raw-intensity threshold of the pseudolabel body mask; default 1e-4 for CT and
  50.0001 for MR), ``aliases`` (optional other names),
- ``spacing_mm`` (float, optional): the in-plane spacing of the processed scans (one value for the whole dataset;
  the SABS registry entry gives the typical value, its scans each keep 1.75 x their own),
- ``n_sv`` (int, voxels, default 5000): mean size of the 3D supervoxels of ``pseudolabel --dim 3`` (the ADNet
  lineage's 5000 for abdominal scans, 1000 for cardiac MRI; docs/supervoxels.md).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import json5

from util.errors import ProjectError

DATASETS_DIR = Path(__file__).resolve().parent / "datasets"
REPO_ROOT = Path(__file__).resolve().parent.parent

_ALLOWED_KEYS = {
    "name", "modality", "data_dir", "labels", "eval_classes", "label_groups", "scan_ids", "folds",
    "body_threshold", "aliases", "description", "n_sv", "spacing_mm",
}
#: Body mask of a processed scan: voxels above this raw intensity, by modality (the one source of these values:
#: registry descriptions, the phantom, ``prepare`` and ``predict.py`` read them here). CT in 0..255 has air at 0;
#: MR uses CHAOS's rule, intensity > 50 (docs/method.md#pseudolabels).
BODY_THRESHOLD: dict[str, float] = {"CT": 1e-4, "MR": 1e-4 + 50.0}


class DatasetDescriptionError(ProjectError, ValueError):
    """A dataset description file (or a registry name) is invalid."""


@dataclass(frozen=True)
class Fold:
    """One cross-validation fold, as scan ids.

    Attributes:
        index: fold number.
        queries: query scan ids, in circular-list order.
        support: support scan ids (``n_shots`` of them; the last ``n_shots`` of the held-out list).
        train: every other scan id, in sorted order.
    """

    index: int
    queries: tuple[int, ...]
    support: tuple[int, ...]
    train: tuple[int, ...]

    @property
    def held_out(self) -> tuple[int, ...]:
        """Queries followed by supports: the original's held-out list."""
        return self.queries + self.support


@dataclass(frozen=True)
class DatasetInfo:
    """Everything dataset-specific, loaded from a description file.

    Attributes:
        name: registry key (e.g. ``"CHAOST2"``).
        modality: ``"CT"`` or ``"MR"``; decides the load-time normalisation and the body threshold.
        labels: label id -> class name (id 0 is the background).
        eval_classes: ids scored by the evaluation protocol (``pa_all``).
        label_groups: the original's ``LABEL_GROUP`` lists (classes of a group's training side).
        data_dir: default processed-data folder (absolute, resolved against the repository root).
        scan_ids: fixed sorted scan ids, or ``None`` when they are discovered in the data folder.
        folds_spec: the ``folds`` entry of the description file.
        body_threshold: raw-intensity threshold of the pseudolabel body mask.
        source: the description file this came from.
        n_sv: mean 3D supervoxel size in voxels (``pseudolabel --dim 3``).
        spacing_mm: in-plane spacing (mm) of the processed scans when the description states it: the one spacing of
            a prepared folder, the registry's nominal value otherwise (SABS: typical, each scan keeps its own). The
            spacing a checkpoint records is measured on its training scans (``preprocessing_record``).
    """

    name: str
    modality: Literal["CT", "MR"]
    labels: dict[int, str]
    eval_classes: tuple[int, ...]
    label_groups: tuple[tuple[int, ...], ...]
    data_dir: Path
    scan_ids: tuple[int, ...] | None
    folds_spec: Any
    body_threshold: float
    source: Path
    aliases: tuple[str, ...] = field(default=())
    n_sv: int = 5000
    spacing_mm: float | None = None

    # ---------------------------------------------------------------- labels and groups
    @property
    def class_names(self) -> dict[int, str]:
        """Foreground label id -> name (background left out)."""
        return {k: v for k, v in self.labels.items() if k != 0}

    @property
    def name_to_id(self) -> dict[str, int]:
        return {v: k for k, v in self.labels.items()}

    @property
    def n_label_groups(self) -> int:
        return len(self.label_groups)

    def test_classes(self, label_set: int) -> list[int]:
        """Classes evaluated with label group ``label_set``: ``eval_classes - label_groups[label_set]``."""
        if not 0 <= label_set < len(self.label_groups):
            raise DatasetDescriptionError(
                f"{self.name}: label_sets={label_set} is out of range; this dataset has "
                f"{len(self.label_groups)} label groups (0..{len(self.label_groups) - 1})")
        group = set(self.label_groups[label_set])
        return [c for c in self.eval_classes if c not in group]

    def setting2_exclusion(self, label_set: int) -> list[int]:
        """Classes whose slices setting 2 drops from training: the group's test classes."""
        return self.test_classes(label_set)

    # ---------------------------------------------------------------- folds
    @property
    def n_folds(self) -> int:
        spec = self.folds_spec
        if isinstance(spec, list):
            return len(spec)
        if "sep" in spec:
            return len(spec["sep"]) - 1
        return int(spec["n_folds"])

    def resolve_scan_ids(self, available: Sequence[int] | None = None) -> list[int]:
        """The sorted scan-id list the folds refer to.

        Args:
            available: ids found in the data folder; required when the description has no fixed ``scan_ids``.
                With fixed ids, every fixed id must be available.
        """
        if self.scan_ids is not None:
            if available is not None:
                missing = sorted(set(self.scan_ids) - set(available))
                if missing:
                    raise DatasetDescriptionError(
                        f"{self.name}: scans {missing} of the fold table are missing from the data folder "
                        f"(found ids {sorted(available)})")
            return list(self.scan_ids)
        if available is None:
            raise DatasetDescriptionError(
                f"{self.name} has no fixed scan_ids: pass the ids found in the data folder")
        return sorted(int(i) for i in available)

    def fold(self, index: int, available: Sequence[int] | None = None, n_shots: int = 1) -> Fold:
        """Fold ``index``: queries, support(s) and training scans.

        The original's scheme: on the sorted circular id list, the held-out list is
        ``ids[sep[k] : sep[k+1] + n_shots]`` (wrapping around); its last ``n_shots`` scans are the supports.
        """
        if not 0 <= index < self.n_folds:
            raise DatasetDescriptionError(
                f"{self.name}: eval_fold={index} is out of range; this dataset has {self.n_folds} folds "
                f"(0..{self.n_folds - 1})")
        if n_shots < 1:
            raise DatasetDescriptionError(f"n_shots must be >= 1, got {n_shots}")
        ids = self.resolve_scan_ids(available)
        spec = self.folds_spec
        if isinstance(spec, list):
            entry = spec[index]
            if not entry["queries"] and not entry["support"]:  # a training-only fold: every scan trains
                return Fold(index=index, queries=(), support=(), train=tuple(ids))
            queries = tuple(int(i) for i in entry["queries"])
            support = tuple(int(i) for i in entry["support"])[:n_shots]
            if len(support) < n_shots:
                raise DatasetDescriptionError(
                    f"{self.name}: fold {index} lists {len(entry['support'])} support scans, n_shots={n_shots}")
            unknown = sorted(set(queries + support) - set(ids))
            if unknown:
                raise DatasetDescriptionError(f"{self.name}: fold {index} names unknown scans {unknown}")
        else:
            order = list(ids)
            if "sep" in spec:
                sep = [int(s) for s in spec["sep"]]
                if sep[-1] != len(order):
                    raise DatasetDescriptionError(
                        f"{self.name}: folds.sep ends at {sep[-1]} but there are {len(order)} scans")
            else:
                n = len(order)
                k = int(spec["n_folds"])
                if n < k + 1:
                    raise DatasetDescriptionError(
                        f"{self.name}: {n} scans are too few for {k} folds (need at least {k + 1})")
                if "seed" in spec:
                    random.Random(int(spec["seed"])).shuffle(order)
                sep = [round(i * n / k) for i in range(k + 1)]
            held = [order[p % len(order)] for p in range(sep[index], sep[index + 1] + n_shots)]
            queries, support = tuple(held[:-n_shots]), tuple(held[-n_shots:])
            if set(queries) & set(support):
                raise DatasetDescriptionError(
                    f"{self.name}: fold {index} with n_shots={n_shots} wraps onto its own queries")
        held_out = set(queries) | set(support)
        train = tuple(i for i in ids if i not in held_out)
        return Fold(index=index, queries=queries, support=support, train=train)


# -------------------------------------------------------------------- loading
def _fail(source: Path | str, msg: str) -> DatasetDescriptionError:
    return DatasetDescriptionError(f"{source}: {msg}")


def _int_list(source: Path, key: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise _fail(source, f"'{key}' must be a list of integers, got {value!r}")
    return tuple(value)


def parse_description(raw: dict[str, Any], source: Path) -> DatasetInfo:
    """Validate a parsed description dict and build a :class:`DatasetInfo`; errors name ``source`` and the key."""
    if not isinstance(raw, dict):
        raise _fail(source, "a dataset description must be a JSON object")
    unknown = sorted(set(raw) - _ALLOWED_KEYS)
    if unknown:
        raise _fail(source, f"unknown keys {unknown}; allowed: {sorted(_ALLOWED_KEYS)}")
    for key in ("name", "modality", "labels"):
        if key not in raw:
            raise _fail(source, f"missing required key '{key}'")
    name = raw["name"]
    if not isinstance(name, str) or not name:
        raise _fail(source, "'name' must be a non-empty string")
    modality = raw["modality"]
    if modality not in ("CT", "MR"):
        raise _fail(source, f"'modality' must be \"CT\" or \"MR\", got {modality!r}")

    if not isinstance(raw["labels"], dict) or not raw["labels"]:
        raise _fail(source, "'labels' must be an object {\"<id>\": \"<NAME>\"}")
    labels: dict[int, str] = {}
    for k, v in raw["labels"].items():
        try:
            lid = int(k)
        except ValueError:
            raise _fail(source, f"label id {k!r} in 'labels' is not an integer") from None
        if lid < 0 or not isinstance(v, str) or not v:
            raise _fail(source, f"label {k!r}: ids must be >= 0 and names non-empty strings")
        labels[lid] = v
    if 0 not in labels:
        raise _fail(source, "'labels' must name the background id 0")
    if len(set(labels.values())) != len(labels):
        raise _fail(source, "label names in 'labels' must be unique")

    eval_classes = _int_list(source, "eval_classes", raw.get("eval_classes", sorted(k for k in labels if k)))
    bad = [c for c in eval_classes if c not in labels or c == 0]
    # A dataset without any foreground class (a user's unlabelled scans, data_preprocessing.prepare) trains but
    # evaluates nothing: its eval_classes are empty.
    if bad or (not eval_classes and any(labels)):
        raise _fail(source, f"'eval_classes' must be non-empty foreground ids of 'labels'; bad: {bad}")

    if "label_groups" in raw:
        if not isinstance(raw["label_groups"], list) or not raw["label_groups"]:
            raise _fail(source, "'label_groups' must be a non-empty list of id lists")
        groups = tuple(_int_list(source, "label_groups", g) for g in raw["label_groups"])
    else:  # one group per evaluated class: each class tested alone
        groups = tuple(tuple(c for c in eval_classes if c != t) for t in eval_classes)
    for g, group in enumerate(groups):
        if any(c not in eval_classes for c in group):
            raise _fail(source, f"label_groups[{g}] = {list(group)} names classes outside eval_classes")
        if eval_classes and set(group) >= set(eval_classes):
            raise _fail(source, f"label_groups[{g}] leaves no class to test")

    scan_ids = None
    if "scan_ids" in raw:
        scan_ids = _int_list(source, "scan_ids", raw["scan_ids"])
        if list(scan_ids) != sorted(set(scan_ids)):
            raise _fail(source, "'scan_ids' must be sorted and unique")

    folds = raw.get("folds", {"n_folds": 5})
    if isinstance(folds, list):
        for i, f in enumerate(folds):
            if not isinstance(f, dict) or set(f) != {"queries", "support"}:
                raise _fail(source, f"folds[{i}] must be {{\"queries\": [...], \"support\": [...]}}")
            _int_list(source, f"folds[{i}].queries", f["queries"])
            _int_list(source, f"folds[{i}].support", f["support"])
        if not folds:
            raise _fail(source, "'folds' is empty")
    elif isinstance(folds, dict):
        if "sep" in folds:
            sep = _int_list(source, "folds.sep", folds["sep"])
            if set(folds) != {"sep"} or len(sep) < 2 or sep[0] != 0 or list(sep) != sorted(set(sep)):
                raise _fail(source, "'folds.sep' must be increasing positions starting at 0 (and the only key)")
            if scan_ids is not None and sep[-1] != len(scan_ids):
                raise _fail(source, f"'folds.sep' ends at {sep[-1]} but 'scan_ids' has {len(scan_ids)} scans")
        elif "n_folds" in folds:
            if set(folds) - {"n_folds", "seed"} or not isinstance(folds["n_folds"], int) or folds["n_folds"] < 1:
                raise _fail(source, "'folds' must be {\"n_folds\": k >= 1} with an optional integer \"seed\"")
        else:
            raise _fail(source, "'folds' needs 'sep', 'n_folds', or an explicit list of folds")
    else:
        raise _fail(source, "'folds' must be an object or a list")

    threshold = raw.get("body_threshold", BODY_THRESHOLD[modality])
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        raise _fail(source, f"'body_threshold' must be a number, got {threshold!r}")

    n_sv = raw.get("n_sv", 5000)
    if not isinstance(n_sv, int) or isinstance(n_sv, bool) or n_sv < 1:
        raise _fail(source, f"'n_sv' must be a positive integer (voxels), got {n_sv!r}")

    spacing = raw.get("spacing_mm")
    if spacing is not None and (isinstance(spacing, bool) or not isinstance(spacing, (int, float)) or spacing <= 0):
        raise _fail(source, f"'spacing_mm' must be a positive number of mm, got {spacing!r}")

    data_dir = Path(raw.get("data_dir", f"data/{name}"))
    if not data_dir.is_absolute():
        data_dir = REPO_ROOT / data_dir
    aliases = tuple(raw.get("aliases", ()))
    return DatasetInfo(
        name=name, modality=modality, labels=dict(sorted(labels.items())), eval_classes=eval_classes,
        label_groups=groups, data_dir=data_dir, scan_ids=scan_ids, folds_spec=folds,
        body_threshold=float(threshold), source=source, aliases=aliases, n_sv=n_sv,
        spacing_mm=None if spacing is None else float(spacing),
    )


def load_description(path: str | Path) -> DatasetInfo:
    """Load and validate one description file (JSON or JSON5)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetDescriptionError(f"dataset description file not found: {path}")
    try:
        raw = json5.loads(path.read_text())
    except ValueError as err:
        raise _fail(path, f"not valid JSON/JSON5: {err}") from None
    return parse_description(raw, path)


def builtin_names() -> list[str]:
    """Names of the built-in datasets."""
    return sorted(p.stem for p in DATASETS_DIR.glob("*.json5"))


def get_dataset_info(name_or_path: str | Path) -> DatasetInfo:
    """Look a dataset up by registry name (or alias, e.g. ``C0``), or load a description file by path.

    Raises:
        DatasetDescriptionError: unknown name (the message lists the known ones) or invalid file.
    """
    text = str(name_or_path)
    if text.endswith((".json", ".json5")) or Path(text).is_file():
        return load_description(text)
    for stem in builtin_names():
        info = load_description(DATASETS_DIR / f"{stem}.json5")
        if text == info.name or text in info.aliases:
            return info
    raise DatasetDescriptionError(
        f"unknown dataset {text!r}; known: {builtin_names()}, or pass the path of a dataset description "
        f"file (.json/.json5)")
