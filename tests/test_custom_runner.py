"""Custom runners get retries, timeouts, callbacks and stop() from the hooks alone.

Two runners: the example ``examples/custom_runner.py`` (each attempt in a ``python -c``
subprocess, imported here by path) and a tiny in-test one that shows the minimal hook set.
The subprocess tests learn "the child has started" over a localhost socket the child
connects to, and "the child is gone" from that socket's end of file.
"""

import asyncio
import importlib.util
import logging
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import threading
import time

import cloudpickle
import pytest

import taskrun
from taskrun import (
    Attempt,
    BaseTaskRun,
    SerializationError,
    Status,
    TaskStopped,
    TaskTimeout,
    WorkerDied,
    task,
)
from taskrun.errors import RemoteTraceback

WAIT = 10
EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "custom_runner.py"

# Task bodies below are sent to a child interpreter that cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _load_example():
    spec = importlib.util.spec_from_file_location("taskrun_example_custom_runner", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


example = _load_example()
SubprocessTaskRun = example.SubprocessTaskRun


@pytest.fixture(autouse=True)
def _subprocesses_and_helpers_end():
    yield
    SubprocessTaskRun.shutdown()
    helpers = [t for t in threading.enumerate() if t.name.startswith("subprocess-runner-")]
    for t in helpers:
        t.join(WAIT)
    assert not [t.name for t in helpers if t.is_alive()]
    assert not SubprocessTaskRun._live


class Spy(SubprocessTaskRun):
    """Records stop_attempt calls and the attempts' subprocesses."""

    stopped: list = []

    def stop_attempt(self, attempt):
        type(self).stopped.append(attempt)
        super().stop_attempt(attempt)


@pytest.fixture
def spy():
    Spy.stopped = []
    return Spy


@pytest.fixture
def listener():
    """A localhost socket the child connects to: accept() is "the child has started"."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(WAIT)
    conns = []

    class Listener:
        port = server.getsockname()[1]

        def accept(self):
            conn, _ = server.accept()
            conn.settimeout(WAIT)
            conns.append(conn)
            assert conn.recv(7) == b"started"
            return conn

    yield Listener()
    for conn in conns:
        conn.close()
    server.close()


def hang_after_connecting(port, seconds=60):
    conn = socket.create_connection(("127.0.0.1", port))
    conn.sendall(b"started")
    time.sleep(seconds)
    return "woke up"


def assert_child_gone(conn):
    assert conn.recv(1) == b""  # end of file: the process holding the other end has died


# ---- the subprocess runner from the example ------------------------------------------------


def test_example_runs_as_a_script():
    proc = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "7 squared is 49" in proc.stdout
    assert "second attempt worked after 2 attempts" in proc.stdout
    assert "timed out:" in proc.stdout
    assert "stopped: True stopped" in proc.stdout


def test_subprocess_value_comes_back_from_another_process():
    @task(runner=SubprocessTaskRun)
    def info(x, y=1):
        print("noise on stdout must not break the reply")
        os.write(1, b"raw noise on fd 1\n")
        return x + y, os.getpid()

    run = info(2, y=3)
    value, pid = run.get_result(timeout=WAIT)
    assert value == 5
    assert pid != os.getpid()
    assert run.status is Status.SUCCEEDED and run.attempts == 1


def test_subprocess_failure_reraises_with_the_child_traceback():
    @task(runner=SubprocessTaskRun)
    def divide(a, b):
        return a / b

    run = divide(1, 0)
    with pytest.raises(ZeroDivisionError, match="division by zero") as info:
        run.get_result(timeout=WAIT)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "in divide" in str(info.value.__cause__)
    assert run.status is Status.FAILED


def test_subprocess_retries(tmp_path, caplog):
    counter = tmp_path / "attempts"

    @task(runner=SubprocessTaskRun, retries=3, retry_sleep_time=0.01)
    def flaky():
        with open(counter, "a") as f:
            f.write("x")
        n = len(counter.read_text())
        if n < 3:
            raise ConnectionError(f"attempt {n} fails")
        return n

    with caplog.at_level(logging.INFO, logger="taskrun"):
        run = flaky()
        assert run.get_result(timeout=WAIT) == 3
    assert run.attempts == 3
    assert counter.read_text() == "xxx"
    assert caplog.text.count("retrying in") == 2


def test_subprocess_timeout_calls_stop_attempt_and_kills_the_child(spy, listener):
    @task(runner=spy, timeout=1.0)
    def hangs(port):
        return hang_after_connecting(port)

    t0 = time.monotonic()
    run = hangs(listener.port)
    conn = listener.accept()
    with pytest.raises(TaskTimeout, match="timeout of 1.0 s"):
        run.get_result(timeout=WAIT)
    assert time.monotonic() - t0 < WAIT / 2
    assert run.status is Status.FAILED and run.attempts == 1
    assert len(spy.stopped) == 1
    attempt = spy.stopped[0]
    assert isinstance(attempt, Attempt) and attempt.number == 1 and attempt.stop_requested
    assert_child_gone(conn)
    assert attempt.runner_state.proc.wait(WAIT) != 0


def test_subprocess_timed_out_attempt_is_retried(spy, listener, tmp_path):
    marker = str(tmp_path / "first-attempt-ran")

    @task(runner=spy, timeout=1.0, retries=1)
    def first_hangs(port):
        if not os.path.exists(marker):
            open(marker, "w").close()
            hang_after_connecting(port)
        return "second attempt"

    run = first_hangs(listener.port)
    conn = listener.accept()
    assert run.get_result(timeout=WAIT) == "second attempt"
    assert run.attempts == 2
    assert [a.number for a in spy.stopped] == [1]
    assert_child_gone(conn)


def test_subprocess_callbacks(caplog):
    calls = []
    called = threading.Event()

    @task(runner=SubprocessTaskRun)
    def double(x):
        return 2 * x

    def bad(run):
        raise RuntimeError("callback fails")

    with caplog.at_level(logging.ERROR, logger="taskrun"):
        run = double(21)
        run.add_done_callback(bad)
        run.add_done_callback(lambda r: (calls.append((r.status, r.get_result(wait=False))), called.set()))
        assert called.wait(WAIT)
        assert run.get_result(timeout=WAIT) == 42
    assert calls == [(Status.SUCCEEDED, 42)]
    assert "callback fails" in caplog.text
    late = []
    run.add_done_callback(late.append)
    assert late == [run]


def test_subprocess_stop_of_a_running_attempt_kills_it(spy, listener):
    calls = []

    @task(runner=spy, retries=3)
    def hangs(port):
        return hang_after_connecting(port)

    run = hangs(listener.port)
    run.add_done_callback(lambda r: calls.append(r.status))
    conn = listener.accept()
    assert run.status is Status.RUNNING
    assert run.stop() is True
    assert run.status is Status.STOPPED
    assert calls == [Status.STOPPED]
    assert len(spy.stopped) == 1
    assert_child_gone(conn)
    with pytest.raises(TaskStopped):
        run.get_result(timeout=WAIT)
    assert run.attempts == 1  # a stopped run is not retried
    assert run.stop() is False


def test_subprocess_stop_right_after_the_call(spy):
    @task(runner=spy)
    def sleeper():
        time.sleep(60)

    run = sleeper()
    assert run.stop() is True  # whether or not the child had started: it ends now
    assert run.status is Status.STOPPED
    with pytest.raises(TaskStopped):
        run.get_result(timeout=WAIT)


def test_subprocess_await():
    @task(runner=SubprocessTaskRun)
    def add(a, b):
        return a + b

    async def main():
        return await asyncio.gather(add(1, 2), add(3, 4))

    assert asyncio.run(main()) == [3, 7]


def test_subprocess_unpicklable_argument_fails_the_call_at_once():
    @task(runner=SubprocessTaskRun)
    def use(lock):
        return 1

    with pytest.raises(SerializationError, match="could not be pickled"):
        use(threading.Lock())


def test_subprocess_unpicklable_result_is_a_serialization_error():
    @task(runner=SubprocessTaskRun)
    def make_lock():
        import threading

        return threading.Lock()

    run = make_lock()
    with pytest.raises(SerializationError, match="result could not be pickled"):
        run.get_result(timeout=WAIT)


def test_subprocess_that_dies_is_worker_died():
    @task(runner=SubprocessTaskRun, retries=1)
    def dies():
        os._exit(3)

    run = dies()
    with pytest.raises(WorkerDied, match="exit code 3") as info:
        run.get_result(timeout=WAIT)
    assert info.value.exitcode == 3
    assert run.attempts == 2  # retried like any failure


def test_subprocess_runner_configure():
    configured = SubprocessTaskRun.configure(python=sys.executable)
    assert configured is SubprocessTaskRun.configure(python=sys.executable)
    assert issubclass(configured, SubprocessTaskRun) and configured.python == sys.executable
    with pytest.raises(TypeError, match="max_workers"):
        SubprocessTaskRun.configure(max_workers=2)
    assert task(runner=configured)(lambda: "configured")().get_result(timeout=WAIT) == "configured"


# ---- the minimal runner: one hook ---------------------------------------------------------


class OwnThreadRun(BaseTaskRun):
    """The least a runner needs: ``start_attempt``. Each attempt gets a thread of its own.

    ``attempt.execute()`` runs the call in the current thread (``mark_started``, the function
    with ``stop_requested()`` set up, then ``set_result``/``set_exception``). There is no
    ``stop_attempt``: a stopped or timed-out function is asked to stop via ``stop_requested()``.
    """

    def start_attempt(self, attempt):
        threading.Thread(target=attempt.execute, name=f"taskrun-test-own-{attempt.number}", daemon=True).start()


class ByHandRun(BaseTaskRun):
    """The same, reporting by hand instead of through ``execute()``."""

    def start_attempt(self, attempt):
        def work():
            attempt.mark_started()
            try:
                value = attempt.fn(*attempt.args, **attempt.kwargs)
            except Exception as exc:
                attempt.set_exception(exc)
            else:
                attempt.set_result(value)

        threading.Thread(target=work, name="taskrun-test-byhand", daemon=True).start()


@pytest.mark.parametrize("runner", [OwnThreadRun, ByHandRun])
def test_minimal_runner_value_retries_and_callbacks(runner):
    calls = []
    done = []

    @task(runner=runner, retries=2, name="flaky")
    def flaky(x):
        calls.append(threading.current_thread().name)
        if len(calls) < 3:
            raise OSError("again")
        return x * 10

    run = flaky(4)
    run.add_done_callback(done.append)
    assert run.get_result(timeout=WAIT) == 40
    assert run.attempts == 3
    assert all(name.startswith("taskrun-test-") for name in calls)
    assert threading.current_thread().name not in calls
    assert done == [run]
    assert repr(run).startswith("<TaskRun flaky#") and "succeeded" in repr(run) and "attempt 3/3" in repr(run)


def test_minimal_runner_timeout_and_stop():
    saw_stop = threading.Event()
    started = threading.Event()

    def polls():
        started.set()
        while not taskrun.stop_requested():
            time.sleep(0.002)
        saw_stop.set()

    timed = task(runner=OwnThreadRun, timeout=0.05)(polls)()
    with pytest.raises(TaskTimeout):
        timed.get_result(timeout=WAIT)
    assert saw_stop.wait(WAIT)

    saw_stop.clear()
    started.clear()
    stopped = task(runner=OwnThreadRun, retries=2)(polls)()
    assert started.wait(WAIT)
    assert stopped.stop() is True
    assert stopped.status is Status.STOPPED
    assert saw_stop.wait(WAIT)
    assert stopped.attempts == 1


def test_minimal_runner_await():
    async def main():
        return await task(runner=OwnThreadRun)(lambda: "awaited")()

    assert asyncio.run(main()) == "awaited"


def test_runner_without_start_attempt_is_refused_at_decoration():
    class NoHooks(BaseTaskRun):
        pass

    with pytest.raises(TypeError, match=r"runner NoHooks does not implement start_attempt\(attempt\)"):
        task(runner=NoHooks)(lambda: 1)
    with pytest.raises(TypeError, match="runner BaseTaskRun does not implement start_attempt"):
        task(runner=BaseTaskRun)(lambda: 1)


class ClosingRun(OwnThreadRun):
    """A runner holding something to release: its shutdown hook records each call."""

    shutdowns: list = []

    @classmethod
    def shutdown(cls, wait=True):
        cls.shutdowns.append(wait)


def test_a_custom_runners_shutdown_hook_runs_with_taskrun_shutdown():
    ClosingRun.shutdowns.clear()
    assert task(runner=ClosingRun)(lambda: 1)().get_result(timeout=WAIT) == 1
    taskrun.shutdown()
    taskrun.shutdown(wait=False)
    assert ClosingRun.shutdowns == [True, False]


def test_a_custom_runners_shutdown_hook_runs_at_exit():
    script = textwrap.dedent("""
        import threading
        from taskrun import BaseTaskRun, task

        class Closing(BaseTaskRun):
            def start_attempt(self, attempt):
                threading.Thread(target=attempt.execute).start()

            @classmethod
            def shutdown(cls, wait=True):
                print("shutdown", wait, flush=True)

        print(task(runner=Closing)(lambda: "value")().get_result(timeout=30), flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["value", "shutdown True"]


def test_a_runners_settings_are_its_defaults_until_configured():
    """Regression: the README calls ``settings`` "the settings and their defaults", but an unconfigured
    runner had no attribute for a setting it did not also declare itself (AttributeError in start_attempt)."""

    class Prefixed(BaseTaskRun):
        settings = {"prefix": "p-", "suffix": ""}
        suffix = "!"  # a class attribute of its own wins over the settings dict

        def start_attempt(self, attempt):
            attempt.set_result(f"{self.prefix}{attempt.args[0]}{self.suffix}")

    assert (Prefixed.prefix, Prefixed.suffix) == ("p-", "!")
    assert task(runner=Prefixed)(str)("x").get_result(timeout=WAIT) == "p-x!"
    configured = Prefixed.configure(prefix="q-")
    assert task(runner=configured)(str)("x").get_result(timeout=WAIT) == "q-x!"
    assert Prefixed.prefix == "p-"  # configuring made a subclass; the runner itself is unchanged
