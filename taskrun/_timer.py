"""One daemon thread that runs callbacks after a delay: retry waits and attempt timeouts.

A single heap keeps a thread per pending wait from ever being needed. A cancelled entry
lets go of its callback at once (so a finished run it would have timed out is freed), and
the heap is rebuilt without cancelled entries once they are the majority.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("taskrun")

#: The heap is compacted when more than half its entries, and at least this many, are cancelled.
COMPACT_MIN = 64


class TimerHandle:
    """One pending callback; :meth:`cancel` drops it (and what it refers to) for good."""

    __slots__ = ("when", "callback", "on_drop", "cancelled", "in_heap", "_timer")

    def __init__(
        self, when: float, callback: Callable[[], None], on_drop: Callable[[], None] | None, timer: Timer
    ) -> None:
        self.when = when
        self.callback: Callable[[], None] | None = callback
        self.on_drop = on_drop
        self.cancelled = False
        self.in_heap = True
        self._timer = timer

    def cancel(self) -> None:
        # TimerHandle and Timer are one design: a handle counts itself among its timer's cancelled
        # entries, under the timer's lock, so the heap can be compacted in bulk.
        timer = self._timer
        with timer._cond:  # pyright: ignore[reportPrivateUsage]
            if self.cancelled:
                return
            self.cancelled = True
            self.callback = self.on_drop = None
            if self.in_heap:
                timer._cancelled += 1  # pyright: ignore[reportPrivateUsage]
                timer._compact_if_sparse()  # pyright: ignore[reportPrivateUsage]


class Timer:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._cancelled = 0  # cancelled handles still in the heap
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closing = False

    def call_later(
        self, delay: float, callback: Callable[[], None], on_drop: Callable[[], None] | None = None
    ) -> TimerHandle:
        """Run ``callback`` after ``delay`` seconds; ``on_drop`` runs instead if the timer shuts down first."""
        handle = TimerHandle(time.monotonic() + delay, callback, on_drop, self)
        with self._cond:
            heapq.heappush(self._heap, (handle.when, next(self._seq), handle))
            if self._thread is None:
                self._closing = False
                self._thread = threading.Thread(target=self._loop, name="taskrun-timer", daemon=True)
                self._thread.start()
            self._cond.notify()
        return handle

    def __len__(self) -> int:
        """Entries in the heap, cancelled ones included (they are compacted away in bulk)."""
        return len(self._heap)

    def _compact_if_sparse(self) -> None:
        """Rebuild the heap without its cancelled entries once they are most of it (lock held)."""
        if self._cancelled >= COMPACT_MIN and 2 * self._cancelled > len(self._heap):
            kept: list[tuple[float, int, TimerHandle]] = []
            for entry in self._heap:
                if entry[2].cancelled:
                    entry[2].in_heap = False
                else:
                    kept.append(entry)
            heapq.heapify(kept)
            self._heap = kept
            self._cancelled = 0

    def _pop(self) -> TimerHandle:
        handle = heapq.heappop(self._heap)[2]
        handle.in_heap = False
        if handle.cancelled:
            self._cancelled -= 1
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
                            handle = self._pop()
                            callback = handle.callback
                            handle.callback = handle.on_drop = None
                            break
                        self._cond.wait(delay)
                    else:
                        self._cond.wait()
            if callback is not None:
                try:
                    callback()
                except Exception:
                    logger.exception("taskrun timer callback %r failed", callback)
            del handle, callback  # do not keep the last run alive while waiting for the next

    def shutdown(self) -> None:
        """Stop the thread; pending callbacks are dropped (their ``on_drop`` runs). Restarts on next use."""
        with self._cond:
            thread, self._thread = self._thread, None
            self._closing = True
            drops = [entry[2].on_drop for entry in self._heap if not entry[2].cancelled]
            for entry in self._heap:
                entry[2].callback = entry[2].on_drop = None
                entry[2].in_heap = False
            self._heap.clear()
            self._cancelled = 0
            self._cond.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        for on_drop in drops:
            if on_drop is not None:
                try:
                    on_drop()
                except Exception:
                    logger.exception("taskrun timer drop callback %r failed", on_drop)

    def reset_after_fork(self) -> None:
        """In a forked child: the parent's thread and pending callbacks are not this process's."""
        self._cond = threading.Condition(threading.Lock())
        self._heap = []
        self._cancelled = 0
        self._thread = None
        self._closing = False


timer = Timer()
