"""Bad input through the real entry points: exit code 2, one ``error:`` line naming the file/key/scan, nothing
half-written; bugs keep their traceback (exit 1); evaluation skips a query without the class and says so.

Most cases run the scripts' command line in this process (:func:`tests.reliability_fixtures.cli`, the function the
``__main__`` blocks call); a few run real interpreters to pin down the exit codes and the observer record.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import training  # noqa: F401 - registers the train command on the experiment
from config_ssl_upload import ex
from data_preprocessing import chaos
from data_preprocessing.class_slice_index import write_classmap
from dataloaders import niftiio
from dataloaders.dataset_info import get_dataset_info
from engine import train_loop
from tests.raw_fixtures import foreign_dicom, make_chaos_patient
from tests.reliability_fixtures import TINY, cli, copy_data, files_under, script
from util.cli import EXIT_FAILURE, EXIT_USER_ERROR


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().err


def _rewrite_label(data: Path, sid: int, change: Callable[[np.ndarray, niftiio.Geometry], tuple]) -> None:
    arr, geom = niftiio.read_label_volume(niftiio.label_path(data, sid))
    arr, geom = change(arr, geom)
    niftiio.write_volume(arr.astype(np.uint8), niftiio.label_path(data, sid), geom)


def _shift(geom: niftiio.Geometry, field: str) -> niftiio.Geometry:
    values = list(getattr(geom, field))
    if field == "direction":
        values = [0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0]  # x and y swapped
    else:
        values[0] += 0.5
    return niftiio.Geometry(**{**geom.__dict__, field: tuple(values)})


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# ------------------------------------------------------------------------------------------------------------- data
# (case id, how to break a copy of the phantom, regex the error line must match)
DATA_CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("no_images", lambda d: [p.unlink() for p in d.glob("image_*.nii.gz")],
     r"phantom_copy: no image_<id>\.nii\.gz files in this folder"),
    ("truncated_image", lambda d: _truncate(d / "image_1.nii.gz"),
     r"image_1\.nii\.gz: truncated or corrupt gzip stream"),
    ("corrupt_label", lambda d: (d / "label_3.nii.gz").write_bytes(b"\x1f\x8b" + b"not gzip" * 20),
     r"label_3\.nii\.gz: truncated or corrupt gzip stream"),
    ("label_shape", lambda d: _rewrite_label(d, 3, lambda a, g: (a[:, :, :60], g)),
     r"label_3\.nii\.gz: shape \(12, 64, 60\) differs from image_3\.nii\.gz \(12, 64, 64\)"),
    ("label_spacing", lambda d: _rewrite_label(d, 0, lambda a, g: (a, _shift(g, "spacing"))),
     r"label_0\.nii\.gz: geometry differs from image_0\.nii\.gz: spacing"),
    ("label_origin", lambda d: _rewrite_label(d, 4, lambda a, g: (a, _shift(g, "origin"))),
     r"label_4\.nii\.gz: geometry differs from image_4\.nii\.gz: origin"),
    ("label_direction", lambda d: _rewrite_label(d, 5, lambda a, g: (a, _shift(g, "direction"))),
     r"label_5\.nii\.gz: geometry differs from image_5\.nii\.gz: direction"),
    ("unknown_label_id", lambda d: _rewrite_label(d, 1, lambda a, g: (np.where(a == 2, 7, a), g)),
     r"label_1\.nii\.gz: label ids \[7\] are not in the dataset's label map \[0, 1, 2, 3, 4\]"),
    ("classmap_missing", lambda d: (d / "classmap_1.json").unlink(),
     r"classmap_1\.json: class-slice index not found; build it with"),
    ("classmap_malformed", lambda d: (d / "classmap_1.json").write_text('{"BG": {"0": [0, 1'),
     r"classmap_1\.json: malformed JSON"),
    ("classmap_stale", lambda d: (d / "classmap_1.json").write_text(json.dumps(
        {k: {**v, "9": [0]} for k, v in json.loads((d / "classmap_1.json").read_text()).items()})),
     r"classmap_1\.json: stale index, it lists scans \['9'\] that have no image file"),
    ("superpixels_missing", lambda d: (d / "superpix-MIDDLE_5.nii.gz").unlink(),
     r"superpix-MIDDLE_5\.nii\.gz: superpixel file missing for scan 5"),
]


@pytest.mark.parametrize("name,breaker,message", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_training_rejects_bad_data(name: str, breaker: Callable[[Path], None], message: str, tiny_phantom: Path,
                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = copy_data(tiny_phantom, tmp_path / "phantom_copy")
    breaker(data)
    before = sorted(p.name for p in data.iterdir())
    run_dir = tmp_path / "run"
    code = cli("training.py", [*TINY, f"data_dir={data}", f"run_dir={run_dir}"])
    err = _err(capsys)
    assert code == EXIT_USER_ERROR, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err
    assert re.search(message, last), last
    assert files_under(run_dir) == []  # no snapshot, no log
    assert sorted(p.name for p in data.iterdir()) == before  # nothing written next to the data either


def test_missing_data_dir_real_script(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = script(["training.py", "with", "demo", *TINY, f"data_dir={tmp_path / 'nowhere'}", f"run_dir={run_dir}"])
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nowhere'}: data directory not found"
    assert "Traceback" not in proc.stderr
    assert files_under(run_dir) == []


# ----------------------------------------------------------------------------------------------------------- config
CONFIG_CASES = [
    ("eval_fold", ["eval_fold=7"], r"PHANTOM: eval_fold=7 is out of range; this dataset has 5 folds \(0\.\.4\)"),
    ("n_ways", ["n_ways=2"], r"n_ways=2 is not supported \(allowed: \[1\]\)"),
    ("n_queries", ["n_queries=3"], r"n_queries=3 is not supported"),
    ("n_shots_zero", ["n_shots=0"], r"n_shots=0 must be a positive integer"),
    ("n_shots_no_training_scan", ["n_shots=4"], r"fold 2 with n_shots=4 holds out every scan .*no training scan"),
    ("n_shots_too_many", ["n_shots=5"], r"fold 2 with n_shots=5 wraps onto its own queries"),
    ("unknown_dataset", ["dataset=CHAOS"], r"unknown dataset 'CHAOS'"),
    ("snapshot_interval", ["save_snapshot_every=0"], r"save_snapshot_every=0 must be a positive integer"),
    ("misspelt_key", ["n_step=3"], r"Added new config entry that is not used anywhere\s+Conflicting configuration "
                                   r"values:\s+n_step=3"),
    ("resume_from_nothing", ["resume_from=/nonexistent/run"], r"resume_from=/nonexistent/run: no such checkpoint"),
]


@pytest.mark.parametrize("name,updates,message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_training_rejects_bad_config(name: str, updates: list[str], message: str, tiny_phantom: Path,
                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    code = cli("training.py", [*TINY, f"data_dir={tiny_phantom}", f"run_dir={run_dir}", *updates])
    err = _err(capsys)
    assert code == EXIT_USER_ERROR, err
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert files_under(run_dir) == []


def test_resume_needs_a_fixed_run_dir(tiny_phantom: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log_dir = tmp_path / "sacred"
    code = cli("training.py", [*TINY, f"data_dir={tiny_phantom}", "use_file_observer=True",
                               f"path.log_dir={log_dir}", "resume=True"])
    assert code == EXIT_USER_ERROR
    assert "error: resume=True needs run_dir=<folder of the run to continue> (an observed run gets a new folder " \
           "every time), or pass resume_from=<run folder or checkpoint>" in _err(capsys)
    assert not list(log_dir.glob("*/*/snapshots"))


# ------------------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def trained(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step demo checkpoint on the tiny phantom."""
    run_dir = tmp_path_factory.mktemp("trained")
    ex.run("train", named_configs=["demo"], options={"--unobserved": True}, config_updates={
        "modelname": "lite_gn", "lr_schedule": "step",
        "input_size": (64, 64), "feature_hw": [8, 8], "proto_grid_size": 2, "num_workers": 0, "eval_fold": 2,
        "n_steps": 2, "lr_milestones": [1], "save_snapshot_every": 2, "data_dir": str(tiny_phantom),
        "run_dir": str(run_dir)})
    return run_dir / "snapshots" / "2.pth"


