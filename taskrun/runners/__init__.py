"""The runners: where an attempt executes. Each is a ``BaseTaskRun`` subclass."""

from .._run import BaseTaskRun
from .sequential import SequentialTaskRun
from .thread import ThreadTaskRun

__all__ = ["BaseTaskRun", "SequentialTaskRun", "ThreadTaskRun"]
