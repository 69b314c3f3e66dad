"""The parent's side of one worker process: its pipes, its process group, and reaping it.

A pid is reused once its process is reaped, so only the pool reaps its workers, and a
worker is never signalled after it was reaped (see :meth:`WorkerProcess.signal_group`).
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import sys
import tempfile
import threading
import uuid
from typing import TYPE_CHECKING, Any

import multiprocess
from multiprocess import process as mp_process
from multiprocess.connection import wait

from ..base import Attempt
from . import _worker
from ._protocol import FrameReader

if TYPE_CHECKING:
    from ._pool import ProcessPool

_worker_numbers = itertools.count(1)

# Held while a worker is started, from its pipes' making until the parent has closed the child's
# ends, and while the parent's ends of a worker's pipes are closed. A fork copies every open fd:
# a worker of another pool forked in between would keep this one's exit sentinel and pipe ends
# open, and its death would go unseen while that one lives. And a forked child closes the
# parent's ends by the numbers their connections hold (ProcessPool.after_fork_in_child): forked
# between the closing of an fd and its connection forgetting the number, it would close that
# number again, by then perhaps one of its own pipes.
_pipes_lock = threading.Lock()


def _reset_after_fork() -> None:
    global _pipes_lock
    _pipes_lock = threading.Lock()  # a worker forked while this process started another inherits it held


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def default_start_method() -> str:
    """fork where the platform has it (not macOS, where it is unsafe), else spawn."""
    return "fork" if "fork" in multiprocess.get_all_start_methods() and sys.platform != "darwin" else "spawn"


class StartName(str):
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

    def __new__(cls, name: str, path: str) -> StartName:
        self = super().__new__(cls, name)
        self.path = path
        return self

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (eval, ("exec(hook, {'PATH': path}) or name", {"hook": _worker.START_HOOK, "path": self.path,
                                                              "name": str(self)}))


class WorkerProcess:
    """One worker process and the parent's ends of its three pipes."""

    def __init__(self, pool: ProcessPool) -> None:
        with _pipes_lock:
            self._start(pool)
        self.pid: int = self.process.pid
        try:
            os.setpgid(self.pid, self.pid)  # as the worker does first thing: its group exists from now on
        except OSError:
            pass  # it already did (or, under spawn, exec'd and must do it itself)
        self.sentinel: int = self.process.sentinel
        self.reader = FrameReader(self.result_r.fileno())

    def _start(self, pool: ProcessPool) -> None:
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
            name=name if self.method == "fork" or not self.start_error_path else StartName(name, self.start_error_path),
            daemon=True,
        )
        pool.workers.append(self)  # registered before fork, so a forked child can close our ends
        try:
            self.process.start()
        except BaseException:
            pool.workers.remove(self)
            for conn in (call_r, result_w, alive_r):
                conn.close()
            self.close_unlocked()
            raise
        # Only we reap it: multiprocess would otherwise reap it whenever any process is started
        # (or active_children() is called), and we must know when its pid is no longer ours.
        children = getattr(mp_process, "_children", None)  # multiprocess's own record of children to reap
        if children is not None:
            children.discard(self.process)
        for conn in (call_r, result_w, alive_r):
            conn.close()

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
            exitcode: int | None = self.process.exitcode
            if exitcode is not None:
                self.reaped = True
            return exitcode

    def poll_exit(self) -> int | None:
        """The exit code if the worker has exited (reaping it), else None; never blocks."""
        with self.reap_lock:
            exitcode: int | None = self.process.exitcode
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
        """Close the parent's ends of the worker's pipes (not while a worker is being started: see ``_pipes_lock``)."""
        with _pipes_lock:
            self.close_unlocked()

    def close_call_pipe(self) -> None:
        """Close the pipe calls go out on: the worker exits once it has sent back what it holds."""
        with _pipes_lock:
            try:
                self.call_w.close()
            except OSError:
                pass

    def close_unlocked(self) -> None:
        """:meth:`close` without ``_pipes_lock``: in a forked child (whose copy of it may be held), or where it is held."""
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