def _other_arch_state_dict(path: Path) -> None:
    torch.save({"encoder.conv1.weight": torch.zeros(4, 3, 3, 3), "encoder.localconv.weight": torch.zeros(2, 4)},
               path)


CKPT_CASES = [
    ("not_found", lambda p, c: None, [], r"nowhere\.pth: checkpoint not found"),
    ("truncated", lambda p, c: p.write_bytes(c.read_bytes()[:4000]), [],
     r"bad\.pth: corrupt or not a PyTorch checkpoint"),
    ("other_arch_state_dict", lambda p, c: _other_arch_state_dict(p), [],
     r"bad\.pth does not fit the model"),
    ("other_modelname", lambda p, c: p.write_bytes(c.read_bytes()), ["modelname=dlfcn_res50"],
     r"bad\.pth was trained with modelname='lite_gn' but this run has modelname='dlfcn_res50'"),
]


@pytest.mark.parametrize("name,maker,updates,message", CKPT_CASES, ids=[c[0] for c in CKPT_CASES])
def test_validation_rejects_bad_checkpoints(name: str, maker: Callable, updates: list[str], message: str,
                                            trained: Path, tiny_phantom: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / ("nowhere.pth" if name == "not_found" else "bad.pth")
    maker(path, trained)
    run_dir = tmp_path / "eval"
    code = cli("validation.py", [*TINY, f"data_dir={tiny_phantom}", f"run_dir={run_dir}",
                                 f"reload_model_path={path}", *updates])
    err = _err(capsys)
    assert code == EXIT_USER_ERROR, err
    assert re.search(message, err), err
    if name.startswith("other"):  # another architecture: the first missing and unexpected keys are listed
        assert "missing keys, first: ['encoder." in err
    if name == "other_arch_state_dict":
        assert "unexpected keys, first: ['encoder.conv1.weight'" in err
    assert "Traceback" not in err
    assert files_under(run_dir) == []


def test_resume_refuses_another_architecture(trained: Path, tiny_phantom: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code = cli("training.py", [*TINY, f"data_dir={tiny_phantom}", f"run_dir={tmp_path / 'run'}",
                               f"resume_from={trained}", "feature_hw=[4, 4]", "input_size=(32, 32)"])
    err = _err(capsys)
    assert code == EXIT_USER_ERROR
    assert "cannot resume with a different config (input_size: [64, 64] in the checkpoint, [32, 32] now; " \
           "feature_hw: [8, 8] in the checkpoint, [4, 4] now)" in err


def test_support_scan_without_the_test_class(trained: Path, tiny_phantom: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    data = copy_data(tiny_phantom, tmp_path / "data")
    _rewrite_label(data, 4, lambda a, g: (np.where(a == 4, 0, a), g))  # scan 4 (the support) loses its spleen
    write_classmap(data, get_dataset_info("PHANTOM"), progress=False)  # as the user must (a stale one is refused)
    run_dir = tmp_path / "eval"
    code = cli("validation.py", [*TINY, f"data_dir={data}", f"run_dir={run_dir}", f"reload_model_path={trained}"])
    err = _err(capsys)
    assert code == EXIT_USER_ERROR
    assert "error: support scan 4 of fold 2 holds no pixel of classes ['SPLEEN']; choose another support_idx" in err
    assert files_under(run_dir) == []


def test_failed_run_is_recorded_by_the_observer(trained: Path, tiny_phantom: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    log_dir = tmp_path / "sacred"
    proc = script(["validation.py", "with", "demo", *TINY[:-1], f"data_dir={tiny_phantom}",
                   f"run_dir={tmp_path / 'eval'}", f"reload_model_path={bad}", f"path.log_dir={log_dir}"])
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {bad}: corrupt or not a PyTorch checkpoint")
    (run_json,) = log_dir.glob("*/1/run.json")
    record = json.loads(run_json.read_text())
    assert record["status"] == "FAILED"
    assert "CheckpointError" in "".join(record["fail_trace"]) and str(bad) in "".join(record["fail_trace"])
    assert not (tmp_path / "eval" / "results.json").exists()


# ------------------------------------------------------------------------------------------- other errors: traceback
def test_unexpected_errors_keep_their_traceback(tiny_phantom: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    def broken_step(*args, **kwargs):
        raise RuntimeError("a bug in the step, reported as it is")

    monkeypatch.setattr(train_loop, "train_step", broken_step)
    run_dir = tmp_path / "run"
    code = cli("training.py", [*TINY, f"data_dir={tiny_phantom}", f"run_dir={run_dir}"])
    err = _err(capsys)
    assert code == EXIT_FAILURE
    assert "Traceback" in err and "RuntimeError: a bug in the step, reported as it is" in err
    assert "error: " not in err
    assert files_under(run_dir) == []
    with pytest.raises(RuntimeError, match="a bug in the step"):  # in-process runs raise the real exception
        ex.run("train", named_configs=["demo"], options={"--unobserved": True}, config_updates={
            "data_dir": str(tiny_phantom), "run_dir": str(tmp_path / "run2"), "num_workers": 0,
            "modelname": "lite_gn", "lr_schedule": "step",
            "input_size": (64, 64), "feature_hw": [8, 8], "proto_grid_size": 2, "eval_fold": 2})


def test_fresh_run_does_not_overwrite_a_used_run_dir(trained: Path, tiny_phantom: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = trained.parent.parent
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "snapshots").iterdir()}
    code = cli("training.py", [*TINY, f"data_dir={tiny_phantom}", f"run_dir={run_dir}"])
    assert code == EXIT_USER_ERROR
    assert f"run_dir={run_dir} already holds snapshots of a run (latest: 2.pth); continue it with resume=True" \
        in _err(capsys)
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "snapshots").iterdir()} == before


# --------------------------------------------------------------------------------------------- evaluation robustness
def test_query_without_the_class_is_skipped_and_listed(trained: Path, tiny_phantom: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    data = copy_data(tiny_phantom, tmp_path / "data")
    _rewrite_label(data, 3, lambda a, g: (np.where(a == 2, 0, a), g))  # query 3 loses its right kidney
    write_classmap(data, get_dataset_info("PHANTOM"), progress=False)
    run_dir = tmp_path / "eval"
    with pytest.warns(UserWarning, match="query scan 3 holds no slice of class 2: skipped"):
        code = cli("validation.py", [*TINY, f"data_dir={data}", f"run_dir={run_dir}",
                                     f"reload_model_path={trained}"])
    err = _err(capsys)
    assert code == 0, err
    assert "query scan 3 holds no RK: not scored for that class" in caplog.text
    res = json.loads((run_dir / "results.json").read_text())
    assert res["skipped"] == [[3, 2]]
    assert set(res["per_scan"]["3"]) == {"1", "3", "4"} and set(res["per_scan"]["2"]) == {"1", "2", "3", "4"}
    # the class mean is over the queries that hold the class; the mean over scans of each scan's class mean
    assert res["class_dice"]["2"] == pytest.approx(res["per_scan"]["2"]["2"]["dice"])
    scan_means = [np.mean([d["dice"] for d in res["per_scan"][s].values()]) for s in ("2", "3")]
    assert res["mean_dice"] == pytest.approx(np.mean(scan_means))
    assert sorted(p.name for p in (run_dir / "interm_preds").iterdir()) == sorted(
        f"scan_{s}_label_{c}.nii.gz" for s in (2, 3) for c in (1, 2, 3, 4) if (s, c) != (3, 2))
    assert not math.isnan(res["mean_dice"])


def test_predictions_are_replaced_as_a_whole(tmp_path: Path) -> None:
    from validation import write_predictions

    geom = niftiio.Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    folder = tmp_path / "interm_preds"
    write_predictions({(1, 2): np.ones((2, 3, 3), bool), (1, 3): np.zeros((2, 3, 3), bool)}, {1: geom}, folder)
    write_predictions({(5, 2): np.ones((2, 3, 3), bool)}, {5: geom}, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["scan_5_label_2.nii.gz"]  # no mix of two evaluations
    assert sorted(p.name for p in tmp_path.iterdir()) == ["interm_preds"]
    arr, _ = niftiio.read_volume(folder / "scan_5_label_2.nii.gz")
    assert arr.dtype == np.uint8 and set(np.unique(arr)) == {2}


# --------------------------------------------------------------------------------------------------- CHAOS raw data
def test_chaos_cli_rejects_mixed_series_missing_slices_and_png_count(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    cases = []
    p = make_chaos_patient(tmp_path / "a" / "MR", 7, n_slices=6, rows=32, cols=32)
    foreign = foreign_dicom(p.dicom_files[3], p.dicom_files[0].with_name("IMG-0104-00001.dcm"), 1)
    cases.append((p, rf"error: patient 7: {foreign.name} belongs to another acquisition"))
    p = make_chaos_patient(tmp_path / "b" / "MR", 7, n_slices=6, rows=32, cols=32)
    p.dicom_files[3].unlink()
    p.png_files[3].unlink()
    cases.append((p, rf"error: patient 7: gap of .* between {p.dicom_files[2].name} and {p.dicom_files[4].name}"))
    p = make_chaos_patient(tmp_path / "c" / "MR", 7, n_slices=6, rows=32, cols=32)
    p.png_files[0].with_name("IMG-0004-00099.png").write_bytes(p.png_files[0].read_bytes())  # 7 PNGs, 6 DICOMs
    cases.append((p, r"error: patient 7: IMG-0004-00099\.png has no DICOM slice with number 99"))
    p = make_chaos_patient(tmp_path / "d" / "MR", 7, n_slices=6, rows=32, cols=32)
    p.png_files[2].unlink()  # 5 PNGs, 6 DICOMs
    cases.append((p, rf"error: patient 7: DICOM slice {p.dicom_files[2].name} has no ground-truth PNG"))
    for i, (patient, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        code = chaos.main(["--raw", str(patient.mr_dir), "--out", str(out), "--no-progress"])
        err = _err(capsys)
        assert code == EXIT_USER_ERROR, err
        assert re.search(message, err), err
        assert files_under(out) == []


def test_chaos_real_script_exit_code(tmp_path: Path) -> None:
    p = make_chaos_patient(tmp_path / "MR", 7, n_slices=6, rows=32, cols=32)
    foreign_dicom(p.dicom_files[3], p.dicom_files[0].with_name("IMG-0104-00001.dcm"), 1)
    proc = script(["-m", "data_preprocessing.chaos", "--raw", str(p.mr_dir), "--out", str(tmp_path / "out"),
                   "--no-progress"])
    assert proc.returncode == EXIT_USER_ERROR
    assert re.fullmatch(r"error: patient 7: IMG-0104-00001\.dcm belongs to another acquisition; keep one series per "
                        r"folder \(SeriesInstanceUID [\d.]+ vs [\d.]+ in 6 files such as IMG-0004-00001\.dcm\)",
                        proc.stderr.strip().splitlines()[-1]), proc.stderr
    assert files_under(tmp_path / "out") == []
