"""Derived files checked against what they were made from, and the commands that rebuild them.

The processed folder holds files derived from others (docs/method.md#datasets): ``classmap_<min_fg>.json`` from the
label files, ``superpix-<SCALE>_<id>.nii.gz`` and ``fgmask_<id>.nii.gz`` from ``image_<id>.nii.gz``; a training
checkpoint holds a fold and a CT normaliser derived from the folder. Each can go stale when its source changes (labels
flipped along z after a slice-order fix, images preprocessed again). This module finds out, cheaply, and names the
command that rebuilds the file:

- class map vs labels: the slice lists are recomputed from the label arrays the caller has already read (one
  ``bincount`` per scan) and compared list by list (:func:`classmap_disagreement`, shared with
  ``data_preprocessing.verify``);
- superpixel / body-mask files vs image: ``data_preprocessing.pseudolabel`` writes a fingerprint of its source
  image (BLAKE2b of the float32 voxels, the shape and the geometry) into the NIfTI header (``descrip``, via
  SimpleITK's ``ITK_FileNotes``); readers compare it with the fingerprint of the image they loaded
  (:func:`check_made_from`, a few ms per scan). Files without a fingerprint (older runs, the original's
  released pseudolabels) are accepted with a warning.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from dataloaders.dataset_info import DatasetDescriptionError, DatasetInfo, get_dataset_info
from dataloaders.niftiio import DataFormatError, Geometry, classmap_path, image_path, label_path, read_header

logger = logging.getLogger(__name__)

NOTES_KEY = "ITK_FileNotes"  # SimpleITK metadata key stored in the NIfTI header's 80-character ``descrip``
_FP_PREFIX = "source image b2:"
_warned_unfingerprinted: set[str] = set()


# -------------------------------------------------------------------- rebuild commands
def dataset_arg(info: DatasetInfo) -> str:
    """What ``--dataset`` of the preprocessing CLIs accepts for ``info``: its registry name, else its file."""
    try:
        if get_dataset_info(info.name).source == info.source:
            return info.name
    except DatasetDescriptionError:
        pass  # not a registry name: a description file given by path
    return str(info.source)


def classmap_command(data_dir: str | Path, info: DatasetInfo, min_fg: int = 1) -> str:
    """The complete command that (re)builds ``classmap_<min_fg>.json`` of ``data_dir``."""
    return (f"python -m data_preprocessing.class_slice_index --data-dir {data_dir} --dataset {dataset_arg(info)}"
            f" --min-fg {int(min_fg)}")


def pseudolabel_command(data_dir: str | Path, info: DatasetInfo, scan_ids: Sequence[int] | None = None,
                        scale: str = "MIDDLE") -> str:
    """The complete command that (re)builds the superpixel and body-mask files of ``scan_ids`` (default: all)."""
    scans = f" --scans {','.join(str(int(s)) for s in scan_ids)}" if scan_ids else ""
    tail = f" --scale {scale}" if scale != "MIDDLE" else ""
    return f"python -m data_preprocessing.pseudolabel --data-dir {data_dir} --dataset {dataset_arg(info)}{scans}{tail}"


# -------------------------------------------------------------------- image fingerprints
def image_fingerprint(image: np.ndarray, geometry: Geometry) -> str:
    """32 hex digits identifying an image: BLAKE2b-128 of its float32 voxels, shape and geometry (rounded to 1e-4).

    Args:
        image: (Z, H, W) array, any numeric dtype (hashed as float32, so a float32 copy gives the same value).
        geometry: its spacing (mm), origin (mm) and direction.
    """
    arr = np.ascontiguousarray(image, dtype=np.float32)
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(arr.shape).encode())
    h.update(repr([round(float(v), 4) for v in (*geometry.spacing, *geometry.origin, *geometry.direction)]).encode())
    h.update(arr.view(np.uint8).data)
    return h.hexdigest()


def source_note(fingerprint: str) -> str:
    """Header note (at most 80 characters) recording the source image's fingerprint."""
    return f"{_FP_PREFIX}{fingerprint}"


def read_source_fingerprint(path: str | Path) -> str | None:
    """The source-image fingerprint stored in a derived volume's header, or ``None`` (reads the header only)."""
    reader = read_header(path)
    notes = reader.GetMetaData(NOTES_KEY) if reader.HasMetaDataKey(NOTES_KEY) else ""
    notes = notes.strip()
    return notes[len(_FP_PREFIX):] if notes.startswith(_FP_PREFIX) else None


