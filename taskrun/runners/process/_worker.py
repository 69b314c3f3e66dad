"""The worker side of the process pool: a small loop that reads calls, runs them and sends back each outcome.

It runs in the worker process only (see ``_protocol`` for the messages). With
``max_tasks_per_worker`` the worker forks a fresh child to serve each run of calls, from a
clean copy of itself, and says when one ends without finishing.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import select
import signal
import sys
import threading
import time
import traceback
import types
import warnings
from collections import deque
from typing import Any

import cloudpickle

from ..base import register_sources
from ._protocol import (
    CALLS,
    DIED,
    LOG,
    OK,
    PROTOCOL,
    RAISED,
    READY,
    SKIPPED,
    UNPICKLABLE,
    WARN,
    Sender,
    receive,
)

#: Narrows a value to a coroutine of anything (``types.CoroutineType`` alone leaves its parameters unknown).
_CoroutineType: type[types.CoroutineType[Any, Any, Any]] = types.CoroutineType


class _ForwardHandler(logging.Handler):
    """Sends every log record to the parent, which hands it to its own handlers."""

    def __init__(self, sender: Sender) -> None:
        super().__init__()
        self.sender = sender

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = dict(record.__dict__)
            fields["msg"] = record.getMessage()
            fields["args"] = None
            if record.exc_info:
                fields["exc_text"] = logging.Formatter().formatException(record.exc_info)
            fields["exc_info"] = None
            self.sender.send((LOG, None, fields, 0.0))
        except Exception:
            self.handleError(record)


_forwarder: logging.Handler | None = None  # this worker's _ForwardHandler


def _forward_logging(sender: Sender, levels: dict[str, int]) -> None:
    global _forwarder
    _forwarder = _ForwardHandler(sender)
    _route_logging()
    for name, level in levels.items():
        logging.getLogger(name or None).setLevel(level)

    def show_warning(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                     line: Any = None) -> None:
        try:
            pickle.dumps(category)
        except Exception:
            category = UserWarning
        sender.send((WARN, None, (str(message), category, filename, lineno), 0.0))

    warnings.showwarning = show_warning


def _route_logging() -> None:
    """Every record reaches the forwarder, and only the forwarder: the parent's handlers print it.

    On the root logger, and on each logger that does not propagate (``propagate = False``, an
    app's own logger with its own handlers): their records never reach the root. Other handlers
    (inherited through fork, or added by the main module's top level run again under spawn when a
    function is loaded) are removed: the parent has them, and would print each record twice.
    """
    forwarder = _forwarder
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        if not isinstance(logger, logging.Logger):
            continue  # a placeholder
        routed = logger is logging.root or not logger.propagate
        for handler in list(logger.handlers):
            if handler is not forwarder or not routed:
                logger.removeHandler(handler)
        if routed and forwarder is not None and forwarder not in logger.handlers:
            logger.addHandler(forwarder)


def _watch_parent(alive_conn: Any) -> None:  # pragma: no cover - ends its process by SIGKILL: nothing can save its coverage
    """End this worker's process group as soon as the parent is gone (its end of the pipe closes)."""
    try:
        alive_conn.recv_bytes()
    except (EOFError, OSError):
        pass
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _load_function(fns: dict[int, Any], fn_id: int, fn: tuple[bytes, dict[str, list[str]], tuple[int, ...]]) -> None:
    """Take in a function the parent sent: forget the ones it replaces, register its source lines, load it."""
    data, sources, drop = fn
    for old in drop:
        fns.pop(old, None)
    fns.pop(fn_id, None)  # if loading fails, no stale entry stays under this id
    if sources:
        register_sources(sources)
    fns[fn_id] = cloudpickle.loads(data)
    if _forwarder is not None:
        _route_logging()  # loading it may have run a module's top level that set up logging


def _run_call(
    fns: dict[int, Any], fn_id: int, fn: Any, payload: bytes | tuple[Any, ...]
) -> tuple[int, Any]:
    """Load the function and arguments, then call: ``(OK, value)``, ``(RAISED, exc)`` or ``(UNPICKLABLE, (reason, tb))``."""
    try:
        if fn is not None:
            _load_function(fns, fn_id, fn)
    except Exception as exc:
        reason = f"the task's function could not be loaded in the worker process: {type(exc).__name__}: {exc}"
        return UNPICKLABLE, (reason, "")
    if type(payload) is tuple:  # plain positional arguments, already unpickled with the batch
        args, kwargs = payload, {}
    else:
        try:
            args, kwargs = pickle.loads(payload)  # type: ignore[arg-type]
        except Exception as exc:
            reason = f"the call's arguments could not be unpickled in the worker process: {type(exc).__name__}: {exc}"
            return UNPICKLABLE, (reason, "")
    function = fns.get(fn_id)
    if function is None:  # its pickle failed to load with an earlier call, which said why
        return UNPICKLABLE, ("the task's function could not be loaded in the worker process", "")
    try:
        value = function(*args, **kwargs)
        while type(value) is _CoroutineType:  # an async def (that may return a coroutine): run it to completion here
            import asyncio

            value = asyncio.run(value)
        return OK, value
    except BaseException as exc:  # noqa: B036 - a task's SystemExit is its outcome, not ours
        return RAISED, exc


def _rebuild_exception(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any] | None) -> BaseException:
    """An exception of ``cls`` with these args and attributes, made without calling its ``__init__``."""
    try:
        exc = cls.__new__(cls, *args)
    except TypeError:
        exc = cls.__new__(cls)
    exc.args = args
    if state:
        exc.__dict__.update(state)
    return exc


