"""Command-line options checked before any work: one ``error:`` line and exit code 2 for a bad option.

Every ``python -m ...`` entry point of the project builds its parser with :class:`OptionParser` and gives numeric
options a range type (:func:`int_at_least`, :func:`float_between`) or checks combinations with ``parser.error``
right after parsing, so a bad option stops the command before it reads or writes anything (never a traceback from
a worker process). The Sacred scripts (``training.py``, ``validation.py``) report their config errors through
:mod:`util.cli` in the same form.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

EXIT_USAGE = 2


class OptionParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line, ``error: <message> (see <prog> --help)``, exit 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def float_between(low: float, high: float) -> Callable[[str], float]:
    """argparse type: a number in ``[low, high]``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low:g}, {high:g}], got {value:g}")
        return value

    parse.__name__ = f"number in [{low:g}, {high:g}]"
    return parse


def existing_dir(text: str) -> Path:
    """argparse type: a folder that exists."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: no such folder")
    return path


#: argparse type: an integer >= 1.
positive_int = int_at_least(1)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


positive_float.__name__ = "number > 0"
MAX_CLASSES = 255  # processed labels are uint8
_CLASS_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def parse_classes(text: str) -> dict[str, int]:
    """``--classes``: ``"LIVER=5,SPLEEN=1"`` -> ``{"LIVER": 5, "SPLEEN": 1}`` (order kept), the one parser of every
    tool that takes class names with label ids (``prepare``, ``predict.py``).

    Names start with a letter and hold letters, digits and ``_``; ``BG`` is the background (id 0) and cannot be
    given; ids are integers >= 1; names and ids are unique; at most :data:`MAX_CLASSES` classes.

    Raises:
        argparse.ArgumentTypeError (a ``ValueError``): a malformed entry, named in the message.
    """
    out: dict[str, int] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not _CLASS_NAME.fullmatch(name) or not value.isdigit():
            raise argparse.ArgumentTypeError(f"--classes: expected NAME=ID entries such as LIVER=5, got {item!r}")
        if name.upper() == "BG":
            raise argparse.ArgumentTypeError("--classes: the name BG is the background (id 0)")
        if name in out or int(value) in out.values():
            raise argparse.ArgumentTypeError(f"--classes: {item!r} repeats a name or an id")
        if int(value) < 1:
            raise argparse.ArgumentTypeError(f"--classes: {item!r}: ids must be >= 1 (0 is the background)")
        out[name] = int(value)
    if not out:
        raise argparse.ArgumentTypeError("--classes: no class given")
    if len(out) > MAX_CLASSES:
        raise argparse.ArgumentTypeError(f"--classes: at most {MAX_CLASSES} classes")
    return out
