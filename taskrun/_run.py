"""The run handle every runner shares: one state machine, waiting, callbacks and the retry loop.

A runner is a :class:`BaseTaskRun` subclass that says *where* an attempt executes by
implementing the runner hooks (``start_attempt`` and, optionally, ``stop_attempt``,
``prepare`` and ``shutdown``). Everything else -- retries, timeouts, the ledger,
callbacks, waiting -- lives here, once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Generator
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from . import _deps
from ._timer import TimerHandle, timer
from .errors import TaskStillRunning, TaskStopped, TaskTimeout, attach_traceback

if TYPE_CHECKING:
    from ._task import Task

logger = logging.getLogger("taskrun")

R = TypeVar("R")
RunT = TypeVar("RunT", bound="BaseTaskRun[Any]")


class Status(str, Enum):
    """Where a run is in its life. PENDING and RUNNING are unfinished; the rest are final."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"
    SKIPPED = "skipped"  # skipped by a condition (reserved: nothing produces it yet); a cached run is SUCCEEDED

    def __str__(self) -> str:
        return self.value


FINISHED = frozenset({Status.SUCCEEDED, Status.FAILED, Status.STOPPED, Status.SKIPPED})
_PENDING, _RUNNING, _SUCCEEDED = Status.PENDING, Status.RUNNING, Status.SUCCEEDED  # enum lookups cost on hot paths

_local = threading.local()
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

_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})