class _SameException:
    """Pickles as a rebuilt copy of an exception whose own pickle does not load (an ``__init__``
    that does not take its ``args`` back), so the caller still gets its type and message."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self) -> tuple[Any, ...]:
        exc = self.exc
        return (_rebuild_exception, (type(exc), exc.args, getattr(exc, "__dict__", None) or None))


def _exception_payload(exc: BaseException) -> tuple[int, Any]:
    tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    why: Exception | None = None
    # An attribute that cannot be pickled still fails: a copy without it would not be the same exception.
    for candidate in (exc, _SameException(exc)):
        try:
            data = cloudpickle.dumps(candidate, PROTOCOL)
            cloudpickle.loads(data)  # an exception that pickles but cannot be rebuilt fails here, not in the parent
            return RAISED, (data, tb_text)
        except Exception as error:
            why = why or error
    return UNPICKLABLE, (
        f"the task raised {type(exc).__qualname__}: {exc}, which could not be pickled to send back "
        f"({type(why).__name__}: {why})",
        tb_text,
    )


def _ignore_signal(signum: int, frame: Any) -> None:
    """SIGINT in a worker: Ctrl-C is the parent's to handle."""


def worker_main(call_conn: Any, result_conn: Any, alive_conn: Any, config: dict[str, Any]) -> None:
    """Entry point of a worker process."""
    try:
        os.setpgid(0, 0)  # lead a process group, so stop and timeout can end what the task started too
        # A handler, not SIG_IGN: an ignored signal stays ignored across exec, so every program a
        # task started would ignore Ctrl-C; a handler is reset to the default on exec.
        signal.signal(signal.SIGINT, _ignore_signal)
        hook = sys.excepthook
        if getattr(hook, "taskrun_start_hook", False):
            sys.excepthook = hook.previous  # type: ignore[attr-defined]  # set up: the start went well
        import multiprocess

        multiprocess.current_process().daemon = False  # let tasks start processes of their own
        threading.Thread(target=_watch_parent, args=(alive_conn,), name="taskrun-parent-watch", daemon=True).start()
        sender = Sender(result_conn)
        _forward_logging(sender, config["log_levels"])
    except BaseException as exc:
        write_start_error(config.get("start_error_path"), exc)
        raise
    sender.send((READY, None, None, 0.0))
    try:
        if config["max_tasks_per_worker"] is None:
            _serve(call_conn, sender, None)
        else:
            _fork_servers(call_conn, sender, config["max_tasks_per_worker"])
    finally:
        _end_own_pools()
        logging.getLogger().handlers.clear()
        sys.stdout.flush()
        sys.stderr.flush()


def write_start_error(path: str | None, exc: BaseException) -> None:
    """Leave why this worker could not start where the parent looks for it: the error, NUL, its traceback."""
    if not path:
        return
    try:
        text = "".join(traceback.format_exception_only(type(exc), exc)) + "\0" + "".join(
            traceback.format_exception(type(exc), exc, exc.__traceback__)
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except Exception:
        pass


# Run in a spawned or forkserver worker before anything else (see process._StartName): until
# the worker is set up, an uncaught exception -- in multiprocess's bootstrap, which runs the
# main script -- leaves its traceback in PATH, where the parent reads it when the worker dies.
# Standard library only: taskrun may not be importable before the parent's sys.path is set.
START_HOOK = """
import os, sys, traceback
def hook(kind, value, tb, previous=sys.excepthook, path=PATH):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(traceback.format_exception_only(kind, value)) + "\\0"
                    + "".join(traceback.format_exception(kind, value, tb)))
    except Exception:
        pass
    previous(kind, value, tb)
if not getattr(sys.excepthook, "taskrun_start_hook", False):
    hook.taskrun_start_hook = True
    hook.previous = sys.excepthook
    sys.excepthook = hook
"""


def _end_own_pools() -> None:
    """Shut down the pools tasks started in this worker (tasks calling tasks), as a process's exit would.

    Worker processes end without running atexit handlers, and multiprocess would SIGTERM
    those pools' workers instead, which their supervisor took for deaths.
    """
    from ..base import anything_started, shutdown

    if not anything_started():
        return  # the usual case: no task here called another
    try:
        shutdown(wait=True)
    except BaseException:  # noqa: B036 - ending anyway; nothing here may keep the worker alive
        logging.getLogger("taskrun").exception("taskrun could not shut down the pools of a worker process")


def _fork_servers(call_conn: Any, sender: Sender, max_calls: int) -> None:
    """Serve every ``max_calls`` calls from a fresh child forked from this (clean) process.

    A spare child is forked while the current one works and waits for a go byte, so neither
    the fork nor the old child's exit is on the path of the next call. A child that ends
    without writing its clean byte is reported as a dead worker, with its exit status.
    """
    hangup = select.poll()
    hangup.register(call_conn.fileno(), select.POLLIN)
    spare = _fork_server(call_conn, sender, max_calls)
    exited: int | None = None  # a child that finished cleanly, reaped once the next one has its go
    while True:
        pid, go_w, done_r = spare
        os.write(go_w, b"1")
        os.close(go_w)
        if exited is not None:
            os.waitpid(exited, 0)  # off the path of the next call: its exit overlaps the next child's work
            exited = None
        spare = _fork_server(call_conn, sender, max_calls)
        clean = os.read(done_r, 1) == b"1"  # b"" (end of file): it died without finishing
        os.close(done_r)
        if clean:
            exited = pid
        else:
            _, status = os.waitpid(pid, 0)
            sender.send((DIED, None, os.waitstatus_to_exitcode(status), 0.0))
        for _fd, events in hangup.poll(0):
            if events & select.POLLHUP and not events & select.POLLIN:
                os.close(spare[1])  # the parent closed the call pipe and nothing is left: let the spare go
                os.waitpid(spare[0], 0)
                os.close(spare[2])
                if exited is not None:
                    os.waitpid(exited, 0)
                return


def _fork_server(call_conn: Any, sender: Sender, max_calls: int) -> tuple[int, int, int]:
    """Fork a child that waits for a go byte, serves ``max_calls`` calls and says it finished."""
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    gc.freeze()  # the child's collections then skip (and never write to) every object it inherits
    pid = os.fork()
    # The child goes on in this frame, which coverage.py's tracer (before Python 3.12's sys.monitoring)
    # does not follow after a fork: it measures only frames entered since. _serve's count.
    if pid == 0:  # pragma: no cover
        os.close(go_w)
        os.close(done_r)
        code = 0
        try:
            if os.read(go_r, 1) == b"1":
                _serve(call_conn, sender, max_calls)
                _end_own_pools()
                os.write(done_w, b"1")
        except BaseException:
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(go_r)
    os.close(done_w)
    return pid, go_w, done_r


def _serve(call_conn: Any, sender: Sender, max_calls: int | None) -> None:
    """Read calls, run them in order and send back each outcome, until end of file or ``max_calls``."""
    fns: dict[int, Any] = {}
    queued: deque[tuple[int, int, Any, bytes | tuple[Any, ...]]] = deque()
    cancelled: set[int] = set()
    calls_done = 0
    call_fd = call_conn.fileno()
    arrivals = select.poll()
    arrivals.register(call_fd, select.POLLIN)

    def take(message: tuple[Any, ...]) -> None:
        if message[0] == CALLS:
            queued.extend(message[1])
        else:
            cancelled.add(message[1])

    try:
        while max_calls is None or calls_done < max_calls:
            if not queued:
                take(receive(call_fd))
            while max_calls is None and arrivals.poll(0):  # cancels arrive while we work
                take(receive(call_fd))
            if not queued:
                continue
            call_id, fn_id, fn, payload = queued.popleft()
            if call_id in cancelled:
                cancelled.discard(call_id)
                if fn is not None:
                    try:
                        _load_function(fns, fn_id, fn)
                    except Exception:
                        pass  # the calls that need it say why
                sender.send((SKIPPED, call_id, None, 0.0))
                continue
            began = time.perf_counter()
            kind, value = _run_call(fns, fn_id, fn, payload)
            seconds = time.perf_counter() - began
            calls_done += 1
            if kind != OK:
                if kind == RAISED:
                    kind, value = _exception_payload(value)
                sender.send((kind, call_id, value, seconds))
                continue
            try:
                sender.send((OK, call_id, value, seconds))
            except Exception as why:
                reason = (
                    f"the task's result of type {type(value).__qualname__} could not be pickled to send back "
                    f"({type(why).__name__}: {why})"
                )
                sender.send((UNPICKLABLE, call_id, (reason, ""), seconds))
    except (EOFError, OSError):
        pass  # the parent closed our pipe: time to go