def check_made_from(derived: str | Path, image_file: str | Path, fingerprint: str, rebuild: str) -> None:
    """Refuse a derived volume made from another version of its image.

    Args:
        derived: the superpixel or body-mask file.
        image_file: the image it should have been made from (named in the message).
        fingerprint: :func:`image_fingerprint` of that image as loaded now.
        rebuild: the command that regenerates ``derived`` (named in the message).

    Raises:
        DataFormatError: the stored fingerprint differs (the image changed after the file was made).
    """
    stored = read_source_fingerprint(derived)
    if stored is None:
        key = str(derived)
        if key not in _warned_unfingerprinted:
            _warned_unfingerprinted.add(key)
            logger.warning("%s records no source-image fingerprint (made by an older version or the original): "
                           "cannot check it was made from the current %s; regenerate with %s to enable the check",
                           derived, Path(image_file).name, rebuild)
        return
    if stored != fingerprint:
        raise DataFormatError(f"{derived}: made from another version of {Path(image_file).name} (the image changed "
                              f"after the file was written); regenerate it with {rebuild}")


# -------------------------------------------------------------------- class map vs labels
def slice_lists(counts: np.ndarray, min_fg: int) -> dict[int, list[int]]:
    """Per class id, the slices holding >= ``min_fg`` pixels of it, from (Z, C) per-slice pixel counts."""
    return {c: np.flatnonzero(counts[:, c] >= min_fg).tolist() for c in range(counts.shape[1])}


def classmap_disagreement(cmap: Mapping[str, Mapping[str, list[int]]],
                          labels_per_scan: Mapping[int, dict[int, list[int]]],
                          info: DatasetInfo) -> tuple[int, str, list[int], list[int]] | None:
    """First (scan id, class name, listed slices, slices in the label file) where the map and labels differ.

    Args:
        cmap: a loaded class map.
        labels_per_scan: scan id -> class id -> sorted slices holding the class (from the label file).
        info: the dataset (class names).
    """
    for sid in sorted(labels_per_scan):
        for c, zs in sorted(labels_per_scan[sid].items()):
            if c not in info.labels:
                continue
            listed = cmap.get(info.labels[c], {}).get(str(sid))
            if listed != zs:
                return sid, info.labels[c], list(listed or []), list(zs)
    return None


def describe_disagreement(data_dir: str | Path, info: DatasetInfo, min_fg: int,
                          found: tuple[int, str, list[int], list[int]]) -> str:
    """The message for a :func:`classmap_disagreement`: file, scan, class, what differs, and the rebuild command."""
    sid, name, listed, actual = found
    only_map = sorted(set(listed) - set(actual))
    only_label = sorted(set(actual) - set(listed))
    return (f"{classmap_path(data_dir, min_fg)}: stale index, it disagrees with {label_path(data_dir, sid).name}: "
            f"class {name} of "
            f"scan {sid} is listed on {len(listed)} slices, the label file has it on {len(actual)} (listed only: "
            f"{only_map[:8]}, label only: {only_label[:8]}); the labels changed after the class map was built. "
            f"Rebuild it with {classmap_command(data_dir, info, min_fg)}")


def check_classmap_matches(cmap: Mapping[str, Mapping[str, list[int]]], counts: Mapping[int, np.ndarray],
                           data_dir: str | Path, info: DatasetInfo, min_fg: int) -> None:
    """Refuse a class map that disagrees with the label files.

    Args:
        cmap: the loaded ``classmap_<min_fg>.json``.
        counts: scan id -> (Z, C) per-slice class pixel counts of its label file
            (:func:`dataloaders.slice_counts.slice_counts`).

    Raises:
        DataFormatError: naming the file, scan, class and the rebuild command.
    """
    found = classmap_disagreement(cmap, {sid: slice_lists(c, min_fg) for sid, c in counts.items()}, info)
    if found is not None:
        raise DataFormatError(describe_disagreement(data_dir, info, min_fg, found))


def check_superpixels_made_from(data_dir: str | Path, info: DatasetInfo, scan_id: int, image: np.ndarray,
                                geometry: Geometry, scale: str = "MIDDLE") -> None:
    """:func:`check_made_from` for a scan's superpixel file against its loaded image."""
    from dataloaders.niftiio import superpix_path

    check_made_from(superpix_path(data_dir, scan_id, scale), image_path(data_dir, scan_id),
                    image_fingerprint(image, geometry), pseudolabel_command(data_dir, info, [scan_id], scale))


