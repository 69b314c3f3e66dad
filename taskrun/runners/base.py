"""The runner interface: everything a runner may use, the built-in ones included.

A runner is a :class:`BaseTaskRun` subclass. It implements ``start_attempt`` (and, if it
can, ``stop_attempt``; optionally ``prepare`` and the classmethod ``shutdown``) and reports
on the :class:`Attempt` it is given. A runner that keeps a pool of workers registers it
here, so that ``taskrun.shutdown()`` and the interpreter's exit shut it down and a forked
child forgets it. The built-in runners import nothing else of taskrun's (a test checks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

from .._config import positive_int_or_none
from .._lifecycle import (
    Pool,
    PoolKey,
    anything_started,
    drop_pools,
    exit_handler_first,
    forget_pool,
    get_pool,
    pools,
    shutdown,
)
from .._run import PLAIN_TYPES, Attempt, BaseTaskRun, R, set_stop_flag, stop_requested
from .._status import Status

PoolT = TypeVar("PoolT", bound=Pool)

__all__ = [
    "BaseTaskRun",
    "Attempt",
    "R",
    "Status",
    "Pool",
    "PoolKey",
    "PLAIN_TYPES",
    "stop_requested",
    "set_stop_flag",
    "shared_pool",
    "registered_pools",
    "drop_pools",
    "forget_pool",
    "anything_started",
    "shutdown",
    "exit_handler_first",
    "check_setting_int",
]

#: The registered pools by key (read-only; look a pool up here on hot paths, make it with :func:`shared_pool`).
#: Its values are Any: pools of many kinds, each known to the runner that registered it under its key.
registered_pools: Mapping[PoolKey, Any] = pools


def shared_pool(key: PoolKey, factory: Callable[[], PoolT]) -> PoolT:
    """The pool registered under ``key`` (a runner class, usually), made with ``factory()`` on first use.

    Registered pools are shut down (``pool.shutdown(wait)``) by ``taskrun.shutdown()`` and at
    exit, and forgotten in a forked child (after ``pool.after_fork_in_child()``, if it has one).
    """
    return cast(PoolT, get_pool(key, factory))  # the pool registered under key: the one factory made


def check_setting_int(owner: str, name: str, value: Any, allow_none: bool = True) -> None:
    """Raise TypeError/ValueError naming the setting unless ``value`` is an int >= 1 (or None, if allowed)."""
    positive_int_or_none(owner, name, value, allow_none)
