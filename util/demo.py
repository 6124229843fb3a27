"""`make demo`: the whole pipeline on the embedded phantom, on CPU, in minutes.

    python -m util.demo --out runs/demo [--data-dir data/PHANTOM/phantom_normalized] [--steps N] [--skip-training]

1. generate the phantom (10 scans, 256x256, seed 0) unless the folder already holds the same phantom;
2. build the class-slice index and the superpixel pseudolabels;
3. train ALPNet with the ``demo`` config (``python training.py with demo ...``);
4. evaluate fold 0 on all four organs next to the intensity baseline (``python validation.py with demo ...``);
5. print the table; results in ``<out>/results.json``, a training curve in ``<out>/training_curve.png``.
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

import numpy as np

from dataloaders import niftiio
from dataloaders.dataset_info import get_dataset_info

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
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--data-dir", type=Path, default=get_dataset_info("PHANTOM").data_dir)
    parser.add_argument("--steps", type=int, default=None, help="override the demo config's n_steps")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-training", action="store_true", help="only prepare and summarise the data")
    args = parser.parse_args(argv)

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
