"""The project's command-line tools (argparse ones; the Sacred scripts take config keys): the one list the option and
documentation tests share, with the smallest argument list each parser accepts.

:func:`entry_point_modules` finds every module with a command line in the repository, so a new tool that is not
listed here fails ``tests/test_cli_docs.py``.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]

#: prog -> (module that exposes ``build_parser()`` and ``main(argv)``, the required arguments of its parser).
TOOLS: dict[str, tuple[str, list[str]]] = {
    "python predict.py": ("predict", ["--checkpoint", "c.pth", "--support-image", "s.nii.gz", "--support-label",
                                      "s_seg.nii.gz", "--classes", "LIVER=1", "--query", "q.nii.gz", "--out", "o"]),
    "python -m data_preprocessing.prepare": ("data_preprocessing.prepare",
                                             ["--images", "i.nii.gz", "--modality", "CT", "--out", "o"]),
    "python -m data_preprocessing.phantom": ("data_preprocessing.phantom", ["--out", "o"]),
    "python -m data_preprocessing.class_slice_index": ("data_preprocessing.class_slice_index",
                                                       ["--dataset", "PHANTOM"]),
    "python -m data_preprocessing.pseudolabel": ("data_preprocessing.pseudolabel", ["--dataset", "PHANTOM"]),
    "python -m data_preprocessing.chaos": ("data_preprocessing.chaos", ["--out", "o"]),
    "python -m data_preprocessing.sabs": ("data_preprocessing.sabs", ["--out", "o"]),
    "python -m data_preprocessing.cmr": ("data_preprocessing.cmr", ["--out", "o"]),
    "python -m data_preprocessing.verify": ("data_preprocessing.verify", ["--dataset", "PHANTOM"]),
    "python -m evaluation.baseline": ("evaluation.baseline", ["--dataset", "PHANTOM"]),
    "python -m evaluation.summarize": ("evaluation.summarize", ["."]),
    "python -m evaluation.compare_protocols": ("evaluation.compare_protocols", ["--runs", "."]),
    "python -m launch.sweep": ("launch.sweep", ["--dataset", "PHANTOM", "--devices", "cpu"]),
    "python -m launch.demo": ("launch.demo", []),
    "python -m launch.own_scan_checks": ("launch.own_scan_checks", []),
    "python -m launch.z_localisation": ("launch.z_localisation", []),
    "python -m bench": ("bench.__main__", []),
}

#: Scripts whose command line is Sacred's ``with key=value`` (their keys are documented in docs/config.md).
SACRED_SCRIPTS = {"training", "validation"}

_MAIN_BLOCK = re.compile(r"^if __name__ == [\"']__main__[\"']:", re.MULTILINE)
_SKIP = {".venv", "venv", ".git", "runs", "data", "tests", "__pycache__"}


def entry_point_modules() -> set[str]:
    """Dotted names of the repository's modules with a command line: a ``__main__`` block or a ``__main__.py``."""
    found = set()
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if _SKIP & set(rel.parts) or "site-packages" in rel.parts:
            continue
        if path.name == "__main__.py" or _MAIN_BLOCK.search(path.read_text(encoding="utf-8")):
            found.add(".".join(rel.with_suffix("").parts))
    return found


def tool_module(prog: str) -> ModuleType:
    """The imported module of tool ``prog``."""
    return importlib.import_module(TOOLS[prog][0])
