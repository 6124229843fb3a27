"""Few-shot evaluation with the standard protocol (EP1-ALP, SPEC 8.5): one checkpoint, one fold, one label group.

    python validation.py with CHAOST2 setting2 label_sets=0 eval_fold=0 reload_model_path=<run>/snapshots/100000.pth
    python validation.py with demo run_dir=runs/demo reload_model_path=runs/demo/snapshots/1500.pth baseline=True

Writes ``results.json`` (dataset, fold, setting, label_set, classes, class_dice, class_precision, class_recall,
mean_dice, per_scan, checkpoint, elapsed_s, protocol details), the predicted volumes
``interm_preds/scan_<id>_label_<c>.nii.gz`` with the image geometry, and prints a table.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from config_ssl_upload import ex
from dataloaders import niftiio
from dataloaders.manual_anno_dataset import load_annotated_scans
from dataloaders.normalization import Normalizer, normalizer_from_scans
from models.weights import StateDictMismatchError, load_original_checkpoint
from util.checkpoint import load_checkpoint, state_dict_mismatch
from util.cli import run_cli
from util.inference import FastPredictor
from util.protocol import evaluate_fold
from util.run_setup import ConfigError, build_model, resolve_device, resolve_fold, resolve_run_dir
from util.seeding import seed_everything, set_deterministic

# Keys that must agree between the training run stored in a checkpoint and this evaluation.
_ARCH_KEYS = ("modelname", "proto_grid_size", "feature_hw")


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
                              f"{key}={config[key]!r}; pass with {key}={stored[key]!r}"
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
    tmp = folder.with_name(f".tmp-{folder.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for (sid, c), pred in predictions.items():
        niftiio.write_volume(pred.astype(np.uint8) * np.uint8(c), tmp / f"scan_{sid}_label_{c}.nii.gz", geometry[sid])
    old = folder.with_name(f".old-{folder.name}")
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)


def format_table(result: dict[str, Any], class_names: dict[int, str], baseline: dict[str, Any] | None) -> str:
    """A Markdown table of Dice per class (ALPNet, and the baseline when given)."""
    def pct(x: float | None) -> str:
        return "  n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:5.2f}"

    head = "| method | " + " | ".join(class_names[c] for c in result["classes"]) + " | mean |"
    rows = [head, "|" + "---|" * (len(result["classes"]) + 2)]
    for name, res in (("ALPNet", result), ("intensity baseline", baseline)):
        if res is None:
            continue
        cells = [pct(res["class_dice"].get(str(c))) for c in result["classes"]]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {pct(res['mean_dice'])} |")
    return "\n".join(rows)


@ex.main
def validate(_run, _config: dict, _log, seed: int, reload_model_path: str | None, label_sets: int,
         eval_classes: list | None, n_sup_part: int, z_margin: int, val_wsize: int, eval_batch_size: int,
         save_predictions: bool, baseline: bool, protocol: str, deterministic: bool) -> dict:
    t_start = time.perf_counter()
    seed_everything(seed)
    set_deterministic(deterministic)
    device = resolve_device(_config)
    run_dir = resolve_run_dir(_run, _config)
    if protocol != "ep1_alp":
        raise ConfigError(f"protocol={protocol!r}: only 'ep1_alp' (SPEC 8.5) is implemented")
    if not reload_model_path:
        raise ConfigError("reload_model_path is not set: pass the checkpoint to evaluate, "
                          "e.g. reload_model_path=runs/.../snapshots/100000.pth")

    # ------------------------------------------------------------------ fold and classes
    info, fold = resolve_fold(_config)
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

    # ------------------------------------------------------------------ scans
    if ckpt.get("normalizer"):
        normalizer = Normalizer.from_dict(ckpt["normalizer"])
    else:  # a plain state dict: recompute CT statistics from the fold's training scans (Q16)
        normalizer = normalizer_from_scans(_config["data_dir"], info.modality, list(fold.train))
    scan_ids = list(dict.fromkeys(fold.queries + fold.support))
    scans = load_annotated_scans(_config["data_dir"], info, scan_ids, normalizer,
                                 input_size=int(_config["input_size"][0]))
    images, labels, geometry = scans.images, scans.labels, scans.geometry
    for sid in fold.support:
        present = [c for c in classes if not np.any(labels[sid] == c)]
        if present:
            raise ConfigError(f"support scan {sid} of fold {fold.index} holds no pixel of classes "
                              f"{[info.labels[c] for c in present]}; choose another support_idx")

    predictor = FastPredictor(model, device, window=val_wsize, batch_size=eval_batch_size)

    # ------------------------------------------------------------------ evaluate
    fold_result = evaluate_fold(predictor, images, labels, list(fold.support), list(fold.queries), classes,
                                n_part=n_sup_part, z_margin=z_margin, class_names=info.labels)
    result = fold_result.to_json_dict()
    baseline_result = None
    if baseline:
        from models.intensity_baseline import IntensityBaseline

        base = evaluate_fold(IntensityBaseline(), images, labels, list(fold.support), list(fold.queries), classes,
                             n_part=n_sup_part, z_margin=z_margin, class_names=info.labels)
        baseline_result = base.to_json_dict()

    for sid, c in fold_result.skipped:
        _log.warning("query scan %d holds no %s: not scored for that class (listed under 'skipped' in results.json)",
                     sid, info.labels[c])

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
        "protocol": protocol, "exclusion_rule": _config["exclusion_rule"],
        "exclude_cls_list": list(_config["exclude_cls_list"]), "n_part": n_sup_part, "z_margin": z_margin,
        "val_wsize": val_wsize, "support_scans": list(fold.support), "query_scans": list(fold.queries),
        "seed": seed, "modelname": _config["modelname"], "device": str(device),
        "elapsed_s": round(time.perf_counter() - t_start, 2),
    }
    if baseline_result is not None:
        summary["baseline"] = {k: baseline_result[k] for k in ("class_dice", "class_precision", "class_recall",
                                                               "mean_dice", "per_scan")}
    niftiio.write_json(summary, run_dir / "results.json")
    table = format_table(summary, info.labels, summary.get("baseline"))
    print(f"\n{info.name} fold {fold.index}, setting {_config['setting']}, support scan(s) {list(fold.support)}, "
          f"queries {list(fold.queries)}, Dice (%):\n{table}\nresults: {run_dir / 'results.json'}")
    return {"mean_dice": summary["mean_dice"], "results": str(run_dir / "results.json")}


if __name__ == "__main__":
    sys.exit(run_cli(ex, sys.argv))
