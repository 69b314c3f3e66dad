"""``AsyncTaskRun``: the coroutines of ``async def`` tasks, thousands at once, on an event loop thread of taskrun's.

Each configured runner class has one loop, run by a daemon thread (``taskrun-async-N``) that
starts on the first call and ends with ``taskrun.shutdown()`` or the interpreter. Calls are
handed to the loop in bursts: a caller appends its attempt to a queue and wakes the loop only
if no wake-up is pending, so a ``map`` of 20,000 calls costs a handful of wake-ups, not 20,000.
On the loop, an attempt waits for one of ``max_concurrency`` slots, then runs as an asyncio
task; successes are reported together once per loop iteration (``Attempt.report_results``).

``stop()`` and a timeout cancel the asyncio task: the coroutine gets ``CancelledError`` at its
next ``await`` (so ``finally`` blocks and ``async with`` clean up) while the run is already
STOPPED (or failed with ``TaskTimeout``), and its slot goes to the next call. The loop ends
without waiting for such a coroutine beyond ``CANCEL_GRACE``: one that catches the
``CancelledError`` and goes on is abandoned then, as a stopped thread call is. A watchdog
thread notices one step of a task that holds the loop for ``slow_callback_seconds`` and logs
a warning naming it.

asyncio is imported when the first loop starts, not by ``import taskrun``.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import os
import queue
import threading
import time
import types
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, ClassVar, cast

from ..errors import attach_traceback
from .base import Attempt, BaseTaskRun, R, check_setting_int, drop_pools, registered_pools, shared_pool

if TYPE_CHECKING:
    import asyncio

__all__ = ["AsyncTaskRun"]

logger: logging.Logger = logging.getLogger("taskrun")

#: Seconds a stopped or timed-out coroutine gets, from its cancel, to run its cleanup (``finally``,
#: ``async with``) when its loop ends; then the loop closes without it (its coroutine is closed
#: where it waits) and a warning names its run.
CANCEL_GRACE = 1.0
#: Shown by a blocking wait (``wait()``, ``get_result()``, ``results()``...) called on the loop thread
#: (``{run}``: what is waited for; ``{awaited}``: "run" or "group").
LOOP_THREAD_WAIT = (
    "waiting for {run} on taskrun's event loop thread (in an async task or a done callback) would block every async "
    "task, and for good if it needs this loop; in an async task await it instead: `await {awaited}` (with a "
    "timeout: `await asyncio.wait_for({awaited}, seconds)`)"
)

_CoroutineType: type[types.CoroutineType[Any, Any, Any]] = types.CoroutineType
_RUN_AWAIT_CODE = BaseTaskRun.__await__.__code__  # the frames of `await run`
#: Seconds between looks, while every slot is taken and calls wait, for slots all held by runs awaiting runs of
#: the same runner (a deadlock, warned of once).
STARVED_CHECK_SECONDS = 1.0
_loop_numbers = itertools.count(1)


class AsyncTaskRun(BaseTaskRun[R]):
    """Runs the coroutines of ``async def`` tasks on an event loop thread owned by taskrun; best for many I/O calls.

    Settings: ``max_concurrency`` (coroutines in flight at once, default 1,000; the rest wait
    PENDING for a slot; None: no limit) and ``slow_callback_seconds`` (default 0.1: a task
    that holds the loop longer, with ``time.sleep`` or a blocking client, is logged as a
    WARNING on the ``taskrun`` logger naming it; None: not watched). ``stop()`` and a timeout
    cancel the coroutine at its next ``await``. A plain function given this runner runs on the
    loop thread (keep it short); if it returns an awaitable, that is awaited.
    """

    max_concurrency: ClassVar[int | None] = 1000
    slow_callback_seconds: ClassVar[float | None] = 0.1
    settings: ClassVar[dict[str, Any]] = {"max_concurrency": max_concurrency, "slow_callback_seconds": slow_callback_seconds}
    preemptive_timeout: ClassVar[bool] = True

    @staticmethod
    def validate_setting(name: str, value: Any) -> None:
        if name == "slow_callback_seconds":
            if value is None:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"AsyncTaskRun setting slow_callback_seconds must be a number > 0 or None, got {value!r}")
            if not value > 0 or value == float("inf"):
                raise ValueError(f"AsyncTaskRun setting slow_callback_seconds must be > 0 and finite (or None), got {value!r}")
        else:
            check_setting_int("AsyncTaskRun", name, value)

    @classmethod
    def _pool(cls) -> LoopPool:
        own: LoopPool | None = getattr(threading.current_thread(), "taskrun_loop_pool", None)
        if own is not None and own.runner is cls and not own.ended:
            return own  # a retry from the loop of a pool shutting down (and so unregistered) while it finishes its runs
        return shared_pool(cls, lambda: LoopPool(cls))

    def start_attempt(self, attempt: Attempt) -> None:
        pool: LoopPool | None = registered_pools.get(type(self))
        if pool is None:
            pool = self._pool()
        attempt.runner_state = pool
        pool.submit(attempt)

    def stop_attempt(self, attempt: Attempt) -> None:
        pool = attempt.runner_state
        if pool is not None:
            pool.cancel(attempt)

    @classmethod
    def shutdown(cls, wait: bool = True) -> None:
        for pool in drop_pools(cls):
            pool.shutdown(wait=wait)


def _awaited_run(task: asyncio.Task[Any]) -> BaseTaskRun[Any] | None:
    """The run that ``task`` awaits (``await run`` somewhere down its chain of awaits), if it awaits one."""
    obj: Any = task.get_coro()
    for _ in range(1000):  # the chain of awaits: coroutines (cr_await), generators (gi_yieldfrom)
        if getattr(obj, "gi_code", None) is _RUN_AWAIT_CODE:
            frame = obj.gi_frame
            run: BaseTaskRun[Any] | None = frame.f_locals.get("self") if frame is not None else None  # that frame's
            return run
        obj = getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None)
        if obj is None:
            break
    return None


_held: queue.SimpleQueue[object] | None = None  # what hold_until_exit hands to its thread...
_held_pid = 0  # ...in this process


def hold_until_exit(objects: list[object]) -> None:
    """Keep ``objects`` (abandoned tasks and coroutines) alive until the process ends, from a parked daemon thread.

    A coroutine that ignores GeneratorExit is closed again by Python when it is collected (at
    the latest at exit), with no loop running, where a bare ``except:`` around an await loops
    for good. Only a daemon thread's frame is never cleared at exit; a module's globals are.
    """
    global _held, _held_pid
    with _holder_lock:
        if _held is None or _held_pid != os.getpid():  # (a forked child has no such thread)
            held: queue.SimpleQueue[object] = queue.SimpleQueue()
            threading.Thread(target=_hold, args=(held,), name="taskrun-abandoned-coroutines", daemon=True).start()
            _held, _held_pid = held, os.getpid()
        held = _held
    for obj in objects:
        held.put(obj)


def _hold(incoming: queue.SimpleQueue[object]) -> None:
    kept: list[object] = []
    while True:
        kept.append(incoming.get())


_holder_lock = threading.Lock()


class LoopPool:
    """One event loop, its thread, and the attempts handed to it.

    Only the loop thread touches ``waiting``, ``running``, ``cancelled`` and ``succeeded``; other
    threads append to ``incoming`` and call into the loop with ``call_soon_threadsafe``.
    """

    def __init__(self, runner: type[AsyncTaskRun[Any]]) -> None:
        import asyncio

        self.runner: type[AsyncTaskRun[Any]] = runner
        self.limit: int | None = runner.max_concurrency
        self.slow: float | None = runner.slow_callback_seconds
        self.loop: asyncio.AbstractEventLoop = asyncio.new_event_loop()
        loop = self.loop
        # Bound once: called for every attempt.
        self.call_soon: Callable[..., asyncio.Handle] = loop.call_soon
        self.call_soon_threadsafe: Callable[..., asyncio.Handle] = loop.call_soon_threadsafe
        self.create_task: Callable[..., asyncio.Task[Any]] = loop.create_task
        self.current_task: Callable[..., asyncio.Task[Any] | None] = asyncio.current_task
        self.incoming: deque[Attempt] = deque()  # handed over by any thread, not yet seen by the loop
        self.scheduled: bool = False  # a _take_incoming is due on the loop
        self.waiting: deque[Attempt] = deque()  # taken, waiting for a slot
        self.running: dict[Attempt, asyncio.Task[None]] = {}  # each holds a slot
        # Stopped or timed out: cancelled, their slot given up, the loop waits for them CANCEL_GRACE s at most.
        # (task, time.monotonic() of the cancel)
        self.cancelled: dict[Attempt, tuple[asyncio.Task[None], float]] = {}
        self.succeeded: list[tuple[Attempt, Any, None]] = []  # reported together by _flush
        self.flush_due: bool = False
        self.delivering: int = 0  # runs whose outcome (and done callbacks) _flush is delivering
        self.delivered: list[tuple[Attempt, Any, None]] = []  # ...and which they are (for the watchdog's warning)
        self.flushes: int = 0  # deliveries so far (the watchdog tells one from the next)
        self.starved_check_due: bool = False  # a _check_starved is scheduled
        self.starved_warned: bool = False
        self.lock: threading.Lock = threading.Lock()
        self.shut: bool = False  # shutdown() was called
        self.closing: bool = False  # the loop finishes (or stops) what it has, then ends
        self.stopping: bool = False  # closing with wait=False: what is handed over now is stopped, not run
        self.ended: bool = False  # the loop has ended: it takes nothing more
        self.idle: asyncio.Future[None] | None = None  # resolved when a closing pool has nothing left
        number = next(_loop_numbers)
        self.thread: threading.Thread = threading.Thread(target=self._main, name=f"taskrun-async-{number}", daemon=True)
        self.thread.taskrun_delivers = LOOP_THREAD_WAIT  # type: ignore[attr-defined]  # see BaseTaskRun.wait
        self.thread.taskrun_loop_pool = self  # type: ignore[attr-defined]
        self.thread_id: int | None = None
        # The watchdog: the loop stamps `beat` every `interval` while it has work; a gap longer than `slow` is a block.
        self.beat: float = 0.0
        self.beating: bool = False
        self.interval: float = 0.0 if self.slow is None else max(0.005, self.slow / 4)
        self.busy: threading.Event = threading.Event()  # set while the loop has work: the watchdog watches only then
        self.watchdog: threading.Thread | None = None
        if self.slow is not None:
            self.watchdog = threading.Thread(target=self._watch, name=f"taskrun-async-{number}-watchdog", daemon=True)
        self.thread.start()
        if self.watchdog is not None:
            self.watchdog.start()

    # ---- any thread ---------------------------------------------------------------------

    def submit(self, attempt: Attempt) -> None:
        """Hand ``attempt`` to the loop; wake it only if no wake-up is pending already."""
        self.incoming.append(attempt)
        if not self.scheduled:
            # Set before the wake-up is sent and cleared by the loop before it takes the queue: an
            # attempt appended after the loop took the queue always finds it clear and wakes it.
            self.scheduled = True
            try:
                self.call_soon_threadsafe(self._take_incoming)
            except RuntimeError:  # the loop is closed
                self.scheduled = False
                self._refuse(attempt)
                return
        if self.ended:
            self._refuse(attempt)

    def _refuse(self, attempt: Attempt) -> None:
        try:
            self.incoming.remove(attempt)
        except ValueError:
            return  # the ending loop took it, and stops it
        raise RuntimeError(f"this {self.runner.__name__} event loop was shut down")

    def cancel(self, attempt: Attempt) -> None:
        """End a stopped or timed-out attempt: its coroutine is cancelled (on the loop, at its next ``await``)."""
        if threading.get_ident() == self.thread_id:
            self._cancel(attempt)
            return
        try:
            self.call_soon_threadsafe(self._cancel, attempt)
        except RuntimeError:
            pass  # the loop has ended: nothing of the attempt runs there

    def shutdown(self, wait: bool = True) -> None:
        """End the loop: ``wait=True`` lets every run it has finish; ``wait=False`` stops them (their cleanup may run)."""
        with self.lock:
            if self.shut:
                return
            self.shut = True
        try:
            self.call_soon_threadsafe(self._close, wait)
        except RuntimeError:
            pass  # already ended
        if threading.current_thread() is self.thread:
            return  # a task called shutdown(): the loop ends once it is idle (or its runs stopped), then the watchdog
        self.thread.join()
        watchdog = self.watchdog
        if watchdog is not None:
            watchdog.join()  # it leaves once it sees the loop `ended`

    def after_fork_in_child(self) -> None:
        """The child has no loop thread: this pool takes nothing more there (its loop is left unclosed, as it
        still looks running)."""
        self.ended = self.shut = True
        self.incoming = deque()

    # ---- the loop thread ----------------------------------------------------------------

    def _main(self) -> None:
        import asyncio

        loop = self.loop
        self.thread_id = threading.get_ident()
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            self._end()

    def _take_incoming(self) -> None:
        self.scheduled = False
        incoming = self.incoming
        running = self.running
        limit = self.limit
        while incoming:
            attempt = incoming.popleft()
            if attempt.reported:  # stopped while it was handed over
                continue
            if self.stopping or self.ended:  # (ended: handed over while the loop gave stopped runs their grace)
                attempt.run.stop("its event loop was shut down" if self.ended else "taskrun.shutdown(wait=False) was called")
                continue
            if limit is not None and len(running) >= limit:
                self.waiting.append(attempt)
                if not self.starved_check_due:
                    self.starved_check_due = True
                    self.loop.call_later(STARVED_CHECK_SECONDS, self._check_starved)
            else:
                self._start(attempt)
        if self.closing:
            self._check_idle()

    def _start(self, attempt: Attempt) -> None:
        self.running[attempt] = self.create_task(self._drive(attempt))
        if not self.beating and self.watchdog is not None:
            self.beating = True
            self.beat = time.monotonic()
            self.busy.set()
            self.loop.call_later(self.interval, self._heartbeat)

    async def _drive(self, attempt: Attempt) -> None:
        """Run one attempt in its asyncio task and report how it went (a success is reported by ``_flush``)."""
        try:
            if attempt.stop_requested:  # stopped before this task's first step
                return
            attempt.mark_started()
            attempt.mark_current()  # this task's context: taskrun.stop_requested() reads it
            run = attempt.run
            try:
                value = run.task.fn(*run.args, **run.kwargs)
                if type(value) is _CoroutineType or inspect.isawaitable(value):
                    value = await value
                    while type(value) is _CoroutineType:  # an async def returned a coroutine: a forgotten await
                        value = await value
            except GeneratorExit:  # this coroutine is being closed (an abandoned run: see _abandon)
                raise
            except BaseException as exc:  # noqa: B036 - the coroutine's failure (or its cancelling) is its outcome
                if not attempt.reported:  # else stopped or timed out: the CancelledError we sent, or too late
                    attempt.set_exception(attach_traceback(exc))
            else:
                self.succeeded.append((attempt, value, None))
                if not self.flush_due:
                    self.flush_due = True
                    self.call_soon(self._flush)
        finally:
            if self.running.pop(attempt, None) is None:
                self.cancelled.pop(attempt, None)  # stopped: it gave up its slot when it was cancelled
            elif self.waiting and not self.ended:
                self._start_waiting()
            if self.closing and not self.ended:
                self._check_idle()

    def _start_waiting(self) -> None:
        waiting = self.waiting
        running = self.running
        limit = self.limit
        while waiting and (limit is None or len(running) < limit):
            attempt = waiting.popleft()
            if not attempt.reported:
                self._start(attempt)

    def _flush(self) -> None:
        """Report the successes of this loop iteration together."""
        self.flush_due = False
        batch, self.succeeded = self.succeeded, []
        self.flushes += 1
        self.delivering = len(batch)
        self.delivered = batch
        try:
            Attempt.report_results(batch)
        except Exception:  # not one of these runs may be left unfinished: those not reported yet are, one by one
            logger.exception("%s: reporting %d results together failed", self.runner.__name__, len(batch))
            for attempt, value, _ in batch:
                try:
                    attempt.set_result(value)
                except Exception:
                    logger.exception("%s: reporting the result of %s failed", self.runner.__name__, attempt.run.id)
        finally:
            self.delivering = 0
            self.delivered = []
        if self.closing:
            self._check_idle()

    def _cancel(self, attempt: Attempt) -> None:
        task = self.running.get(attempt)
        if task is None:
            return  # still waiting for a slot: it is dropped when its turn comes
        coro = cast("Coroutine[Any, Any, None]", task.get_coro())  # the task of a _drive coroutine
        if inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
            return  # its first step is due: _drive sees the stop there (a cancel now would skip its bookkeeping)
        task.cancel("taskrun: the run was stopped or its attempt timed out")
        # Its slot goes to the next call now: a coroutine that catches the CancelledError and goes on must
        # not hold it for good (as a ThreadTaskRun replaces the thread of a stopped call).
        del self.running[attempt]
        self.cancelled[attempt] = (task, time.monotonic())
        if self.waiting and not self.ended:
            self._start_waiting()
        if self.closing and not self.ended:
            self._check_idle()

    def _close(self, wait: bool) -> None:
        """Close once no live run is left: ``wait=False`` stops them all first. Stopped ones are not waited
        for here: ``_end`` gives them the rest of their grace."""
        self.closing = True
        self.stopping = not wait
        self.idle = self.loop.create_future()
        if not wait:
            self._stop_all("taskrun.shutdown(wait=False) was called")
            self.waiting.clear()  # all stopped
        self._check_idle()
        self.create_task(self._close_when_idle())

    async def _close_when_idle(self) -> None:
        idle = self.idle
        assert idle is not None
        await idle
        self.loop.stop()

    def _stop_all(self, reason: str) -> None:
        for attempt in [*self.incoming, *self.waiting, *self.running]:
            attempt.run.stop(reason)

    def _check_idle(self) -> None:
        idle = self.idle
        if (
            idle is not None and not idle.done()
            and not self.running and not self.waiting and not self.incoming and not self.succeeded
        ):
            idle.set_result(None)

    def _end(self) -> None:
        """After the loop stopped: stop what was handed over too late, let the stopped coroutines end within
        their grace, abandon those that do not, then close the loop."""
        self.ended = True
        self.busy.set()
        while self.incoming:
            self.incoming.popleft().run.stop("its event loop was shut down")
        for attempt in [*self.waiting, *self.running]:
            attempt.run.stop("its event loop was shut down")
        self.waiting.clear()
        loop = self.loop
        try:
            self._end_tasks()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        except Exception:
            logger.exception("%s: the event loop did not shut down cleanly", self.runner.__name__)
        finally:
            self.running.clear()
            self.cancelled.clear()
            loop.close()

    def _end_tasks(self) -> None:
        """Give every task left on the loop CANCEL_GRACE s from its cancel to end; abandon those that do not."""
        import asyncio

        loop = self.loop
        now = time.monotonic()
        ours = {task: since for task, since in self.cancelled.values()}
        others: list[asyncio.Task[Any]] = [task for task in asyncio.all_tasks(loop) if not task.done() and task not in ours]
        for task in others:  # the user's own tasks on this loop, and runs stopped before their first step
            task.cancel()
        cancels: list[float] = [*ours.values(), *([now] if others else [])]
        deadline = (max(cancels) if cancels else now) + CANCEL_GRACE
        pending = [*ours, *others]
        if pending and deadline > now:
            loop.run_until_complete(asyncio.wait(pending, timeout=deadline - now))
        stuck = [task for task in pending if not task.done()]
        if stuck:
            self._abandon(stuck)

    def _abandon(self, stuck: list[asyncio.Task[Any]]) -> None:
        """Close the coroutines still running after their grace (GeneratorExit where they wait: their ``finally``
        blocks run up to their first ``await``) and end their tasks quietly, saying which runs they were."""
        import asyncio

        names = [self._name_of(task) for task in stuck]
        runs = [name for name in names if not name.startswith("asyncio task ")]
        described = ", ".join(runs[:10]) + (f" and {len(runs) - 10} more" if len(runs) > 10 else "")
        if len(runs) < len(names):
            others = len(names) - len(runs)
            described += (" and " if runs else "") + (f"{others} asyncio task{'s' if others > 1 else ''} of the loop")
        logger.warning(
            "%s: %s still running %.1f s after being cancelled (by stop(), a timeout or the shutdown; %s "
            "CancelledError and carry on?). taskrun's event loop closes without waiting longer: abandoned, "
            "closed where %s (a finally block runs up to its first await)",
            self.runner.__name__, described, CANCEL_GRACE,
            "does it catch" if len(names) == 1 else "do they catch", "it waits" if len(names) == 1 else "they wait",
        )
        kept: list[object] = []  # coroutines that await again once closed: alive, and held until the process exits
        awaited_again: list[str] = []

        async def close_each() -> None:
            # On the running loop: an await in a coroutine's cleanup suspends it (close() then says so) where,
            # with no loop running, it would fail at once, and a bare `except:` around it would loop for good.
            for task, name in zip(stuck, names, strict=True):
                coro = self._coroutine_of(task)
                try:
                    coro.close()
                except Exception as exc:  # noqa: BLE001 - its cleanup's own error, or "coroutine ignored GeneratorExit"
                    if coro.cr_frame is None:
                        logger.warning("%s: the cleanup of %s raised %s: %s", self.runner.__name__, name,
                                       type(exc).__name__, exc)
                if coro.cr_frame is not None:  # still suspended: it caught the GeneratorExit and awaited again
                    awaited_again.append(name)
                    kept.extend((task, task.get_coro(), coro))
                    task._log_destroy_pending = False  # type: ignore[attr-defined]  # noqa: SLF001 - asyncio's own switch
                else:
                    task.cancel()  # its next step finds the coroutine closed, and the task ends

        self.loop.run_until_complete(close_each())
        if awaited_again:
            shown = ", ".join(awaited_again[:10]) + (f" and {len(awaited_again) - 10} more" if len(awaited_again) > 10 else "")
            logger.warning(
                "%s: %s awaited again while being closed (an await in a finally block, or a bare except: around an "
                "await); the rest of %s never runs", self.runner.__name__, shown,
                "it" if len(awaited_again) == 1 else "them",
            )
        # And the tasks they started (an asyncio.wait_for's inner task...), which closing them left behind.
        left = [task for task in asyncio.all_tasks(self.loop) if not task.done() and task not in kept]
        for task in left:
            if task not in stuck:
                task.cancel()
        if left:
            self.loop.run_until_complete(asyncio.wait(left, timeout=CANCEL_GRACE))
        for task in left:
            if not task.done():  # its coroutine goes on still: left pending, not to be reported as lost when collected
                task._log_destroy_pending = False  # type: ignore[attr-defined]  # noqa: SLF001 - asyncio's own switch (gather sets it)
                kept.append(task)
            elif not task.cancelled():
                task.exception()  # retrieved (a RuntimeError: the closed coroutine cannot step), so never logged
        if kept:
            hold_until_exit(kept)

    @staticmethod
    def _coroutine_of(task: asyncio.Task[Any]) -> types.CoroutineType[Any, Any, Any]:
        """The coroutine of a task's own code: for a run, the one its ``_drive`` awaits (the task function's)."""
        coro: Any = task.get_coro()  # a coroutine: every task on this loop is made from one
        if coro.cr_code is LoopPool._drive.__code__ and type(coro.cr_await) is _CoroutineType:
            coro = coro.cr_await
        return cast("types.CoroutineType[Any, Any, Any]", coro)

    def _name_of(self, task: asyncio.Task[Any]) -> str:
        for attempt, (own, _) in self.cancelled.items():
            if own is task:
                return attempt.run.id
        for attempt, own in self.running.items():
            if own is task:
                return attempt.run.id
        return f"asyncio task {task.get_name()!r}"

    def _check_starved(self) -> None:
        """Every slot is taken and calls wait for one: warn (once) if each slot's run awaits a run of this same
        runner that is not done, as then none can go on. While the slots stay full, look again later."""
        self.starved_check_due = False
        limit = self.limit
        if self.ended or not self.waiting or limit is None or len(self.running) < limit:
            return
        awaited = [_awaited_run(task) for task in self.running.values()]
        if all(run is not None and isinstance(run, self.runner) and not run.done() for run in awaited):
            if not self.starved_warned:
                self.starved_warned = True
                waiting = [attempt.run.id for attempt in list(self.waiting)[:3]]
                logger.warning(
                    "%s: all %d of its slots (max_concurrency) are held by runs that await runs of the same runner, "
                    "which wait for a slot (%s%s): none of them can go on. Give the awaited tasks a runner of their "
                    "own (AsyncTaskRun.configure(...)), or await their coroutine directly (`await child.fn(x)`)",
                    self.runner.__name__, limit, ", ".join(waiting), ", ..." if len(self.waiting) > 3 else "",
                )
            return
        self.starved_check_due = True
        self.loop.call_later(STARVED_CHECK_SECONDS, self._check_starved)

    # ---- the watchdog -------------------------------------------------------------------

    def _heartbeat(self) -> None:
        if self.ended:
            return  # the loop runs once more while it closes: `busy` now tells the watchdog to leave, and stays set
        self.beat = time.monotonic()
        if self.running or self.cancelled or self.waiting or self.incoming or self.delivering:
            self.loop.call_later(self.interval, self._heartbeat)
        else:
            self.beating = False
            self.busy.clear()

    def _watch(self) -> None:
        """Warn (once per block) when one step of a task (or one delivery of done callbacks) holds the loop for ``slow`` s.

        Within one loop iteration a task takes at most one step. So when the heartbeat has not
        come round (the same iteration) and the same task is running at two looks ``slow``
        apart, that one step has held the loop all that time. A long iteration of many quick
        steps (a burst of thousands) is not a block.
        """
        slow, interval = self.slow, self.interval
        assert slow is not None
        watched: tuple[Any, float] | None = None  # (what holds the loop, the heartbeat's stamp) first seen...
        since = 0.0  # ...at this time
        warned: tuple[Any, float] | None = None
        while True:
            self.busy.wait()
            if self.ended:
                return
            time.sleep(interval)
            holder = self._holder()
            now = time.monotonic()
            if holder is None or not self.beating:
                watched = None
                continue
            key = (holder, self.beat)
            if key != watched:
                watched, since = key, now
                continue
            if now - since >= slow and key != warned:
                warned = key
                what, verb = self._describe(holder)
                logger.warning(
                    "%s %s blocked the event loop of %s for over %.2f s so far (slow_callback_seconds=%g): every "
                    "other async task waits meanwhile. A blocking call (time.sleep, a synchronous HTTP client, heavy "
                    "CPU work) belongs in its async form (await asyncio.sleep, an async client) or in a "
                    "ThreadTaskRun or MultiprocessTaskRun task", what, verb, self.runner.__name__, now - since, slow,
                )

    def _holder(self) -> Any:
        """What runs on the loop now: the current asyncio task, the number of a delivery of done callbacks, or None."""
        task = self.current_task(self.loop)
        if task is not None:
            return task
        return self.flushes if self.delivering else None

    def _describe(self, holder: Any) -> tuple[str, str]:
        """What holds the loop, for the warning, with the verb that agrees with it ("has" or "have")."""
        if isinstance(holder, int):
            names = [attempt.run.id for attempt, _, _ in list(self.delivered)]
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} other runs" if len(names) > 3 else "")
            return f"the done callbacks of {shown or 'finished runs'}", "have"
        return self._name_of(holder), "has"
