"""taskrun: call a function, get a handle back at once; the work runs in a process, a thread, an event loop or inline.

The process, async and Dask runners and the ledger are imported when first used (they bring
multiprocess, asyncio, dask and sqlite3), so ``import taskrun`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._group import RunGroup
from ._lazy import load as _load
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
from .runners import SequentialTaskRun, ThreadTaskRun

if TYPE_CHECKING:
    from ._ledger import Ledger, RunRecord
    from .runners.aio import AsyncTaskRun
    from .runners.dask import DaskTaskRun
    from .runners.process import MultiprocessTaskRun

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

_LAZY = {
    "Ledger": "._ledger",
    "RunRecord": "._ledger",
    "MultiprocessTaskRun": ".runners.process",
    "AsyncTaskRun": ".runners.aio",
    "DaskTaskRun": ".runners.dask",
}


def __getattr__(name: str) -> Any:
    return _load(__name__, _LAZY, name, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
