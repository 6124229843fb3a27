"""Own-scan prediction end to end: ``predict.py`` on one synthetic 512x512xZ CT query, in a subprocess.

:func:`measure_predict` writes a support and a query CT in HU (int16 NIfTI, 0.78 mm in-plane, 2.5 mm slices: a
body ellipse of soft tissue, an ellipsoid organ labelled 6, air at -1000 HU, Gaussian noise), a random-init
checkpoint of the requested backbone that records CT preprocessing (window -125..275 HU, one fixed 1.6 mm in-plane
spacing, 256x256), then times ``python predict.py ...`` as a new process: interpreter start, reading, the transform,
scoring every slice, the map back to the 512x512 grid and the writing of every output. The peak resident memory
of that process is read from ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` (the only child of the measuring process).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# the own-scan CT default: one fixed 1.6 mm in-plane spacing for support and query (docs/own-scans.md)
CT_SETTINGS = {"modality": "CT", "spacing": 1.6, "z_spacing": None, "size": 256, "window": [-125.0, 275.0],
               "mr_clip_percentile": None, "spacing_rule": "fixed"}
ORGAN_ID = 6


def synthetic_ct(n_slices: int, size: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A (n_slices, size, size) int16 CT volume in HU and its uint8 label (organ = 6, on the middle ~60 % of
    slices). Built slice by slice, so memory stays at the volume's own size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size].astype(np.float32) / size
    body = ((x - 0.5) / 0.42) ** 2 + ((y - 0.52) / 0.33) ** 2 <= 1
    img = np.full((n_slices, size, size), -1000, np.int16)
    lab = np.zeros((n_slices, size, size), np.uint8)
    for z in range(n_slices):
        t = (z / max(n_slices - 1, 1) - 0.5) / 0.3  # organ ellipsoid: |t| <= 1 on the middle 60 % of slices
        r2 = max(0.0, 1.0 - t * t)
        organ = ((x - 0.38) / 0.14) ** 2 + ((y - 0.45) / 0.12) ** 2 <= r2
        sl = np.where(body, 40.0, -1000.0) + rng.normal(0, 12, (size, size))
        sl[organ] = 60 + rng.normal(0, 12, int(organ.sum()))
        img[z] = np.clip(sl, -1024, 3000).astype(np.int16)
        lab[z][organ] = ORGAN_ID
    return img, lab


def _write(arr: np.ndarray, path: Path, spacing: tuple[float, float, float]) -> Path:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((-200.0, -200.0, 0.0))
    sitk.WriteImage(img, str(path), True)
    return path


def measure_predict(backbone: str, n_slices: int = 200, size: int = 512, support_slices: int = 60,
                    device: str = "cpu", batch_size: int = 16, work_dir: str | None = None) -> dict[str, Any]:
    """Seconds and peak RSS of ``predict.py`` on one synthetic CT query (module docstring).

    Args:
        backbone: ``lite_gn_s`` (the demo's), ``lite_gn`` or ``dlfcn_res101`` (the paper's), random init.
        n_slices, size: the query's slices and in-plane size (512x512x200 for the issue's figure).
        support_slices: the support scan's slices (same in-plane grid).
        device: ``--device`` of predict.py.
        batch_size: ``--batch-size`` of predict.py.
        work_dir: scratch folder (default: a temporary one).

    Raises:
        RuntimeError: predict.py failed (its stderr is in the message).
    """
    import torch

    from models.grid_proto_fewshot import FewShotSeg

    root = Path(work_dir or tempfile.mkdtemp(prefix="bench_predict_"))
    root.mkdir(parents=True, exist_ok=True)
    spacing = (0.78, 0.78, 2.5)
    sup_img, sup_lab = synthetic_ct(support_slices, size, seed=1)
    _write(sup_img, root / "support.nii.gz", spacing)
    _write(sup_lab, root / "support_label.nii.gz", spacing)
    del sup_img, sup_lab
    qry_img, _ = synthetic_ct(n_slices, size, seed=2)
    _write(qry_img, root / "query.nii.gz", spacing)
    del qry_img
    torch.manual_seed(0)
    model = FewShotSeg(backbone=backbone, init="none")
    torch.save({"model": model.state_dict(), "config": {"modelname": backbone},
                "preprocessing": {"settings": CT_SETTINGS, "spacing_mm": CT_SETTINGS["spacing"]},
                "normalizer": {"kind": "global", "mean": 60.0, "std": 70.0, "scan_ids": []}}, root / "model.pth")
    del model
    cmd = [sys.executable, str(REPO / "predict.py"), "--checkpoint", str(root / "model.pth"),
           "--support-image", str(root / "support.nii.gz"), "--support-label", str(root / "support_label.nii.gz"),
           "--classes", f"ORGAN={ORGAN_ID}", "--query", str(root / "query.nii.gz"), "--out", str(root / "out"),
           "--device", device, "--batch-size", str(batch_size)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"predict.py exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    summary = json.loads((root / "out" / "predictions.json").read_text())
    return {"seconds": seconds, "predict_elapsed_s": summary["elapsed_s"], "predict_peak_rss_mb": peak_kb / 1024,
            "backbone": backbone, "query_shape": [n_slices, size, size], "support_slices": support_slices,
            "device": device, "batch_size": batch_size,
            "volume_ml": summary["queries"]["query"]["classes"]["ORGAN"]["volume_ml"]}
