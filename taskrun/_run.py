"""The run handle every runner shares: one state machine, waiting, callbacks and the retry loop.

A run goes PENDING -> RUNNING -> SUCCEEDED, FAILED or STOPPED (a cached run is SUCCEEDED
with ``cached`` True). Only this class changes that state, under the run's lock, in three
steps: the outcome is *decided* once (``_finishing``); it is made durable (the task's
ledger, if any, commits it and says so); then :meth:`BaseTaskRun._make_final` makes it the
run's state and the waiters, the run's group and its done callbacks are told, outside
every lock.

A runner says *where* an attempt executes by implementing the runner hooks (``start_attempt``
and, optionally, ``stop_attempt``, ``prepare`` and ``shutdown``) and reports on the
:class:`Attempt` it is given. The ledger answers questions (a stored result? the key
claimed? the record written?) through callbacks the run hands it; the run acts on them.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import os
import sys
import threading
import time
import types
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar, cast, overload

from . import _deps
from ._launcher import launcher
from ._status import FINISHED, Status
from ._timer import TimerHandle, timer
from .errors import TaskStillRunning, TaskStopped, TaskTimeout, attach_traceback

if TYPE_CHECKING:
    import asyncio

    from ._ledger import Ledger
    from ._task import Task

logger = logging.getLogger("taskrun")

if TYPE_CHECKING:
    from typing_extensions import TypeVar as TypeVarWithDefault

    #: A run's value. A runner class named without it (``MultiprocessTaskRun``, what ``configure()``
    #: returns) is a runner of any value: for type checkers only, as no code reads it at run time.
    R = TypeVarWithDefault("R", default=Any)
else:
    R = TypeVar("R")
RunT = TypeVar("RunT", bound="BaseTaskRun[Any]")
#: Told first when runs finish: a RunGroup's counter (a runner reporting many outcomes at once
#: tells it about many runs in one call; ``all_succeeded``: each one ran and succeeded).
Notify = Callable[[Sequence["BaseTaskRun[Any]"], bool], None]

_PENDING, _RUNNING, _SUCCEEDED = Status.PENDING, Status.RUNNING, Status.SUCCEEDED  # enum lookups cost on hot paths

_local = threading.local()
#: The attempt of the asyncio task running here (each asyncio task runs in a context of its own).
_context_attempt: contextvars.ContextVar[BaseTaskRun.Attempt | None] = contextvars.ContextVar("taskrun_attempt", default=None)
_CoroutineType: type[types.CoroutineType[Any, Any, Any]] = types.CoroutineType
_CO_COROUTINE = 0x80  # inspect.CO_COROUTINE: the code of an async def (inspect is not imported on the way in)
_run_numbers = itertools.count(1)

# Runs take their lock from a fixed set instead of making one each: a lock is one more object
# for the garbage collector to track and traverse per run (it halved the collections' time in
# a 20,000-call map). Sound because no code holds two runs' locks at once. After a fork the set is made
# anew on first use, as a lock another thread held at the fork stays held in the child.
_LOCK_MASK = 1023
_locks: list[threading.Lock] | None = None


def _new_locks() -> list[threading.Lock]:
    global _locks
    _locks = [threading.Lock() for _ in range(_LOCK_MASK + 1)]
    return _locks


def _forget_locks() -> None:
    global _locks
    _locks = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks)

#: Argument types that cannot be (or hold) a handle: a call with only these needs no dependency scan.
PLAIN_TYPES = frozenset({int, float, str, bytes, bool, type(None)})


def _one_line(text: str, limit: int = 100) -> str:
    """``text`` on one line, cut to ``limit`` characters: a repr stays readable in a notebook."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


_store_for: Callable[[Any], Any] | None = None


def store_for(ledger: Any) -> Any:
    """The ledger's per-process store (its module is imported with the first ledger run: it brings sqlite3)."""
    global _store_for
    if _store_for is None:
        from ._ledger import store_for as found

        _store_for = found
    return _store_for(ledger)


def stop_requested() -> bool:
    """True inside a task whose run was asked to stop (or timed out); poll it to end early."""
    attempt: BaseTaskRun.Attempt | None = getattr(_local, "attempt", None)
    if attempt is None:
        attempt = _context_attempt.get()
        if attempt is None:
            flag = getattr(_local, "stop_flag", None)  # a runner running the function itself, e.g. on a remote worker
            return flag is not None and bool(flag())
    if attempt.stop_requested:
        return True
    deadline = attempt.deadline  # an inline attempt past its timeout: it fails anyway, so it may stop
    return deadline is not None and time.monotonic() >= deadline


