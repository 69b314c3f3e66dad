"""``Task.map`` and ``Task.starmap``: many calls at once, fed lazily, held in a :class:`RunGroup`.

A feeder thread (``taskrun-map-N``) takes the items one by one and starts a run for each,
never holding more than a window of the group's runs unfinished, so a generator of a
million items is consumed as the work goes, not up front. An inline runner
(``SequentialTaskRun``) is fed in the caller instead, and ``map`` returns when all is done.
"""

from __future__ import annotations

import itertools
import logging
import operator
import os
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, cast, overload

from ._deps import find_upstream
from ._lifecycle import register_feeder, unregister_feeder
from ._run import BaseTaskRun, R, store_for, succeeded_values
from ._status import Status
from .errors import TaskStopped

_FAILED, _STOPPED = Status.FAILED, Status.STOPPED

if TYPE_CHECKING:
    from ._task import Task

logger = logging.getLogger("taskrun")

#: Most unfinished runs a group holds when ``max_concurrency`` is None: bounds memory and how
#: far ahead of the work the input is read, while keeping every worker of a pool busy.
DEFAULT_WINDOW = 4096
#: Seconds between progress bar refreshes.
PROGRESS_INTERVAL = 0.1

_feeder_numbers = itertools.count(1)

# Why a group stopped taking new work.
_STOP_WHEN = "stop_when returned True"
_GROUP_STOPPED = "the group was stopped"
_SHUTDOWN = "taskrun.shutdown() was called"
_ENDS_READING = (_GROUP_STOPPED, _SHUTDOWN)


