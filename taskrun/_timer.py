"""One daemon thread that runs callbacks after a delay: retry waits and attempt timeouts.

A single heap keeps a thread per pending wait from ever being needed.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("taskrun")


class TimerHandle:
    __slots__ = ("when", "callback", "on_drop", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None], on_drop: Callable[[], None] | None) -> None:
        self.when = when
        self.callback = callback
        self.on_drop = on_drop
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Timer:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closing = False

    def call_later(
        self, delay: float, callback: Callable[[], None], on_drop: Callable[[], None] | None = None
    ) -> TimerHandle:
        """Run ``callback`` after ``delay`` seconds; ``on_drop`` runs instead if the timer shuts down first."""
        handle = TimerHandle(time.monotonic() + delay, callback, on_drop)
        with self._cond:
            heapq.heappush(self._heap, (handle.when, next(self._seq), handle))
            if self._thread is None:
                self._closing = False
                self._thread = threading.Thread(target=self._loop, name="taskrun-timer", daemon=True)
                self._thread.start()
            self._cond.notify()
        return handle

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closing:
                        return
                    if self._heap:
                        delay = self._heap[0][0] - time.monotonic()
                        if delay <= 0:
                            handle = heapq.heappop(self._heap)[2]
                            break
                        self._cond.wait(delay)
                    else:
                        self._cond.wait()
            if not handle.cancelled:
                try:
                    handle.callback()
                except Exception:
                    logger.exception("taskrun timer callback %r failed", handle.callback)

    def shutdown(self) -> None:
        """Stop the thread; pending callbacks are dropped (their ``on_drop`` runs). Restarts on next use."""
        with self._cond:
            thread, self._thread = self._thread, None
            self._closing = True
            dropped = [entry[2] for entry in self._heap]
            self._heap.clear()
            self._cond.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        for handle in dropped:
            if not handle.cancelled and handle.on_drop is not None:
                try:
                    handle.on_drop()
                except Exception:
                    logger.exception("taskrun timer drop callback %r failed", handle.on_drop)

    def _reset_after_fork(self) -> None:
        # In place, as threading's own objects do: cheaper than a new Condition in every fresh child.
        self._cond._at_fork_reinit()  # type: ignore[attr-defined]
        self._heap = []
        self._thread = None
        self._closing = False


timer = Timer()
