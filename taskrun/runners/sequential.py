"""``SequentialTaskRun``: every attempt runs inline, in the caller, before the call returns."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

from .._run import Attempt, BaseTaskRun, R


class SequentialTaskRun(BaseTaskRun[R]):
    """Runs the call in the calling thread; the handle is finished when the call returns.

    Useful for debugging (breakpoints and tracebacks are where you expect) and for tests.
    Retries wait in the caller. A timeout cannot interrupt inline code: an attempt that
    overruns it fails with ``TaskTimeout`` when it returns.
    """

    preemptive_timeout: ClassVar[bool] = False
    inline: ClassVar[bool] = True

    def _launch(self) -> None:
        self._inline: deque[Attempt] = deque()
        super()._launch()
        # Attempts (first and retries) queue here and run one after another: no recursion.
        while self._inline:
            self._inline.popleft().execute()

    def start_attempt(self, attempt: Attempt) -> None:
        self._inline.append(attempt)

    def _call_later(self, delay: float, fn: Callable[[], Any]) -> None:
        time.sleep(delay)
        fn()
