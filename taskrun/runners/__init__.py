"""The runners: where an attempt executes. Each is a ``BaseTaskRun`` subclass.

``MultiprocessTaskRun``, ``AsyncTaskRun`` and ``DaskTaskRun`` are imported when first used (they
bring multiprocess, asyncio and dask), so ``import taskrun`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
