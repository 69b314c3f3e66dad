"""``MultiprocessTaskRun``: attempts run on a pool of reusable worker processes.

The parent side is one supervisor thread per pool. It waits in one place on the workers'
result pipes, their process sentinels and a wake-up pipe together (never on a timer),
drains a worker's results before it ever joins or replaces it, tops workers up from the
backlog (in batches), and ends workers on stop, timeout and shutdown.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import select
import signal
import struct
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import deque
from typing import Any, ClassVar

import cloudpickle
import multiprocess
from multiprocess import process as _mp_process
from multiprocess.connection import wait

from .. import _freshness, _lifecycle, _worker
from .._config import positive_int_or_none
from .._run import PLAIN_TYPES as _PLAIN
from .._run import Attempt, BaseTaskRun, R
from ..errors import RemoteTraceback, SerializationError, TaskrunError, WorkerDied, describe_exit

logger = logging.getLogger("taskrun")

_OK = _worker.OK
#: Most calls sent to one worker ahead of time when there is a backlog.
MAX_BATCH = 256
#: Seconds of work a worker is given ahead of time when there is a backlog: enough to keep it
#: busy while the parent's threads take turns with the GIL, short enough to balance the end
#: of a batch of long calls (they go one at a time).
AHEAD_SECONDS = 0.01
#: A worker's own cost of one call (receive, unpickle, pickle, send), added to its run time.
CALL_OVERHEAD = 20e-6
#: Bytes of calls a busy worker may have waiting in its pipe; more could block the supervisor.
PIPE_BUDGET = 32 * 1024
#: Bytes of one call's message besides its pickled arguments, as counted against the budget.
CALL_BYTES = 64
#: Plain arguments (str and bytes up to this long) travel in the batch's own pickle.
_PLAIN_MAX = 256
#: Most functions a reused worker holds (one version per task); the oldest goes first.
MAX_WORKER_FUNCTIONS = 64
#: Seconds between SIGTERM and SIGKILL when a worker is ended.
TERMINATE_GRACE = 1.0


def _default_start_method() -> str:
    return "fork" if "fork" in multiprocess.get_all_start_methods() and sys.platform != "darwin" else "spawn"


class MultiprocessTaskRun(BaseTaskRun[R]):
    """Runs calls on a pool of reusable worker processes; best for CPU-bound work.

    Settings: ``start_method`` (fork where available, else spawn), ``max_workers``
    (default ``os.cpu_count()``), ``max_tasks_per_worker`` (None: reuse forever; 1: a fresh
    process per call). ``stop()`` and a timeout end the worker's whole process group
    (SIGTERM, then SIGKILL) and the pool replaces it. Functions, lambdas and closures travel
    with cloudpickle, as they are when each call is made (see ``_freshness``); arguments that
    cannot be pickled raise :class:`SerializationError` at call time.
    """

    start_method: ClassVar[str | None] = _default_start_method()
    max_workers: ClassVar[int | None] = os.cpu_count() or 1
    max_tasks_per_worker: ClassVar[int | None] = None
    settings: ClassVar[dict[str, Any]] = {
        "start_method": start_method, "max_workers": max_workers, "max_tasks_per_worker": max_tasks_per_worker,
    }
    # The call's arguments as sent, made by prepare(): the pickled (args, kwargs), or the args
    # tuple itself when it holds only small plain values (the batch's own pickle carries them).
    _payload: bytes | tuple[Any, ...] | None = None
    _pool_used: ProcessPool | None = None  # the pool of the first attempt, which retries go to
    _function: tuple[int, tuple[bytes, dict[str, list[str]]]]  # its function as pickled when called (prepare)

    @staticmethod
    def validate_setting(name: str, value: Any) -> None:
        if name == "start_method":
            if value is not None and value not in multiprocess.get_all_start_methods():
                available = ", ".join(multiprocess.get_all_start_methods())
                raise ValueError(
                    f"MultiprocessTaskRun setting start_method={value!r} is not available here; use one of {available}"
                )
        else:
            positive_int_or_none("MultiprocessTaskRun", name, value)

    @classmethod
    def _pool(cls) -> ProcessPool:
        pool = _lifecycle.pools.get(cls)
        if pool is None:
            pool = _lifecycle.get_pool(cls, lambda: ProcessPool(cls))
        return pool  # type: ignore[return-value]

    def prepare(self) -> None:
        task = self.task
        # The function as it is now: its pickle is reused while nothing it captured has changed.
        pickled = getattr(task, "_process_fn", None)
        current = pickled.current if pickled is not None else None
        if current is not None and current[0]():  # PickledFunction.payload(), inline: it runs at every call
            self._function = current[1]
        else:
            if pickled is None:
                pickled = task._process_fn = _freshness.PickledFunction(task.fn)  # type: ignore[attr-defined]
            try:
                self._function = pickled.payload()
            except Exception as exc:
                raise SerializationError(f"the function of task {task.name} could not be pickled: {exc}") from exc
        args, kwargs = self.args, self.kwargs
        if not kwargs:
            for arg in args:
                kind = type(arg)
                if kind not in _PLAIN or (kind is str or kind is bytes) and len(arg) > _PLAIN_MAX:
                    break
            else:
                self._payload = args
                return
        try:
            call = (args, kwargs)
            data = _worker.dumps(call)
            if b"__main__" in data and not self._main_names_resolve(call):
                # pickle names classes and functions of __main__; a spawned worker's __main__ lacks
                # those of a notebook or `python -c`, a forked one those made after it was forked:
                # send them by value.
                data = cloudpickle.dumps(call, _worker.PROTOCOL)
            self._payload = data
        except Exception as exc:
            raise SerializationError(
                f"the arguments of {self.id} could not be pickled to send to a worker process: {exc}"
            ) from exc

    def _main_names_resolve(self, call: Any) -> bool:
        """True if every worker can look up, by name, the objects of __main__ that ``call`` names."""
        if (self.start_method or _default_start_method()) != "fork":
            return False
        pool = _lifecycle.pools.get(type(self))
        known = pool.forked_main if pool is not None else None  # type: ignore[attr-defined]
        if known is None:  # no worker yet: they will be forked from __main__ as it is now
            return True
        return _freshness.main_references_known(call, known)

    def start_attempt(self, attempt: Attempt) -> None:
        # Retries go to the pool of the first attempt while it lives (it may be finishing at exit).
        pool = self._pool_used
        if pool is None or pool.closing in ("now", "closed"):
            if self._payload is None:  # a subclass's prepare() did not call ours
                MultiprocessTaskRun.prepare(self)
            # _pool(), inline: a classmethod call costs about 2% of a map call
            pool = self._pool_used = _lifecycle.pools.get(type(self)) or self._pool()  # type: ignore[assignment]
        pool.submit(attempt)

    def stop_attempt(self, attempt: Attempt) -> None:
        pool = self._pool_used
        if pool is not None and attempt.runner_state is not None:
            pool.stop_call(attempt)

    @classmethod
    def shutdown(cls, wait: bool = True) -> None:
        for pool in _lifecycle.drop_pools(cls):
            pool.shutdown(wait=wait)


_call_ids = itertools.count(1)
_worker_numbers = itertools.count(1)


class _FrameReader:
    """Reads the length-prefixed frames a worker's ``send_bytes`` writes, many per system call.

    The pipe is non-blocking and ``read`` never waits: the supervisor neither blocks inside a
    read (with the pool locked) nor needs a second system call to ask whether data is there
    (each one lets another thread take the GIL). A frame that has not fully arrived stays
    here until poll reports more: a small one in ``buffer``, a big one in a bytearray of its
    final size that the next reads fill in place, so a 100 MB result is copied once.
    """

    CHUNK = 1 << 16
    #: Reads one call of ``read`` makes into a big frame before it lets the supervisor go on.
    FILL_READS = 16

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.buffer = bytearray()  # the start of a frame (or of its header) that is not complete yet
        self.frame: bytearray | None = None  # a big frame being filled in place
        self.filled = 0
        self.eof = False

    def read(self) -> list[bytes | bytearray] | None:
        """Read what the pipe holds now; the frames it completed, in order ([] if none). None if it held nothing.

        At the end of the pipe ``eof`` turns True; an incomplete frame there (the worker died
        while it wrote) is dropped, and every frame before it has been returned.
        """
        if self.frame is not None:
            return self._fill()
        try:
            chunk = os.read(self.fd, self.CHUNK)
        except BlockingIOError:
            return None
        if not chunk:
            self.eof = True
            return []
        buffer: bytes | bytearray
        if self.buffer:
            buffer = self.buffer
            buffer += chunk
        else:
            buffer = chunk  # the usual case, whole frames: sliced straight out of what was read
        frames: list[bytes | bytearray] = []
        pos, end = 0, len(buffer)
        while end - pos >= 4:
            (size,) = struct.unpack_from("!i", buffer, pos)
            header = 4
            if size == -1:  # a frame of 2 GiB or more
                if end - pos < 12:
                    break
                (size,) = struct.unpack_from("!Q", buffer, pos + 4)
                header = 12
            start = pos + header
            if end - start >= size:
                frames.append(buffer[start : start + size])
                pos = start + size
            elif size > self.CHUNK:  # a big frame: the rest goes straight into place, as it comes
                frame = self.frame = bytearray(size)
                self.filled = end - start
                frame[: self.filled] = memoryview(buffer)[start:end]
                pos = end
                break
            else:
                break
        if buffer is chunk:
            if pos < end:
                self.buffer = bytearray(chunk[pos:])
        else:
            del buffer[:pos]
        return frames

    def _fill(self) -> list[bytes | bytearray] | None:
        """Read into the big frame under way, never past its end; return it once it is complete."""
        frame = self.frame
        assert frame is not None
        size = len(frame)
        view = memoryview(frame)
        got = False
        try:
            for _ in range(self.FILL_READS):
                try:
                    n = os.readv(self.fd, [view[self.filled :]])
                except BlockingIOError:
                    break
                got = True
                if n == 0:
                    self.eof = True
                    self.frame = None  # the worker died in the middle of it
                    return []
                self.filled += n
                if self.filled == size:
                    self.frame = None
                    return [frame]
        finally:
            view.release()
        return [] if got else None


class _StartName(str):
    """The name of a spawned or forkserver worker process; unpickled there, it first installs a hook.

    multiprocess's bootstrap in the new process unpickles its preparation data (which holds
    the process name), then runs the main script again, and only then our entry point. A
    failure in between -- the classic one: a script that calls a task at import time, without
    an ``if __name__ == "__main__":`` guard -- ends the process with exit code 1 and its
    traceback on stderr, out of the caller's sight. This name, unpickled first, runs
    ``_worker.START_HOOK`` (standard library only, so it works before the parent's sys.path
    is in place), whose excepthook writes that traceback to ``path``, where ``_reap`` reads
    it. It evaluates back to a plain str, the name multiprocess expects.
    """

    path: str

    def __new__(cls, name: str, path: str) -> _StartName:
        self = super().__new__(cls, name)
        self.path = path
        return self

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (eval, ("exec(hook, {'PATH': path}) or name", {"hook": _worker.START_HOOK, "path": self.path,
                                                              "name": str(self)}))


class _Worker:
    """One worker process and the parent's ends of its three pipes."""

    def __init__(self, pool: ProcessPool) -> None:
        ctx = pool.ctx
        call_r, self.call_w = ctx.Pipe(duplex=False)
        self.result_r, result_w = ctx.Pipe(duplex=False)
        alive_r, self.alive_w = ctx.Pipe(duplex=False)
        self.in_flight: dict[int, Attempt] = {}  # call id -> attempt, in the order sent, which is the order they run
        self.fns_sent: dict[int, Any] = {}  # id -> owner (PickledFunction) of the functions it holds, oldest first
        self.bytes_in_flight = 0
        self.ending = False  # stopped or timed out: being terminated
        self.ready = False  # set up and reading calls: calls sent to it begin (and their timeouts run) from then
        self.pool_fresh = pool.max_tasks is not None
        self.method = pool.method
        self.kill_at: float | None = None
        self.gone_waiters: list[threading.Event] = []
        self.reap_lock = threading.Lock()  # held to signal the process, and to reap it: never one after the other
        self.reaped = False
        number = next(_worker_numbers)
        # Where the worker leaves the traceback of an error that keeps it from starting (created only then).
        self.start_error_path: str | None
        try:
            self.start_error_path = os.path.join(
                tempfile.gettempdir(), f"taskrun-start-{os.getpid()}-{number}-{uuid.uuid4().hex}.txt"
            )
        except OSError:  # no usable temporary directory: start errors say only the exit code
            self.start_error_path = None
        config = {
            "max_tasks_per_worker": pool.max_tasks, "log_levels": _log_levels(), "start_error_path": self.start_error_path,
        }
        name = f"taskrun-worker-{number}"
        if self.method == "fork":
            pool.note_fork()
        self.process = ctx.Process(
            target=_worker.worker_main,
            args=(call_r, result_w, alive_r, config),
            name=name if self.method == "fork" or not self.start_error_path else _StartName(name, self.start_error_path),
            daemon=True,
        )
        pool.workers.append(self)  # registered before fork, so a forked child can close our ends
        try:
            self.process.start()
        except BaseException:
            pool.workers.remove(self)
            for conn in (call_r, result_w, alive_r):
                conn.close()
            self.close()
            raise
        # Only we reap it: multiprocess would otherwise reap it whenever any process is started
        # (or active_children() is called), and we must know when its pid is no longer ours.
        _mp_process._children.discard(self.process)
        for conn in (call_r, result_w, alive_r):
            conn.close()
        self.pid: int = self.process.pid
        try:
            os.setpgid(self.pid, self.pid)  # as the worker does first thing: its group exists from now on
        except OSError:
            pass  # it already did (or, under spawn, exec'd and must do it itself)
        self.sentinel: int = self.process.sentinel
        self.reader = _FrameReader(self.result_r.fileno())

    @property
    def busy(self) -> bool:
        return bool(self.in_flight)

    # Signals and pid reuse. A pid is free for reuse once its process is reaped; a process
    # group id once its leader is reaped *and* the group is empty (Linux never hands out a
    # number still in use as a process group id). Under fork and spawn the worker is our child
    # and only we reap it (see __init__): until we do, even dead, it holds its pid and its
    # group id, so signalling either is safe; so signal_group and reap take reap_lock,
    # and nothing is signalled once ``reaped``. Under forkserver the forkserver reaps it, at
    # once; its sentinel then reports the exit code, so we signal nothing once that is there.

    def signal_group(self, signum: int) -> None:
        """Signal the worker's process group (what its task started too); the worker alone if it has none yet."""
        with self.reap_lock:
            if self.reaped or self.method == "forkserver" and wait([self.sentinel], 0):
                return
            try:
                os.killpg(self.pid, signum)
                return
            except ProcessLookupError:
                pass  # a worker that has not made its group yet (just started): signal it alone
            except PermissionError:
                return
            try:
                os.kill(self.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def reap(self, kill_group: bool, timeout: float) -> int | None:
        """After the worker exited: end what its task left in its group (if ``kill_group``), then reap it.

        Under fork and spawn the group is signalled while the dead worker still holds its
        group id. Under forkserver it was reaped already: the group id stays reserved while
        the task's processes live, which are the ones to kill; once none does, killpg finds
        nothing, unless, within the milliseconds since the worker died, every pid was handed
        out again and a new process made itself the leader of a group with this number.
        """
        with self.reap_lock:
            if kill_group and not self.reaped:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except OSError:
                    pass
            self.process.join(timeout)
            exitcode = self.process.exitcode
            if exitcode is not None:
                self.reaped = True
            return exitcode

    def poll_exit(self) -> int | None:
        """The exit code if the worker has exited (reaping it), else None; never blocks."""
        with self.reap_lock:
            exitcode = self.process.exitcode
            if exitcode is not None:
                self.reaped = True
            return exitcode

    def take_start_error(self) -> str | None:
        """The traceback the worker left when it could not start, if it did (the file is removed)."""
        if self.start_error_path is None:
            return None
        try:
            with open(self.start_error_path) as f:
                text = f.read()
        except OSError:
            return None
        try:
            os.unlink(self.start_error_path)
        except OSError:
            pass
        return text or None

    def close(self) -> None:
        for conn in (self.call_w, self.result_r, self.alive_w):
            try:
                conn.close()
            except OSError:
                pass


def _log_levels() -> dict[str, int]:
    """The caller's logger levels, so a spawned worker forwards what the caller would handle."""
    levels = {"": logging.getLogger().getEffectiveLevel()}
    for name, item in logging.Logger.manager.loggerDict.items():
        if isinstance(item, logging.Logger) and item.level:
            levels[name] = item.level
    return levels


class ProcessPool:
    """The worker processes of one runner class, with the supervisor thread that watches them.

    One lock guards the pool's state. A caller's thread may hand a call straight to an idle
    worker (the fast path for a call-and-wait loop); everything else -- reading results,
    reaping and replacing workers, topping up busy workers from the backlog -- happens in
    the supervisor. Outcomes are collected under the lock and delivered after it is released,
    so handles, retries and user callbacks never run while the pool is locked.
    """

    def __init__(self, runner: type[MultiprocessTaskRun[Any]]) -> None:
        method = self.method = runner.start_method or _default_start_method()
        self.ctx = multiprocess.get_context(method)
        # fork: the classes and functions of __main__ that every worker forked so far has as we
        # do (None: no worker yet). A call's arguments may name those by reference.
        self.forked_main: dict[str, Any] | None = None
        self.max_workers = runner.max_workers or os.cpu_count() or 1
        self.max_tasks = runner.max_tasks_per_worker
        self.lock = threading.Lock()
        self.workers: list[_Worker] = []
        self.pending: deque[Attempt] = deque()  # the attempts of calls waiting for a worker
        self.submitted: deque[Attempt] = deque()  # appended without the lock while no worker has room
        self.has_room = True  # a worker is idle, or another may start
        # Moving average of a call's duration in a worker, with its overhead. It starts at a
        # value that sends calls one at a time, until calls have shown they are short.
        self.call_seconds = AHEAD_SECONDS
        self.outbox: list[tuple[Any, ...]] = []
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.wake_pending = False
        self.closing: str | None = None  # "wait", "now", then "closed"
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._supervise, name="taskrun-process-pool", daemon=True)
        self.thread.taskrun_delivers = True  # type: ignore[attr-defined]  # see BaseTaskRun.wait
        self.thread.start()

    # ---- entry points from any thread ------------------------------------------------------

    def submit(self, attempt: Attempt) -> None:
        """Queue ``attempt`` as a call to a worker. While the pool holds it, its ``runner_state`` is the call's id.

        Every call submitted ends: it runs, or, if the pool is shut down first, it ends
        STOPPED, saying so.
        """
        attempt.runner_state = next(_call_ids)
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
                started, out = False, []
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
        if gone is not None:
            self._wake()  # the supervisor keeps the SIGKILL deadline
            if threading.current_thread() is not self.thread:
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
        now = _freshness.main_objects()
        known = self.forked_main
        self.forked_main = now if known is None else {k: v for k, v in known.items() if now.get(k) is v}

    def after_fork_in_child(self) -> None:
        """In a forked child (a new worker, or the user's own fork): drop the parent's pipe ends."""
        for worker in self.workers:
            worker.close()
        for fd in (self.wake_r, self.wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _take_outbox(self) -> list[tuple[Any, ...]]:
        out, self.outbox = self.outbox, []
        return out

    def _deliver(self, out: list[tuple[Any, ...]]) -> None:
        """Hand outcomes, log records and warnings over; runs without the pool lock.

        The successes of one read are reported together (``Attempt.report_results``), so the
        runs of a ``map`` group are counted by their group together.
        """
        successes: list[tuple[Attempt, Any, float | None]] = []
        ended = 0.0
        for item in out:
            kind = item[0]
            try:
                if kind == _OK:
                    successes.append((item[1], item[2], item[3]))
                    ended = item[4]
                elif kind == _worker.RAISED:
                    item[1].set_exception(item[2], started_at=item[3])
                elif kind == _worker.LOG:
                    record = logging.makeLogRecord(item[1])
                    target = logging.getLogger(record.name)
                    if target.isEnabledFor(record.levelno):
                        target.handle(record)
                elif kind == _worker.WARN:
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
                Attempt.report_results(successes, ended)
            except Exception:
                logger.exception("taskrun could not deliver the results of a worker process")

    # ---- the supervisor thread --------------------------------------------------------------

    def _supervise(self) -> None:
        # One poll object over the wake-up pipe and every worker's result pipe and sentinel;
        # rebuilt only when the set of workers changes.
        poller = select.poll()
        watched: dict[int, tuple[_Worker | None, bool]] = {}  # fd -> (worker, is its sentinel)
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
                    current = {self.wake_r: (None, False)}
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
            _lifecycle.forget_pool(self)  # the next call starts a new pool
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
            free.append(_Worker(self))
            idle += 1
            started = True
        depth = 1
        # Fresh processes (max_tasks_per_worker) take one call at a time: a queued call would
        # otherwise wait in a process that is about to be replaced.
        if len(pending) > len(free) and self.max_tasks is None:
            ahead = int(AHEAD_SECONDS / self.call_seconds)
            depth = max(1, min(MAX_BATCH, ahead, len(pending) // max(1, len(free))))
        for worker in free:
            if not pending:
                break
            if worker.busy:
                # A busy worker gets more only when there is a backlog and it is running low.
                if idle_only or depth == 1 or len(worker.in_flight) > depth // 2:
                    continue
            elif running >= self.max_workers:
                continue
            else:
                running += 1
            self._send_batch(worker, depth)
        return started

    def _send_batch(self, worker: _Worker, depth: int) -> None:
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
            run = attempt.run
            if run.task is not task:
                task = run.task
                timeout = task.timeout
            if run._function is not function:  # type: ignore[attr-defined]
                function = run._function  # type: ignore[attr-defined]
                fn_id = function[0]
                send_fn = fresh or fn_id not in worker.fns_sent
            if timeout is not None and in_flight:
                break  # a call with a timeout starts at once, never queued behind another
            payload = run._payload  # type: ignore[attr-defined]
            size = len(payload) + CALL_BYTES
            if size > budget and in_flight:
                break
            pending.popleft()
            call_id = attempt.runner_state
            if send_fn:
                fn = self._function_message(worker, run, fresh)  # the worker holds it from now on
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
            worker.call_w.send_bytes(pickle.dumps((_worker.CALLS, batch), _worker.PROTOCOL))
        except OSError:  # the worker is gone; its sentinel will say so
            pending.extendleft(reversed([in_flight.pop(entry[0]) for entry in batch]))
            worker.fns_sent.clear()
            return
        worker.bytes_in_flight += sent
        if worker.ready and was_idle:
            self._mark_started(worker)

    @staticmethod
    def _function_message(worker: _Worker, run: Any, fresh: bool) -> tuple[bytes, dict[str, list[str]], tuple[int, ...]]:
        """The function of ``run`` as sent to ``worker``, which from then on holds it (see ``_worker``).

        A reused worker holds one version of each task's function, and at most
        ``MAX_WORKER_FUNCTIONS`` functions: the message says which ones to forget.
        """
        fn_id, (data, sources) = run._function
        if fresh:
            return data, sources, ()  # a fresh process forgets everything anyway
        held = worker.fns_sent
        owner = run.task._process_fn
        drop = [old for old, old_owner in held.items() if old_owner is owner]
        excess = len(held) - len(drop) + 1 - MAX_WORKER_FUNCTIONS
        if excess > 0:
            drop.extend([old for old in held if old not in drop][:excess])
        for old in drop:
            del held[old]
        held[fn_id] = owner
        return data, sources, tuple(drop)

    @staticmethod
    def _mark_started(worker: _Worker) -> None:
        """The worker's first call in flight is the one it executes: it turns RUNNING (and its timeout starts).

        Calls sent ahead stay PENDING behind it; each begins when the one before it is reported.
        """
        for attempt in worker.in_flight.values():
            if attempt.started_at is None:
                attempt.mark_started()
            return

    def _read_once(self, worker: _Worker) -> None:
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

    def _drain(self, worker: _Worker) -> None:
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

    def _handle(self, worker: _Worker, frames: list[bytes | bytearray]) -> None:
        """Handle the messages of one read, then mark the call the worker has gone on to started.

        A call whose outcome comes in the same read as the one before it was never marked
        started: its start is dated back by the time it ran, which the worker sends along.
        """
        if not frames:
            return
        in_flight = worker.in_flight
        outbox = self.outbox
        now = time.time()
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
                    outbox.append((_worker.RAISED, attempt, SerializationError(reason), None))
                continue
            if kind == _OK:  # the hot path, inline
                attempt = in_flight.pop(call_id, None)
                if attempt is None:
                    continue  # its run was stopped
                freed += len(attempt.run._payload) + CALL_BYTES
                attempt.runner_state = None
                outbox.append((_OK, attempt, payload, now - seconds, now))
            else:
                self._handle_other(worker, kind, call_id, payload, seconds, now)
        worker.bytes_in_flight -= freed
        if seconds >= 0:  # the last call's time stands for the read's: calls of one read are alike
            self.call_seconds += 0.2 * (seconds + CALL_OVERHEAD - self.call_seconds)
        if worker.ready:
            self._mark_started(worker)

    def _handle_other(self, worker: _Worker, kind: int, call_id: int | None, payload: Any, seconds: float,
                      now: float) -> None:
        if kind == _worker.READY:
            worker.ready = True
            return
        if kind == _worker.LOG or kind == _worker.WARN:
            self.outbox.append((kind, payload))
            return
        if kind == _worker.DIED:  # a fresh child of this worker ended without finishing its call
            attempt = next(iter(worker.in_flight.values()), None)
            if attempt is not None:
                self._finish_call(worker, attempt)
                self.outbox.append((_worker.RAISED, attempt, self._died(worker, attempt, payload), None))
            return
        attempt = worker.in_flight.get(call_id)  # type: ignore[arg-type]
        if attempt is None:
            return  # its run was stopped (a cancelled call's acknowledgement lands here too)
        self._finish_call(worker, attempt)
        if kind == _worker.RAISED:
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
        self.outbox.append((_worker.RAISED, attempt, exc, now - seconds))

    @staticmethod
    def _finish_call(worker: _Worker, attempt: Attempt) -> None:
        """The call of ``attempt`` leaves ``worker`` (and the pool)."""
        if worker.in_flight.pop(attempt.runner_state, None) is not None:
            worker.bytes_in_flight -= len(attempt.run._payload) + CALL_BYTES  # type: ignore[attr-defined]
        attempt.runner_state = None

    def _reap(self, worker: _Worker) -> None:
        """A worker exited: drain what it sent, end what its task left behind, reap it, settle its calls, forget it."""
        self._drain(worker)  # every outcome it sent before it died is delivered first
        calls = list(worker.in_flight.values())
        worker.in_flight.clear()
        worker.bytes_in_flight = 0
        # Whatever the task started dies with it (see _Worker.reap for why before the reaping).
        exitcode = worker.reap(kill_group=worker.ending or bool(calls), timeout=1)
        start_error = None if worker.ready or worker.ending else worker.take_start_error()
        if start_error is not None:
            # It could not start, and the next worker would fail the same way: the calls waiting
            # for a worker end with its error (calls made from now on try a new worker again).
            waiting = calls + [attempt for attempt in self.pending if not attempt.reported]
            self.pending.clear()
            for attempt in waiting:
                attempt.runner_state = None
                self.outbox.append((_worker.RAISED, attempt, self._start_failed(worker, attempt, exitcode, start_error),
                                    None))
            if not waiting:
                logger.warning("%s", self._start_failed(worker, None, exitcode, start_error))
        elif worker.ending:
            self.pending.extendleft(reversed(calls))  # queued behind the stopped call: never started
        elif calls:
            dead, rest = calls[0], calls[1:]
            self.pending.extendleft(reversed(rest))
            dead.runner_state = None
            self.outbox.append((_worker.RAISED, dead, self._died(worker, dead, exitcode), None))
        elif self.closing is None:
            logger.warning("taskrun worker process %s died while idle: %s", worker.pid, describe_exit(exitcode))
        worker.close()
        self.workers.remove(worker)
        for event in worker.gone_waiters:
            event.set()

    @staticmethod
    def _died(worker: _Worker, attempt: Attempt, exitcode: int | None) -> WorkerDied:
        where = "a fresh process of worker" if worker.pool_fresh else "the worker process"
        return WorkerDied(
            f"{where} (pid {worker.pid}) running {attempt.run.id} died: {describe_exit(exitcode)}", exitcode
        )

    def _start_failed(self, worker: _Worker, attempt: Attempt | None, exitcode: int | None, text: str) -> WorkerDied:
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
        call_id = attempt.runner_state
        worker = next((w for w in self.workers if call_id in w.in_flight), None)
        if worker is None:  # still queued (dispatch skips it), or already back
            return None
        self._drain(worker)
        if call_id not in worker.in_flight:  # it finished meanwhile
            return None
        first = next(iter(worker.in_flight))
        self._finish_call(worker, attempt)
        if first != call_id:  # queued in the worker behind another call: tell it to skip this one
            try:
                worker.call_w.send_bytes(pickle.dumps((_worker.CANCEL, call_id), _worker.PROTOCOL))
            except OSError:
                pass
            return None
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

    def _end_worker(self, worker: _Worker) -> None:
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
                try:
                    worker.call_w.close()
                except OSError:
                    pass
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

    def _drain_until_exit(self, worker: _Worker, deadline: float) -> None:
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
