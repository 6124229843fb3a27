"""`make demo`: the whole pipeline on the embedded phantom, on CPU, in minutes.

    python -m launch.demo --out runs/demo [--data-dir data/PHANTOM/phantom_normalized] [--steps N] [--skip-training]

1. generate the phantom (10 scans, 256x256, seed 0) unless the folder already holds the same phantom;
2. build the class-slice index and the superpixel pseudolabels;
3. train ALPNet with the ``demo`` config (``python training.py with demo ...``);
4. evaluate fold 0 on all four organs next to the intensity baseline (``python validation.py with demo ...``);
5. print the table; results in ``<out>/results.json``, a training curve in ``<out>/training_curve.png``;
6. own scans: export fold 0's two queries to a scanner-like raw geometry (512x512, 0.7 mm, RAS-stored NIfTI: x
   and y flipped against the processed grid), segment them with ``predict.py`` from the fold's support scan with
   each whole-volume method (``registered``, the default; ``atlas``; ``body``, the previous rule) and print their
   Dice side by side with EP1-ALP's, then the default on the processed-format copies
   (``<out>/predict_<method>/report.html``).
Each step prints the command that repeats it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dataloaders import niftiio
from dataloaders.dataset_info import get_dataset_info
from util.atomic import atomic_file
from util.options import OptionParser, int_at_least

PHANTOM_ARGS = {"n_scans": 10, "seed": 0, "size": 256, "appearance": "mr"}


def _step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def prepare_phantom(data_dir: Path, workers: int) -> float:
    """Phantom, class map and pseudolabels in ``data_dir``; reuses a complete folder made with the same settings."""
    from data_preprocessing.class_slice_index import write_classmap
    from data_preprocessing.phantom import generate_phantom
    from data_preprocessing.pseudolabel import generate_pseudolabels

    t0 = time.perf_counter()
    stamp = data_dir / "demo_phantom.json"
    info = get_dataset_info("PHANTOM")
    if stamp.is_file() and json.loads(stamp.read_text()) == PHANTOM_ARGS:
        print(f"phantom already in {data_dir} (delete {stamp.name} to regenerate)")
        return time.perf_counter() - t0
    _step(f"phantom -> {data_dir}   (python -m data_preprocessing.phantom --out {data_dir} --n-scans 10 --seed 0)")
    data_dir.mkdir(parents=True, exist_ok=True)
    generate_phantom(data_dir, **PHANTOM_ARGS)
    _step(f"class-slice index   (python -m data_preprocessing.class_slice_index --data-dir {data_dir} "
          f"--dataset PHANTOM)")
    write_classmap(data_dir, info)
    _step(f"superpixel pseudolabels   (python -m data_preprocessing.pseudolabel --data-dir {data_dir} "
          f"--dataset PHANTOM)")
    generate_pseudolabels(data_dir, info, workers=workers)
    niftiio.write_json(PHANTOM_ARGS, stamp)
    return time.perf_counter() - t0


def data_summary(data_dir: Path) -> str:
    """Scans, slices, organ slices and superpixels per slice of a processed folder."""
    info = get_dataset_info("PHANTOM")
    cmap = niftiio.load_classmap(data_dir, list(info.labels.values()))
    lines = ["| scan | slices | " + " | ".join(info.class_names.values()) + " | superpixels/slice |",
             "|" + "---|" * (len(info.class_names) + 3)]
    for sid in niftiio.list_scan_ids(data_dir):
        sp, _ = niftiio.read_label_volume(niftiio.superpix_path(data_dir, sid))
        n_sp = np.mean([len(np.unique(s[s > 0])) for s in sp])
        organ = " | ".join(str(len(cmap[name][str(sid)])) for name in info.class_names.values())
        lines.append(f"| {sid} | {sp.shape[0]} | {organ} | {n_sp:.1f} |")
    return "\n".join(lines)


# A scanner-like raw geometry for the phantom (processed: 256x256 at 1.25 mm, identity direction).
FOREIGN_SIZE, FOREIGN_SPACING = 512, 0.7  # in-plane voxels and mm (field of view 358 mm > 320 mm)
FOREIGN_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # how SimpleITK reads a RAS-stored NIfTI


def export_foreign(data_dir: Path, scan_id: int, out_dir: Path) -> tuple[Path, Path]:
    """Write a processed phantom scan in another geometry covering the same physical space.

    The image is resampled linearly, the label by nearest neighbour, onto a ``FOREIGN_SIZE`` x ``FOREIGN_SIZE``
    grid of ``FOREIGN_SPACING`` mm in-plane, slices kept (same z spacing and positions), centred on the scan and
    with the direction ``FOREIGN_DIRECTION``: array x and y run the other way (a NIfTI written in RAS).

    Returns:
        (image path, label path): ``phantom_<id>.nii.gz`` and ``phantom_<id>_label.nii.gz`` in ``out_dir``.
    """
    import SimpleITK as sitk

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for src_path, suffix, interp in ((niftiio.image_path(data_dir, scan_id), "", sitk.sitkLinear),
                                     (niftiio.label_path(data_dir, scan_id), "_label", sitk.sitkNearestNeighbor)):
        src = niftiio.read_sitk(src_path)
        nx, ny, nz = src.GetSize()
        centre = np.asarray(src.TransformContinuousIndexToPhysicalPoint(((nx - 1) / 2, (ny - 1) / 2, 0.0)))
        spacing = (FOREIGN_SPACING, FOREIGN_SPACING, src.GetSpacing()[2])
        half = (FOREIGN_SIZE - 1) / 2 * FOREIGN_SPACING
        direction = np.asarray(FOREIGN_DIRECTION).reshape(3, 3)
        origin = centre - direction @ np.array([half, half, 0.0])
        res = sitk.Resample(src, [FOREIGN_SIZE, FOREIGN_SIZE, nz], sitk.Transform(), interp, tuple(origin), spacing,
                            FOREIGN_DIRECTION, 0.0, src.GetPixelID())
        path = out_dir / f"phantom_{scan_id}{suffix}.nii.gz"
        niftiio.write_volume(sitk.GetArrayFromImage(res), path, reference=res)
        paths.append(path)
    return paths[0], paths[1]


def own_scan_methods(out: Path, data_dir: Path, checkpoint: Path, queries: list[int], support: int,
                     ep1: dict[str, Any]) -> dict[str, float]:
    """Step 6: ``predict.py`` on fold 0's queries exported to a foreign geometry, with each whole-volume method, next
    to EP1-ALP (which picks the query's slices from its labels); then the default method on the processed-format
    copies of the same scans (the geometry round trip must not change the Dice).

    Returns:
        Mean Dice per row: ``ep1_alp``, each method on the foreign copies, and ``registered_processed``.
    """
    info = get_dataset_info("PHANTOM")
    classes = ",".join(f"{info.labels[c]}={c}" for c in info.eval_classes)
    exported = [export_foreign(data_dir, q, out / "foreign_scans") for q in queries]
    common = [sys.executable, "predict.py", "--checkpoint", str(checkpoint), "--classes", classes,
              "--support-image", str(niftiio.image_path(data_dir, support)),
              "--support-label", str(niftiio.label_path(data_dir, support)), "--device", "cpu"]
    foreign = ([str(i) for i, _ in exported], [str(lb) for _, lb in exported])
    processed = ([str(niftiio.image_path(data_dir, q)) for q in queries],
                 [str(niftiio.label_path(data_dir, q)) for q in queries])
    names = [info.labels[c] for c in info.eval_classes]
    rows: dict[str, dict[str, float]] = {"ep1_alp": {n: ep1["class_dice"][str(c)] for n, c in
                                                     zip(names, info.eval_classes)}}
    for name, method, (imgs, labels) in (("registered", "registered", foreign), ("atlas", "atlas", foreign),
                                         ("body", "body", foreign),
                                         ("registered_processed", "registered", processed)):
        folder = out / f"predict_{name}"
        run([*common, "--method", method, "--query", *imgs, "--query-label", *labels, "--out", str(folder)])
        summary = json.loads((folder / "predictions.json").read_text())
        rows[name] = {n: float(np.nanmean([q["classes"][n]["dice"] if q["classes"][n]["dice"] is not None
                                           else np.nan for q in summary["queries"].values()])) for n in names}
    titles = {"ep1_alp": "EP1-ALP (slices picked with the query's labels)",
              "registered": "registered (default, no query label)", "atlas": "atlas (registration alone)",
              "body": "body (the previous rule)", "registered_processed": "registered, processed-format copies"}
    print("| method (predict.py, foreign geometry) | " + " | ".join(names) + " | mean |")
    print("|" + "---|" * (len(names) + 2))
    means = {}
    for key, row in rows.items():
        means[key] = float(np.nanmean(list(row.values())))
        print(f"| {titles[key]} | " + " | ".join(f"{row[n]:.3f}" for n in names) + f" | {means[key]:.3f} |")
    print(f"geometry round trip: foreign minus processed {means['registered'] - means['registered_processed']:+.3f} "
          f"| report: {out / 'predict_registered' / 'report.html'}")
    return means


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def plot_curve(run_dir: Path) -> Path | None:
    """Training loss curve from ``<run_dir>/train_log.json`` (written by training.py)."""
    log = run_dir / "train_log.json"
    if not log.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(log.read_text())
    steps = np.arange(1, len(data["loss"]) + 1)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key in ("loss", "query_loss", "align_loss"):
        vals = np.asarray(data[key], dtype=float)
        k = max(1, len(vals) // 50)
        smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (moving average)")
    ax.legend()
    ax.set_title("ALPNet demo training on the phantom")
    fig.tight_layout()
    out = run_dir / "training_curve.png"
    with atomic_file(out) as tmp:  # a crash leaves no half-written figure
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out


def build_parser() -> OptionParser:
    """The options of ``python -m launch.demo`` (docs/cli.md)."""
    parser = OptionParser(prog="python -m launch.demo", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--data-dir", type=Path, default=get_dataset_info("PHANTOM").data_dir)
    parser.add_argument("--steps", type=int_at_least(1), default=None, help="override the demo config's n_steps")
    parser.add_argument("--workers", type=int_at_least(1), default=os.cpu_count() or 1)
    parser.add_argument("--skip-training", action="store_true", help="only prepare and summarise the data")
    return parser


def main(argv: list[str] | None = None) -> int:
    """What ``make demo`` runs; a bad option exits with one ``error:`` line and code 2 before any work."""
    args = build_parser().parse_args(argv)

    t0 = time.perf_counter()
    prep_s = prepare_phantom(args.data_dir, args.workers)
    _step("data summary")
    print(data_summary(args.data_dir))
    print(f"data ready in {prep_s:.1f} s")
    if args.skip_training:
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    common = [f"data_dir={args.data_dir}", f"run_dir={args.out}", "use_file_observer=False"]
    steps = [f"n_steps={args.steps}"] if args.steps else []
    _step("training (demo config)")
    t_train = time.perf_counter()
    # resume=True: a finished run is not trained again, an interrupted one continues
    run([sys.executable, "training.py", "with", "demo", *common, *steps, "resume=True"])
    train_s = time.perf_counter() - t_train
    snapshots = args.out / "snapshots"
    final = max(snapshots.glob("*.pth"), key=lambda p: int(p.stem))
    _step("evaluation, fold 0, all four organs, with the intensity baseline")
    run([sys.executable, "validation.py", "with", "demo", *common, *steps, f"reload_model_path={final}",
         "baseline=True"])
    curve = plot_curve(args.out)
    res = json.loads((args.out / "results.json").read_text())
    total = time.perf_counter() - t0
    _step("demo summary")
    print(f"ALPNet mean Dice {res['mean_dice']:.3f} | intensity baseline {res['baseline']['mean_dice']:.3f} | "
          f"training {train_s:.0f} s | total {total:.0f} s")
    print(f"results: {args.out / 'results.json'}" + (f" | curve: {curve}" if curve else ""))
    _step("own scans: predict.py on fold 0's queries exported to a foreign geometry, from the fold's support scan, "
          "with each whole-volume method")
    own_scan_methods(args.out, args.data_dir, final, list(res["query_scans"]), int(res["support_scans"][0]), res)
    print(f"demo total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
