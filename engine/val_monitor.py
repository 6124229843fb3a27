"""Validation-based checkpoint choice (optional, off by default): score held-out ``val_scans`` at every snapshot.

``val_scans`` are scan ids with labels taken out of the fold's training scans (docs/method.md#folds: a validation subset
comes from the training scans only and is reported apart from the parity numbers): training never sees them, and a val
scan that is a query or the support of the fold is refused, since choosing a checkpoint on the test scans would leak
them.
At each snapshot the model is scored on the val scans with the same EP1-ALP protocol and predictor as
``validation.py`` (:func:`evaluation.ep1_alp.evaluate_fold`, :class:`evaluation.predictors.FastPredictor`), with the
fold's
support scan(s) as support and the run's test classes. The history goes to ``<run folder>/val_history.json``; the
best snapshot (highest mean Dice, the earliest on ties) is reported next to the fixed final step, never instead of
it: the paper's numbers are those of the final step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from dataloaders import niftiio
from dataloaders.dataset_info import DatasetInfo, Fold
from dataloaders.manual_anno_dataset import load_annotated_scans
from dataloaders.normalization import Normalizer
from evaluation.ep1_alp import evaluate_fold
from evaluation.predictors import FastPredictor
from util.errors import ConfigError

HISTORY_FILE = "val_history.json"


def split_off_val_scans(fold: Fold, val_scans: list[int] | tuple[int, ...] | None) -> Fold:
    """The fold with ``val_scans`` removed from its training scans.

    Args:
        fold: the fold from :func:`engine.run_setup.resolve_fold`.
        val_scans: scan ids to hold out for validation (``[]``/``None``: the fold unchanged).

    Returns:
        A :class:`Fold` with the same queries and support and ``train`` without the val scans.

    Raises:
        ConfigError: a val scan is not an integer, is listed twice, is a query or support scan of the fold (test
            data), is not a scan of the dataset, or no training scan would be left.
    """
    ids = list(val_scans or [])
    if not ids:
        return fold
    bad = [s for s in ids if isinstance(s, bool) or not isinstance(s, int)]
    if bad or len(set(ids)) != len(ids):
        raise ConfigError(f"val_scans={ids} must list distinct integer scan ids")
    for sid in ids:
        if sid in fold.queries or sid in fold.support:
            role = "a query" if sid in fold.queries else "the support"
            raise ConfigError(f"val_scans: scan {sid} is {role} scan of fold {fold.index} (test data: choosing a "
                              f"checkpoint on it leaks the test set); pick val scans among the training scans "
                              f"{list(fold.train)}")
        if sid not in fold.train:
            raise ConfigError(f"val_scans: scan {sid} is not a scan of this dataset (training scans of fold "
                              f"{fold.index}: {list(fold.train)})")
    train = tuple(s for s in fold.train if s not in ids)
    if not train:
        raise ConfigError(f"val_scans={ids} takes every training scan of fold {fold.index}: none is left")
    return Fold(fold.index, fold.queries, fold.support, train)


def without_val_scans(fold: Fold, val_scans: list[int] | tuple[int, ...] | None) -> Fold:
    """The fold's training scans without a checkpoint's ``val_scans`` (what it was really trained on), no checks.

    For evaluating a checkpoint trained with ``val_scans``: queries and support stay as resolved now (with another
    ``n_shots`` a val scan may have become a support scan, which is fine: supports are labelled inputs).
    """
    held = {int(s) for s in val_scans or []}
    return Fold(fold.index, fold.queries, fold.support, tuple(s for s in fold.train if s not in held))


class ValMonitor:
    """Scores snapshots on the val scans and keeps the history (``val_history.json``) and the best snapshot.

    Args:
        config: the run's resolved config (``val_scans``, ``data_dir``, ``eval_classes``, ``label_sets``,
            ``n_sup_part``, ``z_margin``, ``val_wsize``, ``eval_batch_size``, ``input_size``).
        info: the dataset description.
        fold: the fold after :func:`split_off_val_scans` (its support scans are the val support).
        normalizer: the training data's normaliser (the one stored in the checkpoints).
        device: where to run the model.
        run_dir: run folder; ``val_history.json`` is written there.
        start_step: a resumed run keeps the entries of earlier snapshots up to this step.

    Raises:
        ConfigError: a support scan lacks one of the evaluated classes.
        niftiio.DataFormatError: a val or support scan is missing, corrupt or unlabelled.
    """

    def __init__(self, config: dict[str, Any], info: DatasetInfo, fold: Fold, normalizer: Normalizer,
                 device: torch.device, run_dir: Path, start_step: int = 0) -> None:
        self.val_scans = [int(s) for s in config["val_scans"]]
        self.support = list(fold.support)
        self.classes = list(config["eval_classes"]) if config["eval_classes"] else info.test_classes(
            config["label_sets"])
        self.names = dict(info.labels)
        self.n_part, self.z_margin = int(config["n_sup_part"]), int(config["z_margin"])
        self.window, self.batch_size = int(config["val_wsize"]), int(config["eval_batch_size"])
        self.device = device
        self.path = Path(run_dir) / HISTORY_FILE
        # on the images' own grid (as validation.py): the predictor resizes for the encoder only
        scans = load_annotated_scans(config["data_dir"], info, self.val_scans + self.support, normalizer,
                                     progress=False)
        self.input_size = int(config["input_size"][0])
        self.images, self.labels = scans.images, scans.labels
        for sid in self.support:
            missing = [info.labels[c] for c in self.classes if not (self.labels[sid] == c).any()]
            if missing:
                raise ConfigError(f"val_scans: support scan {sid} holds no pixel of {missing}; no val support")
        self.history: list[dict[str, Any]] = []
        if start_step > 0 and self.path.is_file():
            old = json.loads(self.path.read_text())
            self.history = [e for e in old.get("history", []) if int(e["step"]) <= start_step]

    def score(self, model: torch.nn.Module, step: int, checkpoint: str | Path) -> dict[str, Any]:
        """Score the model (eval mode; its train/eval mode is restored) and append to ``val_history.json``.

        Args:
            model: the unwrapped :class:`models.grid_proto_fewshot.FewShotSeg`.
            step: the snapshot's step.
            checkpoint: the snapshot file (recorded in the entry).

        Returns:
            The entry ``{"step", "checkpoint", "mean_dice", "class_dice": {name: dice}}`` (Dice in [0, 1],
            ``None`` where undefined).
        """
        was_training = model.training
        predictor = FastPredictor(model, self.device, window=self.window, batch_size=self.batch_size,
                                  input_size=self.input_size)
        try:
            result = evaluate_fold(predictor, self.images, self.labels, self.support, self.val_scans, self.classes,
                                   n_part=self.n_part, z_margin=self.z_margin, class_names=self.names).to_json_dict()
        finally:
            model.train(was_training)  # back to training mode whatever happened
        entry = {"step": int(step), "checkpoint": str(checkpoint), "mean_dice": result["mean_dice"],
                 "class_dice": {self.names[int(c)]: v for c, v in result["class_dice"].items()}}
        self.history = [e for e in self.history if e["step"] != entry["step"]] + [entry]
        niftiio.write_json({"protocol": "ep1_alp", "val_scans": self.val_scans, "support_scans": self.support,
                            "classes": {str(c): self.names[c] for c in self.classes}, "history": self.history,
                            "best_snapshot": self.best}, self.path)
        return entry

    @property
    def best(self) -> dict[str, Any] | None:
        """The entry with the highest mean Dice (the earliest on ties), or ``None`` before any defined score."""
        scored = [e for e in self.history if e["mean_dice"] is not None and not math.isnan(e["mean_dice"])]
        return max(scored, key=lambda e: (e["mean_dice"], -e["step"])) if scored else None


def log_validation(run: Any, writer: Any, entry: dict[str, Any]) -> None:
    """Record one val entry as Sacred scalars ``val.dice.<NAME>``/``val.dice.mean`` and, when ``writer`` is given
    (a :class:`engine.tensorboard_log.TensorBoardLog`), in TensorBoard."""
    for name, value in entry["class_dice"].items():
        if value is not None:
            run.log_scalar(f"val.dice.{name}", value, entry["step"])
    if entry["mean_dice"] is not None:
        run.log_scalar("val.dice.mean", entry["mean_dice"], entry["step"])
    if writer is not None:
        writer.validation(entry)
