"""Pools that must end with the interpreter, and must be forgotten in a forked child.

At a normal exit every pool finishes the runs already started (fire-and-forget calls
complete); after an unhandled exception or Ctrl-C it stops them at once instead.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, Protocol

from ._timer import timer

if TYPE_CHECKING:
    from ._run import BaseTaskRun

logger = logging.getLogger("taskrun")


class Pool(Protocol):
    """What taskrun.shutdown() calls on a registered pool (or map feeder)."""

    def shutdown(self, wait: bool = True) -> None: ...


#: A registered pool's key: usually a runner class. (Classes are hashable; the union is spelled
#: out because mypy does not see ``cls`` in a classmethod as Hashable.)
PoolKey = Hashable | type[Any]

_pools: dict[PoolKey, Pool] = {}
pools = _pools  # read without the lock on hot paths; changed only under it
_lock = threading.Lock()
_feeders: set[Pool] = set()  # map() feeder threads: stopped before the pools they feed
_runners: dict[type[BaseTaskRun[Any]], None] = {}  # runner classes of tasks that override the shutdown(wait) hook, in order


def register_runner(runner: type[BaseTaskRun[Any]]) -> None:
    """Call ``runner.shutdown(wait)`` in every ``shutdown()`` (and at exit) from now on."""
    with _lock:
        _runners.setdefault(runner)


def register_feeder(feeder: Pool) -> None:
    with _lock:
        _feeders.add(feeder)


def unregister_feeder(feeder: Pool) -> None:
    with _lock:
        _feeders.discard(feeder)


def get_pool(runner: PoolKey, factory: Callable[[], Pool]) -> Pool:
    """The pool of ``runner`` (one per configured runner class), made with ``factory()`` on first use."""
    pool = _pools.get(runner)
    if pool is None:
        with _lock:
            pool = _pools.get(runner)
            if pool is None:
                pool = _pools[runner] = factory()
    return pool


def forget_pool(pool: Pool) -> None:
    """Unregister ``pool`` (it failed), so the next call of its runner makes a new one."""
    with _lock:
        for key in [key for key, value in _pools.items() if value is pool]:
            del _pools[key]


def drop_pools(runner: type[Any]) -> list[Pool]:
    """Forget the pools of ``runner`` and of its configured subclasses; the caller shuts them down."""
    with _lock:
        mine = [key for key in _pools if isinstance(key, type) and issubclass(key, runner)]
        return [_pools.pop(key) for key in mine]


def anything_started() -> bool:
    """True if this process has pools, map feeders or runner shutdown hooks to shut down."""
    return bool(_pools or _feeders or _runners)


def shutdown(wait: bool = True) -> None:
    """Shut down every pool taskrun started and its timer thread; ``map`` stops reading its input.

    ``wait=True`` lets started runs finish; ``wait=False`` stops them. Pools start again on
    the next call.
    """
    # shutdown_order (default 0): the ledger starts its claimed runs after map's feeders stopped
    # (feeder, 1), and commits their outcomes after the pools finished them (pool, 1).
    stopped: set[Pool] = set()
    while True:  # first, so that nothing is fed into a pool after it is shut down
        with _lock:  # a feeder may register while another one stops: it is stopped in the next round
            feeders = sorted(_feeders - stopped, key=_shutdown_order)
        if not feeders:
            break
        for feeder in feeders:
            feeder.shutdown(wait=wait)
            stopped.add(feeder)
    with _lock:
        pools = sorted(_pools.values(), key=_shutdown_order)
        _pools.clear()
    try:
        for pool in pools:
            pool.shutdown(wait=wait)
        with _lock:
            runners = list(_runners)
        for runner in runners:  # the built-in ones find their pools gone already
            try:
                runner.shutdown(wait=wait)
            except Exception:
                logger.exception("the shutdown hook of runner %s raised", runner.__name__)
    finally:
        timer.shutdown()


def _shutdown_order(pool: Pool) -> int:
    order: int = getattr(pool, "shutdown_order", 0)
    return order


def _finish_feeders() -> None:
    """At a normal exit the script waits for what it started: each ``map`` reads its input to the end first
    (its runs then finish with the pools). Ctrl-C meanwhile ends the wait (see _at_exit)."""
    finished: set[Pool] = set()
    while True:
        with _lock:
            feeders = [feeder for feeder in _feeders if feeder not in finished]
        if not feeders:
            return
        for feeder in feeders:
            finish = getattr(feeder, "finish", None)
            if finish is not None:
                finish()
            finished.add(feeder)


def _at_exit() -> None:
    crashed = getattr(sys, "last_value", None) is not None or getattr(sys, "last_exc", None) is not None
    try:
        if not crashed:
            _finish_feeders()
        shutdown(wait=not crashed)
    except KeyboardInterrupt:
        shutdown(wait=False)


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    for pool in _pools.values():
        after_fork = getattr(pool, "after_fork_in_child", None)
        if after_fork is not None:
            after_fork()
    _pools.clear()
    _feeders.clear()
    _runners.clear()  # the parent's runners: nothing of theirs runs in this process
    timer.reset_after_fork()


atexit.register(_at_exit)


def exit_handler_first() -> None:
    """Make taskrun's exit handler run before those registered so far (atexit runs the last registered first).

    A runner calls it once it has imported a library with exit handlers of its own
    (multiprocess ends its daemonic children at exit): taskrun's pools must shut down first.
    """
    atexit.unregister(_at_exit)
    atexit.register(_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
