"""The measurements of ``python -m bench`` and the driver :func:`run_suite`.

Measurements (each in its own process, see :mod:`bench.measure`):

* ``train_step``: median seconds of :func:`training.train_step` (forward, both losses, backward, SGD step) on a
  synthetic batch, after warm-up; random init (the weights do not change the cost);
* ``pipeline``: episodes per second of the training DataLoader (:class:`SuperpixelEpisodeDataset` with
  ``sabs_aug``) alone, steady state (the time to the first batch, worker start-up included, is reported apart);
* ``eval``: one fold of EP1-ALP (:func:`evaluation.ep1_alp.evaluate_fold`) on the phantom with
  :class:`evaluation.predictors.FastPredictor` and with :class:`evaluation.predictors.NaivePredictor` (the original's
  loop);
* ``pseudolabels``: :func:`data_preprocessing.pseudolabel.generate_pseudolabels` with 1 and with all workers;
* ``predict``: ``predict.py`` end to end on one synthetic 512x512x200 CT query, as a new process
  (:func:`bench.prediction.measure_predict`): seconds and the process's peak RSS, per backbone.

The data is the synthetic phantom (``data_preprocessing.phantom``), generated in a scratch folder when a selected
part needs it (:data:`PARTS`; ``python -m bench --only predict`` runs the last measurement alone).
"""

from __future__ import annotations

import dataclasses
import datetime
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.measure import (
    BenchError,
    cpu_count,
    environment,
    load_average,
    run_isolated,
    summary,
    synthetic_batch,
    time_repeated,
)
from util.provenance import git_commit, git_dirty

# The measurements, in the order they run; each is a key group of the results (``--only`` selects some).
PARTS: tuple[str, ...] = ("pseudolabels", "pipeline", "eval", "train_step", "loop", "predict")
_NEED_PHANTOM = {"pseudolabels", "pipeline", "eval", "loop"}  # the others build their own inputs

# name -> (backbone, input size): the paper's configuration and the CPU demo's (config_ssl_upload.demo)
MODELS: dict[str, tuple[str, int]] = {"paper": ("dlfcn_res101", 256), "demo": ("lite_gn_s", 256)}  # the demo config's


@dataclass
class SuiteConfig:
    """What to measure and how long.

    Attributes:
        device: "cpu" or "cuda" (or "cuda:1").
        quick: the short preset (recorded in the results).
        models: name -> (backbone, input size) for the training-step measurements.
        amp_modes: amp settings timed for every model; "auto" is the device's mixed precision
            (:func:`mixed_precision`), also allowed as an ``amp`` override in ``options``.
        options: extra training-option measurements: (model, option name, {train-step keyword overrides}).
        warmup, reps_min, reps_max, budget_s: training-step timing (per model name, or "*" for the rest).
        n_scans, n_slices, size: the phantom.
        eval_fold: fold of the phantom evaluated (its training scans feed the pipeline).
        eval_model: model name (a key of ``models``) used for the evaluation.
        eval_batch_size: query slices per forward pass of the fast path.
        pipeline_workers: DataLoader worker counts; pipeline_episodes: episodes timed per count.
        pseudolabel_rounds: rounds of (1 worker, all workers); the fastest of each is kept.
        loop_steps, loop_workers: the loop-overhead run (:func:`bench.loop.measure_loop`), per worker count.
        ratio_reps: alternated steps of the step before the host-sync-free change and the current paper
            step (:func:`bench.loop.measure_step_ratio`); 0 skips it.
        predict_models: model names (keys of ``models``) timed with ``predict.py`` on a CT query of
            ``predict_shape`` (slices, in-plane size); empty skips it.
        isolate: run each measurement in its own process (False only for tests).
        parts: the measurements to run (a subset of :data:`PARTS`; pseudolabels are still generated, untimed,
            when a selected part reads them).
    """

    device: str = "cpu"
    quick: bool = True
    models: dict[str, tuple[str, int]] = field(default_factory=lambda: dict(MODELS))
    amp_modes: tuple[str, ...] = ("off", "auto")
    options: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    warmup: dict[str, int] = field(default_factory=lambda: {"*": 1})
    reps_min: dict[str, int] = field(default_factory=lambda: {"paper": 1, "*": 3})
    reps_max: dict[str, int] = field(default_factory=lambda: {"paper": 2, "*": 5})
    budget_s: dict[str, float] = field(default_factory=lambda: {"paper": 10.0, "*": 4.0})
    n_scans: int = 6
    n_slices: int = 32  # the phantom's usual 30-40 slices (CHAOS-like); fewer would favour the naive path
    size: int = 256
    eval_fold: int = 2
    eval_model: str = "demo"
    eval_batch_size: int = 16
    pipeline_workers: tuple[int, ...] = (0, 1, 2)
    pipeline_episodes: int = 48
    pseudolabel_rounds: int = 1
    loop_steps: int = 300
    loop_workers: tuple[int, ...] = (0,)
    ratio_reps: int = 3
    predict_models: tuple[str, ...] = ()
    predict_shape: tuple[int, int] = (200, 512)
    isolate: bool = True
    parts: tuple[str, ...] = PARTS

    def timing(self, model: str) -> dict[str, Any]:
        """Warm-up and repetition settings of one model (keyword arguments of :func:`measure_train_step`)."""
        return {name: d.get(model, d["*"]) for name, d in
                (("warmup", self.warmup), ("reps_min", self.reps_min), ("reps_max", self.reps_max),
                 ("budget_s", self.budget_s))}


