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
