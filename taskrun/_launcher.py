"""One daemon thread that launches runs whose upstream runs have finished.

The thread that learns an upstream run finished (a pool's supervisor, the ledger's thread,
a timer) only queues the dependent here: resolving its arguments, its ledger key, pickling
and submitting happen on ``taskrun-launch``, off that thread's hot path. It starts on first
use, ends with ``taskrun.shutdown()`` (after launching what is queued, or dropping it) and
starts again on the next use.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable

logger = logging.getLogger("taskrun")

Job = tuple[Callable[[], None], Callable[[], None]]  # (launch, what to do instead if dropped)


class Launcher:
    #: ``taskrun.shutdown()`` stops it with the map feeders, before the pools: what it launches runs there.
    shutdown_order = 0

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._jobs: collections.deque[Job] = collections.deque()
        self._thread: threading.Thread | None = None

    def submit(self, launch: Callable[[], None], on_drop: Callable[[], None]) -> None:
        """Call ``launch()`` on the launcher thread; ``on_drop()`` instead if shutdown(wait=False) comes first."""
        from ._lifecycle import register_feeder

        with self._cond:
            self._jobs.append((launch, on_drop))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="taskrun-launch", daemon=True)
                self._thread.start()
                register_feeder(self)
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    if self._thread is not threading.current_thread():
                        return  # shut down
                    self._cond.wait()
                launch = self._jobs.popleft()[0]
            try:
                launch()
            except Exception:
                logger.exception("taskrun could not launch a run whose upstream runs finished")
            del launch  # do not keep the run alive while waiting for the next

    def shutdown(self, wait: bool = True) -> None:
        """Launch what is queued (``wait``) or drop it, then end the thread. The next ``submit`` starts another."""
        from ._lifecycle import unregister_feeder

        with self._cond:
            thread, self._thread = self._thread, None
            dropped = [] if wait else list(self._jobs)
            if not wait:
                self._jobs.clear()
            self._cond.notify()
        unregister_feeder(self)
        if thread is not None and thread is not threading.current_thread():
            thread.join()  # with wait, it launches what is left first: launching never waits for a run
        for _launch, on_drop in dropped:
            try:
                on_drop()
            except Exception:
                logger.exception("taskrun could not stop a run whose launch was dropped")

    def reset_after_fork(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._jobs = collections.deque()
        self._thread = None


launcher = Launcher()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=launcher.reset_after_fork)
