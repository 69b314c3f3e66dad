"""The runners: where an attempt executes. Each is a ``BaseTaskRun`` subclass."""

from .._run import BaseTaskRun
from .aio import AsyncTaskRun
from .process import MultiprocessTaskRun
from .sequential import SequentialTaskRun
from .thread import ThreadTaskRun

__all__ = ["AsyncTaskRun", "BaseTaskRun", "MultiprocessTaskRun", "SequentialTaskRun", "ThreadTaskRun"]
