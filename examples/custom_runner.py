"""A custom runner: every attempt runs in a fresh ``python -c ...`` subprocess.

A runner is a ``BaseTaskRun`` subclass that says *where* an attempt executes. This one
implements four hooks and gets retries, timeouts, callbacks, waiting and ``await`` from
taskrun for free:

* ``prepare()``         - in the caller, once: reject arguments that cannot be sent.
* ``start_attempt(a)``  - begin the attempt and return at once; report on ``a`` later.
* ``stop_attempt(a)``   - end a started attempt (``stop()`` or a timeout): kill the subprocess.
* ``shutdown()``        - classmethod: release what the runner holds (here: kill what is left).

The call travels to the child pickled with cloudpickle over stdin; the outcome comes back
the same way over stdout. The child's own prints go to stderr so they cannot corrupt the
reply. Each subprocess is driven from a helper thread, so ``start_attempt`` returns promptly.

Run it: ``python examples/custom_runner.py``
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
from typing import Any, ClassVar

import cloudpickle

from taskrun import Attempt, BaseTaskRun, SerializationError, WorkerDied
from taskrun.errors import RemoteTraceback

# The child: read the pickled call from stdin, run it, write the pickled outcome to the
# original stdout. fd 1 is pointed at stderr first so that prints from the task (even from
# C code) cannot mix with the reply.
CHILD = r"""
import os, sys, traceback
import cloudpickle
reply = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)
sys.stdout = sys.stderr
fn, args, kwargs = cloudpickle.loads(sys.stdin.buffer.read())
try:
    outcome = ("ok", fn(*args, **kwargs))
except BaseException as exc:
    outcome = ("error", exc, traceback.format_exc())
try:
    data = cloudpickle.dumps(outcome)
except Exception as exc:
    what = "result" if outcome[0] == "ok" else "exception " + type(outcome[1]).__name__
    data = cloudpickle.dumps(("unpicklable", what, "%s: %s" % (type(exc).__name__, exc)))
reply.write(data)
reply.flush()
"""

_thread_numbers = itertools.count(1)


class _Child:
    """The runner's bookkeeping for one attempt (kept in ``attempt.runner_state``)."""

    __slots__ = ("lock", "proc", "killed")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed = False


class SubprocessTaskRun(BaseTaskRun):
    """Runs each attempt of a call in its own ``python -c`` subprocess.

    Setting: ``python`` - the interpreter to start (default: this one). Use
    ``SubprocessTaskRun.configure(python="/path/to/python")`` for another; it needs cloudpickle.
    """

    settings: ClassVar[dict[str, Any]] = {"python": None}
    python: ClassVar[str | None] = None  # None: sys.executable
    preemptive_timeout: ClassVar[bool] = True  # stop_attempt really ends an attempt

    _live: ClassVar[set[subprocess.Popen[bytes]]] = set()
    _live_lock: ClassVar[threading.Lock] = threading.Lock()

    def prepare(self) -> None:
        # Fail in the caller, at once, if the call cannot travel to a subprocess.
        self._payload = self._pickle_call()

    def _pickle_call(self) -> bytes:
        try:
            return cloudpickle.dumps((self.task.fn, self.args, self.kwargs))
        except Exception as exc:
            raise SerializationError(f"{self.id}: the function or its arguments could not be pickled: {exc}") from exc

    def start_attempt(self, attempt: Attempt) -> None:
        attempt.runner_state = _Child()
        helper = threading.Thread(
            target=self._drive, args=(attempt,), name=f"subprocess-runner-{next(_thread_numbers)}", daemon=True
        )
        helper.start()

    def stop_attempt(self, attempt: Attempt) -> None:
        child: _Child | None = attempt.runner_state
        if child is None:  # never started
            return
        with child.lock:
            child.killed = True
            proc = child.proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    @classmethod
    def shutdown(cls, wait: bool = True) -> None:
        # Attempts are not pooled; on shutdown kill any subprocess still running.
        with cls._live_lock:
            live = list(cls._live)
        for proc in live:
            if proc.poll() is None:
                proc.kill()

    # ---- the helper thread ------------------------------------------------------------------

    def _drive(self, attempt: Attempt) -> None:
        child: _Child = attempt.runner_state
        try:
            with child.lock:
                if child.killed:  # stopped before it could start
                    return
                child.proc = proc = subprocess.Popen(
                    [self.python or sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE
                )
            with self._live_lock:
                self._live.add(proc)
            attempt.mark_started()  # the run is RUNNING and its timeout counts from here
            try:
                out, _ = proc.communicate(self._payload)
            finally:
                with self._live_lock:
                    self._live.discard(proc)
        except BaseException as exc:  # could not start the interpreter, broken pipe, ...
            if not attempt.stop_requested:
                attempt.set_exception(exc)
            return
        if attempt.stop_requested:
            # Stopped or timed out: taskrun reports that outcome itself; the kill's exit is not news.
            return
        if not out:
            attempt.set_exception(WorkerDied(f"{self.id}: the subprocess died ({_describe(proc.returncode)})", proc.returncode))
            return
        try:
            outcome = cloudpickle.loads(out)
        except Exception as exc:
            attempt.set_exception(SerializationError(f"{self.id}: the reply of the subprocess could not be read: {exc}"))
            return
        if outcome[0] == "ok":
            attempt.set_result(outcome[1])
        elif outcome[0] == "error":
            _, exc, tb_text = outcome
            if exc.__cause__ is None:
                exc.__cause__ = RemoteTraceback(tb_text)  # the child's traceback, shown under the error
            attempt.set_exception(exc)
        else:
            _, what, why = outcome
            attempt.set_exception(SerializationError(f"{self.id}: the {what} could not be pickled: {why}"))


def _describe(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


# ---- a short demo ---------------------------------------------------------------------------

if __name__ == "__main__":
    import logging
    import tempfile
    import time

    import taskrun
    from taskrun import TaskTimeout, task

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    @task(runner=SubprocessTaskRun)
    def where(x):
        return f"{x} squared is {x * x}, computed in pid {os.getpid()} (the caller is {os.getppid()})"

    print(where(7).get_result(timeout=30))

    # retries: the marker file makes the first attempt fail, the second succeed
    marker = os.path.join(tempfile.gettempdir(), f"taskrun-demo-{os.getpid()}")

    @task(runner=SubprocessTaskRun, retries=2, retry_sleep_time=0.1)
    def flaky():
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise ConnectionError("first attempt fails")
        os.remove(marker)
        return "second attempt worked"

    run = flaky()
    print(run.get_result(timeout=30), "after", run.attempts, "attempts")

    # a timeout kills the subprocess
    @task(runner=SubprocessTaskRun, timeout=0.5)
    def hangs():
        time.sleep(60)

    try:
        hangs().get_result(timeout=30)
    except TaskTimeout as exc:
        print("timed out:", exc)

    # the task's own exception comes back with the child's traceback as its cause
    @task(runner=SubprocessTaskRun)
    def divide(a, b):
        return a / b

    failed = divide(1, 0)
    failed.add_done_callback(lambda r: print("callback:", r))
    print("error:", repr(failed.exception(timeout=30)))

    # stop() kills a running attempt
    slow = hangs()
    time.sleep(0.3)
    print("stopped:", slow.stop(), slow.status)
    taskrun.shutdown()
    SubprocessTaskRun.shutdown()
