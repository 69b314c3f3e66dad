"""``ThreadTaskRun``: attempts run on a bounded pool of daemon threads, started lazily."""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections import deque
from typing import Any, ClassVar

from .base import Attempt, BaseTaskRun, R, check_setting_int, drop_pools, registered_pools, shared_pool

__all__ = ["ThreadTaskRun"]


class ThreadTaskRun(BaseTaskRun[R]):
    """Runs calls on a pool of up to ``max_workers`` threads; best for I/O-bound work.

    ``stop()`` of a running call marks it STOPPED at once and discards its result; the
    function keeps going until it returns unless it polls :func:`taskrun.stop_requested`.
    Threads cannot be killed, so a timed-out attempt is abandoned the same way; the pool
    starts a replacement thread so the abandoned one does not cost capacity.
    """

    max_workers: ClassVar[int | None] = min(32, (os.cpu_count() or 1) + 4)  # None (configured): the same
    settings: ClassVar[dict[str, Any]] = {"max_workers": max_workers}

    @staticmethod
    def validate_setting(name: str, value: Any) -> None:
        check_setting_int("ThreadTaskRun", name, value)

    @classmethod
    def _pool(cls) -> ThreadPool:
        pool: ThreadPool | None = registered_pools.get(cls)
        if pool is None:
            pool = shared_pool(cls, lambda: ThreadPool.for_runner(cls))
        return pool

    def start_attempt(self, attempt: Attempt) -> None:
        self._pool().submit(attempt)

    def stop_attempt(self, attempt: Attempt) -> None:
        worker = attempt.runner_state
        if worker is not None:
            worker.abandon(attempt)

    @classmethod
    def shutdown(cls, wait: bool = True) -> None:
        for pool in drop_pools(cls):
            pool.shutdown(wait=wait)


_thread_numbers = itertools.count(1)


class _Worker:
    """One pool thread. Abandoned (its attempt stopped or timed out), it exits when the call returns."""

    __slots__ = ("pool", "thread", "abandoned", "attempt")

    def __init__(self, pool: ThreadPool) -> None:
        self.pool: ThreadPool = pool
        self.abandoned: bool = False
        self.attempt: Attempt | None = None
        self.thread: threading.Thread = threading.Thread(
            target=self.loop, name=f"taskrun-thread-{next(_thread_numbers)}", daemon=True
        )

    def loop(self) -> None:
        pool = self.pool
        get = pool.queue.get
        while True:
            attempt = get()
            if attempt is None:
                pool.queue.put(None)  # pass the shutdown on to the next thread
                break
            # Published before the check: a stop() that marks the attempt reported after the check
            # finds this thread through runner_state and abandons it (each side writes, then reads).
            self.attempt = attempt
            attempt.runner_state = self
            if not attempt.reported:  # else stopped while queued: it never starts
                try:
                    attempt.execute()
                except KeyboardInterrupt:
                    pass  # the run failed with it; a pool thread has no caller to interrupt, and must not die
            attempt.runner_state = None
            self.attempt = None
            del attempt  # the finished run must not stay alive while this thread waits for the next
            if self.abandoned:
                break
            pool.idle.append(None)
        pool.worker_exited(self)

    def abandon(self, attempt: Attempt) -> None:
        if self.attempt is attempt and not self.abandoned:
            self.abandoned = True
            self.pool.replace(self)


class ThreadPool:
    @classmethod
    def for_runner(cls, runner: type[ThreadTaskRun[Any]]) -> ThreadPool:
        return cls(runner.max_workers or min(32, (os.cpu_count() or 1) + 4))

    def __init__(self, max_workers: int) -> None:
        self.max_workers: int = max_workers
        self.queue: queue.SimpleQueue[Attempt | None] = queue.SimpleQueue()
        # One token per thread that finished a call and went back to the queue. deque appends and
        # pops are atomic, so threads never contend for a lock just to say they are free.
        self.idle: deque[None] = deque()
        self.lock: threading.Lock = threading.Lock()
        self.workers: set[_Worker] = set()  # threads that take work (not abandoned)
        self.all_workers: set[_Worker] = set()
        self.closed: bool = False

    def submit(self, attempt: Attempt) -> None:
        if self.closed:
            raise RuntimeError("this ThreadTaskRun pool was shut down")
        self.queue.put(attempt)
        try:
            self.idle.pop()
        except IndexError:
            with self.lock:
                if len(self.workers) < self.max_workers:
                    self._start_worker()

    def _start_worker(self) -> None:
        worker = _Worker(self)
        self.workers.add(worker)
        self.all_workers.add(worker)
        worker.thread.start()

    def replace(self, worker: _Worker) -> None:
        with self.lock:
            self.workers.discard(worker)
            if not self.closed:
                self._start_worker()

    def worker_exited(self, worker: _Worker) -> None:
        with self.lock:
            self.workers.discard(worker)
            self.all_workers.discard(worker)

    def shutdown(self, wait: bool = True) -> None:
        """End the threads. ``wait=True`` runs what is queued first; ``wait=False`` stops what is queued or running."""
        with self.lock:
            self.closed = True
            workers = list(self.all_workers)
        if not wait:
            while True:
                try:
                    attempt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if attempt is not None:
                    attempt.run.stop()
            for worker in workers:  # and the running ones: STOPPED now, stop_requested() for the function
                attempt = worker.attempt
                if attempt is not None:
                    attempt.run.stop()
        self.queue.put(None)
        if wait:
            for worker in workers:
                if not worker.abandoned and worker.thread is not threading.current_thread():
                    worker.thread.join()
