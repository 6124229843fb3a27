"""Prepare your own scans for training: any format and geometry -> a processed folder with its dataset description.

Usage::

    python -m data_preprocessing.prepare --images PATH [PATH ...] [--labels PATH ...] --modality CT|MR --out DIR
        [--name NAME] [--classes LIVER=5,SPLEEN=1] [--spacing MM] [--z-spacing MM] [--size 256] [--window LO HI]
        [--mr-clip-percentile P] [--folds K] [--body-threshold T] [--workers N] [--overwrite] [--no-progress]

then ``python training.py with dataset=DIR/dataset.json5`` (docs/own-scans.md).

Inputs (:func:`data_preprocessing.geometry.list_scans`): NIfTI (.nii, .nii.gz), NRRD, MHA/MHD files and DICOM
series folders; a folder of image files means one scan per file, a folder of DICOM files one scan, a folder of
DICOM folders one scan per sub-folder. Labels (optional, files) pair with images by name: a label's name, without
a trailing ``_seg``/``_label``/``_gt``/``_mask`` (etc.) and an image's without a trailing ``_0000``, must be equal
(``liver3.nii.gz`` <-> ``liver3_seg.nii.gz``; nnU-Net's ``case_0000`` <-> ``case``); when the names do not
all match and there are as many labels as images, they pair by order. Images without a label are allowed.

Every scan goes through :func:`data_preprocessing.geometry.preprocess_image`: reoriented to LPS, intensity (CT:
``--window``, default -125..275 HU, scaled to 0..255; MR: clipped at the 99.5th percentile), resampled in-plane to
``--spacing``, one value in mm for every scan of the folder (default: MR 1.25 mm; CT 1.6 mm, 256 px covering 410 mm;
never a multiple of each scan's own spacing, so scans of mixed resolutions keep one physical scale; written to
``dataset.json5`` as ``spacing_mm``), z kept unless ``--z-spacing``, centre crop or pad to ``--size``. Labels follow
one value at a time.

Classes: ``--classes LIVER=5,SPLEEN=1`` names the raw ids of your label files; they become the contiguous ids 1, 2,
... of the processed labels in the order given (other raw ids become background, with a note). Without it, every
raw id found in the labels becomes a class named by its id, in ascending order.

Output, all in ``DIR`` (built in a temporary sibling folder, renamed at the end: never half-written):

- ``image_<id>.nii.gz``, ``label_<id>.nii.gz`` (all 0 for an unlabelled scan), ``superpix-MIDDLE_<id>.nii.gz``,
  ``fgmask_<id>.nii.gz``, ``classmap_1.json``: the processed format (docs/data-format.md), ids 0..N-1 in input order;
- ``dataset.json5``: the description that ``training.py with dataset=DIR/dataset.json5`` reads; folds: with at least
  two labelled scans, ``--folds`` (default 5, at most one per labelled scan) folds over the labelled scans only, each
  labelled scan a query exactly once and the next labelled scan the support, unlabelled scans always training;
  otherwise one training-only fold (every scan trains, nothing to evaluate: use ``predict.py``);
- ``scans.json``: per scan id its name, source image (and label) path, the grid transform back to the source grid
  (:class:`data_preprocessing.geometry.GridTransform`), the settings, and the class map;
- ``verify.json``: the verification table of :mod:`data_preprocessing.verify` (also printed).

Exit codes: 0 done, 1 the verification found errors (the folder is still written), 2 bad input (``error: ...``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from data_preprocessing.geometry import SCANS_FILE, PrepareSettings, label_values, preprocess_image, preprocess_label
from data_preprocessing.intensity import map_label_values
from data_preprocessing.pseudolabel import generate_pseudolabels
from data_preprocessing.scan_reader import (
    check_same_grid,
    grid_problem,
    list_scans,
    read_grid,
    read_label,
    read_scan,
    scan_name,
)
from data_preprocessing.verify import verify_dataset
from dataloaders.dataset_info import load_description
from dataloaders.niftiio import (
    image_path,
    label_path,
    read_label_volume,
    write_json,
    write_volume,
)
from util.atomic import atomic_folder, write_text
from util.errors import EXIT_USER_ERROR, ProjectError, RawDataError, error_line
from util.options import MAX_CLASSES, OptionParser, parse_classes, positive_float, positive_int

DESCRIPTION_FILE = "dataset.json5"
VERIFY_FILE = "verify.json"
DEFAULT_FOLDS = 5
_LABEL_SUFFIX = re.compile(r"[_\-.](seg|segmentation|label|labels|labelmap|gt|mask|masks|annotation)$", re.I)
_CHANNEL_SUFFIX = re.compile(r"_0000$")
_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


# -------------------------------------------------------------------- options
def pairing_key(name: str, is_label: bool) -> str:
    """The name a label and its image share: ``liver3_seg`` -> ``liver3``, ``case_0000`` (image) -> ``case``."""
    name = name.lower()
    return _LABEL_SUFFIX.sub("", name) if is_label else _CHANNEL_SUFFIX.sub("", name)


def pair_labels(images: Sequence[Path], labels: Sequence[Path]) -> list[Path | None]:
    """The label of each image (``None``: unlabelled), by name or, failing that, by order (module docstring).

    Raises:
        RawDataError: more labels than images, two images or labels with the same pairing name, or labels whose
            names match no image while the counts differ (names the first such label).
    """
    if not labels:
        return [None] * len(images)
    if len(labels) > len(images):
        raise RawDataError(f"{len(labels)} labels for {len(images)} images: at most one label per image")
    image_keys: dict[str, Path] = {}
    for img in images:
        key = pairing_key(scan_name(img), is_label=False)
        if key in image_keys:
            if len(labels) == len(images):
                return list(labels)  # ambiguous names: pair by order
            raise RawDataError(f"{img} and {image_keys[key]} have the same name {key!r}: labels cannot be paired "
                               f"by name (give as many labels as images to pair them by order)")
        image_keys[key] = img
    by_key: dict[str, Path] = {}
    unmatched = []
    for lbl in labels:
        key = pairing_key(scan_name(lbl), is_label=True)
        if key not in image_keys:
            unmatched.append(lbl)
        elif key in by_key:
            raise RawDataError(f"{lbl} and {by_key[key]} both pair with the image {image_keys[key]}")
        else:
            by_key[key] = lbl
    if unmatched:
        if len(labels) == len(images):
            return list(labels)
        raise RawDataError(f"{unmatched[0]}: no image with a matching name (labels pair with images by name, "
                           f"e.g. liver3.nii.gz <-> liver3_seg.nii.gz, or by order when there are as many labels "
                           f"as images)")
    return [by_key.get(pairing_key(scan_name(img), is_label=False)) for img in images]


def default_name(out: Path) -> str:
    """Dataset name from the output folder's name (characters other than letters, digits, ``_-.`` -> ``_``)."""
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", out.resolve().name).lstrip("_.-")
    return name or "OWN"


