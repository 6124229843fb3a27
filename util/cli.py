"""Command-line wrapper of the Sacred scripts: short messages for the project's own errors, real tracebacks for bugs.

``python training.py with ...`` and ``python validation.py with ...`` end in :func:`run_cli`. Exit codes:

- 0: the run completed;
- 1: a bug or an unexpected failure: Sacred prints the (filtered) traceback, nothing is hidden
  (docs/method.md#q4-faulty-batch-skip);
- 2: bad input (a :class:`util.errors.ProjectError`, or a Sacred config error such as a misspelt key): one line
  ``error: <message>`` naming the file, key or scan; the observer's ``run.json`` still records the failure with the
  full traceback;
- 130 / 143 / 138: interrupted by Ctrl-C (SIGINT) / SIGTERM / SIGUSR1 (a cluster pre-empting the job): the observer
  records ``INTERRUPTED``. During the training loop SIGTERM and SIGUSR1 first write a snapshot at the current step
  (``engine.preemption``); ``resume=True`` continues the run exactly.

In-process use (``ex.run(...)`` in tests and notebooks) is not wrapped and raises the normal exceptions.
``--debug`` / ``--pdb`` on the command line also keep the raw exception.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

from sacred import Experiment
from sacred.utils import SacredError, format_sacred_error

from util.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_SIGUSR1,
    EXIT_USER_ERROR,
    ProjectError,
    RunInterrupted,
    error_line,
)

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_SIGINT", "EXIT_SIGTERM", "EXIT_SIGUSR1", "EXIT_USER_ERROR", "Terminated",
           "error_line", "run_cli"]


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGUSR1 received; Sacred treats it like Ctrl-C and marks the run ``INTERRUPTED``."""

    STATUS = "INTERRUPTED"

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = int(signum)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


def run_cli(ex: Experiment, argv: Sequence[str] | None = None) -> int:
    """Run ``ex``'s command line and return the process exit code (see the module docstring).

    Sacred's ``run_commandline`` prints a traceback for every exception and exits with 1; here the call to
    ``ex.run`` it makes is wrapped (for this call only) so that project errors become one ``error:`` line and exit
    code 2. The run itself has already recorded the failure (status ``FAILED`` and the traceback in the file
    observer's ``run.json``) when the wrapper sees the exception.

    Args:
        ex: the experiment (``config_ssl_upload.ex``).
        argv: the command line, ``sys.argv`` style (default: ``sys.argv``).

    Returns:
        The exit code; the caller passes it to ``sys.exit``.
    """
    original_run = ex.run
    short_usage = ex.get_usage()[0]

    def guarded_run(*args: Any, **kwargs: Any) -> Any:
        options = kwargs.get("options") or {}
        if options.get("--debug") or options.get("--pdb"):
            return original_run(*args, **kwargs)
        try:
            return original_run(*args, **kwargs)
        except ProjectError as err:
            print(error_line(err), file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USER_ERROR) from err
        except SacredError as err:  # misspelt or missing config keys: Sacred's own message, no traceback
            print(format_sacred_error(err, short_usage), file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USER_ERROR) from err

    in_main_thread = threading.current_thread() is threading.main_thread()
    stop_signals = (signal.SIGTERM, signal.SIGUSR1)
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in stop_signals} if in_main_thread else {}
    ex.run = guarded_run  # instance attribute: shadows Experiment.run for run_commandline only
    try:
        ex.run_commandline(list(argv) if argv is not None else None)
    except SystemExit as stop:
        code = stop.code
        return EXIT_OK if code is None else code if isinstance(code, int) else EXIT_FAILURE
    except RunInterrupted as stop:  # e.g. the training loop wrote a snapshot at the current step (engine.preemption)
        print(str(stop), file=sys.stderr, flush=True)
        return stop.exit_code
    except KeyboardInterrupt as stop:
        name = signal.Signals(stop.signum).name if isinstance(stop, Terminated) else "Ctrl-C"
        print(f"interrupted ({name}); snapshots written so far are complete: continue with resume=True",
              file=sys.stderr, flush=True)
        return 128 + stop.signum if isinstance(stop, Terminated) else EXIT_SIGINT
    finally:
        del ex.run
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK
