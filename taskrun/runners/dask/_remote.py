"""The worker side of ``DaskTaskRun``: what runs in a Dask worker for each attempt.

Every attempt is one Dask task running :func:`run_attempt`. It never raises: it returns an
:class:`Outcome` (the value or the exception with its traceback text, when it began and ended
on the worker, the worker's address and pid, and the log records the call emitted), so that
an error Dask itself reports means the infrastructure failed, never the task.

The task's function reaches each worker once, in a worker plugin (:class:`FunctionPlugin`),
and calls name it by id. This module imports only the standard library, cloudpickle,
distributed, and taskrun's runner interface (for the stop flag), as it runs on the workers.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any

import cloudpickle
from distributed import Event, get_client, get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from ..base import register_sources, set_stop_flag
from ._outcome import (
    DIED,
    END,
    ENDED,
    PROTOCOL,
    RECORD,
    UNPICKLABLE,
    VALUE,
    CoroutineType,
    dumps,
    exception_payload,
    record_fields,
    send_records_to,
    take_frames,
    type_of,
    value_payload,
)

# How a call's arguments travel (the ``mode`` of its config).
PLAIN, BYTES, VIA_DASK = range(3)

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_child.py")
#: Seconds an attempt without a timeout runs before its start is announced to the caller.
START_ANNOUNCE_DELAY = 0.05
#: Seconds between two looks at the attempts whose start may be due for announcing, and at those that
#: logged something, whether they were stopped (their records are then sent to the caller at once).
WATCH_TICK = 0.02
#: The first item of the event that sends the caller the log records of an attempt that was stopped.
LOGS = "logs"
#: Seconds between two reads of a run's stop Event by a function that polls stop_requested().
EVENT_POLL = 0.5
#: Seconds between two checks for a stop while a child process runs an isolated attempt.
CHILD_POLL = 0.05
#: Seconds between SIGTERM and SIGKILL when an isolated attempt is ended.
TERMINATE_GRACE = 1.0


def stop_event_name(key: str) -> str:
    """The name of the ``distributed.Event`` that ``stop()`` sets for the attempt of Dask task ``key``."""
    return f"taskrun-stop-{key}"


class Outcome:
    """What an attempt came to, as the worker returns it. ``payload`` depends on ``kind``:

    VALUE: the value itself (a plain value); PICKLED: the value's pickle; RAISED: ``(pickled
    exception, traceback text)``; UNPICKLABLE: ``(reason, traceback text)``; DIED: the exit code
    of the child process that ran an isolated attempt; ENDED: None (stopped; nobody reads it).
    """

    __slots__ = ("kind", "payload", "started", "ended", "worker", "pid", "logs")

    def __init__(self, kind: int, payload: Any, started: float, ended: float, worker: str, pid: int,
                 logs: list[dict[str, Any]] | None) -> None:
        self.kind = kind
        self.payload = payload
        self.started = started
        self.ended = ended
        self.worker = worker
        self.pid = pid
        self.logs = logs

    def __reduce__(self) -> tuple[Any, ...]:
        return (Outcome, (self.kind, self.payload, self.started, self.ended, self.worker, self.pid, self.logs))

    def value(self) -> Any:
        """The value of a successful attempt (a dependent run's argument)."""
        return self.payload if self.kind == VALUE else pickle.loads(self.payload)


# ---- the function, once per worker --------------------------------------------------------

_functions: dict[str, FunctionPlugin] = {}


class FunctionPlugin(WorkerPlugin):
    """Carries one task's pickled function to every worker (present and future) of a cluster.

    Registered once per task per client; calls name it by ``fn_id``. The function is
    unpickled on a worker the first time a call needs it, after its source lines
    (``sources``, see ``taskrun.runners.base.dumps_function``) are made readable there for
    tracebacks and warnings. ``levels`` are the caller's logger levels, applied in the worker
    so that the records the caller would handle are made.
    """

    idempotent = True  # registering it again (after a worker left mid-broadcast) is a no-op

    def __init__(self, fn_id: str, fn_bytes: bytes, sources: dict[str, list[str]], levels: dict[str, int]) -> None:
        self.fn_id = fn_id
        self.fn_bytes = fn_bytes
        self.sources = sources
        self.levels = levels
        self.fn: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"fn_id": self.fn_id, "fn_bytes": self.fn_bytes, "sources": self.sources, "levels": self.levels,
                "fn": None}

    def setup(self, worker: Any) -> None:
        apply_levels(self.levels)
        _functions[self.fn_id] = self
        _quiet_stopped_tasks(worker)

    def teardown(self, worker: Any) -> None:
        if _functions.get(self.fn_id) is self:
            del _functions[self.fn_id]

    def load(self) -> Any:
        fn = self.fn
        if fn is None:
            register_sources(self.sources)
            fn = self.fn = cloudpickle.loads(self.fn_bytes)
        return fn