def labelled_folds(scan_ids: Sequence[int], labelled: Sequence[int], n_folds: int) -> list[dict[str, list[int]]]:
    """Explicit folds for a prepared folder (``folds`` of the description, dataloaders/dataset_info.py).

    With at least two labelled scans: ``min(n_folds, len(labelled))`` folds; the labelled scans (in id order) are split
    into near-equal consecutive chunks, fold k's queries are chunk k and its support the first labelled scan after the
    chunk (circularly), the original's scheme over the labelled scans (docs/method.md#folds). Every labelled scan is a
    query exactly once; unlabelled scans are never held out. Otherwise one training-only fold
    ``{"queries": [], "support": []}``.
    """
    lab = sorted(labelled)
    if len(lab) < 2:
        return [{"queries": [], "support": []}]
    k = min(n_folds, len(lab))
    bounds = [round(i * len(lab) / k) for i in range(k + 1)]
    return [{"queries": lab[bounds[i]:bounds[i + 1]], "support": [lab[bounds[i + 1] % len(lab)]]} for i in range(k)]


# -------------------------------------------------------------------- one scan
@dataclass(frozen=True)
class ScanJob:
    """One scan to prepare: output id, source paths, settings and the (temporary) output folder."""

    scan_id: int
    image: Path
    label: Path | None
    settings: PrepareSettings
    out_dir: Path


