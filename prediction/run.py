"""The own-scan path behind ``predict.py``: plan (every option and file checked before work), then segment each
query and write the outputs (the file list is in ``predict.py``'s docstring).

Support and query scans go through the transform of ``data_preprocessing.prepare``
(:mod:`data_preprocessing.geometry`) with the settings recorded in the checkpoint, or with the command line's; no
label is ever used on a query: the whole query volume is segmented (:mod:`prediction.volume`).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from data_preprocessing.geometry import (
    GridTransform,
    PrepareSettings,
    prediction_settings,
    preprocess_image,
    preprocess_label,
    to_source_grid,
)
from data_preprocessing.scan_reader import check_same_grid, list_scans, read_label, read_scan, scan_name
from dataloaders import niftiio
from dataloaders.dataset_info import BODY_THRESHOLD, builtin_names, get_dataset_info
from dataloaders.normalization import Normalizer, fit_normalizer
from evaluation.ep2 import margin_fn
from evaluation.metric import hd95, mask_dice
from evaluation.predictors import FastPredictor
from models.backbone import BACKBONES
from models.grid_proto_fewshot import FewShotSeg
from models.weights import load_model_weights
from prediction.report import write_query_overlay, write_report
from prediction.volume import (
    DEFAULT_METHOD,
    INPLANE_MARGIN_MM,
    MARGIN_MM,
    METHODS,
    QueryScan,
    SupportScan,
    VolumeSegmentation,
    describe,
    prepare_atlases,
    segment_volume,
)
from util.atomic import atomic_folder
from util.checkpoint import load_checkpoint
from util.errors import ConfigError, RawDataError
from util.options import parse_classes


@dataclass
class Plan:
    """Everything checked before any scan is processed."""

    settings: PrepareSettings
    model: FewShotSeg
    normalizer: Normalizer | None  # None: CT without stored statistics (fitted on the supports)
    device: torch.device
    n_part: int
    val_wsize: int
    body_threshold: float
    queries: list[Path]
    query_labels: list[Path | None]
    checkpoint: dict[str, Any]
    spacing_source: str = ""
    method: str = DEFAULT_METHOD
    margin_mm: float = MARGIN_MM
    inplane_margin_mm: float = INPLANE_MARGIN_MM


def resolve_settings(ckpt: dict[str, Any], args: argparse.Namespace) -> tuple[PrepareSettings, str]:
    """The preprocessing applied to support and query alike: the checkpoint's, with its one in-plane spacing
    (:func:`data_preprocessing.geometry.prediction_settings`), the flags given overriding it (or alone for a plain
    state dict).

    Returns:
        (settings with one fixed in-plane spacing, where that spacing comes from).

    Raises:
        ConfigError: no recorded preprocessing and no ``--modality``, or invalid values.
    """
    cfg = ckpt.get("config") or {}
    fallback = None
    if isinstance(cfg.get("dataset"), str) and cfg["dataset"] in builtin_names():
        fallback = get_dataset_info(cfg["dataset"]).spacing_mm
    try:
        stored = prediction_settings(ckpt, fallback_spacing=fallback if args.spacing is None else args.spacing)
    except ValueError as err:
        raise ConfigError(f"{args.checkpoint}: {err}") from None
    if stored is None and args.modality is None:
        raise ConfigError(f"{args.checkpoint} records no preprocessing: pass --modality (and --spacing, --size, "
                          "--window as the model was trained)")
    base = stored[0].to_dict() if stored is not None else {"modality": args.modality}
    modality_changed = args.modality is not None and args.modality != base["modality"]
    if modality_changed:
        base = {"modality": args.modality, "z_spacing": base.get("z_spacing")}
    for key, value in (("spacing", args.spacing), ("size", args.size),
                       ("window", list(args.window) if args.window else None)):
        if value is not None:
            base[key] = value
    try:
        settings = PrepareSettings.from_dict({**base, "spacing_rule": "fixed"})
    except ValueError as err:
        raise ConfigError(f"preprocessing: {err}") from None
    if args.spacing is not None:
        why = f"{settings.spacing:g} mm, from --spacing"
    elif stored is not None and not modality_changed:
        why = stored[1]
    else:
        why = f"{settings.spacing:g} mm, the {settings.modality} default"
    return settings, why


def load_model(ckpt: dict[str, Any], args: argparse.Namespace, device: torch.device) -> FewShotSeg:
    """The checkpoint's model (:meth:`models.grid_proto_fewshot.FewShotSeg.from_config`; ``--modelname`` for a plain
    state dict, which has no config), in eval mode on ``device``.

    Raises:
        ConfigError: a plain state dict without ``--modelname``, or ``--modelname`` contradicting the checkpoint.
        StateDictMismatchError: the weights do not fit (names the file).
    """
    cfg = ckpt.get("config") or {}
    name = cfg.get("modelname")
    if name is None and args.modelname is None:
        raise ConfigError(f"{args.checkpoint} is a plain state dict: pass --modelname ({', '.join(BACKBONES)})")
    if name is not None and args.modelname is not None and args.modelname != name:
        raise ConfigError(f"{args.checkpoint} was trained with modelname={name!r}, not --modelname {args.modelname}")
    model = FewShotSeg.from_config(cfg, backbone=args.modelname)
    load_model_weights(model, ckpt["model"], args.checkpoint)
    return model.to(device).eval()


def check_out_dir(out: Path) -> None:
    """``--out`` must be new, empty, or a previous output of this tool (holding ``predictions.json``)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "predictions.json").is_file():
        raise ConfigError(f"--out {out}: folder holds other files; choose a new or empty folder")


