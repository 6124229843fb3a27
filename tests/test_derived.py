"""Derived files checked against their sources (dataloaders/derived.py), through training.py, validation.py and the
preprocessing CLIs: a class map older than the label files, superpixels and body masks made from an older image,
non-finite image voxels, a checkpoint's fold or CT normaliser that no longer matches the folder. Each suggested
rebuild command is run as printed, and the original command then succeeds.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_preprocessing import verify
from dataloaders import niftiio
from dataloaders.derived import image_fingerprint, read_source_fingerprint
from tests.reliability_fixtures import REPO, TINY, cli, copy_data, files_under
from util.checkpoint import load_checkpoint
from util.cli import EXIT_USER_ERROR

SHORT = [*TINY, "n_steps=2", "lr_milestones=[1]", "save_snapshot_every=2"]  # fold 2: train scans 0, 1, 5
TRAIN_SCANS = (0, 1, 5)


def _last_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def _run_suggested(message: str) -> None:
    """Run the ``python -m ...`` command a message suggests, exactly as printed (up to the end of the message)."""
    match = re.search(r"(python -m [^;\n]+?)\s*$", message)
    assert match, message
    argv = shlex.split(match.group(1))
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def short_run(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step demo checkpoint of fold 2 on the tiny phantom."""
    run = tmp_path_factory.mktemp("short_run")
    assert cli("training.py", [f"data_dir={tiny_phantom}", f"run_dir={run}", *SHORT]) == 0
    return run / "snapshots" / "2.pth"


def _flip_labels_z(data: Path) -> None:
    for path in sorted(data.glob("label_*.nii.gz")):
        arr, geom = niftiio.read_label_volume(path)
        niftiio.write_volume(arr[::-1].astype(np.uint8), path, geom)


