"""The contract tests' task bodies as coroutines, so the same tests run on AsyncTaskRun.

``task`` here is ``taskrun.task``, except that a plain function given an ``AsyncTaskRun``
(or a subclass) becomes an ``async def`` that first suspends once (``await asyncio.sleep(0)``,
so the body runs as a real asyncio task would: after an ``await``) and then runs the body.
A body that blocks its thread (``time.sleep``, ``run.wait()`` on its own handle) is written
as a coroutine of its own in the tests instead: on the loop thread it would hold up the loop.
"""

import asyncio
import functools
import threading

import taskrun
from taskrun import AsyncTaskRun

WAIT = 10


def is_async(runner):
    return isinstance(runner, type) and issubclass(runner, AsyncTaskRun)


def as_coroutine_function(fn):
    """``fn`` as an ``async def`` that suspends once, then calls it; same name and qualname, for ids and tracebacks."""
    if asyncio.iscoroutinefunction(fn):
        return fn

    @functools.wraps(fn)
    async def body(*args, **kwargs):
        await asyncio.sleep(0)
        return fn(*args, **kwargs)

    return body


def task(fn=None, /, **options):
    """``taskrun.task``; on an AsyncTaskRun, a plain ``fn`` runs as a coroutine (see the module docstring)."""
    if fn is None:
        return lambda f: task(f, **options)
    if is_async(options.get("runner")):
        fn = as_coroutine_function(fn)
    return taskrun.task(**options)(fn) if options else taskrun.task(fn)


class AsyncGate:
    """An event coroutines wait on (on any loop), opened from any thread; ``entered`` is set once one waits."""

    def __init__(self):
        self.entered = threading.Event()
        self._lock = threading.Lock()
        self._opened = False
        self._waiters = []  # (loop, asyncio.Event)

    async def wait(self, timeout=WAIT):
        event = asyncio.Event()
        with self._lock:
            if self._opened:
                return
            self._waiters.append((asyncio.get_running_loop(), event))
        self.entered.set()
        await asyncio.wait_for(event.wait(), timeout)

    def open(self):
        with self._lock:
            self._opened = True
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop has closed
                pass
