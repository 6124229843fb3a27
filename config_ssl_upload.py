"""The Sacred experiment shared by training.py and validation.py: default scope (the paper's setting), named configs.

Keys keep the original's names (``dataset``, ``eval_fold``, ``label_sets``, ``exclude_cls_list``, ``support_idx``,
``n_steps``, ``lr_milestones``, ``proto_grid_size``, ``val_wsize``, ``n_sup_part``, ``z_margin``, ``use_coco_init``,
``reload_model_path``, ``path.log_dir``, ...), so ``with key=value`` habits carry over. Differences from the
original are fixes of its quirks (docs/method.md#quirks): ``dataset`` is a plain registry name (``CHAOST2``,
``SABS``, ``CMR``, ``PHANTOM``, or a description file), ``min_fg_data`` defaults to 1 (the original's '100' named a
missing class map), ``n_steps`` is the exact number of optimiser steps (no sub-epochs), and the file observer is
replaced, not appended, on every run.

Examples::

    python training.py with CHAOST2 setting2 label_sets=1 eval_fold=3
    python validation.py with CHAOST2 setting2 label_sets=1 eval_fold=3 reload_model_path=<run>/snapshots/100000.pth
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

# sacred 0.8.7 imports pkg_resources (hence setuptools<81 in requirements.txt); its deprecation warning is noise here.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

from sacred import Experiment
from sacred.observers import FileStorageObserver
from sacred.settings import SETTINGS

from dataloaders.dataset_info import get_dataset_info

SETTINGS.CAPTURE_MODE = "sys"  # tqdm-friendly console capture; "fd" breaks progress bars
# Sources are the project modules loaded when a run starts (record_project_sources); "dir" walked the whole repository,
# .venv included: ~10,000 files and ~200 MB copied into every experiment folder, seconds added to every start.
SETTINGS.DISCOVER_SOURCES = "sys"
REPO_ROOT = Path(__file__).resolve().parent

ex = Experiment("mySSL", save_git_info=False)


@ex.config
def cfg():
    # ---------------------------------------------------------------- run
    seed = 1234  # seeds Python, NumPy, torch (and every episode: episode i uses the generator (seed, i))
    device = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    gpu_id = 0  # used when device == "auto" and CUDA is present
    deterministic = False  # deterministic CUDA kernels (slower); CPU runs are deterministic anyway
    num_workers = 4  # DataLoader workers for training episodes
    exp_prefix = "myexp"
    path = {"log_dir": "./runs"}  # observer root: <log_dir>/mySSL_<exp_str>/<n>/
    use_file_observer = True  # one FileStorageObserver, replaced per run (docs/method.md#q11-duplicate-observers)
    run_dir = None  # where snapshots/ and results.json go; default: the observer's run folder

    # ---------------------------------------------------------------- data
    dataset = "CHAOST2"  # registry name (CHAOST2, SABS, CMR/C0, PHANTOM) or a dataset description file
    data_dir = str(get_dataset_info(dataset).data_dir)  # processed files (docs/method.md#datasets); fails if unknown
    superpix_scale = "MIDDLE"
    superpix_dim = 2  # 2: per-slice superpixels (the original); 3: 3D supervoxels, support/query on neighbouring slices
    min_fg_data = 1  # classmap_<min_fg_data>.json; 1 in setting 2 (not '100': docs/method.md#q10-class-map-100)
    input_size = (256, 256)  # encoder input; other slice sizes are resized for the network only (docs/reliability.md)
    which_aug = "sabs_aug"  # "sabs_aug" | "aug_v3" | "none"
    border_fill = "zero_normalised"  # "zero_normalised" (original) | "min": docs/method.md#q17-border-fill
    aug_parity = False  # True: the original's augmentation arithmetic, bit-identical (docs/method.md#augmentation)
    episode_sampling = "compact"  # "compact" (eligible slices and ids) | "legacy" (docs/method.md#q3-slice-redirects)
    exclusion_rule = "any"  # setting 2: "any" (leak-free) | "all" (leaky, docs/method.md#q8-leaky-exclusion)

    # ---------------------------------------------------------------- task and protocol
    eval_fold = 0  # fold of docs/method.md#folds (0..4)
    label_sets = 0  # label group; test classes = eval classes - LABEL_GROUP[label_sets]
    setting = 1  # 1: train on every slice; 2: drop training slices holding any test class
    exclude_cls_list = list(get_dataset_info(dataset).setting2_exclusion(label_sets)) if setting == 2 else []
    support_idx = [-1]  # index into the held-out list; -1 = the fold's support scan (docs/method.md#folds)
    n_ways = 1
    n_shots = 1  # support scans
    n_queries = 1
    n_sup_part = 3  # slices per support scan; 1 = strict single slice (docs/method.md#q26-one-shot-three-slices)
    multishot_proto = "per_shot"  # n_shots > 1: "per_shot" (original, docs/method.md#several-shots) | "pooled"
    task = {"n_ways": n_ways, "n_shots": n_shots, "n_queries": n_queries, "npart": n_sup_part}
    protocol = "ep1_alp"  # "ep1_alp" (GT z-range) | "ep2" (whole volume, no GT): docs/method.md#evaluation-protocols
    # protocol=ep2 only: how the whole query volume is segmented (prediction.volume; docs/protocols.md): "registered"
    # (registration places each support along the query), "atlas" (the supports' labels carried by registration, no
    # network), "body" (the previous release's body-extent rule)
    ep2_method = "registered"
    z_margin = 0
    val_wsize = 2  # ALP window at test time (feature pixels)
    eval_classes = None  # override the classes to evaluate, e.g. [1, 2, 3, 4]; default: the group's test classes
    eval_batch_size = 16  # query slices per forward pass at test time
    save_predictions = True  # write interm_preds/scan_<id>_label_<c>.nii.gz
    baseline = False  # also score the intensity baseline in validation.py

    # ---------------------------------------------------------------- model
    modelname = "dlfcn_res101"  # "dlfcn_res101" (paper) | "dlfcn_res50" | "lite_gn" | "lite_gn_s" (CPU demos)
    clsname = "grid_proto"
    use_coco_init = True  # torchvision COCO DeepLabV3 weights (cache or download); False: random init
    backbone_weights = None  # local weights file for the encoder (no download needed)
    reload_model_path = None  # checkpoint to evaluate (validation.py) or to start from (training.py)
    proto_grid_size = 8  # training ALP window = feature_hw / proto_grid_size = 4
    feature_hw = [32, 32]
    usealign = True  # prototype-alignment loss (docs/method.md#losses)
    use_wce = True  # CE weights [wce_bg_weight, 1.0]
    wce_bg_weight = 0.05  # background weight of the query CE (the paper's 0.05)
    build_unused_aspp = False  # parity export of the unused ASPP keys (docs/method.md#q7-unused-aspp)

    # ---------------------------------------------------------------- optimisation (docs/method.md#training-schedule)
    optim_type = "sgd"
    optim = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4}
    n_steps = 100000  # optimiser steps (the original's 100100 loop gave ~100k, docs/method.md#q12-training-length)
    lr_step_gamma = 0.95
    lr_milestones = [(i + 1) * 1000 for i in range(n_steps // 1000 - 1)]
    lr_schedule = "step"  # "step" (paper: MultiStepLR) | "cosine" | "poly" (engine/lr_schedule.py)
    batch_size = 1  # episodes per step, each with its own prototypes
    ignore_label = 255
    save_snapshot_every = 25000
    print_interval = 100
    max_nonfinite_steps = 10  # abort after this many consecutive non-finite losses
    val_scans = []  # scan ids held out of training, scored (EP1-ALP) at every snapshot -> val_history.json; [] = off
    tensorboard = False  # also log loss terms, lr and validation Dice to <run folder>/tensorboard (SummaryWriter)
    resume = False  # continue from the latest snapshot in run_dir (needs run_dir; starts fresh if it has none)
    resume_from = None  # or continue from this checkpoint file or run folder (its latest snapshot)
    amp = "off"  # "off" | "bf16" | "fp16" (mixed precision; off = the paper's fp32)
    channels_last = False
    compile = False  # torch.compile the encoder
    sync_bn = False  # SyncBatchNorm under torchrun (DDP)


@ex.named_config
def CHAOST2():
    # CHAOS-T2 abdominal MRI (support scan: the 5th of the held-out list, docs/method.md#folds).
    dataset = "CHAOST2"
    support_idx = [4]


@ex.named_config
def SABS():
    # Synapse (SABS) abdominal CT (support scan: the 7th of the held-out list).
    dataset = "SABS"
    support_idx = [6]


@ex.named_config
def CMR():
    # MS-CMRSeg bSSFP cardiac MRI (project fold scheme, docs/method.md#ms-cmrseg-cardiac-mri).
    dataset = "CMR"
    support_idx = [7]


@ex.named_config
def PHANTOM():
    # The synthetic abdominal phantom (python -m data_preprocessing.phantom).
    dataset = "PHANTOM"


@ex.named_config
def setting1():
    # Setting 1: training sees every slice (test organs unlabelled).
    setting = 1


@ex.named_config
def setting2():
    # Setting 2: drop every training slice that holds any pixel of any test class.
    setting = 2


@ex.named_config
def demo():
    # CPU demo on the phantom: light backbone, a few minutes of training (docs/demo.md has the measurements).
    dataset = "PHANTOM"
    device = "cpu"
    # lite_gn_s: lite_gn's depth and receptive field at ~0.6x its step time; this config: fold 0 mean Dice 0.684
    modelname = "lite_gn_s"
    use_coco_init = False
    # on 2 cores a DataLoader worker competes with the 2 torch threads: 0 workers made demo steps ~13 % faster
    num_workers = 0
    # 2000 steps, SGD lr 1e-2 annealed by a cosine: fold 0 mean Dice 0.684 (seed 1234; seeds 1 / 2 / 3 give 0.697 /
    # 0.666 / 0.687); a 2500-step cosine gave 0.678 / 0.705 / 0.717 / 0.720 after 1000 / 1500 / 2000 / 2500 steps;
    # lr 2e-2, AdamW 1e-3, CE weights [0.02 | 0.1 | 0.2, 1], dilations 2/4/8, 2 episodes per step, aug_v3, no
    # augmentation, other superpixel sizes, supervoxels and other norms were no better (docs/demo.md)
    n_steps = 2000
    lr_schedule = "cosine"
    lr_milestones = []
    optim = {"lr": 1e-2, "momentum": 0.9, "weight_decay": 5e-4}
    wce_bg_weight = 0.05
    # fp32: on a CPU without AVX512-BF16 (torch's capability "AVX2") bf16 autocast made a lite_gn step ~67x slower
    amp = "off"
    save_snapshot_every = 1000
    print_interval = 250
    eval_classes = [1, 2, 3, 4]
    exp_prefix = "demo"


def record_project_sources() -> None:
    """Add every loaded module of this repository (not of a virtual environment inside it) to the run's sources."""
    for module in list(sys.modules.values()):
        path = Path(getattr(module, "__file__", None) or "_.none")
        if path.is_absolute() and path.suffix == ".py" and REPO_ROOT in path.resolve().parents and path.is_file() \
                and not {".venv", "venv", "site-packages"} & set(path.resolve().relative_to(REPO_ROOT).parts):
            ex.add_source_file(str(path))


@ex.config_hook
def attach_observer(config: dict, command_name: str, logger) -> dict:
    """Give each run exactly one file observer (replace, never append: a second in-process run must not pile up).

    The folder is ``<path.log_dir>/mySSL_<exp_prefix>_<dataset>_sets_<label_sets>_<n_shots>shot`` (the original's
    layout). Runs started with ``--unobserved`` ignore it; ``use_file_observer=False`` removes it. Under torchrun
    only rank 0 (env ``RANK``) is observed: the other ranks would otherwise create run folders of their own.
    """
    ex.observers[:] = []
    record_project_sources()
    if config["use_file_observer"] and int(os.environ.get("RANK", "0")) == 0:
        exp_str = "_".join([config["exp_prefix"], get_dataset_info(config["dataset"]).name,
                            f"sets_{config['label_sets']}", f"{config['n_shots']}shot"])
        ex.observers[:] = [FileStorageObserver(str(Path(config["path"]["log_dir"]) / f"mySSL_{exp_str}"))]
    return {}
