"""Command-line options checked before any work: one ``error:`` line and exit code 2 for a bad option.

Every ``python -m ...`` entry point of the project builds its parser with :class:`OptionParser` and gives numeric
options a range type (:func:`int_at_least`, :func:`float_between`) or checks combinations with ``parser.error``
right after parsing, so a bad option stops the command before it reads or writes anything (never a traceback from
a worker process). The Sacred scripts (``training.py``, ``validation.py``) report their config errors through
:mod:`util.cli` in the same form.
"""

from __future__ import annotations

import argparse
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