def check_label_grid(image_path: Path, label_path: Path) -> tuple[sitk.Image, sitk.Image]:
    """Read an image and its label and check they share a grid (the error names both files)."""
    img, _ = read_scan(image_path)
    lbl = read_label(label_path)
    return img, check_same_grid(img, lbl, image_path, label_path)


def plan(args: argparse.Namespace) -> Plan:
    """Check every option and file that can be checked without processing a scan.

    Raises:
        A project error (ConfigError, CheckpointError, RawDataError, DataFormatError, StateDictMismatchError)
        naming the file or option.
    """
    if len(args.support_image) != len(args.support_label):
        raise ConfigError(f"{len(args.support_image)} --support-image but {len(args.support_label)} --support-label:"
                          " give one label per support image, in the same order")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_out_dir(args.out)
    queries = list_scans(args.query)
    names = [scan_name(q) for q in queries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"queries share the name(s) {dup}: output files would collide; rename them")
    if args.query_label is not None and len(args.query_label) != len(queries):
        raise ConfigError(f"{len(queries)} queries ({', '.join(names)}) but {len(args.query_label)} --query-label")
    query_labels: list[Path | None] = list(args.query_label) if args.query_label else [None] * len(queries)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    ckpt = load_checkpoint(args.checkpoint, map_location="cpu")
    settings, spacing_source = resolve_settings(ckpt, args)
    model = load_model(ckpt, args, device)
    cfg = ckpt.get("config") or {}
    n_part = args.n_part if args.n_part is not None else int(cfg.get("n_sup_part", 3))
    if n_part < 1:
        raise ConfigError(f"--n-part must be >= 1, got {n_part}")
    normalizer = Normalizer.from_dict(ckpt["normalizer"]) if ckpt.get("normalizer") else (
        fit_normalizer("MR") if settings.modality == "MR" else None)
    body_threshold = args.body_threshold if args.body_threshold is not None else BODY_THRESHOLD[settings.modality]
    # support pairs: readable, on one grid, holding every requested id
    for img_path, lbl_path in zip(args.support_image, args.support_label):
        _, lbl = check_label_grid(img_path, lbl_path)
        present = set(np.unique(sitk.GetArrayViewFromImage(lbl)).tolist())
        for cname, cid in args.classes.items():
            if cid not in present:
                raise RawDataError(f"{lbl_path}: support label holds no voxel of {cname}={cid} (ids present: "
                                   f"{sorted(present)})")
    for q, ql in zip(queries, query_labels):
        if ql is not None:
            check_label_grid(q, ql)
    method = getattr(args, "method", None) or DEFAULT_METHOD
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    margin_mm = getattr(args, "margin_mm", None)
    margin_mm = MARGIN_MM if margin_mm is None else float(margin_mm)
    if margin_mm < 0:
        raise ConfigError(f"--margin-mm must be >= 0, got {margin_mm}")
    inplane = getattr(args, "inplane_margin_mm", None)
    inplane = INPLANE_MARGIN_MM if inplane is None else float(inplane)
    if inplane < 0:
        raise ConfigError(f"--inplane-margin-mm must be >= 0, got {inplane}")
    return Plan(settings, model, normalizer, device, n_part, model.val_wsize, body_threshold, queries, query_labels,
                ckpt, spacing_source, method, margin_mm, inplane)


# ---------------------------------------------------------------------------------------------------- work
@dataclass
class Prepared:
    """A scan on the processed grid: raw processed intensities (before normalisation), body mask and transform."""

    image: np.ndarray
    body: np.ndarray
    transform: GridTransform


def prepare_scan(img: sitk.Image, settings: PrepareSettings, body_threshold: float) -> Prepared:
    """Bring a scan onto the processed grid (:func:`data_preprocessing.geometry.preprocess_image`)."""
    arr, transform, _ = preprocess_image(img, settings)
    return Prepared(arr, arr > body_threshold, transform)


