"""Setting 2 is leak-free whatever the config (dataloaders/leakage.py), through training.py and validation.py: a config
that would keep test-class slices is refused naming its keys unless exclusion_rule=all asks for the leaky variant,
and the checkpoint and results.json record what was excluded, computed from the label files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from data_preprocessing.class_slice_index import write_classmap
from dataloaders import niftiio
from dataloaders.dataset_info import get_dataset_info
from dataloaders.leakage import check_setting2_config
from tests.reliability_fixtures import TINY, cli, copy_data, files_under
from util.checkpoint import load_checkpoint
from util.cli import EXIT_USER_ERROR
from util.errors import ConfigError

SHORT = [*TINY, "n_steps=2", "lr_milestones=[1]", "save_snapshot_every=2"]  # fold 2: train scans 0, 1, 5
TRAIN_SCANS = (0, 1, 5)
INFO = get_dataset_info("PHANTOM")


def _slices(data: Path, classes: list[int], min_px: int = 1, max_px: int | None = None) -> int:
    """Training slices holding between min_px and max_px pixels of any of ``classes`` and some superpixel."""
    n = 0
    for sid in TRAIN_SCANS:
        lab = niftiio.read_label_volume(niftiio.label_path(data, sid))[0]
        sp = niftiio.read_label_volume(niftiio.superpix_path(data, sid))[0]
        for z in range(lab.shape[0]):
            counts = [int((lab[z] == c).sum()) for c in classes]
            hit = any(min_px <= k and (max_px is None or k <= max_px) for k in counts)
            n += int(hit and sp[z].any())
    return n


def test_config_check_names_the_keys() -> None:
    base = {"setting": 2, "label_sets": 0, "exclude_cls_list": [2, 3], "exclusion_rule": "any", "min_fg_data": 1}
    check_setting2_config(base, INFO)
    check_setting2_config({**base, "setting": 1, "exclude_cls_list": [], "min_fg_data": 100}, INFO)  # setting 1
    check_setting2_config({**base, "exclude_cls_list": [2, 3, 1]}, INFO)  # excluding more is fine
    check_setting2_config({**base, "exclusion_rule": "all", "min_fg_data": 100}, INFO)  # leaky by name
    with pytest.raises(ConfigError, match=r"exclude_cls_list=\[2\] misses test classes \['LK'\] of label_sets=0"):
        check_setting2_config({**base, "exclude_cls_list": [2]}, INFO)
    with pytest.raises(ConfigError, match=r"min_fg_data=100 excludes only slices with >= 100 pixels"):
        check_setting2_config({**base, "min_fg_data": 100}, INFO)


def test_min_fg_100_is_refused_unless_leaky_by_name(tiny_phantom: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    data = copy_data(tiny_phantom, tmp_path / "data")
    write_classmap(data, INFO, min_fg=100, progress=False)
    common = ["setting=2", "label_sets=0", "min_fg_data=100", f"data_dir={data}", *SHORT]
    assert cli("training.py", [*common, f"run_dir={tmp_path / 'refused'}"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert re.search(r"error: setting 2 would not be leak-free: min_fg_data=100 excludes only slices with >= 100 "
                     r"pixels of a test class.*pass exclusion_rule=all \(recorded as leaky\)", err), err
    assert files_under(tmp_path / "refused") == []

    leaky = tmp_path / "leaky"
    assert cli("training.py", [*common, "exclusion_rule=all", f"run_dir={leaky}"]) == 0
    record = load_checkpoint(leaky / "snapshots" / "2.pth")["exclusion"]
    # by hand: with the 'all' rule over classmap_100, a trainable slice holds a kidney when it has RK and LK below
    # 100 pixels each, or one kidney only; the record counts trainable slices with >= 1 kidney pixel
    expected_rk = 0
    for sid in TRAIN_SCANS:
        lab = niftiio.read_label_volume(niftiio.label_path(data, sid))[0]
        sp = niftiio.read_label_volume(niftiio.superpix_path(data, sid))[0]
        for z in range(lab.shape[0]):
            rk, lk = int((lab[z] == 2).sum()), int((lab[z] == 3).sum())
            excluded = rk >= 100 and lk >= 100
            expected_rk += int(sp[z].any() and not excluded and rk > 0)
    assert expected_rk > 0
    assert record["trainable_slices_holding"]["RK"] == expected_rk
    assert record["leak_free"] is False and record["exclusion_rule"] == "all"


def test_exclude_list_missing_a_test_class_is_refused(tiny_phantom: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code = cli("training.py", ["setting=2", "label_sets=0", "exclude_cls_list=[2]", f"data_dir={tiny_phantom}",
                               f"run_dir={tmp_path / 'run'}", *SHORT])
    assert code == EXIT_USER_ERROR
    assert "exclude_cls_list=[2] misses test classes ['LK'] of label_sets=0" in capsys.readouterr().err


def test_record_in_checkpoint_and_results(tiny_phantom: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli("training.py", ["setting=2", "label_sets=0", f"data_dir={tiny_phantom}", f"run_dir={run}",
                               *SHORT]) == 0
    record = load_checkpoint(run / "snapshots" / "2.pth")["exclusion"]
    n_total = _slices(tiny_phantom, [0])  # slices with superpixels (background is on every slice)
    n_kidney = _slices(tiny_phantom, [2, 3])
    assert record["trainable_slices"] == n_total - n_kidney
    assert record["trainable_slices_holding"]["RK"] == record["trainable_slices_holding"]["LK"] == 0
    assert record["trainable_slices_holding"]["LIVER"] == _slices(tiny_phantom, [1]) - _liver_and_kidney(tiny_phantom)
    assert record["leak_free"] is True and record["test_classes"] == [2, 3] and record["setting"] == 2

    ckpt = run / "snapshots" / "2.pth"
    for classes, leak_free in (("[2, 3]", True), ("[1, 2, 3, 4]", False)):
        out = tmp_path / f"eval{len(classes)}"
        assert cli("validation.py", [*TINY, "setting=2", "label_sets=0", f"eval_classes={classes}",
                                     f"data_dir={tiny_phantom}", f"run_dir={out}", f"reload_model_path={ckpt}",
                                     "save_predictions=False"]) == 0
        res = json.loads((out / "results.json").read_text())
        assert res["leak_free"] is leak_free
        assert res["training_exclusion"] == record
        assert res["exclude_cls_list"] == [2, 3] and res["exclusion_rule"] == "any"


def _liver_and_kidney(data: Path) -> int:
    """Training slices with superpixels holding the liver and a kidney (excluded in setting 2, group 0)."""
    n = 0
    for sid in TRAIN_SCANS:
        lab = niftiio.read_label_volume(niftiio.label_path(data, sid))[0]
        sp = niftiio.read_label_volume(niftiio.superpix_path(data, sid))[0]
        liver = (lab == 1).any(axis=(1, 2))
        kidney = np.isin(lab, [2, 3]).any(axis=(1, 2))
        n += int((liver & kidney & sp.any(axis=(1, 2))).sum())
    return n
