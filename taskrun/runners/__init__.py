"""The runners: where an attempt executes. Each is a ``BaseTaskRun`` subclass."""

from typing import TYPE_CHECKING, Any

from .._run import BaseTaskRun
from .process import MultiprocessTaskRun
from .sequential import SequentialTaskRun
from .thread import ThreadTaskRun

if TYPE_CHECKING:
    from .dask import DaskTaskRun

__all__ = ["BaseTaskRun", "MultiprocessTaskRun", "SequentialTaskRun", "ThreadTaskRun", "DaskTaskRun"]


def __getattr__(name: str) -> Any:
    """``DaskTaskRun`` imports dask only when it is used (extra ``taskrun[dask]``)."""
    if name == "DaskTaskRun":
        from .dask import DaskTaskRun

        return DaskTaskRun
    raise AttributeError(f"module 'taskrun.runners' has no attribute {name!r}")