class IgnoreInterrupts(WorkerPlugin):
    """Makes the worker processes of taskrun's own local cluster ignore SIGINT.

    Ctrl-C in a terminal signals the whole process group, the cluster's worker processes
    included: each would print its KeyboardInterrupt and Dask's complaints about it, while
    taskrun stops the runs and closes the cluster it started anyway (its process workers
    ignore SIGINT too).
    """

    idempotent = True

    def setup(self, worker: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def apply_levels(levels: dict[str, int]) -> None:
    for name, level in levels.items():
        logging.getLogger(name or None).setLevel(level)


_EXECUTE = re.compile(r"""execute\('(taskrun-[^']*)'\)""")
_quieted_worker: Any = None


class _StoppedTaskWarning(logging.Filter):
    """Drops Dask's warning, as a worker closes, about an attempt taskrun stopped that still runs in its thread
    ("Async instruction for <Task cancelled name="execute('taskrun-...')"...> ended with CancelledError"):
    its run is STOPPED already, and the function runs on as documented; Dask's words say something went wrong."""

    def __init__(self, worker: Any) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        match = _EXECUTE.search(record.getMessage())
        if match is None:
            return True
        task = self.worker.state.tasks.get(match[1])
        return task is None or task.state != "cancelled"  # cancelled: the scheduler let it go (it was stopped)


def _quiet_stopped_tasks(worker: Any) -> None:
    global _quieted_worker
    if _quieted_worker is not worker:
        _quieted_worker = worker
        logging.getLogger("distributed.worker.state_machine").addFilter(_StoppedTaskWarning(worker))


# ---- log records made by a call ----------------------------------------------------------

_capture = threading.local()  # .send: where the records of the attempt this thread runs go (None: none runs)
_capture_lock = threading.Lock()
_capture_installed = False


class _Records:
    """The log records of one attempt running in a worker thread, for its outcome.

    Once it has logged something, the watcher thread keeps an eye on it: if it is stopped
    (its Dask task cancelled) while it runs, its records so far go to the caller at once
    (the outcome of a stopped attempt is never read, and a hung one may never come).
    """

    __slots__ = ("key", "worker", "topic", "records")

    def __init__(self, key: str, worker: Any, topic: str | None) -> None:
        self.key = key
        self.worker = worker
        self.topic = topic
        self.records: list[dict[str, Any]] = []

    def add(self, record: logging.LogRecord) -> None:
        records = self.records
        records.append(record_fields(record))
        if len(records) == 1 and self.topic is not None:
            _watch(self)


def _install_capture() -> None:
    global _capture_installed
    with _capture_lock:
        if not _capture_installed:
            send_records_to(lambda: getattr(_capture, "send", None))
            _capture_installed = True


# ---- the stop flag seen by taskrun.stop_requested() in the task ----------------------------


class _StopFlag:
    """True once the run was stopped: this Dask task was cancelled (the worker released it) or the
    run's stop Event is set. The worker's own state is read at every call (a dict lookup); the
    Event, on the scheduler, at most every ``EVENT_POLL`` seconds."""

    __slots__ = ("worker", "key", "next_event_check", "stopped", "event_seen")

    def __init__(self, worker: Any, key: str) -> None:
        self.worker = worker
        self.key = key
        self.next_event_check = time.monotonic() + EVENT_POLL
        self.stopped = False
        self.event_seen = False

    def __call__(self) -> bool:
        if self.stopped:
            return True
        if not _still_running(self.worker, self.key):
            self.stopped = True
            return True
        now = time.monotonic()
        if now >= self.next_event_check:
            self.next_event_check = now + EVENT_POLL
            try:
                if Event(stop_event_name(self.key), client=get_client()).is_set():
                    self.stopped = self.event_seen = True
            except Exception:
                pass  # the scheduler cannot be asked now: the worker's own state still says
        return self.stopped

    def clear_event(self) -> None:
        """Clear the stop Event this attempt saw set, so that the scheduler forgets it."""
        if self.event_seen:
            try:
                Event(stop_event_name(self.key), client=get_client()).clear()
            except Exception:
                pass


def _still_running(worker: Any, key: str) -> bool:
    """False once the worker was told to let the Dask task ``key`` go (it was cancelled: the run was stopped)."""
    task = worker.state.tasks.get(key)
    return task is not None and task.state in ("executing", "long-running")


# ---- one attempt ---------------------------------------------------------------------------


def run_attempt(fn_id: str, config: tuple[Any, ...], call: Any) -> Outcome:
    """Run one attempt on this worker; always returns its :class:`Outcome`.

    ``config`` is ``(topic, isolate, mode, start_delay)``: the topic to announce the start on
    (None: do not), ``"process"`` to run the call in a child process, how the arguments travel
    (see below), and after how many seconds of running the start is announced (0: at once, for
    an attempt with a timeout; a call that ends sooner is never announced, its start comes with
    its outcome: an announcement costs the scheduler a message, and the worker's next message,
    the outcome, would wait for the end of its batching interval). How the arguments travel: PLAIN
    (``call`` is the tuple of positional arguments), BYTES (``call`` is the pickle of ``(args,
    kwargs)``) or VIA_DASK (``call`` is ``(args, kwargs)`` with the outcomes of upstream runs
    put in by Dask, replaced here by their values).
    """
    started = time.time()
    worker = get_worker()
    key = worker.get_current_task()
    topic, isolate, mode, start_delay = config
    address = worker.address
    if topic is not None:
        announcement = (topic, [key, address, os.getpid(), started])
        if start_delay:
            _announce_later(key, time.monotonic() + start_delay, worker, announcement)
        else:
            worker.log_event(*announcement)
    try:
        return _run(worker, key, fn_id, topic, isolate, mode, call, started, address)
    finally:
        if topic is not None and start_delay:
            _to_announce.pop(key, None)


def _run(worker: Any, key: str, fn_id: str, topic: str | None, isolate: str | None, mode: int, call: Any, started: float,
         address: str) -> Outcome:
    plugin = _functions.get(fn_id)
    if plugin is None:
        reason = (f"the task's function ({fn_id}) is not registered on worker {address}; was its plugin "
                  "unregistered, or the client that registered it closed?")
        return Outcome(UNPICKLABLE, (reason, ""), started, time.time(), address, os.getpid(), None)
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    try:
        if mode == PLAIN:
            args, kwargs = call, {}
        elif mode == BYTES:
            args, kwargs = pickle.loads(call)
        else:
            args, kwargs = _values_of_upstream(call[0]), _values_of_upstream(call[1])
    except Exception as exc:
        reason = f"the call's arguments could not be unpickled on worker {address}: {type(exc).__name__}: {exc}"
        return Outcome(UNPICKLABLE, (reason, traceback.format_exc()), started, time.time(), address, os.getpid(), None)
    flag = _StopFlag(worker, key)
    if isolate == "process":
        return _run_in_child(plugin, args, kwargs, flag, started, address, topic)
    try:
        fn = plugin.load()
    except Exception as exc:
        reason = f"the task's function could not be loaded on worker {address}: {type(exc).__name__}: {exc}"
        return Outcome(UNPICKLABLE, (reason, traceback.format_exc()), started, time.time(), address, os.getpid(), None)
    if not _capture_installed:
        _install_capture()
    records = _Records(key, worker, topic)
    previous_send = getattr(_capture, "send", None)
    _capture.send = records.add
    previous_flag = set_stop_flag(flag)
    try:
        value = fn(*args, **kwargs)
        while type(value) is CoroutineType:  # an async def (that may return a coroutine): run it to completion here
            import asyncio

            value = asyncio.run(value)
    except BaseException as exc:  # noqa: B036 - a task's SystemExit or KeyboardInterrupt is its outcome
        kind, payload = exception_payload(exc)
    else:
        kind, payload = value_payload(value)
    finally:
        set_stop_flag(previous_flag)
        _capture.send = previous_send
        flag.clear_event()
    if records.records and _watched.pop(key, None) is not None and not _still_running(worker, key):
        _send_logs(worker, topic, key, records.records)  # stopped, and it returned before the watcher looked
    return Outcome(kind, payload, started, time.time(), address, os.getpid(), records.records or None)


# Attempts whose start is to be announced if they still run at a given time: key -> (when, worker,
# announcement); and attempts running in a worker thread that logged something: key -> their records.
# One thread per worker process looks at both; it ends after a second with neither.
_to_announce: dict[str, tuple[float, Any, tuple[str, list[Any]]]] = {}
_watched: dict[str, _Records] = {}
_watcher: threading.Thread | None = None
_watcher_lock = threading.Lock()


def _announce_later(key: str, when: float, worker: Any, announcement: tuple[str, list[Any]]) -> None:
    _to_announce[key] = (when, worker, announcement)
    if _watcher is None:
        _start_watcher()


def _watch(records: _Records) -> None:
    _watched[records.key] = records
    if _watcher is None:
        _start_watcher()


def _start_watcher() -> None:
    global _watcher
    with _watcher_lock:
        if _watcher is None:
            _watcher = threading.Thread(target=_watch_loop, name="taskrun-dask-watcher", daemon=True)
            _watcher.start()


def _watch_loop() -> None:
    global _watcher
    idle_since = time.monotonic()
    while True:
        time.sleep(WATCH_TICK)
        now = time.monotonic()
        if not _to_announce and not _watched:
            if now - idle_since > 1.0:
                with _watcher_lock:
                    if not _to_announce and not _watched:
                        _watcher = None
                        return
            continue
        idle_since = now
        for key, (when, worker, announcement) in list(_to_announce.items()):
            if when <= now and _to_announce.pop(key, None) is not None:
                try:
                    worker.log_event(*announcement)
                except Exception:
                    pass  # the worker is closing
        for key, records in list(_watched.items()):
            if not _still_running(records.worker, key) and _watched.pop(key, None) is not None:
                _send_logs(records.worker, records.topic, key, list(records.records))


def _send_logs(worker: Any, topic: str | None, key: str, records: list[dict[str, Any]]) -> None:
    """Send the caller the log records of the stopped attempt of Dask task ``key`` (its outcome will not say)."""
    if topic is None or not records:
        return
    try:
        worker.log_event(topic, [LOGS, key, records])
    except Exception:
        pass  # the worker is closing


_CONTAINERS: tuple[type[Any], ...] = (list, tuple, dict, set, frozenset)


def _values_of_upstream(value: Any) -> Any:
    """``value`` with every upstream :class:`Outcome` (Dask put in for its future) replaced by its value."""
    kind = type_of(value)
    if kind is Outcome:
        return value.value()
    if kind not in _CONTAINERS:
        return value
    if kind is dict:
        return {k: _values_of_upstream(v) for k, v in value.items()}
    items = [_values_of_upstream(v) for v in value]
    return items if kind is list else kind(items)


# ---- isolate="process": the attempt in a child process ------------------------------------


def _run_in_child(plugin: FunctionPlugin, args: tuple[Any, ...], kwargs: dict[str, Any], flag: _StopFlag,
                  started: float, address: str, topic: str | None) -> Outcome:
    """Run the call in a child process leading its own process group; end the group on a stop.

    The child gets the pickled function and call on its stdin and writes its log records, as
    they are made, and then its outcome to a pipe of its own (its stdout and stderr are the
    worker's). Stopped, it is sent SIGTERM, then SIGKILL after ``TERMINATE_GRACE`` seconds;
    whatever it started dies with it, and the records it made go to the caller.
    """
    try:
        call = dumps((args, kwargs))
    except Exception as exc:
        reason = f"the call's arguments could not be pickled for a child process: {type(exc).__name__}: {exc}"
        return Outcome(UNPICKLABLE, (reason, ""), started, time.time(), address, os.getpid(), None)
    result_r, result_w = os.pipe()
    try:
        child = subprocess.Popen(
            [sys.executable, _CHILD, str(result_w)],  # a script: it imports neither taskrun nor dask
            stdin=subprocess.PIPE, pass_fds=(result_w,), start_new_session=True,
        )
    except BaseException:
        os.close(result_r)
        raise
    finally:
        os.close(result_w)
    data = bytearray()
    records: list[dict[str, Any]] = []
    end: tuple[int, Any] | None = None
    try:
        # it imports what the worker can
        message = pickle.dumps((sys.path, plugin.fn_bytes, plugin.sources, call, plugin.levels), PROTOCOL)
        feeder = threading.Thread(target=_feed_child, args=(child, message), daemon=True)
        feeder.start()
        while True:
            ready, _, _ = select.select([result_r], [], [], CHILD_POLL)
            if ready:
                chunk = os.read(result_r, 1 << 16)
                if not chunk:
                    break
                data += chunk
                for tag, item in take_frames(data):
                    if tag == RECORD:
                        records.append(item)
                    elif tag == END:
                        end = item
            if end is None and flag():
                _end_group(child)
                _read_rest(result_r, data, records)
                _send_logs(flag.worker, topic, flag.key, records)
                return Outcome(ENDED, None, started, time.time(), address, child.pid, None)
        exitcode = child.wait()
        feeder.join(1)
    finally:
        os.close(result_r)
        flag.clear_event()
    if end is None:
        return Outcome(DIED, exitcode, started, time.time(), address, child.pid, records or None)
    kind, payload = end
    return Outcome(kind, payload, started, time.time(), address, child.pid, records or None)


def _read_rest(fd: int, data: bytearray, records: list[dict[str, Any]]) -> None:
    """The log records still in the pipe of a child process that was ended."""
    while select.select([fd], [], [], CHILD_POLL)[0]:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    records.extend(item for tag, item in take_frames(data) if tag == RECORD)


def _feed_child(child: subprocess.Popen[bytes], data: bytes) -> None:
    try:
        assert child.stdin is not None
        child.stdin.write(data)
        child.stdin.close()
    except OSError:
        pass  # it died early: its exit status tells


def _end_group(child: subprocess.Popen[bytes]) -> None:
    for signum, wait in ((signal.SIGTERM, TERMINATE_GRACE), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(child.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            child.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(child.pid, signal.SIGKILL)  # what the child started, if it outlived the child
    except (ProcessLookupError, PermissionError):
        pass