# -------------------------------------------------------------------- checkpoint vs folder
def check_checkpoint_matches_folder(ckpt: Mapping[str, object], path: str | Path, fold: object,
                                    config: Mapping[str, object], info: DatasetInfo,
                                    normalizer_now: object | None = None) -> None:
    """Refuse a checkpoint whose stored fold or CT normaliser no longer matches the data folder.

    - Fold: when the checkpoint was trained on the same dataset, fold and ``n_shots`` as this run, its stored
      queries / support / training scans must equal the ones the folder gives now (scans added or removed
      since training move scans between training and test, docs/method.md#q16-ct-statistics).
    - CT normaliser (``kind="global"``): its mean and std must equal those of the same training scans in the
      folder now (relative 1e-5): ``normalizer_now`` when the caller has it (training resumes), else recomputed
      from the images (validation; CT only, one read of the training scans, as the original did,
      docs/method.md#q16-ct-statistics).

    Args:
        ckpt: a loaded checkpoint (``fold``, ``normalizer``, ``config`` entries are optional).
        path: its file, named in messages.
        fold: the :class:`~dataloaders.dataset_info.Fold` resolved from the folder now.
        config: this run's config (``dataset``, ``eval_fold``, ``n_shots``, ``data_dir``).
        info: the dataset.
        normalizer_now: a :class:`~dataloaders.normalization.Normalizer` fitted on the folder now, if available.

    Raises:
        DataFormatError: naming the checkpoint, what it stored and what the folder gives now.
    """
    from dataloaders.normalization import Normalizer, normalizer_from_scans

    stored_cfg = ckpt.get("config") or {}
    stored_fold = ckpt.get("fold")
    same_split = all(stored_cfg.get(k) == config[k] for k in ("eval_fold", "n_shots")) \
        and get_dataset_info(str(stored_cfg.get("dataset", config["dataset"]))).name == info.name
    if stored_fold and same_split:
        now = {"queries": list(fold.queries), "support": list(fold.support), "train": list(fold.train)}
        differs = [k for k in now if [int(i) for i in stored_fold.get(k, [])] != now[k]]
        if differs:
            parts = ", ".join(f"{k} {stored_fold.get(k)} then, {now[k]} now" for k in differs)
            raise DataFormatError(
                f"{path}: trained on fold {fold.index} of another set of scans ({parts}) in {config['data_dir']}: "
                f"scans were added or removed since training, so a scan evaluated now may have been trained on; "
                f"evaluate it on the folder it was trained on, or train again")
    stored_norm = ckpt.get("normalizer")
    if not stored_norm or stored_norm.get("kind") != "global":
        return
    old = Normalizer.from_dict(stored_norm)
    if normalizer_now is None:
        normalizer_now = normalizer_from_scans(config["data_dir"], "CT", list(old.scan_ids), progress=False)
    new = normalizer_now
    if new.kind != "global" or not np.allclose([new.mean, new.std], [old.mean, old.std], rtol=1e-5, atol=0):
        raise DataFormatError(
            f"{path}: its CT normaliser (mean {old.mean:.6g}, std {old.std:.6g} over training scans "
            f"{list(old.scan_ids)}) no longer matches {config['data_dir']} (mean {new.mean:.6g}, std {new.std:.6g} "
            f"now): the images changed after training; evaluate it on the images it was trained on, or train again")


def check_classmap_file(data_dir: str | Path, info: DatasetInfo, labels: Mapping[int, np.ndarray],
                        min_fg: int = 1) -> bool:
    """If ``classmap_<min_fg>.json`` exists, refuse it when it disagrees with the given label volumes.

    For evaluation, which takes slices from the labels themselves but must not run next to a stale class map.

    Args:
        labels: scan id -> (Z, H, W) integer label volume (as read from ``label_<id>.nii.gz``).

    Returns:
        Whether the file existed (and was checked).

    Raises:
        DataFormatError: malformed, stale or disagreeing class map (names the rebuild command).
    """
    from dataloaders.niftiio import load_classmap
    from dataloaders.slice_counts import slice_counts

    if not classmap_path(data_dir, min_fg).is_file():
        return False
    rebuild = classmap_command(data_dir, info, min_fg)
    cmap = load_classmap(data_dir, list(info.labels.values()), sorted(labels), min_fg, rebuild=rebuild)
    n_classes = max(info.labels) + 1
    check_classmap_matches(cmap, {sid: slice_counts(lab, n_classes) for sid, lab in labels.items()},
                           data_dir, info, min_fg)
    return True
