"""The runners: where an attempt executes. Each is a ``BaseTaskRun`` subclass."""

from .._run import BaseTaskRun
from .process import MultiprocessTaskRun
from .sequential import SequentialTaskRun
from .thread import ThreadTaskRun

__all__ = ["BaseTaskRun", "MultiprocessTaskRun", "SequentialTaskRun", "ThreadTaskRun"]
