"""The process pool of one runner class: its worker processes and the supervisor thread that watches them.

The supervisor waits in one place on the workers' result pipes, their process sentinels and
a wake-up pipe together (never on a timer), reads without ever blocking, drains a worker's
results before it joins or replaces it, tops workers up from the backlog (in batches), and
ends workers on stop, timeout and shutdown. Outcomes are collected under the pool's lock and
reported after it is released.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import select
import signal
import threading
import time
import warnings
from collections import deque
from typing import TYPE_CHECKING, Any

import cloudpickle
import multiprocess
from multiprocess.connection import wait

from ...errors import RemoteTraceback, SerializationError, TaskrunError, WorkerDied, describe_exit
from ..base import Attempt, forget_pool
from . import _functions
from ._batching import CALL_BYTES, PIPE_BUDGET, BatchPolicy
from ._protocol import CALLS, CANCEL, DIED, LOG, OK, PROTOCOL, RAISED, READY, SKIPPED, WARN
from ._workers import WorkerProcess, default_start_method

if TYPE_CHECKING:
    from . import MultiprocessTaskRun

logger = logging.getLogger("taskrun")

_call_ids = itertools.count(1)

#: What the lock's holder takes to report once it is released: failures, log records and
#: warnings in order; the successes read, as (attempt, value, when it began); when they were read.
Outbox = tuple[list[tuple[Any, ...]], list[tuple[Attempt, Any, float]], float]
_EMPTY_OUTBOX: Outbox = ([], [], 0.0)

#: Most functions a reused worker holds (one version per task); the oldest goes first.
MAX_WORKER_FUNCTIONS = 64
#: Seconds between SIGTERM and SIGKILL when a worker is ended.
TERMINATE_GRACE = 1.0


class ProcessPool:
    """The worker processes of one runner class, with the supervisor thread that watches them.

    One lock guards the pool's state. A caller's thread may hand a call straight to an idle
    worker (the fast path for a call-and-wait loop); everything else -- reading results,
    reaping and replacing workers, topping up busy workers from the backlog -- happens in
    the supervisor. Outcomes are collected under the lock and delivered after it is released,
    so handles, retries and user callbacks never run while the pool is locked.
    """

    def __init__(self, runner: type[MultiprocessTaskRun[Any]]) -> None:
        method = self.method = runner.start_method or default_start_method()
        self.ctx = multiprocess.get_context(method)
        # fork: the classes and functions of __main__ that every worker forked so far has as we
        # do (None: no worker yet). A call's arguments may name those by reference.
        self.forked_main: dict[str, Any] | None = None
        self.max_workers = runner.max_workers or os.cpu_count() or 1
        self.max_tasks = runner.max_tasks_per_worker
        self.lock = threading.Lock()
        self.workers: list[WorkerProcess] = []
        self.pending: deque[Attempt] = deque()  # the attempts of calls waiting for a worker
        self.submitted: deque[Attempt] = deque()  # appended without the lock while no worker has room
        self.has_room = True  # a worker is idle, or another may start
        self.batching = BatchPolicy(fresh=self.max_tasks is not None)
        # What to report once the lock is released: failures, log records and warnings in order, and
        # the successes of the reads since (attempt, value, when it began), learned at read_at.
        self.outbox: list[tuple[Any, ...]] = []
        self.successes: list[tuple[Attempt, Any, float]] = []
        self.read_at = 0.0
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.wake_pending = False
        self.closing: str | None = None  # "wait", "now", then "closed"
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._supervise, name="taskrun-process-pool", daemon=True)
        self.thread.taskrun_delivers = True  # type: ignore[attr-defined]  # see BaseTaskRun.wait
        self.thread.start()

    # ---- entry points from any thread ------------------------------------------------------

    def submit(self, attempt: Attempt, payload: bytes | tuple[Any, ...], function: _functions.Payload) -> None:
        """Queue ``attempt`` as a call to a worker, sending ``payload`` (its arguments) and ``function``.

        While the pool holds the call, the attempt's ``runner_state`` is ``(call id, payload,
        function)``. Every call submitted ends: it runs, or, if the pool is shut down first,
        it ends STOPPED, saying so.
        """
        attempt.runner_state = (next(_call_ids), payload, function)
        queued: Attempt | None = attempt
        if not self.has_room:
            # Every worker is busy: queue without the lock; the supervisor takes it when a
            # result frees a worker. It publishes has_room before it takes from this queue,
            # and we append before we read has_room, so a call is never left behind. The same
            # goes for closing: whoever sets it (under the lock) then empties this queue, so
            # if we read it unset after our append, our call is taken; if set, we may have
            # come after: we empty the queue ourselves.
            self.submitted.append(attempt)
            if self.closing in ("now", "closed"):
                with self.lock:
                    left = self._take_submitted()
                self._stop_shut_out(left)
                return
            if not self.has_room:
                return
            queued = None
        with self.lock:
            if self.closing in ("now", "closed"):
                left = self._take_submitted()
                if queued is not None:
                    left.append(queued)
                started, out = False, _EMPTY_OUTBOX
            else:
                left = []
                if queued is not None:
                    self.pending.append(queued)
                started = self._dispatch(idle_only=True)
                out = self._take_outbox()
        if started:
            self._wake()  # the supervisor must watch the new workers
        self._deliver(out)
        if left:
            self._stop_shut_out(left)

    def _take_submitted(self) -> list[Attempt]:
        """Empty the lock-free queue (one atomic popleft at a time: a submitter may append meanwhile)."""
        taken: list[Attempt] = []
        try:
            taken.extend(iter(self.submitted.popleft, None))
        except IndexError:
            pass
        return taken

    @staticmethod
    def _stop_shut_out(attempts: list[Attempt]) -> None:
        """End calls that came in as the pool shut down: STOPPED, never left pending."""
        for attempt in attempts:
            attempt.runner_state = None
            attempt.run.stop("its process pool was shut down")

    def stop_call(self, attempt: Attempt) -> None:
        """End the call of ``attempt`` wherever it is; returns once a running one's worker is gone."""
        with self.lock:
            gone = self._stop(attempt)
            out = self._take_outbox()
        self._deliver(out)
        # The supervisor keeps the SIGKILL deadline, and sends the calls waiting for a worker to the one
        # _stop may have freed: the results it read there will not wake the supervisor.
        self._wake()
        if gone is not None and threading.current_thread() is not self.thread:
            gone.wait(TERMINATE_GRACE + 10)

    def shutdown(self, wait: bool = True) -> None:
        """``wait=True``: finish every call first. ``wait=False``: stop them and end the workers now."""
        to_stop: list[Attempt] = []
        with self.lock:
            if self.closing != "closed":
                if not wait:
                    self.closing = "now"
                    to_stop = self._take_all_calls()
                elif self.closing is None:
                    self.closing = "wait"
        for attempt in to_stop:
            attempt.run.stop("its pool shut down")
        self._wake()
        if threading.current_thread() is not self.thread:
            self.closed.wait()
            self.thread.join()

    def _wake(self) -> None:
        if not self.wake_pending:
            self.wake_pending = True
            try:
                os.write(self.wake_w, b"\0")
            except OSError:
                pass

    def note_fork(self) -> None:
        """A worker is about to be forked: it will have __main__ as it is now (see ``forked_main``)."""
        now = _functions.main_objects()
        known = self.forked_main
        self.forked_main = now if known is None else {k: v for k, v in known.items() if now.get(k) is v}

    def after_fork_in_child(self) -> None:
        """In a forked child (a new worker, or the user's own fork): drop the parent's pipe ends."""
        for worker in self.workers:
            worker.close_unlocked()
        for fd in (self.wake_r, self.wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _take_outbox(self) -> Outbox:
        out, self.outbox = self.outbox, []
        successes, self.successes = self.successes, []
        return out, successes, self.read_at

    def _deliver(self, taken: Outbox) -> None:
        """Hand outcomes, log records and warnings over; runs without the pool lock.

        The successes of the reads are reported together (``Attempt.report_results``), so the
        runs of a ``map`` group are counted by their group together.
        """
        out, successes, read_at = taken
        for item in out:
            kind = item[0]
            try:
                if kind == RAISED:
                    item[1].set_exception(item[2], started_at=item[3])
                elif kind == LOG:
                    record = logging.makeLogRecord(item[1])
                    target = logging.getLogger(record.name)
                    if target.isEnabledFor(record.levelno):
                        target.handle(record)
                elif kind == WARN:
                    message, category, filename, lineno = item[1]
                    try:
                        warnings.warn_explicit(message, category, filename, lineno)
                    except Exception as exc:  # the caller's filters make it an error; nobody here can catch it
                        logger.warning("a task's warning is an error under this process's warning filters: %s: %s",
                                       type(exc).__name__, exc)
            except Exception:  # one bad item must neither lose the others nor end the supervisor
                logger.exception("taskrun could not deliver a message from a worker process")
        if successes:
            try:
                Attempt.report_results(successes, read_at)
            except Exception:
                logger.exception("taskrun could not deliver the results of a worker process")

    # ---- the supervisor thread --------------------------------------------------------------

    def _supervise(self) -> None:
        # One poll object over the wake-up pipe and every worker's result pipe and sentinel;
        # rebuilt only when the set of workers changes.
        poller = select.poll()
        watched: dict[int, tuple[WorkerProcess | None, bool]] = {}  # fd -> (worker, is its sentinel)
        ready: list[tuple[int, int]] = []
        try:
            while True:
                with self.lock:
                    for fd, _events in ready:
                        worker, is_sentinel = watched[fd]
                        if worker is None:
                            self.wake_pending = False
                            os.read(self.wake_r, 4096)
                        elif worker in self.workers:
                            if is_sentinel:
                                self._reap(worker)
                            else:
                                self._read_once(worker)
                    self._escalate_kills()
                    self._dispatch()
                    finished = self.closing is not None and not self.pending and not self.submitted and not any(
                        w.in_flight for w in self.workers if not w.ending
                    )
                    shut_out: list[Attempt] = []
                    if finished:
                        self.closing = "closed"
                        self.has_room = False
                        shut_out = self._take_submitted()  # came in after the last check: see submit
                    current: dict[int, tuple[WorkerProcess | None, bool]] = {self.wake_r: (None, False)}
                    for worker in self.workers:
                        current[worker.result_r.fileno()] = (worker, False)
                        current[worker.sentinel] = (worker, True)
                    deadlines = [w.kill_at for w in self.workers if w.kill_at is not None]
                    out = self._take_outbox()
                self._deliver(out)
                del out  # its runs are the callers' now: do not keep them alive while we wait
                if finished:
                    self._stop_shut_out(shut_out)
                    break
                if current != watched:
                    for fd in watched.keys() - current.keys():
                        poller.unregister(fd)
                    for fd in current.keys() - watched.keys():
                        poller.register(fd, select.POLLIN)
                    watched = current
                timeout = max(0.0, min(deadlines) - time.monotonic()) * 1000 if deadlines else None
                ready = poller.poll(timeout)
            self._close_workers()
        except BaseException as exc:
            logger.exception("taskrun process pool supervisor failed; ending its workers and runs")
            forget_pool(self)  # the next call starts a new pool
            with self.lock:
                self.closing = "closed"
                calls = self._take_all_calls()
                out = self._take_outbox()
            self._deliver(out)  # outcomes already read are delivered first: they are not failures
            error = TaskrunError(f"the process pool failed ({type(exc).__name__}: {exc}); see the taskrun log")
            for attempt in calls:
                attempt.set_exception(error)
            self._close_workers()
        finally:
            for fd in (self.wake_r, self.wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.closed.set()

    # ---- under the lock -----------------------------------------------------------------------

    def _dispatch(self, idle_only: bool = False) -> bool:
        """Send queued calls to workers, starting workers as needed. True if any was started."""
        started = False
        while True:
            try:  # move every submitted call to pending, one atomic popleft at a time, at C speed
                self.pending.extend(iter(self.submitted.popleft, None))
            except IndexError:
                pass
            started |= self._dispatch_pending(idle_only)
            active = [w for w in self.workers if not w.ending]
            self.has_room = self.closing not in ("now", "closed") and (
                len(active) < self.max_workers or any(not w.in_flight for w in active)
            )
            if not (self.has_room and self.submitted):
                return started

    def _dispatch_pending(self, idle_only: bool) -> bool:
        pending = self.pending
        while pending and pending[0].reported:  # stopped while queued: never starts
            pending.popleft()
        if not pending or self.closing in ("now", "closed"):
            return False
        free = [w for w in self.workers if not w.ending]
        running = sum(1 for w in free if w.busy)
        idle = len(free) - running
        started = False
        while idle < len(pending) and len(free) < self.max_workers:
            free.append(WorkerProcess(self))
            idle += 1
            started = True
        depth = self.batching.depth(len(pending), len(free))
        for worker in free:
            if not pending:
                break
            if worker.busy:
                if idle_only or not BatchPolicy.tops_up(len(worker.in_flight), depth):
                    continue
            elif running >= self.max_workers:
                continue
            else:
                running += 1
            self._send_batch(worker, depth)
        return started

    def _send_batch(self, worker: WorkerProcess, depth: int) -> None:
        pending, fresh, in_flight = self.pending, self.max_tasks is not None, worker.in_flight
        was_idle = not in_flight
        batch: list[tuple[int, int, Any, bytes | tuple[Any, ...]]] = []
        room = depth - len(in_flight)
        budget = PIPE_BUDGET - worker.bytes_in_flight
        sent = 0
        # Of the previous call: a batch is mostly one task's, and one version of its function.
        task = function = fn_id = timeout = None
        send_fn = False  # whether the call goes with its function (the worker does not hold it)
        while pending and room > 0:
            attempt = pending[0]
            if attempt.reported:
                pending.popleft()
                continue
            run_task = attempt.run.task
            if run_task is not task:
                task = run_task
                timeout = task.timeout
            call_id, payload, call_function = attempt.runner_state
            if call_function is not function:
                function = call_function
                fn_id = function[0]
                send_fn = fresh or fn_id not in worker.fns_sent
            if timeout is not None and in_flight:
                break  # a call with a timeout starts at once, never queued behind another
            size = len(payload) + CALL_BYTES
            if size > budget and in_flight:
                break
            pending.popleft()
            if send_fn:
                fn = self._function_message(worker, task, call_function, fresh)  # the worker holds it from now on
                budget -= len(fn[0])  # counts in this batch only: the worker takes it in at once
                send_fn = fresh
            else:
                fn = None
            batch.append((call_id, fn_id, fn, payload))  # type: ignore[arg-type]
            budget -= size
            sent += size
            in_flight[call_id] = attempt
            room -= 1
            if timeout is not None:
                break
        if not batch:
            return
        try:
            worker.call_w.send_bytes(pickle.dumps((CALLS, batch), PROTOCOL))
        except OSError:  # the worker is gone; its sentinel will say so
            pending.extendleft(reversed([in_flight.pop(entry[0]) for entry in batch]))
            worker.fns_sent.clear()
            return
        worker.bytes_in_flight += sent
        if worker.ready and was_idle:
            self._mark_started(worker)

    @staticmethod
    def _function_message(
        worker: WorkerProcess, task: Any, function: _functions.Payload, fresh: bool
    ) -> tuple[bytes, dict[str, list[str]], tuple[int, ...]]:
        """``function`` (of ``task``) as sent to ``worker``, which from then on holds it (see ``_worker``).

        A reused worker holds one version of each task's function, and at most
        ``MAX_WORKER_FUNCTIONS`` functions: the message says which ones to forget.
        """
        fn_id, (data, sources) = function
        if fresh:
            return data, sources, ()  # a fresh process forgets everything anyway
        held = worker.fns_sent
        owner = task.runner_cache.get(_functions.CACHE_KEY)
        drop = [old for old, old_owner in held.items() if old_owner is owner]
        excess = len(held) - len(drop) + 1 - MAX_WORKER_FUNCTIONS
        if excess > 0:
            drop.extend([old for old in held if old not in drop][:excess])
        for old in drop:
            del held[old]
        held[fn_id] = owner
        return data, sources, tuple(drop)

    @staticmethod
    def _mark_started(worker: WorkerProcess) -> None:
        """The worker's first call in flight is the one it executes: it turns RUNNING (and its timeout starts).

        Calls sent ahead stay PENDING behind it; each begins when the one before it is reported.
        """
        for attempt in worker.in_flight.values():
            if attempt.started_at is None:
                attempt.mark_started()
            return

    def _read_once(self, worker: WorkerProcess) -> None:
        """Handle what one read brings (the pipe was reported readable); poll reports the rest.

        Between the supervisor's poll and its taking the lock, stop() in another thread may
        have drained the pipe: the read then finds nothing.
        """
        try:
            frames = worker.reader.read()
        except (EOFError, OSError):
            return
        if frames:
            self._handle(worker, frames)

    def _drain(self, worker: WorkerProcess) -> None:
        """Read every message the worker has sent so far."""
        reader = worker.reader
        try:
            while not reader.eof:
                frames = reader.read()
                if frames is None:
                    return
                self._handle(worker, frames)
        except (EOFError, OSError):
            pass

    def _handle(self, worker: WorkerProcess, frames: list[bytes | bytearray]) -> None:
        """Handle the messages of one read, then mark the call the worker has gone on to started.

        A call whose outcome comes in the same read as the one before it was never marked
        started: its start is dated back by the time it ran, which the worker sends along.
        """
        if not frames:
            return
        in_flight = worker.in_flight
        outbox, successes = self.outbox, self.successes
        now = self.read_at = time.time()
        seconds = -1.0
        freed = 0
        for data in frames:
            try:
                kind, call_id, payload, seconds = pickle.loads(data)
            except Exception as exc:
                attempt = next(iter(in_flight.values()), None)
                if attempt is not None:
                    self._finish_call(worker, attempt)
                    reason = f"the outcome of {attempt.run.id} could not be unpickled here: {exc}"
                    outbox.append((RAISED, attempt, SerializationError(reason), None))
                continue
            if kind == OK:  # the hot path, inline
                attempt = in_flight.pop(call_id, None)
                if attempt is None:
                    continue  # its run was stopped
                freed += len(attempt.runner_state[1]) + CALL_BYTES
                attempt.runner_state = None
                successes.append((attempt, payload, now - seconds))
            else:
                self._handle_other(worker, kind, call_id, payload, seconds, now)
        worker.bytes_in_flight -= freed
        if seconds >= 0:  # the last call's time stands for the read's: calls of one read are alike
            self.batching.observe(seconds)
        if worker.ready:
            self._mark_started(worker)

    def _handle_other(self, worker: WorkerProcess, kind: int, call_id: int | None, payload: Any, seconds: float,
                      now: float) -> None:
        if kind == READY:
            worker.ready = True
            return
        if kind == LOG or kind == WARN:
            self.outbox.append((kind, payload))
            return
        if kind == DIED:  # a fresh child of this worker ended without finishing its call
            attempt = next(iter(worker.in_flight.values()), None)
            if attempt is not None:
                self._finish_call(worker, attempt)
                self.outbox.append((RAISED, attempt, self._died(worker, attempt, payload), None))
            return
        attempt = worker.in_flight.get(call_id)  # type: ignore[arg-type]
        if attempt is None:
            return  # its run was stopped
        self._finish_call(worker, attempt)
        if kind == SKIPPED:  # a cancelled call, skipped (see _stop)
            return
        if kind == RAISED:
            exc_bytes, tb_text = payload
            try:
                exc = cloudpickle.loads(exc_bytes)
            except Exception as why:
                exc = SerializationError(f"the exception raised by {attempt.run.id} could not be unpickled here: {why}")
        else:  # UNPICKLABLE
            reason, tb_text = payload
            exc = SerializationError(reason)
        if tb_text:
            exc.__cause__ = RemoteTraceback(tb_text)
        self.outbox.append((RAISED, attempt, exc, now - seconds))

    @staticmethod
    def _finish_call(worker: WorkerProcess, attempt: Attempt) -> None:
        """The call of ``attempt`` leaves ``worker`` (and the pool)."""
        state = attempt.runner_state
        if state is not None and worker.in_flight.pop(state[0], None) is not None:
            worker.bytes_in_flight -= len(state[1]) + CALL_BYTES
        attempt.runner_state = None

    def _reap(self, worker: WorkerProcess) -> None:
        """A worker exited: drain what it sent, end what its task left behind, reap it, settle its calls, forget it."""
        self._drain(worker)  # every outcome it sent before it died is delivered first
        calls = list(worker.in_flight.values())
        worker.in_flight.clear()
        worker.bytes_in_flight = 0
        # Whatever the task started dies with it (see WorkerProcess.reap for why before the reaping).
        exitcode = worker.reap(kill_group=worker.ending or bool(calls), timeout=1)
        start_error = None if worker.ready or worker.ending else worker.take_start_error()
        if start_error is not None:
            # It could not start, and the next worker would fail the same way: the calls waiting
            # for a worker end with its error (calls made from now on try a new worker again).
            waiting = calls + [attempt for attempt in self.pending if not attempt.reported]
            self.pending.clear()
            for attempt in waiting:
                attempt.runner_state = None
                self.outbox.append((RAISED, attempt, self._start_failed(worker, attempt, exitcode, start_error),
                                    None))
            if not waiting:
                logger.warning("%s", self._start_failed(worker, None, exitcode, start_error))
        elif worker.ending:
            self.pending.extendleft(reversed(calls))  # queued behind the stopped call: never started
        elif calls:
            dead, rest = calls[0], calls[1:]
            self.pending.extendleft(reversed(rest))
            dead.runner_state = None
            self.outbox.append((RAISED, dead, self._died(worker, dead, exitcode), None))
        elif self.closing is None:
            logger.warning("taskrun worker process %s died while idle: %s", worker.pid, describe_exit(exitcode))
        worker.close()
        self.workers.remove(worker)
        for event in worker.gone_waiters:
            event.set()

    @staticmethod
    def _died(worker: WorkerProcess, attempt: Attempt, exitcode: int | None) -> WorkerDied:
        where = "a fresh process of worker" if worker.pool_fresh else "the worker process"
        return WorkerDied(
            f"{where} (pid {worker.pid}) running {attempt.run.id} died: {describe_exit(exitcode)}", exitcode
        )

    def _start_failed(self, worker: WorkerProcess, attempt: Attempt | None, exitcode: int | None, text: str) -> WorkerDied:
        """The error of a call whose worker could not start: the worker's own error, and what to do about it."""
        summary, _, tb_text = text.partition("\0")
        summary = " ".join(summary.split())
        if "bootstrapping phase" in summary:
            fix = (f'With start_method="{self.method}" a new worker first runs your main script again, and that '
                   'script calls tasks as it runs: put the code that starts them under `if __name__ == "__main__":`.')
        elif "<stdin>" in summary:
            fix = (f'With start_method="{self.method}" a new worker first runs your main script again, which it '
                   'cannot do for a script read from standard input: save the script to a file and run that, or '
                   'use start_method="fork".')
        else:
            fix = "The worker's traceback is this error's __cause__."
        who = f"{attempt.run.id} did not run: " if attempt is not None else ""
        error = WorkerDied(
            f"{who}the taskrun worker process (pid {worker.pid}) could not start ({describe_exit(exitcode)}): "
            f"{summary.rstrip('.')}. {fix}",
            exitcode,
        )
        error.__cause__ = RemoteTraceback(tb_text or text)
        return error

    def _stop(self, attempt: Attempt) -> threading.Event | None:
        """Stop the call of ``attempt``. Returns an event set when its worker is gone, if it had to be ended."""
        state = attempt.runner_state
        if state is None:
            return None  # already back
        call_id = state[0]
        worker = next((w for w in self.workers if call_id in w.in_flight), None)
        if worker is None:  # still queued (dispatch skips it), or already back
            return None
        self._drain(worker)
        if call_id not in worker.in_flight:  # it finished meanwhile
            return None
        if next(iter(worker.in_flight)) != call_id:
            # Queued in the worker behind another call: tell it to skip this one. It stays in flight
            # until the worker says it skipped it, or sends its outcome: the worker may have begun it
            # already, and what it does then (its death too) is its own, never the next call's.
            try:
                worker.call_w.send_bytes(pickle.dumps((CANCEL, call_id), PROTOCOL))
            except OSError:
                pass
            return None
        self._finish_call(worker, attempt)
        self._end_worker(worker)
        gone = threading.Event()
        worker.gone_waiters.append(gone)
        return gone

    def _take_all_calls(self) -> list[Attempt]:
        """The attempts of every call the pool holds, queued or in a worker; the workers are ended. No more calls start."""
        self.has_room = False
        calls = list(self.pending) + self._take_submitted()
        self.pending.clear()
        for worker in self.workers:
            calls.extend(worker.in_flight.values())
            worker.in_flight.clear()
            worker.bytes_in_flight = 0
            self._end_worker(worker)
        for attempt in calls:
            attempt.runner_state = None
        return calls

    def _end_worker(self, worker: WorkerProcess) -> None:
        if not worker.ending:
            worker.ending = True
            worker.kill_at = time.monotonic() + TERMINATE_GRACE
            worker.signal_group(signal.SIGTERM)

    def _escalate_kills(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if worker.kill_at is not None and worker.kill_at <= now:
                worker.kill_at = None
                worker.signal_group(signal.SIGKILL)

    # ---- the end ------------------------------------------------------------------------------

    def _close_workers(self) -> None:
        """Let every worker go (end of file on its pipe), reading what it still sends; kill laggards."""
        with self.lock:
            workers = list(self.workers)
        for worker in workers:
            if worker.ending:
                worker.signal_group(signal.SIGKILL)
            else:
                worker.close_call_pipe()
        deadline = time.monotonic() + 5
        for worker in workers:
            self._drain_until_exit(worker, deadline)
            if worker.poll_exit() is None:
                worker.signal_group(signal.SIGKILL)
                self._drain_until_exit(worker, time.monotonic() + 5)
        with self.lock:
            for worker in workers:
                worker.close()
                self.workers.remove(worker)
                for event in worker.gone_waiters:
                    event.set()
            out = self._take_outbox()
        self._deliver(out)

    def _drain_until_exit(self, worker: WorkerProcess, deadline: float) -> None:
        while worker.poll_exit() is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            ready = wait([worker.result_r, worker.sentinel], remaining)
            with self.lock:
                if worker.result_r in ready:
                    self._drain(worker)
            if worker.sentinel in ready:
                with self.lock:
                    self._drain(worker)
                worker.reap(kill_group=False, timeout=1)
