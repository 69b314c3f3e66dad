"""``SequentialTaskRun``: every attempt runs inline, in the caller, before the call returns."""

from __future__ import annotations

import sys
from typing import ClassVar

from .base import Attempt, BaseTaskRun, R

__all__ = ["SequentialTaskRun"]


class SequentialTaskRun(BaseTaskRun[R]):
    """Runs the call in the calling thread; the handle is finished when the call returns.

    Useful for debugging (breakpoints and tracebacks are where you expect) and for tests.
    Retries wait in the caller. A timeout cannot interrupt inline code: an attempt that
    overruns it fails with ``TaskTimeout`` when it returns. An ``async def`` runs to
    completion on an event loop of its own (``asyncio.run``); called inside a running loop,
    which that would block, it is refused.
    """

    preemptive_timeout: ClassVar[bool] = False
    inline: ClassVar[bool] = True

    def prepare(self) -> None:
        asyncio = sys.modules.get("asyncio")
        if asyncio is None:  # never imported: no loop can be running
            return
        cache = self.task.runner_cache
        is_async = cache.get(SequentialTaskRun)
        if is_async is None:
            import inspect  # asyncio is loaded, and inspect with it

            is_async = cache[SequentialTaskRun] = inspect.iscoroutinefunction(self.task.fn)
        if not is_async:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        raise RuntimeError(
            f"{self.task.name} is an async def called with SequentialTaskRun inside a running event loop, which "
            "running it inline would block; use AsyncTaskRun (the default for an async def), or `await "
            f"{self.task.name}.fn(...)` to run the coroutine in this loop yourself"
        )

    def start_attempt(self, attempt: Attempt) -> None:
        attempt.execute()