def prepare_scan(job: ScanJob) -> dict[str, Any]:
    """Read, transform and write one scan: ``image_<id>`` and ``label_<id>`` (raw label ids, int32; remapped later).

    Returns:
        The scan's ``scans.json`` entry plus ``raw_ids`` (label ids present after resampling) and ``source_ids``
        (present in the source label).
    """
    img, name = read_scan(job.image)
    arr, transform, processed = preprocess_image(img, job.settings)
    write_volume(arr, image_path(job.out_dir, job.scan_id), reference=processed)
    raw_ids: list[int] = []
    source_ids: list[int] = []
    if job.label is not None:
        lbl = check_same_grid(img, read_label(job.label), job.image, job.label)
        source_ids = label_values(sitk.GetArrayViewFromImage(lbl))
        lab = preprocess_label(lbl, transform)
        raw_ids = label_values(lab)
    else:
        lab = np.zeros(arr.shape, dtype=np.int32)
    write_volume(lab, label_path(job.out_dir, job.scan_id), reference=processed)
    return {"name": name, "image": str(job.image.resolve()),
            "label": str(job.label.resolve()) if job.label is not None else None,
            "shape": list(arr.shape), "transform": transform.to_dict(), "raw_ids": raw_ids,
            "source_ids": source_ids}


def _pool_context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def process_scans(jobs: Sequence[ScanJob], workers: int, progress: bool) -> list[dict[str, Any]]:
    """:func:`prepare_scan` of every job, in a process pool when ``workers > 1``; results in job order."""
    if workers == 1 or len(jobs) == 1:
        return [prepare_scan(j) for j in tqdm(jobs, disable=not progress, unit="scan", desc="prepare")]
    pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=_pool_context())
    try:
        return list(tqdm(pool.map(prepare_scan, jobs), total=len(jobs), disable=not progress, unit="scan",
                         desc="prepare"))
    finally:  # on an error: drop the queued scans instead of finishing them
        pool.shutdown(cancel_futures=True)


# -------------------------------------------------------------------- the folder
def class_table(results: Sequence[dict[str, Any]], classes: dict[str, int] | None,
                jobs: Sequence[ScanJob]) -> dict[str, dict[str, int]]:
    """``{NAME: {"id": contiguous id, "raw_id": id in the user's files}}``.

    Raises:
        RawDataError: a ``--classes`` id found in none of the label files, or more than 255 classes.
    """
    present = sorted({v for r in results for v in r["source_ids"]})
    if classes is None:
        if len(present) > MAX_CLASSES:
            raise RawDataError(f"the labels hold {len(present)} different ids; at most {MAX_CLASSES} classes "
                               f"(choose some with --classes)")
        return {str(v): {"id": i + 1, "raw_id": v} for i, v in enumerate(present)}
    labelled = [j.label for j in jobs if j.label is not None]
    if labelled:
        absent = [f"{n}={v}" for n, v in classes.items() if v not in present]
        if absent:
            raise RawDataError(f"--classes {','.join(absent)}: no label file holds these ids (ids found: {present}; "
                               f"label files such as {labelled[0]})")
    return {n: {"id": i + 1, "raw_id": v} for i, (n, v) in enumerate(classes.items())}


def remap_labels(out_dir: Path, results: Sequence[dict[str, Any]], table: dict[str, dict[str, int]]) -> None:
    """Rewrite every ``label_<id>`` from raw ids to the contiguous ids of ``table`` (uint8; other ids -> 0)."""
    to_new = {c["raw_id"]: c["id"] for c in table.values()}
    for sid, res in enumerate(results):
        raw, geom = read_label_volume(label_path(out_dir, sid))
        mapping = {0: 0, **{v: to_new.get(v, 0) for v in np.unique(raw).tolist() if v}}
        write_volume(map_label_values(raw, mapping, what=str(res["label"])), label_path(out_dir, sid),
                     geometry=geom)


def description(name: str, settings: PrepareSettings, out_dir: Path, table: dict[str, dict[str, int]],
                n_scans: int, labelled: list[int], n_folds: int, body_threshold: float | None) -> dict[str, Any]:
    """The ``dataset.json5`` content (dataloaders/dataset_info.py keys)."""
    ids = sorted(c["id"] for c in table.values())
    desc: dict[str, Any] = {
        "name": name, "modality": settings.modality, "data_dir": str(out_dir.resolve()),
        "description": f"prepared by data_preprocessing.prepare: {n_scans} scans, {len(labelled)} labelled",
        "labels": {"0": "BG", **{str(c["id"]): n for n, c in table.items()}},
        "eval_classes": ids, "label_groups": [[]],  # one group testing every class (setting 2: all excluded)
        "scan_ids": list(range(n_scans)),
        "folds": labelled_folds(range(n_scans), labelled, n_folds),
    }
    if body_threshold is not None:
        desc["body_threshold"] = body_threshold
    desc["spacing_mm"] = settings.spacing  # one physical scale for every scan (checked again at training time)
    return desc


