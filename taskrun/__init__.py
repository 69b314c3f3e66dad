"""taskrun: call a function, get a handle back at once; the work runs in a process, a thread, an event loop or inline."""

from ._group import RunGroup
from ._ledger import Ledger, RunRecord
from ._lifecycle import shutdown
from ._run import Attempt, BaseTaskRun, stop_requested
from ._status import Status
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
from .runners import AsyncTaskRun, MultiprocessTaskRun, SequentialTaskRun, ThreadTaskRun

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
    "AsyncTaskRun",
    "MultiprocessTaskRun",
    "SequentialTaskRun",
    "ThreadTaskRun",
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
