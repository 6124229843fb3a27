"""The project's error classes: one base, :class:`ProjectError`, for every "your input is wrong" error.

A project error means bad data, a bad option or config value, a checkpoint that does not fit, or a missing
resource; never a bug. The command-line tools catch :class:`ProjectError` (and only it) and print one
``error: <message>`` line with exit code 2 (:mod:`util.cli`); anything else is a bug and keeps its traceback.

Each error class of the project derives from :class:`ProjectError`. The ones raised by several layers live here;
the others live next to the code that raises them (``dataloaders.niftiio.DataFormatError``,
``models.weights.StateDictMismatchError``, ...). Most also derive from ``ValueError`` so that callers written
against the built-in type keep working.
"""

from __future__ import annotations

import signal

#: Exit codes of every command-line tool: 0 done, 1 a bug (traceback kept), 2 bad input (one ``error:`` line),
#: 128 + signal number when interrupted (:mod:`util.cli` for the Sacred scripts).
EXIT_OK, EXIT_FAILURE, EXIT_USER_ERROR = 0, 1, 2
EXIT_SIGINT, EXIT_SIGTERM, EXIT_SIGUSR1 = 128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGUSR1


def error_line(err: BaseException) -> str:
    """``error: <message>`` (the message may continue on indented lines, e.g. a list of checkpoint keys)."""
    text = str(err).strip() or type(err).__name__
    return f"error: {text}"


class ProjectError(Exception):
    """Base of every error that means "the input is wrong" (data, options, config, checkpoint, environment)."""


class ConfigError(ProjectError, ValueError):
    """A config value or command-line option is invalid; the message names the key or option."""


class RawDataError(ProjectError, ValueError):
    """A user's or a benchmark's raw scan is unusable (missing, unreadable, wrong layout); the message names it."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped on request after saving its state (a cluster's pre-emption signal). Not an error: a
    ``KeyboardInterrupt``, so that Sacred marks the run ``INTERRUPTED``; :func:`util.cli.run_cli` prints the message
    and returns ``exit_code``.

    Attributes:
        exit_code: the process exit code the command line should return (128 + the signal number).
    """

    STATUS = "INTERRUPTED"
    exit_code: int = 1
