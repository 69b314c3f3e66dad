"""taskrun: call a function, get a handle back at once; the work runs in a process, a thread or inline."""

from typing import TYPE_CHECKING, Any

from ._group import RunGroup
from ._ledger import Ledger, RunRecord
from ._lifecycle import shutdown
from ._run import Attempt, BaseTaskRun, Status, stop_requested
from ._task import Task, task
from .errors import (
    LedgerError,
    SerializationError,
    TaskrunError,
    TaskStillRunning,
    TaskStopped,
    TaskTimeout,
    UpstreamFailed,
    WorkerDied,
)
from .runners import MultiprocessTaskRun, SequentialTaskRun, ThreadTaskRun

if TYPE_CHECKING:
    from .runners.dask import DaskTaskRun

TaskRun = BaseTaskRun

__version__ = "0.1.0"

__all__ = [
    "task",
    "Task",
    "RunGroup",
    "Ledger",
    "RunRecord",
    "TaskRun",
    "BaseTaskRun",
    "Attempt",
    "Status",
    "MultiprocessTaskRun",
    "SequentialTaskRun",
    "ThreadTaskRun",
    "DaskTaskRun",
    "stop_requested",
    "shutdown",
    "TaskrunError",
    "TaskStopped",
    "TaskTimeout",
    "TaskStillRunning",
    "WorkerDied",
    "SerializationError",
    "UpstreamFailed",
    "LedgerError",
]


def __getattr__(name: str) -> Any:
    """``taskrun.DaskTaskRun`` imports dask only when it is used (extra ``taskrun[dask]``)."""
    if name == "DaskTaskRun":
        from .runners.dask import DaskTaskRun

        return DaskTaskRun
    raise AttributeError(f"module 'taskrun' has no attribute {name!r}")