def mixed_precision(env: dict[str, Any]) -> str:
    """The AMP mode benchmarked on a machine (:func:`bench.measure.environment`): bf16 on CPU and on GPUs that
    support it, else fp16."""
    return "bf16" if env.get("bf16_supported", True) else "fp16"


def quick_config(device: str) -> SuiteConfig:
    """``--quick``: every required figure, few repetitions (about 2-3 min on 2 CPU cores)."""
    cfg = SuiteConfig(device=device, quick=True, pipeline_episodes=32, loop_steps=200, ratio_reps=2)
    cfg.reps_min, cfg.reps_max, cfg.budget_s = {"paper": 1, "*": 2}, {"paper": 2, "*": 4}, {"paper": 10.0, "*": 3.0}
    cfg.predict_models = ("demo",)
    cfg.options = [("demo", "channels_last", {"channels_last": True}),
                   ("demo", "fp16", {"amp": "fp16"}),
                   ("demo", "batch_size=2", {"batch_size": 2})]
    return cfg


def full_config(device: str) -> SuiteConfig:
    """The default run: more repetitions, a larger phantom and every training option."""
    gpu = device.startswith("cuda")
    cfg = SuiteConfig(device=device, quick=False, n_scans=10, n_slices=36, eval_fold=0,
                      eval_model="paper" if gpu else "demo", pipeline_episodes=200, pseudolabel_rounds=2,
                      predict_models=("demo", "paper"))
    cfg.warmup = {"*": 10 if gpu else 2}
    cfg.reps_min = {"*": 20} if gpu else {"paper": 3, "*": 5}
    cfg.reps_max = {"*": 100} if gpu else {"paper": 5, "*": 20}
    cfg.budget_s = {"*": 10.0} if gpu else {"paper": 60.0, "*": 15.0}
    options = ("paper", "demo") if gpu else ("demo",)
    cfg.options = [(m, name, kw) for m in options for name, kw in (
        ("channels_last", {"channels_last": True}),
        ("fp16", {"amp": "fp16"}),
        ("batch_size=2", {"batch_size": 2}),
        ("batch_size=4", {"batch_size": 4}),
        ("compile", {"compile": True}),
    )]
    if gpu:
        cfg.options.append(("paper", "channels_last+amp", {"channels_last": True, "amp": "auto"}))
    return cfg