def class_values(seg: np.ndarray, ref: np.ndarray | None, cid: int, spacing_xyz: tuple[float, ...]) -> dict[str, Any]:
    """Volume (ml), slices (array axis 0 of the source file), Dice and HD95 (mm) of one class on the source grid."""
    pred = seg == cid
    zs = np.flatnonzero(pred.any(axis=(1, 2)))
    out: dict[str, Any] = {
        "label_id": cid,
        "volume_ml": float(pred.sum() * float(np.prod(spacing_xyz)) / 1000.0),
        "n_slices": int(zs.size),
        "slices": [int(zs[0]), int(zs[-1])] if zs.size else None,
    }
    if ref is not None:
        gt = ref == cid
        d = mask_dice(pred, gt)
        h = hd95(pred, gt, tuple(float(s) for s in spacing_xyz[::-1]))
        out.update({"dice": None if np.isnan(d) else d, "hd95_mm": None if np.isnan(h) else h,
                    "reference_volume_ml": float(gt.sum() * float(np.prod(spacing_xyz)) / 1000.0)})
    return out


def spacing_zyx(transform: GridTransform) -> tuple[float, float, float]:
    """(dz, dy, dx) in mm of a processed grid (SimpleITK's spacing is (x, y, z))."""
    return tuple(float(v) for v in reversed(transform.processed.spacing))  # type: ignore[return-value]


def load_supports(p: Plan, images: list[Path], labels: list[Path], classes: dict[str, int]
                  ) -> tuple[list[SupportScan], list[Prepared], Normalizer]:
    """The support scans on the processed grid (labels keep the user's ids), with the normaliser.

    Raises:
        RawDataError: a class vanishes on the processed grid (names the label file).
    """
    prepared = []
    for img_path, lbl_path in tqdm(list(zip(images, labels)), desc="supports", unit="scan"):
        img, lbl = check_label_grid(img_path, lbl_path)
        prep = prepare_scan(img, p.settings, p.body_threshold)
        label = preprocess_label(lbl, prep.transform)
        for cname, cid in classes.items():
            if not (label == cid).any():
                raise RawDataError(f"{lbl_path}: {cname}={cid} vanishes on the processed grid (too small at "
                                   f"{p.settings.spacing} mm)")
        prepared.append((prep, label))
    normalizer = p.normalizer or fit_normalizer("CT", [s[0].image for s in prepared])
    supports = [SupportScan(normalizer(prep.image), label, prep.image, spacing_zyx(prep.transform), prep.body)
                for prep, label in prepared]
    return supports, [prep for prep, _ in prepared], normalizer


def segment_query(p: Plan, margin: Any, supports: list[SupportScan], atlases: list[Any] | None,
                  normalizer: Normalizer, qpath: Path, classes: dict[str, int]
                  ) -> tuple[sitk.Image, Prepared, VolumeSegmentation]:
    """Read, process and segment one query scan (all classes in one decision).

    Raises:
        RawDataError: the scan cannot be segmented (names it).
    """
    qimg, _ = read_scan(qpath)
    prep = prepare_scan(qimg, p.settings, p.body_threshold)
    query = QueryScan(normalizer(prep.image), prep.image, spacing_zyx(prep.transform), prep.body)
    try:
        result = segment_volume(margin, supports, query, list(classes.values()), method=p.method,
                                modality=p.settings.modality, n_part=p.n_part, margin_mm=p.margin_mm,
                                inplane_margin_mm=p.inplane_margin_mm,
                                atlases=atlases, progress=True)
    except ValueError as err:
        raise RawDataError(f"{qpath}: {err}") from None
    return qimg, prep, result


