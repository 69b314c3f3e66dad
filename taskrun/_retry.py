"""The retry policy: which failures are retried and how long to wait before each retry.

The loop that applies it lives in :meth:`BaseTaskRun._attempt_finished`, shared by every runner.
"""

from __future__ import annotations

import random

from .errors import TaskStopped


class RetryPolicy:
    """A task's retry options, checked by ``@task``."""

    __slots__ = ("retries", "retry_sleep_time", "backoff", "jitter", "retry_on")

    def __init__(
        self,
        retries: int = 0,
        retry_sleep_time: float = 0.0,
        backoff: float = 1.0,
        jitter: float = 0.0,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
    ) -> None:
        self.retries: int = retries
        self.retry_sleep_time: float = retry_sleep_time
        self.backoff: float = backoff
        self.jitter: float = jitter
        self.retry_on: tuple[type[BaseException], ...] = retry_on

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        """True if the failure of attempt number ``attempt`` (1-based) earns another attempt."""
        return attempt <= self.retries and isinstance(exc, self.retry_on) and not isinstance(exc, TaskStopped)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` before the next one."""
        wait = self.retry_sleep_time * self.backoff ** (attempt - 1)
        if self.jitter:
            wait += random.uniform(0, self.jitter)
        return wait
