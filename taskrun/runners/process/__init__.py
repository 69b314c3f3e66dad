"""``MultiprocessTaskRun``: attempts run on a pool of reusable worker processes.

How a call flows (the parent's threads on the left, one worker process on the right)::

    caller: task(x) -> MultiprocessTaskRun.prepare()      pickles the arguments, and the function
                                                          as it is now (_functions)
            start_attempt(attempt) -> ProcessPool.submit  an idle worker gets it at once; else it
                                                          waits in the pool's queue
    supervisor thread (ProcessPool._supervise):
            poll(result pipes, sentinels, wake-up pipe)
              -> FrameReader.read (never blocks)          ->  _worker._serve: receive, run, send
              -> outcomes: Attempt.report_results /           one (kind, call_id, value, seconds)
                 set_exception, outside the pool's lock       per call, in order
              -> top busy workers up in batches (_batching), reap dead workers (WorkerDied),
                 end stopped or timed-out ones (SIGTERM, then SIGKILL to the process group)

Modules: ``_protocol`` (messages and framing, both directions), ``_worker`` (the worker's
loop), ``_workers`` (the parent's handle on one worker process), ``_pool`` (the pool and its
supervisor), ``_batching`` (how many calls a worker gets ahead), ``_functions`` (a task's
function, pickled as it is at call time).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import cloudpickle
import multiprocess

from ...errors import SerializationError
from ..base import (
    PLAIN_TYPES,
    Attempt,
    BaseTaskRun,
    R,
    check_setting_int,
    drop_pools,
    exit_handler_first,
    registered_pools,
    shared_pool,
)
from . import _functions
from ._protocol import PROTOCOL, dumps
from ._workers import default_start_method

if TYPE_CHECKING:
    from ._pool import ProcessPool

exit_handler_first()  # multiprocess (imported above) ends its children at exit: our pools go first

#: Plain arguments (str and bytes up to this long) travel in the batch's own pickle.
PLAIN_MAX = 256
#: ``type``, said to give ``type[Any]`` for any value (pyright makes ``type()`` of an ``Any`` unknown).
_type_of: Callable[[object], type[Any]] = type

__all__ = ["MultiprocessTaskRun"]


class MultiprocessTaskRun(BaseTaskRun[R]):
    """Runs calls on a pool of reusable worker processes; best for CPU-bound work.

    Settings: ``start_method`` (fork where available, else spawn), ``max_workers``
    (default ``os.cpu_count()``), ``max_tasks_per_worker`` (None: reuse forever; 1: a fresh
    process per call). ``stop()`` and a timeout end the worker's whole process group
    (SIGTERM, then SIGKILL) and the pool replaces it. Functions, lambdas and closures travel
    with cloudpickle, as they are when each call is made (see ``_functions``); arguments that
    cannot be pickled raise :class:`SerializationError` at call time.
    """

    start_method: ClassVar[str | None] = default_start_method()
    max_workers: ClassVar[int | None] = os.cpu_count() or 1
    max_tasks_per_worker: ClassVar[int | None] = None
    settings: ClassVar[dict[str, Any]] = {
        "start_method": start_method, "max_workers": max_workers, "max_tasks_per_worker": max_tasks_per_worker,
    }
    # Made by prepare(): the call's arguments as sent (the pickled (args, kwargs), or the args tuple
    # itself when it holds only small plain values, which the batch's own pickle carries), and its
    # function as pickled when the call was made.
    _payload: bytes | tuple[Any, ...] | None = None
    _function: _functions.Payload
    _pool_used: ProcessPool | None = None  # the pool of the first attempt, which retries go to

    @staticmethod
    def validate_setting(name: str, value: Any) -> None:
        if name == "start_method":
            if value is not None and value not in multiprocess.get_all_start_methods():
                available = ", ".join(multiprocess.get_all_start_methods())
                raise ValueError(
                    f"MultiprocessTaskRun setting start_method={value!r} is not available here; use one of {available}"
                )
        else:
            check_setting_int("MultiprocessTaskRun", name, value)

    @classmethod
    def _pool(cls) -> ProcessPool:
        pool: ProcessPool | None = registered_pools.get(cls)
        if pool is None:
            from ._pool import ProcessPool

            pool = shared_pool(cls, lambda: ProcessPool(cls))
        return pool

    def prepare(self) -> None:
        task = self.task
        # The function as it is now: its pickle is reused while nothing it captured has changed.
        pickled = task.runner_cache.get(_functions.CACHE_KEY)
        current = pickled.current if pickled is not None else None
        if current is not None and current[0]():  # PickledFunction.payload(), inline: it runs at every call
            self._function = current[1]
        else:
            if pickled is None:
                pickled = task.runner_cache.setdefault(_functions.CACHE_KEY, _functions.PickledFunction(task.fn))
            try:
                self._function = pickled.payload()
            except Exception as exc:
                raise SerializationError(f"the function of task {task.name} could not be pickled: {exc}") from exc
        args, kwargs = self.args, self.kwargs
        if not kwargs:
            for arg in args:
                kind = _type_of(arg)
                if kind not in PLAIN_TYPES or (kind is str or kind is bytes) and len(arg) > PLAIN_MAX:
                    break
            else:
                self._payload = args
                return
        try:
            call = (args, kwargs)
            data = dumps(call)
            if b"__main__" in data and not self._main_names_resolve(call):
                # pickle names classes and functions of __main__; a spawned worker's __main__ lacks
                # those of a notebook or `python -c`, a forked one those made after it was forked:
                # send them by value.
                data = cloudpickle.dumps(call, PROTOCOL)
            self._payload = data
        except Exception as exc:
            raise SerializationError(
                f"the arguments of {self.id} could not be pickled to send to a worker process: {exc}"
            ) from exc

    def _main_names_resolve(self, call: Any) -> bool:
        """True if every worker can look up, by name, the objects of __main__ that ``call`` names."""
        if (self.start_method or default_start_method()) != "fork":
            return False
        pool: ProcessPool | None = registered_pools.get(type(self))
        known = pool.forked_main if pool is not None else None
        if known is None:  # no worker yet: they will be forked from __main__ as it is now
            return True
        return _functions.main_references_known(call, known)

    def start_attempt(self, attempt: Attempt) -> None:
        # Retries go to the pool of the first attempt while it lives (it may be finishing at exit).
        pool = self._pool_used
        if pool is None or pool.closing in ("now", "closed"):
            if self._payload is None:  # a subclass's prepare() did not call ours
                MultiprocessTaskRun[Any].prepare(self)
            # _pool(), inline: a classmethod call costs about 2% of a map call
            pool = self._pool_used = registered_pools.get(type(self)) or self._pool()
        pool.submit(attempt, self._payload, self._function)  # type: ignore[arg-type]  # prepare() has set it

    def stop_attempt(self, attempt: Attempt) -> None:
        pool = self._pool_used
        if pool is not None and attempt.runner_state is not None:
            pool.stop_call(attempt)

    @classmethod
    def shutdown(cls, wait: bool = True) -> None:
        for pool in drop_pools(cls):
            pool.shutdown(wait=wait)