def run(images: Sequence[str | Path], out: str | Path, settings: PrepareSettings, labels: Sequence[str | Path] = (),
        name: str | None = None, classes: dict[str, int] | None = None, n_folds: int = DEFAULT_FOLDS,
        body_threshold: float | None = None, workers: int = 1, overwrite: bool = False,
        progress: bool = True) -> bool:
    """Prepare the scans into ``out`` (module docstring); returns whether the verification passed.

    Raises:
        RawDataError, DataFormatError, DatasetDescriptionError: bad input, naming the file; ``out`` is untouched.
        ValueError: bad arguments.
    """
    out = Path(out)
    name = name or default_name(out)
    if not _DATASET_NAME.fullmatch(name):
        raise ValueError(f"--name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit")
    if n_folds < 1 or workers < 1:
        raise ValueError("--folds and --workers must be >= 1")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise RawDataError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    # ---------------------------------------------------------------- inputs, checked before any work
    image_paths = list_scans(images)
    label_paths = list_scans(labels) if labels else []
    for p in label_paths:
        if p.is_dir():
            raise RawDataError(f"{p}: labels must be image files (.nii.gz, .nrrd, .mha ...), not DICOM folders")
    paired = pair_labels(image_paths, label_paths)
    for img, lbl in zip(image_paths, paired):
        if lbl is None:
            continue
        img_grid, lbl_grid = read_grid(img), read_grid(lbl)
        if img_grid is not None:
            why, fatal = grid_problem(img_grid, lbl_grid)
            if fatal:
                raise RawDataError(f"{lbl}: not on the grid of its image {img}: {why}")
    print(f"{len(image_paths)} scans, {sum(lbl is not None for lbl in paired)} labelled -> {out}")
    for sid, (img, lbl) in enumerate(zip(image_paths, paired)):
        print(f"  scan {sid}: {img}" + (f"  label {lbl}" if lbl is not None else ""))

    # ---------------------------------------------------------------- build in a temporary sibling folder
    with atomic_folder(out) as tmp:  # built in a temporary sibling, renamed into place when complete
        jobs = [ScanJob(sid, img, lbl, settings, tmp) for sid, (img, lbl) in enumerate(zip(image_paths, paired))]
        results = process_scans(jobs, workers, progress)
        table = class_table(results, classes, jobs)
        remap_labels(tmp, results, table)
        for res in results:
            lost = sorted(set(res["source_ids"]) - set(res["raw_ids"]))
            if lost:
                print(f"note: {res['label']}: ids {lost} vanished at the processed resolution (structures smaller "
                      f"than a voxel)")
            ignored = sorted(set(res["source_ids"]) - {c["raw_id"] for c in table.values()})
            if ignored:
                print(f"note: {res['label']}: ids {ignored} are not in --classes: written as background")
        # a scan counts as labelled (a possible query or support) when its processed label holds a class
        class_ids = {c["raw_id"] for c in table.values()}
        labelled = [sid for sid, res in enumerate(results) if set(res["raw_ids"]) & class_ids]
        for sid, job in enumerate(jobs):
            if job.label is not None and sid not in labelled:
                print(f"note: {job.label}: holds none of the classes; scan {sid} only trains, like an unlabelled one")
        desc = description(name, settings, out, table, len(jobs), labelled, n_folds, body_threshold)
        desc_path = tmp / DESCRIPTION_FILE
        body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in desc.items())
        write_text(desc_path, "// Written by python -m data_preprocessing.prepare (docs/own-scans.md); train with\n"
                    f"// python training.py with dataset={out / DESCRIPTION_FILE}\n{{\n{body}\n}}\n")
        info = load_description(desc_path)
        scans = {str(sid): {**{k: v for k, v in res.items() if k not in ("raw_ids", "source_ids")},
                            "label_ids": sorted(set(res["source_ids"]) & {c["raw_id"] for c in table.values()}),
                            "settings": settings.to_dict()}
                 for sid, res in enumerate(results)}
        write_json({"settings": settings.to_dict(), "classes": table, "scans": scans}, tmp / SCANS_FILE)
        # ------------------------------------------------------------ class map, pseudolabels, verification
        from data_preprocessing.class_slice_index import write_classmap

        write_classmap(tmp, info, min_fg=1, progress=progress)
        generate_pseudolabels(tmp, info, workers=workers, progress=progress)
        report = verify_dataset(tmp, info, expect_hw=(settings.size, settings.size), progress=progress)
        unlabelled = [str(label_path(tmp, sid)) for sid, job in enumerate(jobs) if job.label is None]
        report.warnings = [w for w in report.warnings  # an unlabelled scan has no foreground by construction
                           if not any(w.startswith(f"{p}: no foreground label") for p in unlabelled)]
        report.data_dir = str(out)
        report.errors = [e.replace(str(tmp), str(out)) for e in report.errors]
        report.warnings = [w.replace(str(tmp), str(out)) for w in report.warnings]
        write_json(report.to_dict(), tmp / VERIFY_FILE)
    print(report.table())
    folds = desc["folds"]
    if folds[0]["queries"]:
        print(f"{len(folds)} folds over the {len(labelled)} labelled scans (validation.py with eval_fold=0..."
              f"{len(folds) - 1})")
    else:
        print(f"{len(labelled)} labelled scan(s): one training-only fold (every scan trains; evaluate with predict.py)")
    print(f"wrote {out}; train with: python training.py with dataset={out / DESCRIPTION_FILE}")
    return report.ok


