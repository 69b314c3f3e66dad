"""The runners: where an attempt executes. Each is a ``BaseTaskRun`` subclass.

``MultiprocessTaskRun``, ``AsyncTaskRun`` and ``DaskTaskRun`` are imported when first used (they
bring multiprocess, asyncio and dask), so ``import taskrun`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._lazy import load as _load
from .._run import BaseTaskRun
from .sequential import SequentialTaskRun
from .thread import ThreadTaskRun

if TYPE_CHECKING:
    from .aio import AsyncTaskRun
    from .dask import DaskTaskRun
    from .process import MultiprocessTaskRun

__all__ = ["AsyncTaskRun", "BaseTaskRun", "DaskTaskRun", "MultiprocessTaskRun", "SequentialTaskRun", "ThreadTaskRun"]

_LAZY = {"MultiprocessTaskRun": ".process", "AsyncTaskRun": ".aio", "DaskTaskRun": ".dask"}


def __getattr__(name: str) -> Any:
    return _load(__name__, _LAZY, name, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
