"""The runner interface: everything a runner may use, the built-in ones included.

A runner is a :class:`BaseTaskRun` subclass. It implements ``start_attempt`` (and, if it
can, ``stop_attempt``; optionally ``prepare`` and the classmethod ``shutdown``) and reports
on the :class:`Attempt` it is given. A runner that keeps a pool of workers registers it
here, so that ``taskrun.shutdown()`` and the interpreter's exit shut it down and a forked
child forgets it. The built-in runners import nothing else of taskrun's (a test checks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

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

if TYPE_CHECKING:
    from .._fingerprint import PickledFunction

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
    "dumps_function",
    "register_sources",
    "PickledFunction",
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


def dumps_function(fn: Any, home: dict[str, Any] | None = None, every_file: bool = False) -> tuple[bytes, dict[str, list[str]]]:
    """Pickle ``fn`` for another process, so that tracebacks and warnings there name your file, line and source.

    Returns the pickle (cloudpickle's, whose code objects keep their real file name) and the
    source lines that process needs, ``{file name: lines}``: of code without a file to read
    (a notebook cell), or, with ``every_file``, of every file the pickled code comes from (a
    worker on another machine cannot read this one's files). Give them to
    :func:`register_sources` there before running the function. ``home``: a module's
    globals whose plain functions travel by value too (None: cloudpickle's own rule); if
    that pickle fails, ``fn`` is pickled as cloudpickle does it by default.
    """
    from .._pickling import dumps_function as dumps

    return dumps(fn, home, every_file)


def register_sources(sources: dict[str, list[str]]) -> None:
    """In the process that runs a function from :func:`dumps_function`: make its source lines readable by
    tracebacks and warnings (``linecache``)."""
    from .._pickling import register_sources as register

    register(sources)


def __getattr__(name: str) -> Any:
    # PickledFunction imports cloudpickle: only when a runner that sends functions to other processes asks for it.
    if name == "PickledFunction":
        from .._fingerprint import PickledFunction

        return PickledFunction
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