# -------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = OptionParser(prog="python -m data_preprocessing.prepare", description=__doc__.split("\n")[0],
                          epilog="Inputs, pairing, orientation, outputs and folds: docs/own-scans.md",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", nargs="+", required=True, type=Path,
                        help="image files, folders of image files, DICOM series folders")
    parser.add_argument("--labels", nargs="+", default=[], type=Path,
                        help="label files or folders of label files (optional; paired by name or order)")
    parser.add_argument("--modality", required=True, choices=("CT", "MR"))
    parser.add_argument("--out", required=True, type=Path, help="output folder (created; must be new or empty)")
    parser.add_argument("--name", default=None, help="dataset name (default: the output folder's name)")
    parser.add_argument("--classes", type=parse_classes, default=None,
                        help="NAME=RAW_ID,... e.g. LIVER=5,SPLEEN=1 (default: every id found, named by its id)")
    parser.add_argument("--spacing", type=positive_float, default=None,
                        help="in-plane spacing in mm of every scan, support and query alike (default: MR 1.25; CT 1.6, "
                             "256 px = 410 mm, the field of view of abdominal CT; docs/own-scans.md)")
    parser.add_argument("--z-spacing", type=positive_float, default=None, help="slice spacing in mm (default: kept)")
    parser.add_argument("--size", type=positive_int, default=256, help="in-plane size in voxels (default 256)")
    parser.add_argument("--window", nargs=2, type=float, default=None, metavar=("LO", "HI"),
                        help="CT window in HU, mapped to 0..255 (default -125 275)")
    parser.add_argument("--mr-clip-percentile", type=positive_float, default=None,
                        help="MR: clip above this percentile (default 99.5)")
    parser.add_argument("--folds", type=positive_int, default=DEFAULT_FOLDS,
                        help="folds over the labelled scans (default 5, at most one per labelled scan)")
    parser.add_argument("--body-threshold", type=float, default=None,
                        help="pseudolabel body mask: processed intensity above this (default: CT 1e-4, MR 50.0001)")
    parser.add_argument("--workers", type=positive_int, default=1, help="processes (the output does not depend on it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: 0 done, 1 verification errors, 2 bad input (one ``error:`` line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.name is not None and not _DATASET_NAME.fullmatch(args.name):
            raise ValueError(f"--name {args.name!r}: use letters, digits, '_', '-' and '.', starting with a letter "
                             f"or digit")
        settings = PrepareSettings(modality=args.modality, spacing=args.spacing, z_spacing=args.z_spacing,
                                   size=args.size, window=tuple(args.window) if args.window else None,
                                   mr_clip_percentile=args.mr_clip_percentile)
    except ValueError as err:
        parser.error(str(err))
    try:
        ok = run(args.images, args.out, settings, labels=args.labels, name=args.name, classes=args.classes,
                 n_folds=args.folds, body_threshold=args.body_threshold, workers=args.workers,
                 overwrite=args.overwrite, progress=not args.no_progress)
    except ProjectError as err:
        print(error_line(err), file=sys.stderr)
        return EXIT_USER_ERROR
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