def _one_line(text: str, limit: int = 100) -> str:
    """``text`` on one line, cut to ``limit`` characters: a repr stays readable in a notebook."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def stop_requested() -> bool:
    """True inside a task whose run was asked to stop (or timed out); poll it to end early."""
    attempt = getattr(_local, "attempt", None)
    if attempt is None:
        return False
    if attempt.stop_requested:
        return True
    deadline = attempt._deadline  # an inline attempt past its timeout: it fails anyway, so it may stop
    return deadline is not None and time.monotonic() >= deadline


class Attempt:
    """One try at running a call. A runner executes it and reports its outcome exactly once.

    ``fn``, ``args`` and ``kwargs`` are the call; ``number`` counts from 1. Runners call
    :meth:`mark_started` when it really begins (timeouts count from there), then
    :meth:`set_result` or :meth:`set_exception`; only the first report counts.
    ``runner_state`` is free for the runner's own bookkeeping.
    """

    __slots__ = ("run", "number", "stop_requested", "runner_state", "_reported", "_timeout_timer", "_started_at", "_deadline")

    def __init__(self, run: BaseTaskRun[Any], number: int) -> None:
        self.run = run
        self.number = number
        self.stop_requested = False
        self.runner_state: Any = None
        self._reported = False
        self._timeout_timer: TimerHandle | None = None
        self._started_at: float | None = None
        self._deadline: float | None = None  # monotonic end of a timeout nobody enforces (inline runners)

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
        return self._reported

    def mark_started(self) -> None:
        """Say the attempt has begun executing: the run turns RUNNING and its timeout starts."""
        self.run._attempt_started(self)

    def set_result(self, value: Any) -> None:
        self.run._attempt_finished(self, True, value)

    def set_exception(self, exc: BaseException) -> None:
        self.run._attempt_finished(self, False, exc)

    def execute(self) -> None:
        """Run the call in the current thread and report its outcome (the in-process runners' way)."""
        self.mark_started()
        previous = getattr(_local, "attempt", None)
        _local.attempt = self
        try:
            value = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:
            self.set_exception(attach_traceback(exc))
            if isinstance(exc, KeyboardInterrupt):
                raise
        else:
            self.set_result(value)
        finally:
            _local.attempt = previous

    def __repr__(self) -> str:
        return f"<Attempt {self.number} of {self.run.id}>"


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
    #: True: attempts run in the caller (``SequentialTaskRun``). Upstream runs are then waited for
    #: in the caller, and ``map`` feeds its items in the caller instead of a feeder thread.
    inline: ClassVar[bool] = False

    def __init__(self, task: Task[..., R], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.task = task
        self.args = args
        self.kwargs = kwargs
        self.name: str = task.name
        self._number = number = next(_run_numbers)
        self.cached = False
        self.key: str | None = None
        self._lock = (_locks or _new_locks())[number & _LOCK_MASK]  # never held while taking another run's
        self._waiters: list[threading.Lock] | None = None  # one held lock per blocked wait(); released when finished
        self._status = _PENDING
        self._finishing = False  # the outcome is decided; publishing may still be under way
        self._result: Any = None
        self._exception: BaseException | None = None
        self._attempts = 0
        self._current: Attempt | None = None
        self._retry_timer: TimerHandle | None = None
        self._callbacks: list[Callable[[BaseTaskRun[R]], Any]] | None = None  # made by the first callback
        self._group: Any = None  # the RunGroup of the map() that made this run: told first when it finishes
        self.started_at: float | None = None
        self.finished_at: float | None = None

    # ---- runner hooks ------------------------------------------------------------------

    def prepare(self) -> None:
        """Runner hook, called once in the caller before the first attempt.

        Raise to reject the call (for example arguments that cannot be sent to a worker).
        """

    def start_attempt(self, attempt: Attempt) -> None:
        """Runner hook: begin executing ``attempt`` somewhere and report its outcome on it.

        Return promptly unless the runner is inline by design; call ``attempt.mark_started()``
        when it begins and ``attempt.set_result(v)`` / ``attempt.set_exception(e)`` once.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement start_attempt(attempt)")

    def stop_attempt(self, attempt: Attempt) -> None:
        """Runner hook: end a started attempt (on ``stop()`` or a timeout). May block until it is gone.

        ``attempt.stop_requested`` is already True when this is called. The default does no
        more, which suits runners whose functions poll :func:`taskrun.stop_requested`.
        """

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
        if current is not None and current._started_at is None:
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
        if getattr(threading.current_thread(), "taskrun_delivers", False):
            raise RuntimeError(
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
            self.stop()
        except Exception:
            logger.exception("%s: stopping the run after KeyboardInterrupt failed", self.id)

    def get_result(self, timeout: float | None = None, *, wait: bool = True, raise_exceptions: bool = True) -> R:
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
            return exc  # type: ignore[return-value]
        return self._result  # type: ignore[no-any-return]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The run's failure (``TaskStopped`` for a stopped run), or None if it succeeded.

        Waits like :meth:`wait` (Ctrl-C stops the run); ``TimeoutError`` if ``timeout`` passes first.
        """
        if not self.wait(timeout):
            raise TimeoutError(f"{self.id} did not finish within {timeout} s; it is still running")
        return self._exception

    def stop(self) -> bool:
        """Stop the run: a queued one never starts, a running one is ended by its runner.

        True if this call stopped it; False if it had already finished (or was finishing).
        """
        return self._conclude(Status.STOPPED, exc=TaskStopped(f"{self.id} was stopped"))

    def add_done_callback(self, fn: Callable[[BaseTaskRun[R]], Any]) -> None:
        """Call ``fn(run)`` once the run has finished; at once if it already has."""
        with self._lock:
            if self._status not in FINISHED:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        self._invoke_callback(fn)

    def __await__(self) -> Generator[Any, None, R]:
        if self._status not in FINISHED:
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

    def _start(self) -> None:
        """Begin the run: called once by the task right after the handle is made.

        Arguments that are handles of other runs are waited for here (see ``_deps``) before
        :meth:`_launch`: without blocking the caller, unless the runner is ``inline``.
        """
        if not self.kwargs:
            for arg in self.args:
                if type(arg) not in _PLAIN:
                    break
            else:
                self._launch()  # the usual call: nothing in the arguments can be a handle
                return
        upstream = _deps.find_upstream(self.args, self.kwargs)
        if upstream is None:
            self._launch()
        elif self.inline:
            _deps.wait_inline(self, upstream)
        else:
            _deps.start_after(self, upstream)

    def _launch(self) -> None:
        """Start the first attempt, once the arguments are final (the ledger may answer first)."""
        ledger = self.task.ledger
        if ledger is not None:
            ledger._launch(self)  # a stored result finishes the run here; else prepare(), claim, attempt
            return
        self.prepare()
        self._begin_attempt()

    def _begin_attempt(self) -> None:
        lock = self._lock
        # Not `with`: on every call's path, `with` on a lock costs twice acquire() and release()
        # (it makes two bound methods and parses the arguments of __enter__).
        lock.acquire()
        try:
            if self._finishing:
                return
            self._retry_timer = None
            self._attempts += 1
            attempt = self._current = Attempt(self, self._attempts)
        finally:
            lock.release()
        try:
            self.start_attempt(attempt)
        except Exception as exc:
            attempt.set_exception(exc)

    def _attempt_started(self, attempt: Attempt, now: float | None = None) -> None:
        if now is None:
            now = time.time()
        lock = self._lock
        lock.acquire()  # see _begin_attempt
        try:
            if self._finishing or attempt is not self._current or attempt._started_at is not None:
                return
            attempt._started_at = now
            if self._status is _PENDING:
                self._status = _RUNNING
                self.started_at = now
            timeout = self.task.timeout
            if timeout is not None:
                # Armed under the lock: an outcome reported meanwhile then finds the timer and cancels it.
                if self.preemptive_timeout:
                    attempt._timeout_timer = timer.call_later(timeout, lambda: self._attempt_timed_out(attempt))
                else:
                    attempt._deadline = time.monotonic() + timeout
        finally:
            lock.release()

    def _attempt_timed_out(self, attempt: Attempt) -> None:
        # Claim the attempt's outcome first: once stop_requested is set, a function that polls it
        # returns at once, and its late report must not win over the timeout.
        with self._lock:
            if attempt._reported:
                return
            attempt._reported = True
        attempt.stop_requested = True
        try:
            self.stop_attempt(attempt)
        except Exception:
            logger.exception("%s: stopping timed-out attempt %d failed", self.id, attempt.number)
        self._attempt_outcome(attempt, False, self._timeout_error(attempt))

    def _timeout_error(self, attempt: Attempt) -> TaskTimeout:
        return TaskTimeout(f"{self.id} attempt {attempt.number} ran longer than its timeout of {self.task.timeout} s")

    def _attempt_finished(self, attempt: Attempt, ok: bool, value: Any) -> None:
        """The retry loop: record one attempt's outcome, then finish the run or try again."""
        lock = self._lock
        lock.acquire()  # see _begin_attempt
        try:
            if attempt._reported:
                return
            attempt._reported = True
            # The common case, a success with nothing left to check, is decided right here.
            finished = ok and (self.task.timeout is None or self.preemptive_timeout)
            if finished:
                if self._finishing or attempt is not self._current:
                    return
                self._finishing = True
        finally:
            lock.release()
        if finished:
            if attempt._timeout_timer is not None:
                attempt._timeout_timer.cancel()
            self._record(_SUCCEEDED, value, None)
            return
        self._attempt_outcome(attempt, ok, value)

    def _attempt_succeeded(self, attempt: Attempt, value: Any, began: float | None, ended: float) -> Any:
        """``attempt.set_result(value)`` for a runner that reports many outcomes at once (the process pool).

        ``began`` is when the attempt began, for one the runner never marked started (it learned
        of its start and its end together); ``ended`` is when the runner learned the outcome.
        When nothing waits on the run -- no waiter, callback, ledger or timeout -- the run is
        decided and published in one step, and its group is returned instead of told, so the
        runner can count many runs of a group at once.
        """
        lock = self._lock
        lock.acquire()  # see _begin_attempt
        try:
            if attempt._reported:
                return None
            attempt._reported = True
            if attempt._started_at is None and began is not None:
                attempt._started_at = began
                if self.started_at is None:
                    self.started_at = began
            if self._finishing or attempt is not self._current:
                return None
            # No timeout (so no timer either), nobody waiting, no ledger: publish here.
            if self._waiters is None and self._callbacks is None and self.key is None and self.task.timeout is None:
                self._finishing = True
                return self._make_final(_SUCCEEDED, value, None, ended)[1]
        finally:
            lock.release()
        self._attempt_outcome(attempt, True, value)
        return None

    def _attempt_outcome(self, attempt: Attempt, ok: bool, value: Any) -> None:
        """The rest of the retry loop, for an attempt whose outcome is claimed (``_reported`` set)."""
        with self._lock:
            if self._finishing or attempt is not self._current:
                return
        if attempt._timeout_timer is not None:
            attempt._timeout_timer.cancel()
        timeout = self.task.timeout
        if (
            timeout is not None
            and not self.preemptive_timeout
            and attempt._started_at is not None
            and time.time() - attempt._started_at > timeout
        ):
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
        self._call_later(delay, self._begin_attempt)

    def _call_later(self, delay: float, fn: Callable[[], None]) -> None:
        if delay <= 0:
            fn()
            return
        with self._lock:
            if self._finishing:
                return
            self._retry_timer = timer.call_later(delay, fn, on_drop=self._retry_dropped)

    def _retry_dropped(self) -> None:
        """taskrun shut down while this run waited to retry: it ends STOPPED rather than hang."""
        self._conclude(Status.STOPPED, exc=TaskStopped(f"{self.id} was stopped: taskrun shut down before its retry"))

    def _conclude(self, status: Status, value: Any = None, exc: BaseException | None = None) -> bool:
        """Decide the run's outcome (once), record it, then publish it to waiters and callbacks."""
        with self._lock:
            if self._finishing:
                return False
            self._finishing = True
            attempt, retry_timer = self._current, self._retry_timer
            # Claimed under the lock, as every other report is: a late outcome cannot win over the stop.
            stopping = None
            if status is Status.STOPPED and attempt is not None and not attempt._reported:
                attempt._reported = True
                attempt.stop_requested = True
                stopping = attempt
        if retry_timer is not None:
            retry_timer.cancel()
        if stopping is not None:
            if stopping._timeout_timer is not None:
                stopping._timeout_timer.cancel()
            try:
                self.stop_attempt(stopping)
            except Exception:
                logger.exception("%s: stopping attempt %d failed", self.id, stopping.number)
        self._record(status, value, exc)
        return True

    def _record(self, status: Status, value: Any, exc: BaseException | None) -> None:
        """Make the outcome durable (the ledger commits it), then publish it."""
        if self.key is not None:  # the ledger launched this run
            self.task.ledger._record(self, status, value, exc)
            return
        self._publish(status, value, exc)

    def _publish(self, status: Status, value: Any = None, exc: BaseException | None = None) -> None:
        """Make the run's state final (see ``_make_final``), then wake waiters, tell its group, run callbacks."""
        lock = self._lock
        lock.acquire()  # see _begin_attempt
        try:
            callbacks, group, waiters = self._make_final(status, value, exc, time.time())
        finally:
            lock.release()
        for waiter in waiters or ():
            waiter.release()
        if group is not None:
            self._invoke_callback(group._on_done)
        for fn in callbacks or ():
            self._invoke_callback(fn)

    def _make_final(
        self, status: Status, value: Any, exc: BaseException | None, finished_at: float
    ) -> tuple[list[Callable[[BaseTaskRun[R]], Any]] | None, Any, list[threading.Lock] | None]:
        """The one place a run's state becomes final (the run's lock held).

        Returns the callbacks, group and waiters to tell; ``_publish`` tells them, and the
        one-step success of ``_attempt_succeeded`` (where there are none but the group) its runner.
        """
        self._status = status
        self._result = value
        self._exception = exc
        self.finished_at = finished_at
        callbacks, self._callbacks = self._callbacks, None
        group, self._group = self._group, None
        current, self._current = self._current, None
        if current is not None and current._started_at is None and status is Status.STOPPED:
            self._attempts -= 1  # stopped while queued in its runner: never made
        waiters, self._waiters = self._waiters, None
        return callbacks, group, waiters

    def _invoke_callback(self, fn: Callable[[BaseTaskRun[R]], Any]) -> None:
        try:
            fn(self)
        except Exception:
            logger.exception("done callback %r of %s raised", fn, self.id)


def _resolve(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(None)
