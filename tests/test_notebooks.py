"""The preprocessing notebooks: stripped outputs, a parameters cell, and every notebook executed end to end.

Each dataset's notebooks run in order on a small synthetic raw dataset (``tests/raw_fixtures.py``), with the
paths passed by replacing the source of the first code cell (tagged ``parameters``), in a kernel of this
interpreter (a kernelspec written to a temporary ``JUPYTER_PATH``, so it works in a fresh clone where only
``make setup`` ran). Any cell error fails the test.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from dataloaders.niftiio import classmap_path, fgmask_path, image_path, label_path, superpix_path
from tests.raw_fixtures import make_chaos_patient, make_cmr, make_synapse

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = {
    "CHAOST2": ["data/CHAOST2/png_gth_to_nii.ipynb", "data/CHAOST2/image_normalize.ipynb",
                "data/CHAOST2/class_slice_index_gen.ipynb"],
    "SABS": ["data/SABS/intensity_normalization.ipynb", "data/SABS/resampling_and_roi.ipynb",
             "data/SABS/class_slice_index_gen.ipynb"],
    "CMR": ["data/CMR/label_to_nii.ipynb", "data/CMR/image_normalize.ipynb", "data/CMR/class_slice_index_gen.ipynb"],
}
PSEUDOLABEL_NB = "data_preprocessing/pseudolabel_gen.ipynb"
OWN_SCANS_NB = "examples/own_scans.ipynb"
ALL_NOTEBOOKS = [nb for chain in NOTEBOOKS.values() for nb in chain] + [PSEUDOLABEL_NB, OWN_SCANS_NB]
KERNEL = "alpnet-preprocessing-test"


def _parameter_names(source: str) -> set[str]:
    return {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}


@pytest.mark.parametrize("rel", ALL_NOTEBOOKS)
def test_notebook_is_stripped_and_parameterised(rel: str) -> None:
    nb = nbformat.read(REPO / rel, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and "parameters" in code[0].metadata.get("tags", []), f"{rel}: first code cell must be tagged"
    assert _parameter_names(code[0].source), f"{rel}: the parameters cell assigns nothing"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{rel}: outputs are not stripped"
    text = "\n".join(c.source for c in code)
    assert "sys.path" not in text and "os.chdir" not in text  # thin wrappers: import the package, no path hacks


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for a kernel running this interpreter with the repository importable."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "test kernel", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return {"JUPYTER_PATH": str(root), "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
            "IPYTHONDIR": str(root / "ipython"), "PYTHONPATH": str(REPO), "MPLBACKEND": "agg"}


def run_notebook(rel: str, params: dict[str, object], cwd: Path) -> None:
    """Execute a notebook with its parameters cell replaced; raises on the first failing cell."""
    nb = nbformat.read(REPO / rel, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    expected = _parameter_names(first.source)
    assert set(params) == expected, f"{rel}: parameters {sorted(expected)} expected, test passes {sorted(params)}"
    first.source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    NotebookClient(nb, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": str(cwd)}}).execute()


def _params_chain(dataset: str, raw: Path, work: Path, out: Path) -> list[dict[str, object]]:
    if dataset == "CHAOST2":
        return [{"RAW_DIR": str(raw), "WORK_DIR": str(work), "SCANS": None},
                {"WORK_DIR": str(work), "OUT_DIR": str(out)}, {"OUT_DIR": str(out), "MIN_FG": 1}]
    if dataset == "SABS":
        return [{"RAW_DIR": str(raw), "WORK_DIR": str(work), "OUT_DIR": str(out), "PARITY": False},
                {"WORK_DIR": str(work), "OUT_DIR": str(out), "PARITY": False}, {"OUT_DIR": str(out), "MIN_FG": 1}]
    return [{"RAW_DIR": str(raw), "WORK_DIR": str(work), "SCANS": None},
            {"WORK_DIR": str(work), "OUT_DIR": str(out)}, {"OUT_DIR": str(out), "MIN_FG": 1}]


@pytest.mark.parametrize("dataset", ["CHAOST2", "SABS", "CMR"])
def test_notebooks_execute(dataset: str, tmp_path: Path, kernel_env: dict[str, str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in kernel_env.items():
        monkeypatch.setenv(key, value)
    raw = tmp_path / "raw"
    if dataset == "CHAOST2":
        make_chaos_patient(raw / "MR", 3, n_slices=6)
        make_chaos_patient(raw / "MR", 8, n_slices=6, png_style="liver_gt")
        raw, ids = raw / "MR", [3, 8]
    elif dataset == "SABS":
        make_synapse(raw, names=("img0007", "img0001"), n_slices=(2, 3))
        ids = [0, 1]
    else:
        make_cmr(raw, patients=(4, 2), unlabelled=(40,), n_slices=4)
        ids = [2, 4]
    work, out = tmp_path / "work", tmp_path / "processed"
    for rel, params in zip(NOTEBOOKS[dataset], _params_chain(dataset, raw, work, out)):
        run_notebook(rel, params, cwd=tmp_path)
    run_notebook(PSEUDOLABEL_NB, {"DATASET": dataset, "DATA_DIR": str(out), "WORKERS": 1, "PARITY": False},
                 cwd=tmp_path)
    assert classmap_path(out).is_file()
    for sid in ids:
        for path in (image_path(out, sid), label_path(out, sid), superpix_path(out, sid), fgmask_path(out, sid)):
            assert path.is_file(), path


def test_own_scans_notebook_goes_from_files_to_the_overlays(tmp_path: Path, kernel_env: dict[str, str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The own-scans notebook on tiny files (the predict tests' synthetic scans and untrained model): it writes the
    outputs of predict.py and shows one overlay per query inline."""
    import torch

    from models.grid_proto_fewshot import FewShotSeg
    from tests.test_predict import SETTINGS, _volumes, _write

    for key, value in kernel_env.items():
        monkeypatch.setenv(key, value)
    torch.manual_seed(0)
    model = FewShotSeg(backbone="lite_gn", init="none", proto_grid_size=2, feature_hw=(8, 8), val_wsize=2)
    torch.save({"model": model.state_dict(), "config": {"modelname": "lite_gn", "proto_grid_size": 2,
                                                       "feature_hw": [8, 8], "val_wsize": 2},
                "preprocessing": {"settings": SETTINGS}}, tmp_path / "model.pth")
    files = {}
    for name, shift in (("sup", 0), ("q1", 1), ("q2", 0)):
        img, lab = _volumes(shift)
        files[name], files[f"{name}_lab"] = (_write(img, tmp_path / f"{name}.nii.gz"),
                                             _write(lab, tmp_path / f"{name}_lab.nii.gz"))
    out = tmp_path / "out"
    nb = nbformat.read(REPO / OWN_SCANS_NB, as_version=4)
    params = {"CHECKPOINT": str(tmp_path / "model.pth"), "SUPPORT_IMAGES": [str(files["sup"])],
              "SUPPORT_LABELS": [str(files["sup_lab"])], "CLASSES": "ORGAN=5,OTHER=1",
              "QUERIES": [str(files["q1"]), str(files["q2"])],
              "QUERY_LABELS": [str(files["q1_lab"]), str(files["q2_lab"])], "OUT": str(out), "METHOD": "registered"}
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert set(params) == _parameter_names(first.source)
    first.source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    NotebookClient(nb, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert (out / "predictions.json").is_file() and (out / "report.html").is_file()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # one overlay per query, inline