def set_stop_flag(flag: Callable[[], bool] | None) -> Callable[[], bool] | None:
    """Make :func:`stop_requested` in the current thread return ``flag()``; returns the flag it replaces.

    For runners that call the function outside any :class:`Attempt` of this process (a remote
    worker, a child process): set it before the call, restore the previous one after. An
    attempt executing in the thread (``Attempt.execute``) takes precedence. None removes it.
    """
    previous: Callable[[], bool] | None = getattr(_local, "stop_flag", None)
    _local.stop_flag = flag
    return previous


class BaseTaskRun(Generic[R]):
    """A handle on one call of a task: poll it, wait for it, await it, stop it, read its result.

    Subclass it to write a runner: implement :meth:`start_attempt` (and :meth:`stop_attempt`
    if a running attempt can be ended); set configurable settings in ``settings``.
    """

    #: Settings ``configure()`` accepts, with their defaults. Subclasses extend it.
    settings: ClassVar[dict[str, Any]] = {}
    #: True: a timed-out attempt is ended with ``stop_attempt`` when its timeout passes.
    #: False: the runner cannot interrupt it, so an overrun attempt fails when it returns.
    preemptive_timeout: ClassVar[bool] = True
    #: True: attempts run in the caller, one after another (``SequentialTaskRun``): retries
    #: wait there, upstream runs are waited for there, and ``map`` feeds in the caller.
    inline: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A runner's ``settings`` are its defaults: each becomes a class attribute unless the class sets one."""
        super().__init_subclass__(**kwargs)
        settings = cls.__dict__.get("settings")
        if isinstance(settings, dict):
            for name, default in cast("dict[str, Any]", settings).items():
                if name not in cls.__dict__:
                    setattr(cls, name, default)

    class Attempt:
        """One try at running a call, as its runner sees it (``taskrun.Attempt``).

        ``fn``, ``args`` and ``kwargs`` are the call; ``number`` counts from 1. The runner
        calls :meth:`mark_started` when it really begins (timeouts count from there), then
        :meth:`set_result` or :meth:`set_exception`; only the first report counts, and none
        after the run was stopped or the attempt timed out. ``runner_state`` is free for the
        runner's own bookkeeping.
        """

        __slots__ = ("run", "number", "runner_state", "stop_requested", "deadline", "_reported", "_started_at")

        def __init__(self, run: BaseTaskRun[Any], number: int) -> None:
            self.run: BaseTaskRun[Any] = run
            self.number: int = number
            self.runner_state: Any = None
            #: True once the run was stopped or the attempt timed out: the function may end early
            #: (``taskrun.stop_requested()`` reads it) and its outcome no longer counts.
            self.stop_requested: bool = False
            #: ``time.monotonic()`` at which the timeout of an attempt nobody can interrupt runs out (inline runners).
            self.deadline: float | None = None
            self._reported = False
            self._started_at: float | None = None

        @property
        def task(self) -> Task[..., Any]:
            return self.run.task

        @property
        def fn(self) -> Callable[..., Any]:
            return self.run.task.fn

        @property
        def args(self) -> tuple[Any, ...]:
            return self.run.args

        @property
        def kwargs(self) -> dict[str, Any]:
            return self.run.kwargs

        @property
        def timeout(self) -> float | None:
            return self.run.task.timeout

        @property
        def reported(self) -> bool:
            """True once the outcome is in, or will never count (the run was stopped, the attempt timed out)."""
            return self._reported or self.stop_requested

        @property
        def started_at(self) -> float | None:
            """When the attempt began (``time.time()``), or None while it waits to start."""
            return self._started_at

        def mark_started(self, at: float | None = None) -> None:
            """Say the attempt has begun: the run turns RUNNING and its timeout starts.

            ``at`` is when it began (``time.time()``) if the runner measured it elsewhere (a
            worker, a remote cluster); the timeout then counts from that moment.
            """
            run = self.run
            lock = run._lock
            # Not `with`: on every call's path, `with` on a lock costs twice acquire() and release()
            # (it makes two bound methods and parses the arguments of __enter__).
            lock.acquire()
            try:
                self._start_locked(at)
            finally:
                lock.release()

        def _start_locked(self, at: float | None) -> None:
            run = self.run
            if run._finishing or self is not run._current or self._started_at is not None or self.stop_requested:
                return
            now = time.time()
            began = now if at is None or at > now else at
            self._started_at = began
            if run._status is _PENDING:
                run._status = _RUNNING
                run.started_at = began
            timeout = run.task.timeout
            if timeout is not None:
                # Armed under the lock: an outcome reported meanwhile then finds the timer and cancels it.
                left = max(0.0, timeout - (now - began))
                if run.preemptive_timeout:
                    run._timeout_timer = timer.call_later(left, self._timed_out)
                else:
                    self.deadline = time.monotonic() + left

        def set_result(self, value: Any, *, started_at: float | None = None) -> None:
            """Report success. ``started_at`` (``time.time()``): when it began, for an attempt never marked started."""
            self._report(True, value, started_at)

        def set_exception(self, exc: BaseException, *, started_at: float | None = None) -> None:
            """Report failure with ``exc`` (the task's own exception, or the runner's error)."""
            self._report(False, exc, started_at)

        def mark_current(self) -> None:
            """Make :func:`taskrun.stop_requested` read this attempt in the current context.

            For runners that run many attempts on one thread, each in a context of its own (an
            asyncio task runs in a copy of the context it was created in): call it inside that context.
            """
            _context_attempt.set(self)

        def execute(self) -> None:
            """Run the call in the current thread and report its outcome (the in-process runners' way)."""
            self.mark_started()
            previous = getattr(_local, "attempt", None)
            _local.attempt = self
            try:
                value = self.run.task.fn(*self.run.args, **self.run.kwargs)
                if type(value) is _CoroutineType:  # an async def: run it to completion on a loop of its own
                    value = run_coroutine(value, self.run.id)
            except BaseException as exc:
                self.set_exception(attach_traceback(exc))
                if isinstance(exc, KeyboardInterrupt):
                    raise
            else:
                self.set_result(value)
            finally:
                _local.attempt = previous

        @staticmethod
        def report_results(
            outcomes: Iterable[tuple[BaseTaskRun.Attempt, Any, float | None]], finished_at: float | None = None
        ) -> None:
            """Report the successes of many attempts at once, as ``(attempt, value, started_at)``.

            For a runner that learns many outcomes together (a worker's results in one read):
            each run nobody waits on is made final in one step, and the runs of one ``map``
            are counted by their group together. ``finished_at`` (``time.time()``) is when
            the runner learned them.
            """
            ended = time.time() if finished_at is None else finished_at
            notify: Notify | None = None
            batch: list[BaseTaskRun[Any]] = []
            batches: dict[Notify, list[BaseTaskRun[Any]]] = {}
            for attempt, value, started_at in outcomes:
                told = attempt._report(True, value, started_at, ended)
                if told is not None:
                    if told is not notify:
                        notify = told
                        batch = batches.setdefault(told, [])
                    batch.append(attempt.run)
            for told, runs in batches.items():
                try:
                    told(runs, True)
                except Exception:
                    logger.exception("taskrun could not count %d finished runs in their group", len(runs))

        def _report(self, ok: bool, value: Any, started_at: float | None, quietly_at: float | None = None) -> Notify | None:
            """The retry loop begins here: claim this attempt's outcome (once), then decide the run's.

            ``quietly_at``: a success of :meth:`report_results`, finished at that time. When nothing
            waits on the run (no waiter, callback, ledger or timeout), it is made final right here,
            and its group counter is returned for the batch to tell instead of told.
            """
            run = self.run
            lock = run._lock
            lock.acquire()  # see mark_started
            try:
                if self._reported or self.stop_requested:
                    return None
                self._reported = True
                if started_at is not None and self._started_at is None:
                    self._started_at = started_at  # learned with the end: dated back
                    if run.started_at is None:
                        run.started_at = started_at
                if run._finishing or self is not run._current:
                    return None
                task = run.task
                if (
                    quietly_at is not None and run._waiters is None and run._callbacks is None
                    and run.key is None and task.timeout is None
                ):
                    run._finishing = True
                    run._make_final(_SUCCEEDED, value, None, quietly_at)
                    notify, run._notify = run._notify, None
                    return notify
                timer_handle, run._timeout_timer = run._timeout_timer, None
                # The common case, a success with nothing left to check, is decided right here.
                decided = ok and (task.timeout is None or run.preemptive_timeout)
                if decided:
                    run._finishing = True
            finally:
                lock.release()
            if timer_handle is not None:
                timer_handle.cancel()
            if decided:
                run._record(_SUCCEEDED, value, None)
            else:
                run._attempt_outcome(self, ok, value)
            return None

        def _timed_out(self) -> None:
            run = self.run
            # Claim the outcome first: once stop_requested is set, a function that polls it returns
            # at once, and its late report must not win over the timeout.
            with run._lock:
                if self._reported or self.stop_requested or self is not run._current or run._finishing:
                    return
                self.stop_requested = True
                run._timeout_timer = None
            try:
                run.stop_attempt(self)
            except Exception:
                logger.exception("%s: stopping timed-out attempt %d failed", run.id, self.number)
            run._attempt_outcome(self, False, run._timeout_error(self))

        def __repr__(self) -> str:
            return f"<Attempt {self.number} of {self.run.id}>"

    def __init__(
        self, task: Task[..., R], args: tuple[Any, ...], kwargs: dict[str, Any], *, notify: Notify | None = None
    ) -> None:
        self.task: Task[..., R] = task
        self.args: tuple[Any, ...] = args
        self.kwargs: dict[str, Any] = kwargs
        self.name: str = task.name
        self._number = number = next(_run_numbers)
        self.cached: bool = False
        #: The call's key in the task's ledger (None without a ledger, or until it is computed).
        self.key: str | None = None
        self._lock = (_locks or _new_locks())[number & _LOCK_MASK]  # never held while taking another run's
        self._waiters: list[threading.Lock] | None = None  # one held lock per blocked wait(); released when finished
        self._status = _PENDING
        self._started = False
        self._finishing = False  # the outcome is decided; making it durable and publishing may still be under way
        self._result: Any = None
        self._exception: BaseException | None = None
        self._attempts = 0
        self._current: BaseTaskRun.Attempt | None = None
        self._timeout_timer: TimerHandle | None = None  # of the current attempt
        self._retry_timer: TimerHandle | None = None
        self._callbacks: list[Callable[[BaseTaskRun[R]], Any]] | None = None  # made by the first callback
        self._notify = notify
        self.started_at: float | None = None
        self.finished_at: float | None = None

    # ---- runner hooks ------------------------------------------------------------------

    def prepare(self) -> None:
        """Runner hook, called once in the caller before the first attempt.

        Raise to reject the call (for example arguments that cannot be sent to a worker).
        """

    def start_attempt(self, attempt: BaseTaskRun.Attempt) -> None:
        """Runner hook: begin executing ``attempt`` somewhere and report its outcome on it.

        Return promptly unless the runner is inline by design; call ``attempt.mark_started()``
        when it begins and ``attempt.set_result(v)`` / ``attempt.set_exception(e)`` once.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement start_attempt(attempt)")

    def stop_attempt(self, attempt: BaseTaskRun.Attempt) -> None:
        """Runner hook: end a started attempt (on ``stop()`` or a timeout). May block until it is gone.

        ``attempt.stop_requested`` is already True when this is called. The default does no
        more, which suits runners whose functions poll :func:`taskrun.stop_requested`.
        """

    def upstream_value(self, upstream: BaseTaskRun[Any]) -> Any:
        """Runner hook: what the call receives in place of ``upstream``, a handle among its arguments.

        Called once ``upstream`` has succeeded, before ``prepare()``. The default is its result; a
        runner whose runs keep their results where they ran may pass a reference instead.
        """
        return upstream.get_result()

    @classmethod
    def shutdown(cls, wait: bool = True) -> None:
        """Runner hook: release what the runner holds (pools, workers). Called at exit too."""

    @classmethod
    def configure(cls: type[RunT], **settings: Any) -> type[RunT]:
        """A subclass with these settings as class attributes; the same settings give the same class."""
        from ._config import configure

        return configure(cls, settings)

    # ---- the public handle ------------------------------------------------------------

    @property
    def id(self) -> str:
        """Unique id of this run in this process: the task name and a sequence number, ``inc#3``."""
        return f"{self.name}#{self._number}"

    @property
    def status(self) -> Status:
        return self._status

    @property
    def attempts(self) -> int:
        """Attempts begun so far: one still queued in its runner, or stopped there, does not count."""
        current = self._current
        if current is not None and current.started_at is None:
            return self._attempts - 1
        return self._attempts

    @property
    def duration(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    def done(self) -> bool:
        return self._status in FINISHED

    def is_running(self) -> bool:
        return self._status not in FINISHED

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run has finished or ``timeout`` seconds pass; True if it finished.

        Ctrl-C (``KeyboardInterrupt``) while waiting stops the run, then propagates.
        """
        if self._status in FINISHED:
            return True
        delivers = getattr(threading.current_thread(), "taskrun_delivers", False)
        if delivers:
            # A str says why in that thread's own words ({run}: this run's id, {awaited}: "run").
            raise RuntimeError(
                delivers.format(run=self.id, awaited="run") if isinstance(delivers, str) else
                f"waiting for {self.id} on a taskrun pool's own thread (in a done callback) would block that "
                "pool for good; wait in your own thread, or chain work by passing the handle to a task"
            )
        waiter = threading.Lock()
        waiter.acquire()
        try:
            with self._lock:
                if self._status in FINISHED:
                    return True
                if self._waiters is None:
                    self._waiters = []
                self._waiters.append(waiter)
            if timeout is None or timeout >= threading.TIMEOUT_MAX:  # float("inf") too: wait for good
                waiter.acquire()
            elif not waiter.acquire(True, max(0.0, timeout)):
                self._forget_waiter(waiter)
        except KeyboardInterrupt:
            self._forget_waiter(waiter)
            self._interrupted()
            raise
        return self._status in FINISHED

    def _forget_waiter(self, waiter: threading.Lock) -> None:
        with self._lock:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)

    def _interrupted(self) -> None:
        """Ctrl-C while the caller waited for this run: stop it (the caller then re-raises)."""
        if self._status in FINISHED:
            return
        logger.info("%s: interrupted while waiting for it (KeyboardInterrupt); stopping it", self.id)
        try:
            self.stop("interrupted while waited for (KeyboardInterrupt)")
        except Exception:
            logger.exception("%s: stopping the run after KeyboardInterrupt failed", self.id)

    @overload
    def get_result(self, timeout: float | None = None, *, wait: bool = True, raise_exceptions: Literal[True] = True) -> R: ...

    @overload
    def get_result(
        self, timeout: float | None = None, *, wait: bool = True, raise_exceptions: bool
    ) -> R | BaseException: ...

    def get_result(
        self, timeout: float | None = None, *, wait: bool = True, raise_exceptions: bool = True
    ) -> R | BaseException:
        """The run's value, waiting for it first.

        A failed run raises the task's exception (the traceback where it ran is its
        ``__cause__``), a stopped one :class:`TaskStopped`; with ``raise_exceptions=False``
        that exception is returned instead. ``wait=False`` on an unfinished run raises
        :class:`TaskStillRunning`; a ``timeout`` that passes first raises ``TimeoutError``
        and leaves the run going. Ctrl-C while waiting stops the run (see :meth:`wait`).
        """
        if self._status not in FINISHED:
            if not wait:
                raise TaskStillRunning(f"{self!r} has not finished; use wait=True, wait() or done() first")
            if not self.wait(timeout):
                raise TimeoutError(f"{self.id} did not finish within {timeout} s; it is still running")
        exc = self._exception
        if exc is not None:
            if raise_exceptions:
                raise exc
            return exc
        value: R = self._result  # a succeeded run's result
        return value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The run's failure (``TaskStopped`` for a stopped run), or None if it succeeded.

        Waits like :meth:`wait` (Ctrl-C stops the run); ``TimeoutError`` if ``timeout`` passes first.
        """
        if not self.wait(timeout):
            raise TimeoutError(f"{self.id} did not finish within {timeout} s; it is still running")
        return self._exception

    def stop(self, reason: str | None = None) -> bool:
        """Stop the run: a queued one never starts, a running one is ended by its runner.

        True if this call stopped it; False if it had already finished (or was finishing).
        ``reason`` is shown in the :class:`TaskStopped` it then holds.
        """
        message = f"{self.id} was stopped" if reason is None else f"{self.id} was stopped: {reason}"
        return self._conclude(Status.STOPPED, exc=TaskStopped(message))

    def add_done_callback(self, fn: Callable[[BaseTaskRun[R]], Any]) -> None:
        """Call ``fn(run)`` once the run has finished; at once if it already has.

        ``fn`` is a plain function, called on the thread that finished the run; an ``async def``
        is refused with ``TypeError`` (nothing would await its coroutine): await the run instead.
        """
        if getattr(getattr(fn, "__code__", None), "co_flags", 0) & _CO_COROUTINE:
            raise TypeError(
                f"add_done_callback({getattr(fn, '__qualname__', fn)}) got an async def: a done callback is called, "
                "not awaited, so its coroutine would never run. Pass a plain function, or in async code "
                "`await run` and go on from there"
            )
        with self._lock:
            if self._status not in FINISHED:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        self._invoke_callback(fn)

    def __await__(self) -> Generator[Any, None, R]:
        if self._status not in FINISHED:
            import asyncio

            loop = asyncio.get_running_loop()
            waiter = loop.create_future()

            def wake(_run: BaseTaskRun[R]) -> None:
                try:
                    loop.call_soon_threadsafe(_resolve, waiter)
                except RuntimeError:  # the loop closed before the run finished
                    pass

            self.add_done_callback(wake)
            yield from waiter
        return self.get_result()

    def __repr__(self) -> str:
        status = self._status
        parts = [f"<TaskRun {self.id} {status.value}"]
        if self.started_at is not None:
            end = self.finished_at if self.finished_at is not None else time.time()
            parts.append(f"{end - self.started_at:.1f}s")
        attempts = self.attempts
        if attempts:
            parts.append(f"attempt {attempts}/{self.task.retries + 1}")
        if self.cached:
            parts.append("cached")
        text = " ".join(parts)
        if status is Status.FAILED and self._exception is not None:
            text += f": {type(self._exception).__name__}: {_one_line(str(self._exception))}"
        return text + ">"

    # ---- the life of a run: start, attempts, retries, the end ---------------------------

    def start(self) -> bool:
        """Begin the run; calling a task does this. False if it had begun already.

        Arguments that are handles of other runs are waited for first, without blocking the
        caller (unless the runner is ``inline``). If the call cannot start -- its arguments
        cannot be sent, its ledger key cannot be made -- the run ends FAILED and the error is
        raised here.
        """
        # Not under the lock: whoever made the handle starts it, once (calling again returns False).
        if self._started or self._finishing:
            return False
        self._started = True
        try:
            self.task.check_call(self.args, self.kwargs)
            if not self.kwargs:
                for arg in self.args:
                    if type(arg) not in PLAIN_TYPES:
                        break
                else:
                    self._launch()  # the usual call: nothing in the arguments can be a handle
                    return True
            upstream = _deps.find_upstream(self.args, self.kwargs, BaseTaskRun)
            if upstream is None:
                self._launch()
            elif self.inline:
                self._wait_for_upstream_here(upstream)
            else:
                self._launch_after(upstream)
        except BaseException as exc:
            self._conclude(Status.FAILED, exc=exc)
            if isinstance(exc, KeyboardInterrupt):
                self.stop()
            raise
        return True

    def _launch_after(self, upstream: list[BaseTaskRun[Any]]) -> None:
        """Launch once every upstream run succeeded (on the launcher thread); fail as soon as one did not."""
        remaining = [len(upstream)]

        def on_upstream_done(up: BaseTaskRun[Any]) -> None:
            if not _deps.succeeded(up):
                self._conclude(Status.FAILED, exc=_deps.upstream_error(self.id, up))
                return
            with self._lock:
                remaining[0] -= 1
                last = remaining[0] == 0 and not self._finishing
            if last:
                launcher.submit(self._launch_resolved, self._launch_dropped)

        for up in upstream:
            up.add_done_callback(on_upstream_done)

    def _launch_resolved(self) -> None:
        """Put the upstream results into the arguments, then launch (unless stopped meanwhile)."""
        if self._finishing:
            return
        try:
            self._put_upstream_values()
            self._launch()
        except Exception as exc:  # e.g. prepare() rejected the resolved arguments: nobody is there to raise to
            self._conclude(Status.FAILED, exc=exc)

    def _launch_dropped(self) -> None:
        self.stop("taskrun shut down before its upstream runs' results could be passed to it")

    def _wait_for_upstream_here(self, upstream: list[BaseTaskRun[Any]]) -> None:
        """Inline runners: wait for the upstream runs in the caller, then launch (or fail)."""
        for up in upstream:
            up.wait()
            if not _deps.succeeded(up):
                self._conclude(Status.FAILED, exc=_deps.upstream_error(self.id, up))
                return
        self._put_upstream_values()
        self._launch()

    def _put_upstream_values(self) -> None:
        value_of = self.upstream_value
        self.args = _deps.resolve(self.args, BaseTaskRun, value_of)
        if self.kwargs:
            self.kwargs = {k: _deps.resolve(v, BaseTaskRun, value_of) for k, v in self.kwargs.items()}

    def _launch(self) -> None:
        """Start the first attempt, once the arguments are final: the ledger may answer first."""
        ledger = self.task.ledger
        if ledger is None:
            self.prepare()
            if self.inline:
                self._first_attempt()
            else:
                self._begin_attempt()
            return
        store = store_for(ledger)
        key = self.key = store.key_for(self.task, self.args, self.kwargs)
        found, value = store.lookup(self.name, key)
        if found:
            self._finish_cached(value)
            return
        self.prepare()
        self._admit()

    def _admit(self) -> None:
        """Ask the ledger for the key; :meth:`_on_admission` acts on its answer."""
        store = store_for(cast("Ledger", self.task.ledger))  # a run is admitted only if its task has one
        if self.inline:
            while not self._finishing:
                verdict, value = store.admit_here(self)
                if verdict != "wait":
                    self._on_admission(verdict, value)
                    return
                value.wait()  # the run of this process that holds the key
        else:
            store.admit(self, self._on_admission)

    def _on_admission(self, verdict: str, value: Any) -> None:
        """The ledger's answer: "claimed" (run it), "cached" (its stored result), "wait" (for that run of
        this process, then ask again), "failed" or "stopped" (with the error)."""
        if self._finishing:
            return
        if verdict == "claimed":
            self._first_attempt()
        elif verdict == "cached":
            self._finish_cached(value)
        elif verdict == "wait":
            owner: BaseTaskRun[Any] = value
            owner.add_done_callback(lambda _owner: self._admit_again())
        elif verdict == "stopped":
            self._conclude(Status.STOPPED, exc=value)
        else:
            self._conclude(Status.FAILED, exc=value)

    def _admit_again(self) -> None:
        try:
            store = store_for(cast("Ledger", self.task.ledger))  # see _admit
            found, value = store.lookup(self.name, cast(str, self.key))  # set before the run asked to be admitted
            if found:
                self._finish_cached(value)
            else:
                self._admit()
        except Exception as exc:
            self._conclude(Status.FAILED, exc=exc)

    def _finish_cached(self, value: Any) -> None:
        """The ledger had this call's result: the run succeeded without running."""
        with self._lock:
            if self._finishing:
                return
            self._finishing = True
            self.cached = True
        self._publish(_SUCCEEDED, value, None)

    def _first_attempt(self) -> None:
        if not self.inline:
            self._begin_attempt()
            return
        # Inline: every attempt runs here, one after another, and retries wait here (never on the
        # timer's thread). A retry scheduled meanwhile lands in this frame (see _schedule_retry).
        previous = getattr(_local, "inline", None)
        frame: list[Any] = [self, 0.0]
        _local.inline = frame
        try:
            while frame[1] is not None:
                delay, frame[1] = frame[1], None
                if delay > 0:
                    time.sleep(delay)
                self._begin_attempt()
        except KeyboardInterrupt:
            self.stop("interrupted (KeyboardInterrupt)")
            raise
        finally:
            _local.inline = previous

    def _begin_attempt(self) -> None:
        lock = self._lock
        lock.acquire()  # see Attempt.mark_started
        try:
            if self._finishing:
                return
            self._retry_timer = None
            self._attempts += 1
            attempt = self._current = BaseTaskRun.Attempt(self, self._attempts)
        finally:
            lock.release()
        try:
            self.start_attempt(attempt)
        except Exception as exc:
            attempt.set_exception(exc)

    def _timeout_error(self, attempt: BaseTaskRun.Attempt) -> TaskTimeout:
        return TaskTimeout(f"{self.id} attempt {attempt.number} ran longer than its timeout of {self.task.timeout} s")

    def _attempt_outcome(self, attempt: BaseTaskRun.Attempt, ok: bool, value: Any) -> None:
        """The rest of the retry loop, for an attempt whose outcome is claimed."""
        with self._lock:
            if self._finishing or attempt is not self._current:
                return
        timeout = self.task.timeout
        started = attempt.started_at
        if timeout is not None and not self.preemptive_timeout and started is not None and time.time() - started > timeout:
            ok, value = False, self._timeout_error(attempt)
        if ok:
            self._conclude(Status.SUCCEEDED, value=value)
            return
        policy = self.task.policy
        if not policy.should_retry(value, attempt.number):
            self._conclude(Status.FAILED, exc=value)
            return
        delay = policy.delay(attempt.number)
        logger.info(
            "%s attempt %d/%d failed with %s: %s; retrying in %.2f s",
            self.id, attempt.number, policy.retries + 1, type(value).__name__, value, delay,
        )
        self._schedule_retry(delay)

    def _schedule_retry(self, delay: float) -> None:
        frame = getattr(_local, "inline", None)
        if frame is not None and frame[0] is self:
            frame[1] = delay  # the inline loop in this very caller runs it
            return
        if delay <= 0:
            self._begin_attempt()
            return
        with self._lock:
            if self._finishing:
                return
            self._retry_timer = timer.call_later(delay, self._begin_attempt, on_drop=self._retry_dropped)

    def _retry_dropped(self) -> None:
        """taskrun shut down while this run waited to retry: it ends STOPPED rather than hang."""
        self.stop("taskrun shut down before its retry")

    def _conclude(self, status: Status, value: Any = None, exc: BaseException | None = None) -> bool:
        """Decide the run's outcome (once), make it durable, then publish it to waiters and callbacks."""
        with self._lock:
            if self._finishing:
                return False
            self._finishing = True
            attempt, retry_timer, timeout_timer = self._current, self._retry_timer, self._timeout_timer
            self._retry_timer = self._timeout_timer = None
            # Claimed under the lock, as every report is: a late outcome cannot win over the stop.
            stopping = None
            if status is Status.STOPPED and attempt is not None and not attempt.reported:
                attempt.stop_requested = True
                stopping = attempt
        if retry_timer is not None:
            retry_timer.cancel()
        if timeout_timer is not None:
            timeout_timer.cancel()
        if stopping is not None:
            try:
                self.stop_attempt(stopping)
            except Exception:
                logger.exception("%s: stopping attempt %d failed", self.id, stopping.number)
        self._record(status, value, exc)
        return True

    def _record(self, status: Status, value: Any, exc: BaseException | None) -> None:
        """Make the outcome durable (the ledger commits it and says so), then publish it."""
        if self.key is None:  # no ledger
            self._publish(status, value, exc)
            return
        store = store_for(cast("Ledger", self.task.ledger))  # a run has a key only if its task has a ledger
        if status is Status.STOPPED:
            # Published at once: a stopped call runs again next time whether or not this record lands.
            self._publish(status, value, exc)
            store.record(self, status, value, exc, None)
        elif self.inline:
            self._on_recorded(status, value, exc, store.record_here(self, status, value, exc))
        else:
            store.record(self, status, value, exc, self._on_recorded)

    def _on_recorded(self, status: Status, value: Any, exc: BaseException | None, problem: BaseException | None) -> None:
        """The ledger's answer to a record: written (``problem`` None), or not, and why."""
        if problem is not None and exc is not None:
            note = f"taskrun: this outcome was not recorded in the ledger ({problem}); the call runs again next time"
            if sys.version_info >= (3, 11):
                exc.add_note(note)
        self._publish(status, value, exc)

    def _publish(self, status: Status, value: Any = None, exc: BaseException | None = None) -> None:
        """Make the run's state final (see ``_make_final``), then wake waiters, tell its group, run callbacks."""
        lock = self._lock
        lock.acquire()  # see Attempt.mark_started
        try:
            callbacks, waiters = self._make_final(status, value, exc, time.time())
        finally:
            lock.release()
        for waiter in waiters or ():
            waiter.release()
        notify = self._notify
        if notify is not None:
            self._notify = None
            try:
                notify((self,), status is _SUCCEEDED and not self.cached)  # nothing else to count for a plain success
            except Exception:
                logger.exception("taskrun could not count %s in its group", self.id)
        for fn in callbacks or ():
            self._invoke_callback(fn)

    def _make_final(
        self, status: Status, value: Any, exc: BaseException | None, finished_at: float
    ) -> tuple[list[Callable[[BaseTaskRun[R]], Any]] | None, list[threading.Lock] | None]:
        """The one place a run's state becomes final (the run's lock held).

        Returns the callbacks and waiters to tell; ``_publish`` tells them (and the group).
        """
        self._status = status
        self._result = value
        self._exception = exc
        self.finished_at = finished_at
        callbacks, self._callbacks = self._callbacks, None
        current, self._current = self._current, None
        if status is Status.STOPPED and current is not None and current.started_at is None:
            self._attempts -= 1  # stopped while queued in its runner: never made
        waiters, self._waiters = self._waiters, None
        return callbacks, waiters

    def _invoke_callback(self, fn: Callable[[BaseTaskRun[R]], Any]) -> None:
        try:
            returned = fn(self)
        except Exception:
            logger.exception("done callback %r of %s raised", fn, self.id)
            return
        if type(returned) is _CoroutineType:  # an async callable add_done_callback could not tell (a partial...)
            returned.close()  # never awaited: closed, so Python does not warn about it, pointing here
            logger.error(
                "done callback %r of %s returned a coroutine, which nothing awaits: it did not run (done callbacks "
                "are called, not awaited; in async code `await run` instead)", fn, self.id,
            )


Attempt = BaseTaskRun.Attempt


def succeeded_values(runs: Iterable[BaseTaskRun[R]]) -> list[R]:
    """The values of runs that have all succeeded, read directly (a group's ``results()`` hot path)."""
    return [run._result for run in runs]  # pyright: ignore[reportPrivateUsage]  # (this module's own class)


def run_coroutine(coro: Any, what: str) -> Any:
    """Run ``coro`` (what the function of ``what`` returned) to completion on an event loop of its own, here.

    Refused inside a running event loop, which this thread would block: such a call belongs on
    ``AsyncTaskRun`` (or is awaited).
    """
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        value: Any = asyncio.run(coro)
        while type(value) is _CoroutineType:  # the async def returned a coroutine (a forgotten await): run it too
            value = asyncio.run(value)
        return value
    coro.close()  # never awaited: closed, so Python does not warn about it
    raise RuntimeError(
        f"{what} is an async function called inside a running event loop, which running it here would block; "
        "give the task runner=AsyncTaskRun (the default for an async def), or await the coroutine yourself"
    )


def _resolve(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(None)