class RunGroup(Sequence[BaseTaskRun[R]], Generic[R]):
    """The handles of one ``map``/``starmap`` call, in input order, filled as the input is read.

    For an input with a length (a list, a range), the group is that whole sequence from the
    start: ``len()`` is the input's length and ``group[i]`` waits, if need be, for the feeder
    to make handle ``i`` (handles are made as the work goes, so memory stays bounded). For a
    generator, ``len()`` and indexing see the handles made so far. Iterating follows the input
    to its end (it waits for handles to be made, not for them to finish). ``wait()``,
    ``results()`` and ``as_completed()`` wait for the whole input to be read as well.

    Ctrl-C (``KeyboardInterrupt``) while waiting in any of these stops the group, then propagates.
    """

    #: Passing a group as an argument is refused: pass ``list(group)`` (see ``_deps``).
    taskrun_not_an_argument: ClassVar[bool] = True

    def __init__(
        self,
        task: Task[..., R],
        *,
        window: int,
        explicit_window: bool = True,
        stop_when: Callable[[], object] | None,
        bar: Any = None,
        length: int | None = None,
        items: Iterator[Any] | None = None,
        star: bool = False,
    ) -> None:
        """Made by ``Task.map``/``starmap``, which check the options: it starts reading ``items`` at once."""
        self.task = task
        self._runs: list[BaseTaskRun[R]] = []
        self._completed: list[BaseTaskRun[R]] = []  # in the order they finished
        self._lock = threading.Lock()  # entered directly (cheaper than the condition) on the per-item paths
        self._cond = threading.Condition(self._lock)
        self._waiting = 0  # threads blocked on _cond, and coroutines awaiting the group: notify only when someone listens
        self._async_waiters: list[Callable[[], None]] = []  # how to wake each coroutine awaiting the group
        self._watching = 0  # of those, the ones that want every completion (as_completed, iteration)
        self._feeder_waits = False  # the feeder waits for room in the window
        self._window = window
        # With the default window the feeder refills in halves, not a call at a time: one wake-up
        # per many runs. An explicit max_concurrency is refilled slot by slot.
        self._refill_at = window - 1 if explicit_window else window // 2
        self._started = 0  # written by the feeder only; unfinished runs: _started - _finished
        self._finished = 0
        self._failed = 0
        self._stopped = 0
        self._cached = 0
        self._feeding = True
        self._done = False
        self._halt: str | None = None
        self._cut_short = False  # stopped before the whole input was read
        self._error: BaseException | None = None
        self._stop_when_error: Exception | None = None
        self._stop_when = stop_when
        # The length of a sized input (a list, a range), None for a generator. Once the group
        # stops, the rest of a sized input still becomes stopped handles, so the group is always
        # the whole sequence; a generator is read no further, as it may never end.
        self._length = length
        self._want = sys.maxsize  # the lowest index a waiter waits for the feeder to make
        self._stop_seen: int | None = None  # runs made when stop() first halted the group (see stop())
        self._bar = bar
        self._bar_lock = threading.Lock()
        self._bar_next = 0.0
        self._thread: threading.Thread | None = None
        self._feeder: threading.Thread | None = None  # the thread reading the input (the caller for inline runners)
        if items is None:
            return
        if task.runner.inline:
            self._feed(items, star)
            return
        self._thread = threading.Thread(
            target=self._feed, args=(items, star), name=f"taskrun-map-{next(_feeder_numbers)}", daemon=True
        )
        register_feeder(self)
        self._thread.start()

    # ---- the sequence ---------------------------------------------------------------------

    def __len__(self) -> int:
        """The input's length if it has one (from the start); else the handles made so far."""
        length = self._length
        if length is not None and self._feeding:
            return length
        return len(self._runs)  # a generator; or the feeding ended (an input that raised has fewer)

    @overload
    def __getitem__(self, index: int) -> BaseTaskRun[R]: ...

    @overload
    def __getitem__(self, index: slice) -> list[BaseTaskRun[R]]: ...

    def __getitem__(self, index: int | slice) -> BaseTaskRun[R] | list[BaseTaskRun[R]]:
        """The handle of item ``index`` (negative and slices too), waiting for the feeder to make it.

        An index outside the input raises IndexError at once. For a generator, only the
        handles made so far can be indexed.
        """
        runs = self._runs
        if isinstance(index, slice):
            wanted = range(len(self))[index]
            if wanted and self._length is not None:
                self._await_made(max(wanted[0], wanted[-1]))
            made = len(runs)
            return [runs[i] for i in wanted if i < made]
        if self._length is None:
            return runs[index]
        i = operator.index(index)
        length = len(self)
        if i < 0:
            i += length
        if not 0 <= i < length:
            made = len(self._runs)
            if not self._feeding and made < self._length and 0 <= i < self._length:
                raise IndexError(f"{self._label()}: its input ended after {made} items, before item {i}")
            raise IndexError(f"{self._label()} has {length} items; index {index} is out of range")
        if i >= len(runs):
            self._await_made(i)
        return runs[i]

    def _await_made(self, i: int) -> None:
        """Wait until the feeder has made handle ``i``; IndexError if the input ended before it."""
        runs = self._runs
        if i < len(runs):
            return
        try:
            with self._lock:
                while self._feeding:
                    self._want = min(self._want, i)  # before looking: the feeder looks after appending
                    if i < len(runs):
                        return
                    self._refuse_own_thread()
                    self._wait(None)
        except KeyboardInterrupt:
            self._interrupted()
            raise
        if i >= len(runs):
            raise IndexError(f"{self._label()}: its input ended after {len(runs)} items, before item {i}")

    def _wake_wanted(self) -> None:
        """The feeder made the handle a waiter wants (see _await_made)."""
        with self._lock:
            self._want = sys.maxsize
            self._notify_locked()

    def __iter__(self) -> Iterator[BaseTaskRun[R]]:
        """Each handle in input order, waiting for the feeder to make the next until the input ends."""
        runs = self._runs
        i = 0
        while True:
            try:
                with self._lock:
                    while self._feeding and not self._settled():
                        self._want = min(self._want, i)
                        if i < len(runs):
                            break
                        self._refuse_own_thread()
                        self._wait(None, watching=True)
                    feeding = self._feeding and not self._settled()
            except KeyboardInterrupt:
                self._interrupted()
                raise
            while i < len(runs):
                yield runs[i]
                i += 1
            if not feeding:
                return

    # ---- waiting ----------------------------------------------------------------------------

    def done(self) -> bool:
        """True once the input is exhausted (or the group stopped) and every run has finished."""
        return self._settled()

    def _settled(self) -> bool:
        """Done; or a generator's group stopped, with every run made so far finished (a feeder
        still inside the input makes no more). A sized input's rest is made, STOPPED, first."""
        return self._done or (
            self._length is None and self._halt in _ENDS_READING and self._finished >= len(self._runs)
        )

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the input is read and every run has finished, or ``timeout`` seconds pass."""
        if self._settled():
            return True
        self._refuse_own_thread()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            with self._lock:
                while not self._settled():
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._wait(remaining)
        except KeyboardInterrupt:
            self._interrupted()
            raise
        return True

    @overload
    def results(self, timeout: float | None = None, *, raise_exceptions: Literal[True] = True) -> list[R]: ...

    @overload
    def results(self, timeout: float | None = None, *, raise_exceptions: bool) -> list[R | BaseException]: ...

    def results(self, timeout: float | None = None, *, raise_exceptions: bool = True) -> list[R] | list[R | BaseException]:
        """Every run's value, in input order, once all have finished (``get_result`` of each).

        With ``raise_exceptions=True`` the first failure in input order is raised (a stopped
        run raises ``TaskStopped``); with False failures are returned in place of values.
        If reading the input or ``stop_when`` raised, that exception is raised here; so is
        ``TaskStopped`` if ``stop()`` left part of a generator unread (unless ``raise_exceptions=False``).
        Ctrl-C while waiting stops the group.
        """
        if not self.wait(timeout):
            raise TimeoutError(f"{self._label()} did not finish within {timeout} s; its runs go on")
        if self._error is not None:
            raise self._error
        if raise_exceptions and self._cut_short:
            raise TaskStopped(
                f"{self._label()} was stopped ({self._halt_text()}) before its input was all read; the "
                f"{len(self._runs)} handles made are in the group, results(raise_exceptions=False) returns their values"
            )
        if not self._failed and not self._stopped:  # every run succeeded (or came from the ledger): no raising
            return succeeded_values(self._runs)
        return [run.get_result(raise_exceptions=raise_exceptions) for run in self._runs]

    def as_completed(self, timeout: float | None = None) -> Iterator[BaseTaskRun[R]]:
        """Each handle once, as it finishes; ``TimeoutError`` if the whole group is not done within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        completed = self._completed
        i = 0
        while True:
            try:
                with self._lock:
                    while i >= len(completed) and not self._settled():
                        remaining = None if deadline is None else deadline - time.monotonic()
                        if remaining is not None and remaining <= 0:
                            left = len(self) - self._finished
                            raise TimeoutError(f"{self._label()}: {left} run(s) or more unfinished after {timeout} s")
                        self._refuse_own_thread()
                        self._wait(remaining, watching=True)
                    done = self._settled()
                    batch = completed[i:]
            except KeyboardInterrupt:
                self._interrupted()
                raise
            i += len(batch)
            yield from batch
            if done and i >= len(completed):
                return

    def __await__(self) -> Generator[Any, None, list[R]]:
        """``await group``: every run's value, in input order, as ``results()`` gives them, without blocking the event loop.

        Awaitable from any event loop (yours, a notebook's, an async task's); wrap it in
        ``asyncio.wait_for`` for a timeout. Cancelling the await leaves the runs going.
        """
        if not self._settled():
            import asyncio

            loop = asyncio.get_running_loop()
            settled: asyncio.Future[None] = loop.create_future()

            def check() -> None:
                if not settled.done() and self._settled():
                    settled.set_result(None)

            def wake() -> None:
                try:
                    loop.call_soon_threadsafe(check)
                except RuntimeError:  # the loop closed while the group was awaited
                    pass

            with self._lock:
                self._async_waiters.append(wake)
                self._waiting += 1
            try:
                check()  # it may have settled before the waiter was in place
                yield from settled
            finally:
                with self._lock:
                    self._async_waiters.remove(wake)
                    self._waiting -= 1
        return self.results()

    def _notify_locked(self) -> None:
        """Wake every thread and coroutine waiting for the group (the lock held): each looks at what it waits for."""
        self._cond.notify_all()
        for wake in self._async_waiters:
            wake()

    def _refuse_own_thread(self) -> None:
        """Waiting for the group on its feeder or a pool's thread (in stop_when, a callback) would never end."""
        thread = threading.current_thread()
        delivers = getattr(thread, "taskrun_delivers", False)
        if isinstance(delivers, str) and thread is not self._feeder:  # that thread says why, in its own words
            raise RuntimeError(delivers.format(run=f"the {self._label()}", awaited="group"))
        if thread is self._feeder or delivers:
            raise RuntimeError(
                f"waiting for the {self._label()} on a thread it needs (its feeder, or a pool's thread: in stop_when "
                "or a done callback) would block it for good; read len(group) or group.summary() there instead"
            )

    def _wait(self, timeout: float | None, watching: bool = False) -> None:
        if timeout is not None and timeout >= threading.TIMEOUT_MAX:
            timeout = None  # float("inf"): wait for good
        self._waiting += 1
        self._watching += watching
        try:
            self._cond.wait(timeout)
        finally:
            self._waiting -= 1
            self._watching -= watching

    # ---- stopping and counting ------------------------------------------------------------

    def stop(self) -> int:
        """Stop the group: nothing new starts, and its running and not-started runs are stopped.

        The items of a sized input not yet started become STOPPED handles too (the feeder makes
        them); a generator is read no further. Returns how many runs this call stopped,
        counting those items.
        """
        with self._lock:
            # The feeder reads the halt after appending each run: the runs made by now are this
            # call's to stop (the feeder leaves the one it may be handling to it); it ends every
            # later one STOPPED without starting it.
            if self._stop_seen is None:
                self._stop_seen = len(self._runs)
            unmade = 0
            if self._feeding:
                if self._length is None:
                    self._cut_short = True
                elif self._halt is None:  # (after stop_when they were to end STOPPED anyway)
                    unmade = max(0, self._length - self._stop_seen)
            self._halt_locked(_GROUP_STOPPED)
            runs = self._runs[: self._stop_seen]
        # Not-started runs first: stopping a running one may free a worker that would start the next.
        stopped = sum(run.stop() for run in runs if run.status is Status.PENDING)
        return unmade + stopped + sum(run.stop() for run in runs if not run.done())

    def _interrupted(self) -> None:
        """Ctrl-C while the caller waited for the group: stop it (the caller then re-raises)."""
        logger.info("%s: interrupted while waiting for it (KeyboardInterrupt); stopping the group", self._label())
        try:
            self.stop()
        except Exception:
            logger.exception("%s: stopping the group after KeyboardInterrupt failed", self._label())

    def summary(self) -> dict[str, int]:
        """Counts of the handles per status name, plus ``"cached"``.

        A run answered from the ledger is counted under ``"succeeded"`` and also under ``"cached"``.
        The items of a sized input the feeder has yet to reach count as pending.
        """
        counts = dict.fromkeys((s.value for s in Status), 0)
        cached = 0
        runs = list(self._runs)
        for run in runs:
            counts[run.status.value] += 1
            cached += run.cached
        counts["cached"] = cached
        counts[Status.PENDING.value] += max(0, len(self) - len(runs))
        return counts

    def __repr__(self) -> str:
        counts = self.summary()
        parts = [f"{n} {name}" for name, n in counts.items() if n]
        state = "done" if self._settled() else "feeding" if self._feeding else "finishing"
        if self._halt is not None:
            state += f", stopped: {self._halt_text()}"
        return f"<RunGroup {self.task.name}: {len(self)} runs{', ' if parts else ''}{', '.join(parts)} ({state})>"

    def _label(self) -> str:
        return f"map of {self.task.name}"

    # ---- feeding ----------------------------------------------------------------------------

    def _feed(self, items: Iterator[Any], star: bool) -> None:
        """Start a run per item, keeping at most ``window`` unfinished; ends when the input does or the group halts."""
        task = self.task
        runner = task.runner
        runs = self._runs
        lock = self._lock
        window = self._window
        stop_when = self._stop_when
        count_done = self._on_done_many  # one bound method for every run of the group to tell (not kept: a cycle)
        sized = self._length is not None
        self._feeder = threading.current_thread()
        try:
            for item in items:
                # Without the lock while there is room (a stale _finished only makes it look fuller).
                halt = self._halt
                if halt is not None or self._started - self._finished >= window:
                    with lock:
                        if self._started - self._finished >= window and self._halt is None:
                            self._feeder_waits = True
                            while self._started - self._finished > self._refill_at and self._halt is None:
                                self._wait(None)
                            self._feeder_waits = False
                        halt = self._halt
                        if halt is not None and halt is not _STOP_WHEN and not sized:
                            self._cut_short = True
                            break  # a generator's group stopped or shut down: leave the rest unread
                self._started += 1
                if star:
                    try:
                        args = tuple(item)
                    except TypeError:
                        raise TypeError(f"starmap() items must be iterables of arguments, got {item!r}") from None
                else:
                    args = (item,)
                run = runner(task, args, {}, notify=count_done)  # its end is counted in _on_done_many
                runs.append(run)
                if len(runs) > self._want:
                    self._wake_wanted()
                if halt is None and stop_when is not None and not self._in_ledger(run):
                    self._may_start(stop_when)
                halt = self._halt  # after the append (see stop()); stop_when or another thread may have halted
                if halt is not None:
                    with lock:  # stop() holds it while it halts the group and takes the runs made
                        seen = self._stop_seen
                    if seen is None or len(runs) > seen:  # else stop() saw this run, and stops it
                        # The rest of a sized input becomes runs that end STOPPED, never started.
                        run.stop(f"not started: {self._halt_text()}")
                    if not sized:
                        break
                else:
                    try:
                        run.start()
                    except Exception:  # arguments that do not fit, or a worker cannot receive: the run failed with it
                        pass
        except BaseException as exc:
            self._error = exc
            logger.error("%s: reading the input raised %s: %s; no more items are read", self._label(), type(exc).__name__, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._end_feeding()

    def _in_ledger(self, run: BaseTaskRun[R]) -> bool:
        """True if the task's ledger holds ``run``'s result: it will not run, so ``stop_when`` is not asked for it
        (a quota that counts its calls then counts calls that run, and a rerun goes on where the last one stopped)."""
        task = self.task
        if task.ledger is None or find_upstream(run.args, run.kwargs, BaseTaskRun) is not None:
            return False
        try:
            store = store_for(task.ledger)
            found, _ = store.lookup(task.name, store.key_for(task, run.args, run.kwargs))
        except Exception:  # noqa: BLE001 - a call that cannot be keyed fails when it starts, saying why
            return False
        return bool(found)

    def _may_start(self, stop_when: Callable[[], object]) -> bool:
        """Ask ``stop_when`` (the group's) once, before a run starts; on True (or an error) halt the group. True: go on."""
        if self._halt is not None:
            return False
        try:
            stop = bool(stop_when())
        except Exception as exc:
            self._error = self._stop_when_error = exc
            logger.error("%s: stop_when raised %s: %s; nothing new starts", self._label(), type(exc).__name__, exc)
            stop = True
        if stop:
            self._halt_group(_STOP_WHEN)
            return False
        return True

    def _halt_text(self) -> str | None:
        """Why the group took no more work, as shown in its repr and its stopped runs' errors."""
        error = self._stop_when_error
        if self._halt is _STOP_WHEN and error is not None:
            return f"stop_when raised {type(error).__name__}: {error}"
        return self._halt

    def _halt_group(self, reason: str) -> None:
        """Take no new work (see ``_halt_locked``)."""
        with self._lock:
            first = self._halt_locked(reason)
        if reason is _STOP_WHEN and first:
            logger.info("%s: stop_when returned True; running calls finish, nothing new starts", self._label())

    def _halt_locked(self, reason: str) -> bool:
        """Take no new work, the lock held; True if the group was taking work until now.

        The first reason sticks, except that ``stop()`` and shutdown override ``stop_when``
        (a generator's feeder then stops reading at once). Runs ``stop_when`` let in go on:
        the window keeps them no more than the pool's workers.
        """
        halt = self._halt
        if halt is not None and not (halt is _STOP_WHEN and reason is not _STOP_WHEN):
            return False
        self._halt = reason
        if self._waiting:
            self._notify_locked()
        return halt is None

    def _end_feeding(self) -> None:
        with self._lock:
            self._feeding = False
            self._feeder = None
            finished = self._finished == len(self._runs)
            if self._waiting:
                self._notify_locked()
        unregister_feeder(self)
        if finished:
            self._finish()

    def _finish(self) -> None:
        """The input is read and every run finished (reached exactly once): close the bar, wake the waiters."""
        self._close_bar()
        with self._lock:
            self._done = True
            if self._waiting:
                self._notify_locked()

    def _on_done_many(self, runs: Sequence[BaseTaskRun[Any]], all_succeeded: bool) -> None:
        """Runs of the group finished (a runner reporting many at once tells them together).

        ``all_succeeded``: each one ran and succeeded (none came from the ledger), so there is nothing else to count.
        """
        with self._lock:
            self._finished += len(runs)
            if not all_succeeded:
                for run in runs:
                    status = run.status
                    if status is _FAILED:
                        self._failed += 1
                    elif status is _STOPPED:
                        self._stopped += 1
                    if run.cached:
                        self._cached += 1
            self._completed.extend(runs)
            finished = self._finished == len(self._runs) and not self._feeding
            if (
                self._watching
                or (self._feeder_waits and self._started - self._finished <= self._refill_at)
                or (self._waiting and self._halt in _ENDS_READING and self._length is None and self._finished == len(self._runs))
            ):
                self._notify_locked()
        if finished:
            self._finish()
        elif self._bar is not None:
            self._refresh_bar()

    # ---- the progress bar -------------------------------------------------------------------

    def _postfix(self) -> dict[str, int]:
        cached = self._cached  # among the succeeded: answered from the ledger
        postfix = {"succeeded": self._finished - self._failed - self._stopped, "failed": self._failed}
        if cached or self.task.ledger is not None:
            postfix["cached"] = cached
        if self._stopped:
            postfix["stopped"] = self._stopped
        return postfix

    def _refresh_bar(self) -> None:
        now = time.monotonic()
        if now < self._bar_next or not self._bar_lock.acquire(blocking=False):
            return
        try:
            self._bar_next = now + PROGRESS_INTERVAL
            bar = self._bar
            if bar is None:  # closed meanwhile
                return
            bar.set_postfix(self._postfix(), refresh=False)
            bar.update(self._finished - bar.n)
        finally:
            self._bar_lock.release()

    def _close_bar(self) -> None:
        bar = self._bar
        if bar is None:
            return
        with self._bar_lock:
            if self._bar is None:
                return
            self._bar = None
            bar.set_postfix(self._postfix(), refresh=False)
            bar.n = self._finished
            bar.close()  # draws the final state once

    # ---- taskrun.shutdown() -----------------------------------------------------------------

    def finish(self) -> None:
        """Lifecycle hook, at a normal exit: wait until the feeder has read the whole input (and started its runs)."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def shutdown(self, wait: bool = True) -> None:
        """Lifecycle hook: stop reading the input, and let the feeder thread end before pools shut down."""
        if self._feeding:
            logger.info("%s: %s; stopped reading the input after %d items", self._label(), _SHUTDOWN, len(self._runs))
        self._halt_group(_SHUTDOWN)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(1)  # a feeder still inside next(items) exits by itself once that returns


def start_map(
    task: Task[..., R],
    items: Iterable[Any],
    *,
    star: bool,
    max_concurrency: int | None,
    stop_when: Callable[[], object] | None,
    progress: bool,
) -> RunGroup[R]:
    """Check the options, make the group and start feeding it (in a thread, or inline for inline runners)."""
    method = "starmap" if star else "map"
    limit = cast(object, max_concurrency)  # checked as what the caller may really pass
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
        raise TypeError(f"{task.name}.{method}() option max_concurrency must be an int >= 1 or None, got {max_concurrency!r}")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(
            f"{task.name}.{method}() option max_concurrency must be >= 1 (or None for no limit), got {max_concurrency}"
        )
    if stop_when is not None and not callable(stop_when):
        raise TypeError(f"{task.name}.{method}() option stop_when must be a callable() -> bool or None, got {stop_when!r}")
    try:
        iterator = iter(items)
    except TypeError:
        raise TypeError(f"{task.name}.{method}() needs an iterable of items, got {type(items).__name__}") from None
    if not star:
        try:
            task.check_call((None,), {})
        except TypeError as exc:
            raise TypeError(
                f"{task.name}.map() passes each item as the one argument, and {exc} "
                "(starmap() unpacks each item into the arguments)"
            ) from None
    length: int | None
    try:
        length = len(items)  # type: ignore[arg-type]  # an iterable may have a length: tried
    except Exception:  # a generator (or an object whose length cannot be told)
        length = None
    else:
        if type(length) is not int or length < 0:
            length = None
    bar = _make_bar(task, length) if progress else None
    window = max_concurrency or DEFAULT_WINDOW
    runner = task.runner
    workers = getattr(runner, "max_workers", None) or getattr(runner, "max_concurrency", None)
    if stop_when is not None and type(workers) is int and workers < window:
        # No run waits in the pool's queue: stop_when is then asked right before each run starts.
        window = workers
    return RunGroup(
        task,
        window=window,
        explicit_window=max_concurrency is not None or stop_when is not None,
        stop_when=stop_when,
        bar=bar,
        length=length,
        items=iterator,
        star=star,
    )


def _make_bar(task: Task[..., Any], total: int | None) -> Any:
    return _bar_class()(total=total, desc=task.name, unit="call", dynamic_ncols=True)


def _bar_class() -> Any:
    """tqdm's notebook widget in a Jupyter notebook with ipywidgets; its text bar anywhere else.

    Chosen here rather than by ``tqdm.auto``, which in a notebook without ipywidgets warns
    ("IProgress not found") and then draws the text bar anyway.
    """
    try:
        from tqdm.std import tqdm
    except ImportError as exc:
        raise ImportError("progress=True needs tqdm, an optional extra: pip install taskrun[progress]") from exc
    if _in_notebook():
        try:
            from tqdm import notebook
        except Exception:  # any failure of the widget's imports: the text bar will do
            return tqdm
        if getattr(notebook, "IProgress", None) is not None:  # None: ipywidgets is not there
            return notebook.tqdm
    return tqdm


def _in_notebook() -> bool:
    """True in a Jupyter kernel that shows widgets: the test ``tqdm.autonotebook`` makes."""
    if "ipykernel.zmqshell" in sys.modules:
        if any(name == "QT_API" or name.startswith("SPYDER") for name in os.environ):
            return False  # jupyter-qtconsole, spyder: a console, no widgets
        ipython = sys.modules.get("IPython")
        shell = getattr(ipython, "get_ipython", lambda: None)()
        if shell is None:
            return False
        kind = type(shell).__name__.lower()
        return "qt" not in kind and "spyder" not in kind
    return "IPython.utils._process_emscripten" in sys.modules  # jupyterlite
