"""The exceptions taskrun raises: one small hierarchy under :class:`TaskrunError`."""

from __future__ import annotations

import signal
import traceback
from typing import Any

from ._status import Status


class TaskrunError(Exception):
    """Base class of every error taskrun raises itself."""


class TaskStopped(TaskrunError):
    """The run was stopped with ``stop()`` (or by a group's stop condition) before it finished."""


class TaskTimeout(TaskrunError):
    """One attempt ran longer than the task's ``timeout``."""


class TaskStillRunning(TaskrunError):
    """``get_result(wait=False)`` was called on a run that has not finished."""


class WorkerDied(TaskrunError):
    """The process running the task vanished (segfault, ``os._exit``, a signal, the OOM killer)."""

    def __init__(self, message: str, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.exitcode = exitcode

    @property
    def signal(self) -> str | None:
        """Name of the signal that killed the worker, or None if it exited by itself."""
        if self.exitcode is None or self.exitcode >= 0:
            return None
        return _signal_name(-self.exitcode)

    def __reduce__(self) -> tuple[Any, ...]:  # keep exitcode through pickling
        return (type(self), (str(self), self.exitcode))


class SerializationError(TaskrunError):
    """Arguments, a result or an exception could not be pickled; the message says which and why."""


class UpstreamFailed(TaskrunError):
    """A run this one depended on failed or was stopped, so this one never ran.

    ``upstream_id`` names that run and ``upstream_status`` is its :class:`~taskrun.Status`.
    """

    def __init__(self, message: str, upstream_id: str | None = None, upstream_status: Status | None = None) -> None:
        super().__init__(message)
        self.upstream_id = upstream_id
        self.upstream_status = upstream_status

    def __reduce__(self) -> tuple[Any, ...]:  # keep the upstream's id and status through pickling
        return (type(self), (str(self), self.upstream_id, self.upstream_status))


class LedgerError(TaskrunError):
    """The ledger file cannot be used: not a ledger, unwritable, or from a newer taskrun."""


class RemoteTraceback(Exception):
    """Carries the traceback text of a task's exception from where it ran; set as the ``__cause__``."""

    def __init__(self, tb_text: str) -> None:
        super().__init__(tb_text)
        self.tb_text = tb_text

    def __str__(self) -> str:
        return f'\n"""\n{self.tb_text.rstrip()}\n"""'


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_exit(exitcode: int | None) -> str:
    """'exit code 3' or 'killed by SIGKILL (exit code -9)' for a finished process."""
    if exitcode is None:
        return "exit code unknown"
    if exitcode < 0:
        return f"killed by {_signal_name(-exitcode)} (exit code {exitcode})"
    return f"exit code {exitcode}"


def format_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def attach_traceback(exc: BaseException, tb_text: str | None = None) -> BaseException:
    """Set the traceback text of where ``exc`` was raised as its cause, unless it has one."""
    if exc.__cause__ is None:
        exc.__cause__ = RemoteTraceback(tb_text if tb_text is not None else format_traceback(exc))
    return exc


__all__ = [
    "TaskrunError",
    "TaskStopped",
    "TaskTimeout",
    "TaskStillRunning",
    "WorkerDied",
    "SerializationError",
    "UpstreamFailed",
    "LedgerError",
    "RemoteTraceback",
]