# ----------------------------------------------------------------------------------------------- measurements
def measure_train_step(backbone: str, size: int, device: str, amp: str = "off", batch_size: int = 1,
                       channels_last: bool = False, compile: bool = False, warmup: int = 1, reps_min: int = 3,
                       reps_max: int = 5, budget_s: float = 5.0) -> dict[str, Any]:
    """Seconds per :func:`training.train_step` (paper losses and SGD settings) after ``warmup`` steps."""
    import torch

    from engine.train_step import train_step
    from models.grid_proto_fewshot import FewShotSeg

    torch.manual_seed(0)
    dev = torch.device(device)
    model = FewShotSeg(backbone=backbone, init="none", proto_grid_size=8, feature_hw=(size // 8, size // 8))
    model = model.to(dev).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model.encoder.compile(dynamic=False)  # as engine.run_setup.build_model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(dev.type) if amp == "fp16" else None
    batch = synthetic_batch(batch_size, size)
    losses: list[float] = []

    def step() -> None:
        losses.append(train_step(model, batch, optimizer, scaler, dev, amp, use_wce=True, usealign=True,
                                 ignore_label=255)["loss"])

    times = time_repeated(step, device, warmup, reps_min, reps_max, budget_s)
    if not all(np.isfinite(losses)):
        raise BenchError(f"train step {backbone} amp={amp}: non-finite loss {losses}")
    return {**summary(times), "backbone": backbone, "input_size": size, "amp": amp, "batch_size": batch_size,
            "channels_last": channels_last, "compile": compile, "warmup": warmup}


def prepare_phantom(data_dir: str, n_scans: int, n_slices: int, size: int) -> dict[str, Any]:
    """Write the phantom's images, labels and class map (pseudolabels come from :func:`measure_pseudolabels`)."""
    from data_preprocessing.class_slice_index import write_classmap
    from data_preprocessing.phantom import generate_phantom
    from dataloaders.dataset_info import get_dataset_info

    start = time.perf_counter()
    generate_phantom(data_dir, n_scans=n_scans, seed=0, size=size, n_slices_min=n_slices, n_slices_max=n_slices)
    write_classmap(data_dir, get_dataset_info("PHANTOM"), progress=False)
    return {"seconds": time.perf_counter() - start}


def measure_pseudolabels(data_dir: str, workers: int) -> dict[str, Any]:
    """Seconds of :func:`generate_pseudolabels` over the whole folder, and per 100 slices."""
    from data_preprocessing.pseudolabel import generate_pseudolabels
    from dataloaders.dataset_info import get_dataset_info
    from dataloaders.niftiio import image_path, list_scan_ids, read_volume

    n_slices = sum(read_volume(image_path(data_dir, sid))[0].shape[0] for sid in list_scan_ids(data_dir))
    start = time.perf_counter()
    generate_pseudolabels(data_dir, get_dataset_info("PHANTOM"), workers=workers, progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "slices": n_slices, "s_per_100_slices": 100.0 * seconds / n_slices,
            "workers": workers}


def _fold(data_dir: str, index: int):
    from dataloaders.dataset_info import get_dataset_info
    from dataloaders.niftiio import list_scan_ids

    info = get_dataset_info("PHANTOM")
    return info, info.fold(index, available=list_scan_ids(data_dir))


def measure_pipeline(data_dir: str, fold_index: int, workers: int, n_episodes: int, size: int) -> dict[str, Any]:
    """Episodes/s of the training DataLoader alone (batch 1, ``sabs_aug``), after the first batch arrived."""
    import torch

    from dataloaders.superpixel_dataset import SuperpixelEpisodeDataset
    from util.seeding import worker_init_fn

    info, fold = _fold(data_dir, fold_index)
    warm = max(2 * workers, 1)  # the first batches include worker start-up and prefetch
    dataset = SuperpixelEpisodeDataset(data_dir, info, list(fold.train), n_episodes=n_episodes + warm, seed=1234,
                                       aug="sabs_aug", input_size=size, progress=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False, num_workers=workers,
                                         worker_init_fn=worker_init_fn)
    start = time.perf_counter()
    first = None
    for i, _ in enumerate(loader):
        if i == warm - 1:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"episodes_per_s": n_episodes / (end - first), "startup_s": first - start, "episodes": n_episodes,
            "workers": workers, "input_size": size}


def measure_eval(data_dir: str, fold_index: int, backbone: str, size: int, device: str, naive: bool,
                 batch_size: int = 16) -> dict[str, Any]:
    """Seconds of one EP1-ALP fold (all four phantom classes) with the fast or the naive predictor."""
    import torch

    from dataloaders.manual_anno_dataset import load_annotated_scans
    from evaluation.ep1_alp import evaluate_fold
    from evaluation.predictors import FastPredictor, NaivePredictor
    from models.grid_proto_fewshot import FewShotSeg

    info, fold = _fold(data_dir, fold_index)
    scans = load_annotated_scans(data_dir, info, list(fold.queries + fold.support), progress=False)
    torch.manual_seed(0)
    dev = torch.device(device)
    model = FewShotSeg(backbone=backbone, init="none", proto_grid_size=8, feature_hw=(size // 8, size // 8))
    model = model.to(dev).eval()
    with torch.inference_mode():  # first-call set-up (allocator, kernels) is not part of either path's time
        model.encode(torch.zeros(2, 3, size, size, device=dev))
    predictor = NaivePredictor(model, dev) if naive else FastPredictor(model, dev, batch_size=batch_size)
    encodes = {"n": 0}
    inner = model.encode

    def counting_encode(imgs):
        encodes["n"] += imgs.shape[0]
        return inner(imgs)

    model.encode = counting_encode
    start = time.perf_counter()
    result = evaluate_fold(predictor, scans.images, scans.labels, list(fold.support), list(fold.queries),
                           list(info.eval_classes))
    seconds = time.perf_counter() - start
    scored = sum(hi - lo + 1 for lo, hi in result.scored.values())
    return {"seconds": seconds, "scored_slices": scored, "images_encoded": encodes["n"],
            "mean_dice": result.metrics["mean_dice"], "backbone": backbone, "input_size": size,
            "path": "naive" if naive else "fast", "batch_size": 1 if naive else batch_size,
            "queries": list(fold.queries), "support": list(fold.support)}


# ----------------------------------------------------------------------------------------------- driver
def _mem(entry: dict[str, Any]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in entry.items() if k.startswith("peak_")}


def run_suite(cfg: SuiteConfig, work_dir: str | Path | None = None, log=print) -> dict[str, Any]:
    """Run every measurement of ``cfg`` and return the results dict (the JSON of ``python -m bench``).

    Args:
        cfg: what to measure (``cfg.parts`` selects the measurements).
        work_dir: scratch folder for the phantom (default: a temporary folder, removed afterwards).
        log: progress messages.

    Raises:
        BenchError: an unknown part, or a measurement process failed.
    """
    unknown = sorted(set(cfg.parts) - set(PARTS))
    if unknown or not cfg.parts:
        raise BenchError(f"unknown or no benchmark part(s) {unknown}: choose from {', '.join(PARTS)}")
    t_start = time.perf_counter()
    tmp = None
    if work_dir is None:
        tmp = tempfile.mkdtemp(prefix="bench_phantom_")
        work_dir = tmp
    data_dir = str(Path(work_dir) / "phantom")
    parts = set(cfg.parts)

    def run(fn, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return run_isolated(fn, *args, isolate=cfg.isolate, **kwargs)

    # where the figures come from: when, which code (the commit; "dirty" when tracked files differ from it)
    res: dict[str, Any] = {"meta": {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                                    "git_commit": git_commit(), "git_dirty": git_dirty(), "parts": list(cfg.parts),
                                    "quick": cfg.quick, "load_avg_start": load_average(),
                                    "config": dataclasses.asdict(cfg)}}
    measurements: dict[str, dict[str, Any]] = {}
    try:
        env = run(environment, cfg.device)
        res["meta"].update({k: v for k, v in env.items() if not k.startswith("peak_") and k != "wall_s"})
        amp_on = mixed_precision(res["meta"])
        log(f"bench on {res['meta'].get('gpu', res['meta']['cpu'])} ({cfg.device}), torch {res['meta']['torch']}, "
            f"{res['meta']['cpu_count']} CPU cores, load {res['meta']['load_avg_start']}")
        # ------------------------------------------------------------ data and pseudolabels
        if parts & _NEED_PHANTOM:
            log("phantom ...")
            res["meta"]["phantom_s"] = run(prepare_phantom, data_dir, cfg.n_scans, cfg.n_slices, cfg.size)["seconds"]
        all_workers = cpu_count()
        if "pseudolabels" in parts:
            best: dict[int, dict[str, Any]] = {}
            for _ in range(cfg.pseudolabel_rounds):
                for workers in dict.fromkeys((1, all_workers)):
                    log(f"pseudolabels, {workers} worker(s) ...")
                    m = run(measure_pseudolabels, data_dir, workers)
                    if workers not in best or m["seconds"] < best[workers]["seconds"]:
                        best[workers] = m
            for workers, m in best.items():
                measurements[f"pseudolabels.workers={workers}"] = m
            res["pseudolabel_s_per_100_slices"] = {str(w): m["s_per_100_slices"] for w, m in best.items()}
            res["pseudolabel_workers_all"] = all_workers
            res["pseudolabel_speedup"] = best[1]["seconds"] / best[all_workers]["seconds"]
        elif parts & {"pipeline", "loop"}:  # they read the superpixels: generate them, untimed
            log("pseudolabels (untimed) ...")
            run(measure_pseudolabels, data_dir, all_workers)
        # ------------------------------------------------------------ episode pipeline
        if "pipeline" in parts:
            res["episodes_per_s"] = {}
            for workers in cfg.pipeline_workers:
                log(f"pipeline, {workers} worker(s) ...")
                m = run(measure_pipeline, data_dir, cfg.eval_fold, workers, cfg.pipeline_episodes, cfg.size)
                measurements[f"pipeline.workers={workers}"] = m
                res["episodes_per_s"][str(workers)] = m["episodes_per_s"]
        # ------------------------------------------------------------ evaluation
        if "eval" in parts:
            backbone = cfg.models[cfg.eval_model][0]
            for naive in (False, True):
                log(f"evaluation, {'naive' if naive else 'fast'} path ...")
                m = run(measure_eval, data_dir, cfg.eval_fold, backbone, cfg.size, cfg.device, naive,
                        cfg.eval_batch_size)
                measurements[f"eval.{'naive' if naive else 'fast'}"] = m
            res["eval_s"] = measurements["eval.fast"]["seconds"]
            res["eval_naive_s"] = measurements["eval.naive"]["seconds"]
            res["eval_speedup_vs_naive"] = res["eval_naive_s"] / res["eval_s"]
            res["eval_same_dice"] = measurements["eval.fast"]["mean_dice"] == measurements["eval.naive"]["mean_dice"]
            res["eval_model"] = backbone
        # ------------------------------------------------------------ training step
        if "train_step" in parts:
            res["train_step_s"] = {}
            for name, (backbone, size) in cfg.models.items():
                res["train_step_s"][name] = {}
                for amp in (amp_on if a == "auto" else a for a in cfg.amp_modes):
                    log(f"train step, {name} ({backbone}, {size}x{size}), amp={amp} ...")
                    m = run(measure_train_step, backbone, size, cfg.device, amp=amp, **cfg.timing(name))
                    measurements[f"train_step.{name}.amp={amp}"] = m
                    res["train_step_s"][name][amp] = m["median_s"]
            res["train_options_s"] = {}
            for name, option, overrides in cfg.options:
                backbone, size = cfg.models[name]
                log(f"train step, {name}, {option} ...")
                kwargs = {**cfg.timing(name), **overrides}
                if kwargs.get("amp") == "auto":
                    kwargs["amp"] = amp_on
                try:
                    m = run(measure_train_step, backbone, size, cfg.device, **kwargs)
                except BenchError as err:  # e.g. torch.compile without a working compiler: record, go on
                    res["train_options_s"].setdefault(name, {})[option] = None
                    measurements[f"train_step.{name}.{option}"] = {"error": str(err)}
                    continue
                measurements[f"train_step.{name}.{option}"] = m
                res["train_options_s"].setdefault(name, {})[option] = m["median_s"]
        # ------------------------------------------------------------ loop overhead (host-sync-free loop)
        if "loop" in parts:
            from bench.loop import measure_loop, measure_step_ratio

            res["loop_steps_per_s"] = {}
            for workers in cfg.loop_workers:
                log(f"training loop, one-layer encoder 64x64, {workers} worker(s) ...")
                m = run(measure_loop, data_dir, cfg.eval_fold, cfg.device, cfg.loop_steps, workers)
                measurements[f"loop.workers={workers}"] = m
                res["loop_steps_per_s"][str(workers)] = m["steps_per_s"]
            if cfg.ratio_reps:
                backbone, size = cfg.models["paper"]
                log(f"train step, paper ({backbone}), before vs after the host-sync-free step ...")
                m = run(measure_step_ratio, backbone, size, cfg.device, cfg.ratio_reps)
                measurements["train_step.paper.legacy_vs_new"] = m
                res["train_step_ratio_legacy_vs_new"] = m["ratio"]
        # ------------------------------------------------------------ own-scan prediction (predict.py end to end)
        if "predict" in parts:
            from bench.prediction import measure_predict

            for name in cfg.predict_models:
                backbone = cfg.models[name][0]
                n_slices, size = cfg.predict_shape
                log(f"predict.py, one {size}x{size}x{n_slices} CT query, {name} ({backbone}) ...")
                m = run(measure_predict, backbone, n_slices, size, device=cfg.device,
                        work_dir=str(Path(work_dir) / f"predict_{name}"))
                measurements[f"predict.{name}"] = m
                res.setdefault("predict_s", {})[name] = m["seconds"]
                res.setdefault("predict_peak_rss_mb", {})[name] = round(m["predict_peak_rss_mb"], 1)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    res["peak_rss_mb"] = {k: round(m["peak_rss_mb"], 1) for k, m in measurements.items() if "peak_rss_mb" in m}
    cuda = {k: round(m["peak_cuda_mb"], 1) for k, m in measurements.items() if "peak_cuda_mb" in m}
    if cuda:
        res["peak_cuda_mb"] = cuda
    res["measurements"] = {k: {**m, **_mem(m)} for k, m in measurements.items()}
    res["meta"]["amp_on"] = amp_on
    res["meta"]["load_avg_end"] = load_average()
    res["meta"]["wall_s"] = round(time.perf_counter() - t_start, 1)
    return res
