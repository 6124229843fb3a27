"""Few-shot evaluation, one checkpoint, one fold, one label group: EP1-ALP (the default) or EP2 (``protocol=ep2``:
the whole query volume, no ground-truth localisation); docs/method.md#evaluation-protocols and ``evaluation.ep1_alp``.

    python validation.py with CHAOST2 setting2 label_sets=0 eval_fold=0 reload_model_path=<run>/snapshots/100000.pth
    python validation.py with demo run_dir=runs/demo reload_model_path=runs/demo/snapshots/1500.pth baseline=True

Writes ``results.json`` (dataset, fold, setting, label_set, classes, class_dice, class_precision, class_recall,
mean_dice: the 3D Dice, the paper's; class_dice_per_slice, mean_dice_per_slice: the mean per-slice Dice;
per_scan, checkpoint, environment: versions, device and git commit; elapsed_s, protocol details), the predicted volumes
``interm_preds/scan_<id>_label_<c>.nii.gz`` with the image geometry, and prints a table.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from config_ssl_upload import ex
from dataloaders import niftiio
from dataloaders.derived import (
    check_checkpoint_matches_folder,
    check_classmap_file,
    check_made_from,
    image_fingerprint,
    pseudolabel_command,
)
from dataloaders.leakage import leak_free_for
from dataloaders.manual_anno_dataset import load_annotated_scans
from dataloaders.normalization import Normalizer, normalizer_from_scans
from engine.builders import build_model
from engine.run_setup import resolve_device, resolve_fold, resolve_run_dir
from engine.val_monitor import without_val_scans
from evaluation.advice import low_dice_warnings
from evaluation.ep1_alp import evaluate_fold
from evaluation.ep2 import evaluate_fold_ep2, margin_fn
from evaluation.predictors import FastPredictor
from evaluation.tables import dice_table, labelled_rows
from models.weights import StateDictMismatchError, load_original_checkpoint, state_dict_mismatch
from prediction.volume import DEFAULT_METHOD, METHODS, QueryScan, SupportScan, describe, prepare_atlases, segment_volume
from util.atomic import atomic_folder
from util.checkpoint import load_checkpoint
from util.cli import run_cli
from util.errors import ConfigError
from util.provenance import software_versions
from util.seeding import seed_everything, set_deterministic

# Keys that must agree between the training run stored in a checkpoint and this evaluation.
_ARCH_KEYS = ("modelname", "proto_grid_size", "feature_hw")


def shell_update(key: str, value: Any) -> str:
    """``key=value`` as one shell word that Sacred parses back to ``value`` (lists without spaces, quoted)."""
    if isinstance(value, (list, tuple)):
        text = "[" + ",".join(repr(v) for v in value) + "]"
    elif isinstance(value, str) and value.isidentifier():
        text = value  # Sacred reads a bare word as a string
    else:
        text = repr(value)
    return shlex.quote(f"{key}={text}")


def check_checkpoint_config(stored: dict[str, Any] | None, config: dict[str, Any], path: str, log,
                            mismatch: str | None = None) -> None:
    """Refuse a checkpoint trained with another architecture; warn when the dataset or fold differ.

    Args:
        mismatch: why the weights do not fit the model built from ``config`` (first missing/unexpected keys), added
            to the message.
    """
    if not stored:
        log.warning("%s holds no config (a plain state dict): trusting modelname=%s", path, config["modelname"])
        return
    for key in _ARCH_KEYS:
        if key in stored and stored[key] != config[key]:
            raise ConfigError(f"{path} was trained with {key}={stored[key]!r} but this run has "
                              f"{key}={config[key]!r}; add {shell_update(key, stored[key])} after 'with'"
                              + (f"\n{mismatch}" if mismatch else ""))
    for key in ("dataset", "eval_fold", "setting", "label_sets"):
        if key in stored and stored[key] != config[key]:
            log.warning("checkpoint %s: %s=%r at training, %r now", path, key, stored[key], config[key])
    if stored.get("setting") == 2 and sorted(stored.get("exclude_cls_list", [])) != sorted(config["exclude_cls_list"]):
        log.warning("checkpoint %s excluded classes %s in training; evaluating with exclude_cls_list=%s",
                    path, stored.get("exclude_cls_list"), config["exclude_cls_list"])


def write_predictions(predictions: dict[tuple[int, int], np.ndarray], geometry: dict[int, niftiio.Geometry],
                      folder: Path) -> None:
    """Write ``scan_<id>_label_<c>.nii.gz`` volumes into ``folder`` as a whole: all of them or none.

    They are written into a temporary sibling folder which then replaces ``folder``, so a crash leaves either the
    previous predictions or the new ones, never a mix.

    Args:
        predictions: {(scan id, class id): (Z, H, W) binary mask}.
        geometry: scan id -> image geometry.
    """
    with atomic_folder(folder) as tmp:
        for (sid, c), pred in predictions.items():
            niftiio.write_volume(pred.astype(np.uint8) * np.uint8(c), tmp / f"scan_{sid}_label_{c}.nii.gz",
                                 geometry[sid])


def load_body_masks(data_dir: str | Path, info: Any, scan_ids: list[int]) -> dict[int, np.ndarray]:
    """Body masks for EP2 (only their z-extent is used): ``fgmask_<id>.nii.gz``, or, for a scan without one, the
    raw image thresholded at the dataset's ``body_threshold``; on the image's own grid, like the images.

    Returns:
        {scan id: (Z, H, W) bool}, the shape of ``image_<id>.nii.gz``.

    Raises:
        niftiio.DataFormatError: a file is corrupt, a mask is on another grid than its image, or was made from
            another version of it (``dataloaders.derived``).
    """
    out: dict[int, np.ndarray] = {}
    for sid in scan_ids:
        path = niftiio.fgmask_path(data_dir, sid)
        if path.is_file():
            mask, _ = niftiio.read_label_volume(path)
            image, geom = niftiio.read_volume(niftiio.image_path(data_dir, sid))
            if mask.shape != image.shape:
                raise niftiio.DataFormatError(f"{path}: shape {mask.shape} != image shape {image.shape}")
            check_made_from(path, niftiio.image_path(data_dir, sid), image_fingerprint(image, geom),
                            pseudolabel_command(data_dir, info, [sid]))  # not from an older image
            mask = mask > 0
        else:
            image, _ = niftiio.read_volume(niftiio.image_path(data_dir, sid))
            mask = image > info.body_threshold
        out[sid] = mask
    return out


class WholeVolume:
    """EP2's segmenter over a fold: :func:`prediction.volume.segment_volume`, the function ``predict.py`` uses.

    The support scans' registration atlases and each query's correspondences are computed once and shared by
    ALPNet and the baseline (they depend on the images only).

    Args:
        data_dir, info: the processed folder and its dataset.
        images, labels, geometry: the fold's normalised images, labels and geometries (scan id -> ...).
        support_ids: the fold's support scans.
        classes: the classes to segment (all in one decision).
        method: ``ep2_method``.
        n_part: support slices (EP1-ALP chunk centres) per support scan, for ``body`` and ``registered``.
    """

    def __init__(self, data_dir: str | Path, info: Any, images: dict[int, np.ndarray], labels: dict[int, np.ndarray],
                 geometry: dict[int, niftiio.Geometry], support_ids: list[int], classes: list[int], method: str,
                 n_part: int) -> None:
        self.info, self.classes, self.method, self.n_part = info, classes, method, n_part
        scan_ids = list(images)
        bodies = load_body_masks(data_dir, info, scan_ids) if method == "body" else {}
        raw = {sid: niftiio.read_volume(niftiio.image_path(data_dir, sid))[0].astype(np.float32) for sid in scan_ids}
        # (dz, dy, dx) mm from the image geometry (x, y, z)
        spacing = {sid: tuple(float(v) for v in reversed(geometry[sid].spacing)) for sid in scan_ids}
        self.queries = {sid: QueryScan(images[sid], raw[sid], spacing[sid], bodies.get(sid)) for sid in scan_ids}
        self.supports = [SupportScan(images[s], labels[s], raw[s], spacing[s], bodies.get(s)) for s in support_ids]
        self.atlases = prepare_atlases(self.supports, info.modality) if method != "body" else None
        self._corrs: dict[int, Any] = {}

    def segmenter(self, predict: Any):
        """query scan id -> :class:`prediction.volume.VolumeSegmentation` with ``predict``'s margins."""
        fn = margin_fn(predict)

        def segment(q: int):
            seg = segment_volume(fn, self.supports, self.queries[q], self.classes, method=self.method,
                                 modality=self.info.modality, n_part=self.n_part, atlases=self.atlases,
                                 correspondences=self._corrs.get(q))
            if seg.correspondences:
                self._corrs[q] = seg.correspondences
            return seg

        return segment


