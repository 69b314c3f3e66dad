"""``DaskTaskRun``: each attempt runs as one task on a ``dask.distributed`` cluster (extra ``taskrun[dask]``).

Built on the public runner hooks only: ``prepare`` sends the task's function to the cluster
once and readies the call's arguments, ``start_attempt`` submits one Dask task per attempt,
``stop_attempt`` cancels it, and ``upstream_value`` hands a dependent its upstream's Dask
future so that data stays on the workers. The retry loop, timeouts, the ledger and callbacks
are the handle's, in the calling process.
"""

from __future__ import annotations

import atexit
import sys
import threading
from typing import Any, ClassVar, TypeGuard, TypeVar

import cloudpickle

try:
    import distributed
except ImportError as _missing:  # pragma: no cover - the extra is missing
    raise ImportError(
        f'DaskTaskRun needs dask.distributed, which is not installed ({_missing}); install the extra: pip install "taskrun[dask]"'
    ) from _missing

from ...errors import SerializationError
from ..base import PLAIN_TYPES, Attempt, BaseTaskRun, R, check_setting_int, drop_pools, registered_pools, shared_pool
from . import _client, _guard, _outcome, _remote
from ._client import DaskPool

__all__ = ["DaskTaskRun"]

_ISOLATE = (None, "thread", "process")
_RunT = TypeVar("_RunT", bound=BaseTaskRun[Any])
_CONTAINERS = (list, tuple, dict, set, frozenset)


class DaskTaskRun(BaseTaskRun[R]):
    """Runs each attempt as one task on a ``dask.distributed`` cluster.

    Settings: ``address`` (a scheduler's, e.g. ``"tcp://scheduler:8786"``) or ``client`` (a
    ``distributed.Client`` of yours, never closed by taskrun); with neither, a ``LocalCluster``
    of ``n_workers`` processes (default: one per core) with ``threads_per_worker`` threads
    (default 1), ``memory_limit`` each and ``dashboard_address`` (None: no dashboard) is started
    on first use (by a thread of taskrun's: calls return at once, and wait PENDING) and closed at
    exit; runner classes that differ only in settings that do not change the cluster share it.
    ``isolate="process"`` runs each attempt in a child process
    on its worker, so that ``stop()`` and a timeout end it (and its process group); by default
    (``isolate="thread"``) a stopped or timed-out attempt runs on in its worker thread until it
    returns, its result discarded, and ``taskrun.stop_requested()`` turns True inside it.
    """

    address: ClassVar[str | None] = None
    client: ClassVar[Any] = None
    n_workers: ClassVar[int | None] = None
    threads_per_worker: ClassVar[int | None] = 1
    memory_limit: ClassVar[str | int | float | None] = None
    dashboard_address: ClassVar[str | None] = None
    isolate: ClassVar[str | None] = None
    settings: ClassVar[dict[str, Any]] = {
        "address": None, "client": None, "n_workers": None, "threads_per_worker": 1, "memory_limit": None,
        "dashboard_address": None, "isolate": None,
    }

    # Per call, set by prepare(): the function's id on the cluster, how the arguments travel, and what is sent.
    _pool_used: DaskPool | None = None
    _fn_id: str | None = None
    _mode: int = _remote.PLAIN
    _payload: Any = ()
    _via_dask = False  # an argument is an upstream run's Dask future
    _key_prefix = ""

    @staticmethod
    def validate_setting(name: str, value: Any) -> None:
        if name in ("n_workers", "threads_per_worker"):
            check_setting_int("DaskTaskRun", name, value)
        elif name in ("address", "dashboard_address"):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"DaskTaskRun setting {name} must be a str or None, got {value!r}")
        elif name == "client":
            if value is not None and not isinstance(value, distributed.Client):
                raise TypeError(f"DaskTaskRun setting client must be a distributed.Client or None, got {value!r}")
        elif name == "isolate":
            if value not in _ISOLATE:
                raise ValueError(f"DaskTaskRun setting isolate must be None, 'thread' or 'process', got {value!r}")
        elif name == "memory_limit":
            if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
                raise TypeError(f"DaskTaskRun setting memory_limit must be a str such as '2GiB', a number of bytes, "
                                f"or None, got {value!r}")

    @classmethod
    def configure(cls: type[_RunT], **settings: Any) -> type[_RunT]:
        """A subclass with these settings (see :meth:`BaseTaskRun.configure`); ``address`` and ``client`` exclude each other."""
        address = settings.get("address", getattr(cls, "address", None))
        client = settings.get("client", getattr(cls, "client", None))
        if address is not None and client is not None:
            raise ValueError(
                f"{cls.__name__}: give address= (taskrun connects to that scheduler) or client= (your own "
                f"distributed.Client), not both; got address={address!r} and client={client!r}"
            )
        return super().configure(**settings)

    @classmethod
    def _pool(cls) -> DaskPool:
        pool: DaskPool | None = registered_pools.get(cls)
        if pool is None:
            if cls.address is None and cls.client is None:
                _guard.check_main_guard(cls.__name__)
            pool = shared_pool(cls, lambda: DaskPool(cls))
        return pool

    # ---- dependencies: an upstream's future, kept until its dependents finish --------------------

    def start(self) -> bool:
        args, kwargs = self.args, self.kwargs
        if kwargs or any(type(arg) not in PLAIN_TYPES for arg in args):
            upstream = _dask_runs((*args, *kwargs.values()) if kwargs else args, [])
            if upstream:
                _client.hold(upstream)
                self.add_done_callback(_LetGo(upstream, args, kwargs))
        return super().start()

    def upstream_value(self, upstream: BaseTaskRun[Any]) -> Any:
        """An upstream DaskTaskRun on the same client passes its Dask future (its data stays on the
        workers); any other upstream, its result. So does every upstream of a task with a ledger:
        the call's key in the ledger is made of its arguments' values."""
        if isinstance(upstream, DaskTaskRun) and self.task.ledger is None:
            future = _client.kept_future(upstream)
            if future is not None and future.client is type(self)._pool().client:  # None until connected
                self._via_dask = True
                return future
        return upstream.get_result()

    # ---- the runner hooks -------------------------------------------------------------------------

    def prepare(self) -> None:
        pool = self._pool_used = type(self)._pool()
        self._fn_id = pool.function_id(self.task)
        self._key_prefix = f"taskrun-{self.name}-{self.id.rpartition('#')[2]}-{_client.SESSION}-a"
        args, kwargs = self.args, self.kwargs
        if not kwargs:
            for arg in args:
                if type(arg) not in PLAIN_TYPES:
                    break
            else:
                self._mode, self._payload = _remote.PLAIN, args
                return
        if self._via_dask or _client.contains_future((*args, *kwargs.values())):
            self._mode, self._payload = _remote.VIA_DASK, (args, kwargs)  # Dask puts the futures' data in
            return
        try:
            data = _outcome.dumps((args, kwargs))
            if b"__main__" in data:
                # pickle refers to classes of __main__ by name, and a worker's __main__ is not the caller's
                data = cloudpickle.dumps((args, kwargs), _outcome.PROTOCOL)
        except Exception as exc:
            raise SerializationError(
                f"the arguments of {self.id} could not be pickled to send to the Dask cluster: {exc}"
            ) from exc
        self._mode, self._payload = _remote.BYTES, data

    def start_attempt(self, attempt: Attempt) -> None:
        pool = self._pool_used
        key = self._key_prefix + str(attempt.number)
        for _ in range(3):
            if pool is None or pool.closed:  # shut down, or it could not connect: a new pool, which tries again
                pool = self._pool_used = type(self)._pool()
                self._fn_id = pool.function_id(self.task)
            if pool.submit(attempt, key, self._fn_id, self._mode, self._payload):  # type: ignore[arg-type]
                return
            pool = None
        raise RuntimeError(f"{type(self).__name__}: its Dask pool closed at every try to send {attempt.run.id}")

    def stop_attempt(self, attempt: Attempt) -> None:
        pool = self._pool_used
        if pool is not None:
            pool.stop_call(attempt)

    @classmethod
    def shutdown(cls, wait: bool = True) -> None:
        for pool in drop_pools(cls):
            pool.shutdown(wait=wait)


