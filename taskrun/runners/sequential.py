"""``SequentialTaskRun``: every attempt runs inline, in the caller, before the call returns."""

from __future__ import annotations

from typing import ClassVar

from .base import Attempt, BaseTaskRun, R


class SequentialTaskRun(BaseTaskRun[R]):
    """Runs the call in the calling thread; the handle is finished when the call returns.

    Useful for debugging (breakpoints and tracebacks are where you expect) and for tests.
    Retries wait in the caller. A timeout cannot interrupt inline code: an attempt that
    overruns it fails with ``TaskTimeout`` when it returns.
    """

    preemptive_timeout: ClassVar[bool] = False
    inline: ClassVar[bool] = True

    def start_attempt(self, attempt: Attempt) -> None:
        attempt.execute()