def test_flipped_labels_refuse_the_old_class_map(tiny_phantom: Path, short_run: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    data = copy_data(tiny_phantom, tmp_path / "data")
    before = {sid: niftiio.read_label_volume(niftiio.label_path(data, sid))[0] for sid in TRAIN_SCANS}
    _flip_labels_z(data)  # the user fixes a slice-order bug in the labels but keeps the class map
    run = tmp_path / "run"
    updates = ["setting=2", "label_sets=0", f"data_dir={data}", f"run_dir={run}", *SHORT]
    assert cli("training.py", updates) == EXIT_USER_ERROR
    line = _last_error(capsys)
    assert re.match(rf"error: {re.escape(str(data))}/classmap_1\.json: stale index, it disagrees with "
                    r"label_0\.nii\.gz: class LIVER of scan 0 is listed on \d+ slices", line), line
    assert line.endswith(f"Rebuild it with python -m data_preprocessing.class_slice_index --data-dir {data} "
                         f"--dataset PHANTOM --min-fg 1")
    assert files_under(run) == []
    # validation refuses it too (scans 2, 3, 4 of fold 2), before writing anything
    code = cli("validation.py", [*TINY, f"data_dir={data}", f"run_dir={tmp_path / 'eval'}",
                                 f"reload_model_path={short_run}"])
    assert code == EXIT_USER_ERROR
    line_val = _last_error(capsys)
    assert re.match(r"error: .*classmap_1\.json: stale index, it disagrees with label_2\.nii\.gz: class LIVER of "
                    r"scan 2 is listed on \d+ slices", line_val), line_val
    assert files_under(tmp_path / "eval") == []
    # verify (the offline check) reports the same disagreement
    assert verify.main(["--data-dir", str(data), "--dataset", "PHANTOM"]) == 1
    assert "stale index, it disagrees with label_0.nii.gz: class LIVER of scan 0" in capsys.readouterr().out

    _run_suggested(line)  # the rebuild command, as printed
    assert cli("training.py", updates) == 0, capsys.readouterr().err
    record = load_checkpoint(run / "snapshots" / "2.pth")["exclusion"]
    # by hand from the flipped label files and the superpixel files: trainable = non-empty and kidney-free
    n_trainable = n_kidney_flipped = n_kidney_before = 0
    for sid in TRAIN_SCANS:
        lab = niftiio.read_label_volume(niftiio.label_path(data, sid))[0]
        sp = niftiio.read_label_volume(niftiio.superpix_path(data, sid))[0]
        kidney = np.isin(lab, [2, 3]).any(axis=(1, 2))
        n_trainable += int((sp.any(axis=(1, 2)) & ~kidney).sum())
        n_kidney_flipped += int(kidney.sum())
        n_kidney_before += int((np.isin(before[sid], [2, 3]).any(axis=(1, 2)) & ~kidney).sum())
    assert n_kidney_before > 0  # the stale map would have excluded other slices
    assert record["trainable_slices"] == n_trainable
    assert record["trainable_slices_holding"]["RK"] == record["trainable_slices_holding"]["LK"] == 0
    assert record["leak_free"] is True and record["excluded_classes"] == [2, 3]


def test_superpixels_and_body_masks_from_an_older_image(tiny_phantom: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    data = copy_data(tiny_phantom, tmp_path / "data")
    image, geom = niftiio.read_volume(niftiio.image_path(data, 1))
    assert read_source_fingerprint(niftiio.superpix_path(data, 1)) == image_fingerprint(image, geom)
    niftiio.write_volume(image * 1.5 + 3.0, niftiio.image_path(data, 1), geom)  # preprocessed again
    run = tmp_path / "run"
    updates = [f"data_dir={data}", f"run_dir={run}", *SHORT]
    assert cli("training.py", updates) == EXIT_USER_ERROR
    line = _last_error(capsys)
    assert line == (f"error: {data}/superpix-MIDDLE_1.nii.gz: made from another version of image_1.nii.gz (the image "
                    f"changed after the file was written); regenerate it with python -m data_preprocessing.pseudolabel "
                    f"--data-dir {data} --dataset PHANTOM --scans 1")
    assert verify.main(["--data-dir", str(data), "--dataset", "PHANTOM"]) == 1
    out = capsys.readouterr().out
    assert "superpix-MIDDLE_1.nii.gz: made from another version of image_1.nii.gz" in out
    assert "fgmask_1.nii.gz: made from another version of image_1.nii.gz" in out
    _run_suggested(line)
    assert verify.main(["--data-dir", str(data), "--dataset", "PHANTOM"]) == 0
    assert cli("training.py", updates) == 0, capsys.readouterr().err


def test_non_finite_voxels_are_an_error(tiny_phantom: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = copy_data(tiny_phantom, tmp_path / "data")
    image, geom = niftiio.read_volume(niftiio.image_path(data, 3))
    image[5, 10, 20], image[6, 0, 0] = np.nan, np.inf
    niftiio.write_volume(image, niftiio.image_path(data, 3), geom)
    assert cli("training.py", [f"data_dir={data}", f"run_dir={tmp_path / 'run'}", *SHORT]) == EXIT_USER_ERROR
    assert _last_error(capsys) == (f"error: {data}/image_3.nii.gz: 2 voxels are NaN or infinite (first at z, y, x = "
                                   f"(5, 10, 20)); fix the preprocessing that wrote it (they are never replaced "
                                   f"silently, as SimpleITK's reader would, with 0)")


def test_checkpoint_fold_must_match_the_folder(short_run: Path, tiny_phantom: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    data = copy_data(tiny_phantom, tmp_path / "data")
    for path in data.glob("*_5.nii.gz"):  # a scan added after training: the folds are recomputed
        (data / path.name.replace("_5.nii.gz", "_6.nii.gz")).write_bytes(path.read_bytes())
    from data_preprocessing.class_slice_index import write_classmap
    from dataloaders.dataset_info import get_dataset_info

    write_classmap(data, get_dataset_info("PHANTOM"), progress=False)
    run = tmp_path / "eval"
    code = cli("validation.py", [*TINY, f"data_dir={data}", f"run_dir={run}", f"reload_model_path={short_run}"])
    line = _last_error(capsys)
    assert code == EXIT_USER_ERROR
    assert line.startswith(f"error: {short_run}: trained on fold 2 of another set of scans (")
    assert "scans were added or removed since training" in line
    assert files_under(run) == []


def test_checkpoint_ct_normaliser_must_match_the_images(short_run: Path, tiny_phantom: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from dataloaders.normalization import normalizer_from_scans

    data = copy_data(tiny_phantom, tmp_path / "data")
    ckpt = load_checkpoint(short_run)
    norm = normalizer_from_scans(data, "CT", list(TRAIN_SCANS), progress=False)  # a global (CT-style) normaliser
    ckpt["normalizer"] = norm.to_dict()
    path = tmp_path / "ct.pth"
    torch.save(ckpt, path)
    updates = [*TINY, f"data_dir={data}", f"reload_model_path={path}", "save_predictions=False"]
    assert cli("validation.py", [*updates, f"run_dir={tmp_path / 'ok'}"]) == 0  # the folder it was trained on
    image, geom = niftiio.read_volume(niftiio.image_path(data, 5))
    niftiio.write_volume(image + 10.0, niftiio.image_path(data, 5), geom)  # a training image changed since
    capsys.readouterr()
    assert cli("validation.py", [*updates, f"run_dir={tmp_path / 'bad'}"]) == EXIT_USER_ERROR
    line = _last_error(capsys)
    assert line.startswith(f"error: {path}: its CT normaliser (mean {norm.mean:.6g}, std {norm.std:.6g} over training "
                           f"scans [0, 1, 5]) no longer matches {data} (mean ")
    assert files_under(tmp_path / "bad") == []