@ex.main
def validate(_run, _config: dict, _log, seed: int, reload_model_path: str | None, label_sets: int,
         eval_classes: list | None, n_sup_part: int, z_margin: int, val_wsize: int, eval_batch_size: int,
         save_predictions: bool, baseline: bool, protocol: str, deterministic: bool, ep2_method: str) -> dict:
    t_start = time.perf_counter()
    seed_everything(seed)
    set_deterministic(deterministic)
    device = resolve_device(_config)
    run_dir = resolve_run_dir(_run, _config)
    if protocol not in ("ep1_alp", "ep2"):
        raise ConfigError(f"protocol={protocol!r}: choose 'ep1_alp' or 'ep2' (whole volume); "
                          "docs/method.md#evaluation-protocols")
    if ep2_method not in METHODS:
        raise ConfigError(f"ep2_method={ep2_method!r}: choose one of {', '.join(METHODS)} (docs/protocols.md)")
    if protocol != "ep2" and ep2_method != DEFAULT_METHOD and "ep2_method" in _run.config_modifications.modified:
        raise ConfigError(f"ep2_method={ep2_method!r} acts only with protocol=ep2 (protocol={protocol!r} scores the "
                          "ground-truth range); add protocol=ep2 or drop ep2_method")
    if not reload_model_path:
        raise ConfigError("reload_model_path is not set: pass the checkpoint to evaluate, "
                          "e.g. reload_model_path=runs/.../snapshots/100000.pth")

    # ------------------------------------------------------------------ fold and classes
    info, fold = resolve_fold(_config)
    if not fold.queries:
        raise ConfigError(f"{info.name} fold {fold.index} holds no query scan (a training-only fold: fewer than two "
                          f"labelled scans): nothing to evaluate; segment new scans with predict.py instead")
    classes = list(eval_classes) if eval_classes else info.test_classes(label_sets)
    unknown = [c for c in classes if c not in info.eval_classes]
    if unknown:
        raise ConfigError(f"eval_classes has ids {unknown} outside {info.name}'s evaluated classes "
                          f"{list(info.eval_classes)}")

    # ------------------------------------------------------------------ checkpoint and model (before any scan is read)
    ckpt = load_checkpoint(reload_model_path, map_location="cpu")
    model = build_model(_config, device, for_training=False)
    mismatch = state_dict_mismatch(model, ckpt["model"], reload_model_path)
    check_checkpoint_config(ckpt.get("config"), _config, reload_model_path, _log, mismatch)
    if mismatch:
        raise StateDictMismatchError(mismatch)
    load_original_checkpoint(model, ckpt["model"])
    model.eval()
    trained_exclusion = ckpt.get("exclusion")  # dataloaders.leakage record; None for checkpoints without one

    # ------------------------------------------------------------------ scans
    fold = without_val_scans(fold, (ckpt.get("config") or {}).get("val_scans"))  # not trained on either
    check_checkpoint_matches_folder(ckpt, reload_model_path, fold, _config, info)  # fold and CT normaliser
    if ckpt.get("normalizer"):
        normalizer = Normalizer.from_dict(ckpt["normalizer"])
    else:  # a plain state dict: CT statistics from the fold's training scans (docs/method.md#q16-ct-statistics)
        normalizer = normalizer_from_scans(_config["data_dir"], info.modality, list(fold.train))
    scan_ids = list(dict.fromkeys(fold.queries + fold.support))
    # on the images' own grid: the predictor resizes slices to input_size for the encoder only (evaluation.predictors)
    scans = load_annotated_scans(_config["data_dir"], info, scan_ids, normalizer)
    images, labels, geometry = scans.images, scans.labels, scans.geometry
    check_classmap_file(_config["data_dir"], info, labels, _config["min_fg_data"])
    for sid in fold.support:
        present = [c for c in classes if not np.any(labels[sid] == c)]
        if present:
            raise ConfigError(f"support scan {sid} of fold {fold.index} holds no pixel of classes "
                              f"{[info.labels[c] for c in present]}; choose another support_idx")

    predictor = FastPredictor(model, device, window=val_wsize, batch_size=eval_batch_size,
                              input_size=int(_config["input_size"][0]))

    # ------------------------------------------------------------------ evaluate
    whole_volume = WholeVolume(_config["data_dir"], info, images, labels, geometry, list(fold.support),
                               classes, ep2_method, n_sup_part) if protocol == "ep2" else None

    def run_protocol(predict):  # the same protocol for ALPNet and the baseline
        if whole_volume is not None:
            return evaluate_fold_ep2(whole_volume.segmenter(predict), labels, list(fold.support),
                                     list(fold.queries), classes, n_part=n_sup_part, class_names=info.labels,
                                     method=describe(ep2_method))
        return evaluate_fold(predict, images, labels, list(fold.support), list(fold.queries), classes,
                             n_part=n_sup_part, z_margin=z_margin, class_names=info.labels)

    fold_result = run_protocol(predictor)
    result = fold_result.to_json_dict()
    baseline_result = None
    if baseline:
        from models.intensity_baseline import IntensityBaseline

        base = run_protocol(IntensityBaseline())
        baseline_result = base.to_json_dict()

    for sid, c in fold_result.skipped:
        _log.warning("query scan %d holds no %s: not scored for that class (listed under 'skipped' in results.json)",
                     sid, info.labels[c])
    # an empty prediction or a Dice below 0.3 is most often a data problem: say which pair and what to check
    for line in low_dice_warnings(fold_result.per_scan, info.labels, str(_config["data_dir"]), info.name):
        _log.warning(line)

    # ------------------------------------------------------------------ write (only after everything succeeded)
    if save_predictions:
        write_predictions(fold_result.predictions, geometry, run_dir / "interm_preds")
    for c in classes:
        value = result["class_dice"].get(str(c))
        if value is not None:
            _run.log_scalar(f"val.dice.{info.labels[c]}", value, 0)
    if result["mean_dice"] is not None:
        _run.log_scalar("val.dice.mean", result["mean_dice"], 0)
    summary = {
        "dataset": info.name, "fold": fold.index, "setting": _config["setting"], "label_set": label_sets,
        **result,
        "class_names": {str(c): info.labels[c] for c in classes},
        "checkpoint": str(reload_model_path), "checkpoint_step": ckpt.get("step"),
        "protocol": protocol, "ep2_method": ep2_method if protocol == "ep2" else None,
        # what training really excluded, from the checkpoint's record (computed from the label files); the
        # config's values only for a checkpoint without one (a plain state dict)
        "exclusion_rule": trained_exclusion["exclusion_rule"] if trained_exclusion else _config["exclusion_rule"],
        "exclude_cls_list": trained_exclusion["excluded_classes"] if trained_exclusion
        else list(_config["exclude_cls_list"]),
        "training_exclusion": trained_exclusion, "leak_free": leak_free_for(trained_exclusion, classes, info),
        "n_part": n_sup_part, "z_margin": z_margin,
        "val_wsize": val_wsize, "support_scans": list(fold.support), "query_scans": list(fold.queries),
        "multishot_proto": _config["multishot_proto"],  # how support scans combine (docs/method.md#several-shots)
        "seed": seed, "modelname": _config["modelname"], "device": str(device),
        # Python, torch, numpy, CUDA/cuDNN (on CUDA), the device's name, the git commit (null without git)
        "environment": software_versions(str(device)),
        "elapsed_s": round(time.perf_counter() - t_start, 2),
    }
    if baseline_result is not None:
        summary["baseline"] = {k: baseline_result[k] for k in ("class_dice", "class_precision", "class_recall",
                                                               "mean_dice", "class_dice_per_slice",
                                                               "mean_dice_per_slice", "per_scan")}
    niftiio.write_json(summary, run_dir / "results.json")
    table = dice_table(labelled_rows({"ALPNet": summary, "intensity baseline": summary.get("baseline")}),
                       summary["classes"], info.labels)
    print(f"\n{info.name} fold {fold.index}, setting {_config['setting']}, support scan(s) {list(fold.support)}, "
          f"queries {list(fold.queries)}, Dice (%):\n{table}\nresults: {run_dir / 'results.json'}")
    return {"mean_dice": summary["mean_dice"], "results": str(run_dir / "results.json")}


if __name__ == "__main__":
    sys.exit(run_cli(ex, sys.argv))
