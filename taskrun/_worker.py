"""The worker side of the process pool: read calls, run them, send back each outcome.

Messages are pickled tuples. Parent to worker: ``(CALLS, [(call_id, fn_id, fn_bytes | None,
args), ...])`` (``args``: the pickled ``(args, kwargs)``, or a tuple of plain positional
arguments) and ``(CANCEL, call_id)``; end of file means exit. Worker to parent:
``(kind, call_id, payload, seconds)`` with the kinds below (``seconds``: how long the call
ran), one message per finished call, in the order the calls arrived, so the parent always
knows which call a dead worker was running. With ``max_tasks_per_worker`` the worker forks a
fresh child to serve each run of calls and reports ``(DIED, None, exitcode, 0.0)`` when one
ends without finishing. ``(READY, None, None, 0.0)``, sent once set up, tells the parent that
calls sent to it begin now (a spawned worker takes a while to start: that is not the calls' time).
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import select
import signal
import struct
import sys
import threading
import time
import traceback
import types
import warnings
from collections import deque
from typing import Any

import cloudpickle

CALLS, CANCEL = "calls", "cancel"
OK, RAISED, SKIPPED, UNPICKLABLE, LOG, WARN, DIED, READY = range(8)
PROTOCOL = pickle.HIGHEST_PROTOCOL
SMALL_FRAME = 4000  # bytes: with its header, one pipe write that cannot be split (PIPE_BUF is 4096)
_frame_header = struct.Struct("!i").pack
_unpack_header = struct.Struct("!i").unpack


def dumps(obj: Any) -> bytes:
    """Pickle with the fast standard pickler; fall back to cloudpickle (lambdas, local classes)."""
    try:
        return pickle.dumps(obj, PROTOCOL)
    except Exception:
        return cloudpickle.dumps(obj, PROTOCOL)


class _Sender:
    """The result pipe, shared by the call loop and by log records from any thread of a task.

    Small messages are framed as ``Connection.send_bytes`` frames them (a 4-byte big-endian
    length, then the bytes) and written in one system call; larger ones go through the
    connection, which also handles partial writes.
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.fd = conn.fileno()
        self.lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        data = dumps(message)
        size = len(data)
        with self.lock:
            if size < SMALL_FRAME:
                os.write(self.fd, _frame_header(size) + data)  # atomic: a pipe write under PIPE_BUF
            else:
                self.conn.send_bytes(data)


class _ForwardHandler(logging.Handler):
    """Sends every log record to the parent, which hands it to its own handlers."""

    def __init__(self, sender: _Sender) -> None:
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


def _forward_logging(sender: _Sender, levels: dict[str, int]) -> None:
    manager = logging.Logger.manager
    for logger in [logging.getLogger(), *manager.loggerDict.values()]:
        if isinstance(logger, logging.Logger):
            for handler in list(logger.handlers):  # inherited through fork: the parent prints those
                logger.removeHandler(handler)
    root = logging.getLogger()
    root.addHandler(_ForwardHandler(sender))
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


def _read_exactly(fd: int, size: int) -> bytes | bytearray:
    data = os.read(fd, size)
    if len(data) == size:
        return data
    if not data:
        raise EOFError("the parent closed the call pipe in the middle of a message")
    buffer = bytearray(size)  # a big message: read the rest straight into place
    buffer[: len(data)] = data
    view = memoryview(buffer)[len(data) :]
    while len(view):
        n = os.readv(fd, [view])
        if n == 0:
            raise EOFError("the parent closed the call pipe in the middle of a message")
        view = view[n:]
    return buffer


def _receive(fd: int) -> Any:
    """Read and unpickle one message framed as ``Connection.send_bytes`` frames it.

    Plain reads instead of the connection's own: a fresh child runs far less code, and so
    copies fewer of the pages it shares with its zygote.
    """
    header = os.read(fd, 4)
    if not header:
        raise EOFError("the parent closed the call pipe")
    if len(header) < 4:
        header += _read_exactly(fd, 4 - len(header))
    (size,) = _unpack_header(header)
    if size == -1:  # 2 GiB or more
        (size,) = struct.unpack("!Q", _read_exactly(fd, 8))
    return pickle.loads(_read_exactly(fd, size))


def _watch_parent(alive_conn: Any) -> None:
    """End this worker's process group as soon as the parent is gone (its end of the pipe closes)."""
    try:
        alive_conn.recv_bytes()
    except (EOFError, OSError):
        pass
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _run_call(
    fns: dict[int, Any], fn_id: int, fn_bytes: bytes | None, payload: bytes | tuple[Any, ...]
) -> tuple[int, Any]:
    """Load the function and arguments, then call: ``(OK, value)``, ``(RAISED, exc)`` or ``(UNPICKLABLE, (reason, tb))``."""
    try:
        if fn_bytes is not None:
            fns[fn_id] = cloudpickle.loads(fn_bytes)
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
    try:
        value = fns[fn_id](*args, **kwargs)
        if type(value) is types.CoroutineType:  # an async def: run it to completion in this process
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


def worker_main(call_conn: Any, result_conn: Any, alive_conn: Any, config: dict[str, Any]) -> None:
    """Entry point of a worker process."""
    os.setpgid(0, 0)  # lead a process group, so stop and timeout can end what the task started too
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    import multiprocess

    multiprocess.current_process().daemon = False  # let tasks start processes of their own
    threading.Thread(target=_watch_parent, args=(alive_conn,), name="taskrun-parent-watch", daemon=True).start()
    sender = _Sender(result_conn)
    _forward_logging(sender, config["log_levels"])
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


def _end_own_pools() -> None:
    """Shut down the pools tasks started in this worker (tasks calling tasks), as a process's exit would.

    Worker processes end without running atexit handlers, and multiprocess would SIGTERM
    those pools' workers instead, which their supervisor took for deaths.
    """
    from . import _lifecycle

    if not _lifecycle.anything_started():
        return  # the usual case: no task here called another
    try:
        _lifecycle.shutdown(wait=True)
    except BaseException:  # noqa: B036 - ending anyway; nothing here may keep the worker alive
        logging.getLogger("taskrun").exception("taskrun could not shut down the pools of a worker process")


def _fork_servers(call_conn: Any, sender: _Sender, max_calls: int) -> None:
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


def _fork_server(call_conn: Any, sender: _Sender, max_calls: int) -> tuple[int, int, int]:
    """Fork a child that waits for a go byte, serves ``max_calls`` calls and says it finished."""
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    gc.freeze()  # the child's collections then skip (and never write to) every object it inherits
    pid = os.fork()
    if pid == 0:
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


def _serve(call_conn: Any, sender: _Sender, max_calls: int | None) -> None:
    """Read calls, run them in order and send back each outcome, until end of file or ``max_calls``."""
    fns: dict[int, Any] = {}
    queued: deque[tuple[int, int, bytes | None, bytes | tuple[Any, ...]]] = deque()
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
                take(_receive(call_fd))
            while max_calls is None and arrivals.poll(0):  # cancels arrive while we work
                take(_receive(call_fd))
            if not queued:
                continue
            call_id, fn_id, fn_bytes, payload = queued.popleft()
            if call_id in cancelled:
                cancelled.discard(call_id)
                if fn_bytes is not None:
                    fns[fn_id] = cloudpickle.loads(fn_bytes)
                sender.send((SKIPPED, call_id, None, 0.0))
                continue
            began = time.perf_counter()
            kind, value = _run_call(fns, fn_id, fn_bytes, payload)
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