def query_entry(result: VolumeSegmentation, classes: dict[str, int], seg: np.ndarray, ref: np.ndarray | None,
                spacing_xyz: tuple[float, ...]) -> dict[str, Any]:
    """The per-class values of one query for ``predictions.json``: :func:`class_values` plus the range the method
    allowed (processed slices) and the support slices used; the registration of each support when one ran."""
    out: dict[str, Any] = {"classes": {}}
    for cname, cid in classes.items():
        values = class_values(seg, ref, cid, spacing_xyz)
        res = result.classes[cid]
        values["estimated_range"] = [round(float(v), 2) for v in res.estimated_range]
        if res.placement is not None:
            values["open_ends"] = list(res.placement.open_ends)
        values["support_slices"] = res.support_slices
        out["classes"][cname] = values
    out["registration"] = [{"score": round(c.score, 4), "overlap_mm": round(c.overlap_mm, 1),
                            "z_offset_mm": round(c.z_offset_mm, 1), "stages": list(c.stages),
                            "search_metric": c.search_metric, "metric": c.metric,
                            "seconds": round(c.stage_seconds.get("total", 0.0), 2)} for c in result.correspondences]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Plan, segment every query and write the outputs (``predict.py``'s docstring). Returns ``predictions.json``."""
    t0 = time.perf_counter()
    p = plan(args)
    classes = args.classes
    supports, support_preps, normalizer = load_supports(p, args.support_image, args.support_label, classes)
    # registration work that depends on a support only: once per support, reused by every query
    atlases = prepare_atlases(supports, p.settings.modality) if p.method != "body" else None
    predictor = FastPredictor(p.model, p.device, window=p.val_wsize, batch_size=args.batch_size, cache_mb=512)
    margin = margin_fn(predictor)
    print(f"in-plane spacing {p.spacing_source} (support and query alike); method {p.method}")

    summary: dict[str, Any] = {
        "checkpoint": str(args.checkpoint), "checkpoint_step": p.checkpoint.get("step"),
        "supports": [{"image": str(i), "label": str(lb)} for i, lb in zip(args.support_image, args.support_label)],
        "classes": dict(classes), "preprocessing": p.settings.to_dict(), "spacing": p.spacing_source,
        "normalizer": normalizer.to_dict(), "method": p.method,
        "rule": describe(p.method, margin_mm=p.margin_mm, inplane_margin_mm=p.inplane_margin_mm)
        if p.method == "registered" else describe(p.method),
        "n_part": p.n_part, "device": str(p.device), "queries": {},
    }
    with atomic_folder(args.out) as tmp:  # all files or none: a temporary sibling renamed at the end
        (tmp / "overlays").mkdir()
        for qpath, qlabel in tqdm(list(zip(p.queries, p.query_labels)), desc="queries", unit="scan"):
            name = scan_name(qpath)
            qimg, prep, result = segment_query(p, margin, supports, atlases, normalizer, qpath, classes)
            predictor.clear_cache()
            seg_img = to_source_grid(result.labels, prep.transform)
            seg_file = tmp / f"{name}_seg.nii.gz"
            sitk.WriteImage(seg_img, str(seg_file), True)
            seg = sitk.GetArrayViewFromImage(seg_img)
            ref = ref_proc = None
            if qlabel is not None:
                ref_img = check_same_grid(qimg, read_label(qlabel), qpath, qlabel)
                ref = sitk.GetArrayFromImage(ref_img)
                ref_proc = preprocess_label(ref_img, prep.transform)
            entry = {"source": str(qpath), "segmentation": seg_file.name, "reference": str(qlabel) if qlabel else None,
                     **query_entry(result, classes, seg, ref, seg_img.GetSpacing())}
            png = Path("overlays") / f"{name}.png"
            entry["overlay"] = str(png)
            entry["overlay_slices"] = write_query_overlay(
                prep.image, result.labels, ref_proc, classes, spacing_zyx(prep.transform), tmp / png,
                supports=[(s.raw, s.label) for s in supports], support_slices={
                    cid: result.classes[cid].support_slices for cid in classes.values()})
            summary["queries"][name] = entry
        summary["elapsed_s"] = round(time.perf_counter() - t0, 2)
        niftiio.write_json(summary, tmp / "predictions.json")
        write_report(summary, tmp, tmp / "report.html")
    return summary


def predict_scans(checkpoint: str | Path, support_images: list[str | Path], support_labels: list[str | Path],
                  classes: str | dict[str, int], queries: list[str | Path], out: str | Path,
                  query_labels: list[str | Path] | None = None, method: str = DEFAULT_METHOD,
                  device: str = "auto", **options: Any) -> dict[str, Any]:
    """``predict.py`` from Python (a notebook): the same checks, work and outputs as the command line.

    Args:
        checkpoint, support_images, support_labels, queries, out, query_labels, method, device: the options of
            ``predict.py`` of the same names.
        classes: ``"LIVER=5,SPLEEN=1"`` or ``{"LIVER": 5, "SPLEEN": 1}``.
        options: any other ``predict.py`` option by its Python name (``batch_size``, ``n_part``, ``margin_mm``,
            ``modality``, ``spacing``, ``size``, ``window``, ``modelname``, ``body_threshold``).

    Returns:
        The ``predictions.json`` content.

    Raises:
        ConfigError and the other project errors of :func:`run`; an unknown option.
    """
    known = {"batch_size": 16, "n_part": None, "margin_mm": MARGIN_MM, "inplane_margin_mm": INPLANE_MARGIN_MM,
             "modality": None, "spacing": None,
             "size": None, "window": None, "modelname": None, "body_threshold": None}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"unknown predict.py options {unknown}; known: {sorted(known)}")
    args = argparse.Namespace(
        checkpoint=Path(checkpoint), support_image=[Path(p) for p in support_images],
        support_label=[Path(p) for p in support_labels],
        classes=parse_classes(classes) if isinstance(classes, str) else dict(classes),
        query=[Path(q) for q in queries], out=Path(out),
        query_label=[Path(q) for q in query_labels] if query_labels else None, device=device, method=method,
        **{**known, **options})
    return run(args)
