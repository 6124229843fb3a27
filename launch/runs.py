"""The runs of a sweep and how one run executes: train (``resume=True``), then test from its latest snapshot.

A run is one training and the tests of its model (docs/method.md#settings-and-label-groups, as
``examples/test_ssl_*.sh`` pair them); each step is ``python training.py`` / ``python validation.py`` in a child process
whose output goes to the run's ``train.log`` / ``test.log``. Layout and rules: docs/sweep.md.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from util.checkpoint import latest_snapshot
from util.errors import ProjectError

REPO = Path(__file__).resolve().parent.parent


class SweepError(ProjectError, ValueError):
    """Bad sweep arguments (one-line message)."""


@dataclass(frozen=True)
class Run:
    """One training of ``dataset`` (setting, label group ``train_set``, fold) and its tests on ``test_sets``.

    ``dataset`` is the dataset's name (the folder under ``<out>``); ``dataset_file`` the absolute path of its
    description file, or ``None`` for a registry dataset.
    """

    dataset: str
    setting: int
    train_set: int
    fold: int
    test_sets: tuple[int, ...]
    dataset_file: str | None = None

    def dataset_words(self) -> list[str]:
        """The words after ``with`` that select the dataset: a registry dataset's named config (its support scan)
        and ``dataset=<name>``; a description file as ``dataset=<file>`` (Sacred would take a bare file name for a
        named config). A ``key=value`` update outranks named configs, so ``with demo`` cannot switch the dataset."""
        if self.dataset_file is not None:
            return [f"dataset={self.dataset_file}"]
        return [self.dataset, f"dataset={self.dataset}"]

    @property
    def name(self) -> str:
        return f"{self.dataset} setting {self.setting} sets_{self.train_set} fold {self.fold}"

    def train_dir(self, out: Path) -> Path:
        return out / self.dataset / f"setting{self.setting}" / f"sets_{self.train_set}" / f"fold{self.fold}"

    def test_dir(self, out: Path, label_set: int) -> Path:
        return self.train_dir(out) / f"eval_sets_{label_set}"

    def finished(self, out: Path) -> bool:
        """Every test of the run has written its results.json."""
        return all((self.test_dir(out, g) / "results.json").is_file() for g in self.test_sets)


def plan_runs(dataset: str, settings: Sequence[int], folds: Sequence[int], label_sets: Sequence[int],
              dataset_file: str | None = None) -> list[Run]:
    """The runs of a sweep, fold-major (fold 0 of every setting first, so early results cover every setting).

    Args:
        dataset: the dataset's name.
        dataset_file: the absolute path of its description file (``None``: a registry dataset).
    """
    runs = []
    for k in folds:
        for s in settings:
            if s == 1:
                runs.append(Run(dataset, 1, 0, k, tuple(label_sets), dataset_file))
            else:
                runs.extend(Run(dataset, 2, g, k, (g,), dataset_file) for g in label_sets)
    return runs


def parse_folds(items: Sequence[str]) -> list[int]:
    """``["0-4"]`` -> [0, 1, 2, 3, 4]; ``["0", "2"]`` -> [0, 2] (ranges inclusive)."""
    folds: list[int] = []
    for item in items:
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not match or (match.group(2) and int(match.group(2)) < int(match.group(1))):
            raise SweepError(f"--folds: {item!r} is not a fold number or a range like 0-4")
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        folds.extend(k for k in range(lo, hi + 1) if k not in folds)
    return folds


def parse_devices(text: str, n_gpus: int | None = None) -> list[str]:
    """``"0,1"`` -> ["0", "1"] (GPU indices); ``"cpu,cpu"`` -> ["cpu", "cpu"].

    Args:
        text: the ``--devices`` value.
        n_gpus: the machine's CUDA device count; GPU indices must be below it (``None``: not checked).

    Raises:
        SweepError: an entry that is neither ``cpu`` nor an index, or an index the machine does not have.
    """
    devices = [d.strip() for d in text.split(",")]
    for d in devices:
        if d != "cpu" and not d.isdigit():
            raise SweepError(f"--devices: {d!r} is neither 'cpu' nor a GPU index (e.g. --devices 0,1 or cpu,cpu)")
    gpus = sorted({int(d) for d in devices if d != "cpu"})  # integers: "10" > "2"
    if n_gpus is not None and gpus and gpus[-1] >= n_gpus:
        if n_gpus == 0:
            raise SweepError(f"--devices {text}: this machine has no CUDA device; use --devices cpu,cpu")
        beyond = ", ".join(str(g) for g in gpus if g >= n_gpus)
        raise SweepError(f"--devices {text}: GPU {beyond} is beyond this machine's {n_gpus} CUDA devices "
                         f"(indices 0-{n_gpus - 1})")
    return devices


def observer_off(extra: Sequence[str]) -> bool:
    """Whether the words after ``with`` turn the file observer off (``use_file_observer=False``, as Sacred reads
    the value)."""
    for word in extra:
        key, sep, value = word.partition("=")
        if sep and key.strip() == "use_file_observer":
            try:
                on = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                on = value.strip()  # Sacred keeps an unparsable value as a (non-empty, true) string
            return not on
    return False


def _call(cmd: list[str], log_path: Path, env: dict[str, str], on_start: Callable[[subprocess.Popen], None]) -> int:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        on_start(proc)
        return proc.wait()


def execute(run: Run, out: Path, extra: Sequence[str], device: str | None, threads: int | None = None,
            on_start: Callable[[subprocess.Popen], None] = lambda proc: None) -> int:
    """Train (``resume=True``) then test ``run``; returns 0 or the exit code of the step that failed.

    Args:
        device: "cpu", a GPU index (sets ``CUDA_VISIBLE_DEVICES``), or ``None`` (keep the environment's devices
            and the config's ``device``, e.g. a SLURM allocation).
        threads: ``OMP_NUM_THREADS`` of the children (CPU runs sharing the machine), unless already set.
        on_start: called with each child process as it starts (to signal it).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    overrides: list[str] = []
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        overrides = ["device=cpu"]
    elif device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
        overrides = ["device=cuda:0"]
    # the run's identity comes last: a key in ``extra`` cannot move a run into another run's folder. path.log_dir
    # only where an observer writes (training refuses a key that cannot act, engine.run_setup.KEY_CONFLICTS)
    records = [] if observer_off(extra) else [f"path.log_dir={out / 'sacred'}"]
    common = [*run.dataset_words(), f"setting{run.setting}", *records, *extra, *overrides, f"eval_fold={run.fold}"]
    train_dir = run.train_dir(out)
    code = _call([sys.executable, "training.py", "with", *common, f"label_sets={run.train_set}",
                  f"run_dir={train_dir}", "resume=True"], train_dir / "train.log", env, on_start)
    if code != 0:
        return code
    checkpoint = latest_snapshot(train_dir)
    if checkpoint is None:  # e.g. a `with` update that sent the snapshots elsewhere: a failed run, not a crash
        with open(train_dir / "train.log", "a") as log:
            log.write(f"error: the training exited with 0 but {train_dir / 'snapshots'} holds no snapshot\n")
        return 1
    for g in run.test_sets:
        test_dir = run.test_dir(out, g)
        if (test_dir / "results.json").is_file():
            continue
        code = _call([sys.executable, "validation.py", "with", *common, f"label_sets={g}",
                      f"reload_model_path={checkpoint}", f"run_dir={test_dir}"], test_dir / "test.log", env, on_start)
        if code != 0:
            return code
    return 0


def log_of(run: Run, out: Path) -> Path:
    """The log to read for a failed run: its last test log, else its training log."""
    tests = [run.test_dir(out, g) / "test.log" for g in run.test_sets]
    return next((p for p in reversed(tests) if p.is_file()), run.train_dir(out) / "train.log")