def _is_dask_run(value: object) -> TypeGuard[DaskTaskRun[Any]]:
    return isinstance(value, DaskTaskRun)


def _dask_runs(values: Any, found: list[DaskTaskRun[Any]]) -> list[DaskTaskRun[Any]]:
    """The DaskTaskRun handles among ``values`` and inside the plain containers among them."""
    for value in values:
        if _is_dask_run(value):
            if value not in found:
                found.append(value)
        elif type(value) in _CONTAINERS:
            _dask_runs(value.values() if type(value) is dict else value, found)
    return found


class _LetGo:
    """A dependent's done callback: its upstream runs may let their futures go, and so may its arguments."""

    __slots__ = ("upstream", "args", "kwargs")

    def __init__(self, upstream: list[DaskTaskRun[Any]], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.upstream = upstream
        self.args = args  # as given: with the upstream handles, not their futures (put in when it starts)
        self.kwargs = kwargs

    def __call__(self, run: BaseTaskRun[Any]) -> None:
        _client.release(self.upstream)
        run.args, run.kwargs = self.args, self.kwargs


def _shutdown_before_dask() -> None:
    """At exit, before Dask can no longer work: attempts already sent finish first, as under the
    other runners (unless the program crashed), then a cluster taskrun started is closed."""
    crashed = getattr(sys, "last_value", None) is not None or getattr(sys, "last_exc", None) is not None
    try:
        DaskTaskRun.shutdown(wait=not crashed)
    except KeyboardInterrupt:
        DaskTaskRun.shutdown(wait=False)


# The interpreter shuts thread pool executors down (Dask's own, which its scheduler and client use)
# in threading's exit hooks, newest first and before any atexit handler: ours is registered after
# Dask's imports registered theirs, so it runs while Dask still works. atexit too, in case the hook
# is missing (it is private to threading); the second call finds nothing left to do.
_register_threading_exit = getattr(threading, "_register_atexit", None)
if _register_threading_exit is not None:
    _register_threading_exit(_shutdown_before_dask)
atexit.register(_shutdown_before_dask)
