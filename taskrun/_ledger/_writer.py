"""The writer: one thread per ledger file and process that takes queued claims and records in batches.

Producers (the runs' threads) append to a queue without a lock and wake the thread only when
it sleeps. The thread takes up to ``MAX_BATCH`` items at a time and hands them to its
:class:`Batcher` (the store), which commits them in a few transactions; a burst of tiny runs
so shares its commits. Between batches it calls the batcher's ``tick`` (lease renewal, looking
at keys other processes hold).

A batch is processed under ``batch_lock``, and the batcher may start claimed runs while it
holds it; everything else the batch decided (results, cached values, failures) it returns as
replies, which the thread calls after releasing the lock: no reply that publishes a run runs
under a ledger lock. ``taskrun.shutdown()`` takes ``batch_lock`` to know that no claim is
between the queue and its pool.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

logger = logging.getLogger("taskrun")

#: Most queued items processed in one batch.
MAX_BATCH = 4096

#: A call a batch leaves for later: ``(fn, args)``, made as ``fn(*args)`` once the batch lock is released.
Call = tuple[Callable[..., Any], tuple[Any, ...]]

_thread_numbers = itertools.count(1)


class Batcher(Protocol):
    """What a batch of queued items means (the store)."""

    def process(self, items: list[Any]) -> list[Call]:
        """Act on ``items`` (``batch_lock`` held); return the replies to call once it is released."""
        ...

    def tick(self) -> list[Call]:
        """Periodic work between batches (no lock held); its replies are called right after."""
        ...

    def sleep_for(self) -> float:
        """Seconds until ``tick`` has something to do."""
        ...

    def on_start(self) -> None:
        """The thread has started (once per start)."""
        ...


class Writer:
    """The ledger thread of one file in this process, with its queue."""

    def __init__(self, name: str, batcher: Batcher) -> None:
        self.name = name
        self.batcher = batcher
        self.reset()

    def reset(self) -> None:
        """A new, idle writer (also in a forked child: the parent's thread does not exist there)."""
        self.batch_lock = threading.RLock()
        self.queue: collections.deque[Any] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._idle = False  # the thread waits on _cond: notify it
        self._closing = False  # the thread ends once its queue is empty
        #: Shutting down: new claims are refused (they end STOPPED); records are still taken.
        self.gate_closed = False

    @property
    def running(self) -> bool:
        return self._thread is not None

    def submit_claim(self, item: Any) -> bool:
        """Queue a claim, starting the thread if needed; False while shutting down (it is not queued)."""
        running = self._thread
        if running is not None and not self.gate_closed:
            self.queue.append(item)
            if self._idle or self._thread is None:  # (it may have ended since it was looked at)
                self._wake()
            return True
        with self._cond:
            if self.gate_closed:
                return False
            if self._thread is None:
                self._start()
            self.queue.append(item)
            self._cond.notify()
        return True

    def submit_record(self, item: Any) -> bool:
        """Queue a record for the thread; False if no thread runs to take it (the caller commits it then)."""
        running = self._thread
        if running is not None and not self.gate_closed:
            self.queue.append(item)
            if self._idle or self._thread is None:
                self._wake()
            return True
        with self._cond:
            if self._thread is None:
                return False
            self.queue.append(item)
            self._cond.notify()
        return True

    def _wake(self) -> None:
        """After an append: wake the sleeping thread, or take what is queued if it ended meanwhile."""
        if self._idle:
            with self._cond:
                self._cond.notify()
        if self._thread is None:  # it ended meanwhile: nobody else will take the item
            self.drain()

    def _start(self) -> None:
        self._closing = False
        thread = self._thread = threading.Thread(
            target=self._loop, name=f"taskrun-ledger-{self.name}-{next(_thread_numbers)}", daemon=True
        )
        thread.taskrun_delivers = True  # type: ignore[attr-defined]  # see BaseTaskRun.wait
        thread.start()
        self.batcher.on_start()

    def take(self, claims_only: bool = False) -> list[Any]:
        """Everything queued (hold ``batch_lock``); ``claims_only``: only the claims, records stay queued."""
        queue = self.queue
        items: list[Any] = []
        for _ in range(len(queue)):
            item = queue.popleft()
            if claims_only and not is_claim(item):
                queue.append(item)
            else:
                items.append(item)
        return items

    def run_batch(self) -> None:
        """Take up to MAX_BATCH queued items, process them, then call the replies the batch returned."""
        queue = self.queue
        with self.batch_lock:
            take = queue.popleft  # every taker holds the batch lock: the queue only grows meanwhile
            items = [take() for _ in range(min(len(queue), MAX_BATCH))]
            replies = self.batcher.process(items)
        call_all(replies)

    def drain(self) -> None:
        """Process what is queued, here (once the thread has ended)."""
        while self.queue:
            self.run_batch()

    def close_gate(self) -> None:
        with self._cond:
            self.gate_closed = True

    def open_gate(self) -> None:
        with self._cond:
            self.gate_closed = False

    def stop(self, timeout: float) -> None:
        """End the thread once its queue is empty, and wait up to ``timeout`` seconds for it."""
        with self._cond:
            self._closing = True
            thread = self._thread
            self._cond.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _loop(self) -> None:
        cond, queue, batcher = self._cond, self.queue, self.batcher
        while True:
            if not queue:
                with cond:
                    # Producers append without the lock, then notify if _idle: set it before looking.
                    self._idle = True
                    if not queue:
                        if self._closing:
                            self._thread = None
                            self._idle = False
                            break
                        wait = batcher.sleep_for()
                        if wait > 0:
                            cond.wait(wait)
                    self._idle = False
            try:
                self.run_batch()
                call_all(batcher.tick())
            except Exception:
                logger.exception("ledger %s: the ledger thread failed; it goes on", self.name)
        self.drain()  # whatever came in while it was ending


def is_claim(item: tuple[Any, ...]) -> bool:
    """A queued claim is ``(run, reply)``; a record is longer (see Store.record)."""
    return len(item) == 2


def call_all(calls: list[Call]) -> None:
    """Make each call; one that raises is logged and the others are still made."""
    for fn, args in calls:
        try:
            fn(*args)
        except Exception:
            logger.exception("taskrun: a ledger reply raised")
