"""Signals the pool sends, and the ones its workers pass on.

- A worker's pid is never signalled once it was reaped: it may belong to another process by then.
- A task's own subprocesses start with the default SIGINT disposition, not the worker's.
"""

import os
import signal
import subprocess
import sys

import pytest
from test_process_runner import (  # noqa: F401
    WAIT,
    _no_child_processes,
    exit_with,
    read_pid,
    runner,
    start_sleep_child,
    write_pid_then_sleep,
)

from taskrun import Status, WorkerDied, task

METHODS = ["fork", "spawn"]  # forkserver: the forkserver reaps its children, out of our sight


@pytest.fixture
def signal_log(monkeypatch):
    """Record, in this process only, every kill/killpg and every waitpid that reaped a process."""
    events = []
    me = os.getpid()
    real_kill, real_killpg, real_waitpid = os.kill, os.killpg, os.waitpid

    def kill(pid, signum):
        if os.getpid() == me:
            events.append(("signal", pid, signum))
        return real_kill(pid, signum)

    def killpg(pgid, signum):
        if os.getpid() == me:
            events.append(("signal", pgid, signum))
        return real_killpg(pgid, signum)

    def waitpid(pid, options):
        result = real_waitpid(pid, options)
        if os.getpid() == me and result[0] > 0:
            events.append(("reaped", result[0], None))
        return result

    monkeypatch.setattr(os, "kill", kill)
    monkeypatch.setattr(os, "killpg", killpg)
    monkeypatch.setattr(os, "waitpid", waitpid)
    return events


def signals_after_reaping(events):
    reaped = set()
    late = []
    for kind, pid, signum in events:
        if kind == "reaped":
            reaped.add(pid)
        elif pid in reaped:
            late.append((pid, signal.Signals(signum).name))
    return late


@pytest.mark.parametrize("method", METHODS)
def test_a_worker_that_died_running_a_call_is_not_signalled_once_reaped(method, signal_log):
    R = runner(method, max_workers=1)
    run = task(runner=R)(exit_with)(3)
    with pytest.raises(WorkerDied, match="exit code 3"):
        run.get_result(WAIT)
    assert task(runner=R)(os.getpid)().get_result(WAIT) > 0  # the dead worker was handled and replaced
    assert any(kind == "reaped" for kind, _, _ in signal_log)
    assert signals_after_reaping(signal_log) == []


@pytest.mark.parametrize("method", METHODS)
def test_a_stopped_worker_is_not_signalled_once_reaped(method, signal_log, tmp_path):
    R = runner(method, max_workers=1)
    run = task(runner=R)(write_pid_then_sleep)(tmp_path / "pid", 30)
    pid = read_pid(tmp_path / "pid")
    assert run.stop() is True
    assert task(runner=R)(os.getpid)().get_result(WAIT) != pid
    assert ("reaped", pid, None) in signal_log
    assert ("signal", pid, signal.SIGTERM) in signal_log
    assert signals_after_reaping(signal_log) == []


@pytest.mark.parametrize("method", METHODS)
def test_what_a_stopped_task_started_still_dies_with_it(method, tmp_path, signal_log):
    """The group is still ended (before the worker is reaped), so the task's own subprocess goes too."""
    import psutil
    from _waiting import is_alive, wait_for

    run = task(runner=runner(method, max_workers=1))(start_sleep_child)(tmp_path / "child")
    child = read_pid(tmp_path / "child")
    assert psutil.Process(child).name() == "sleep"
    assert run.stop() is True
    wait_for(lambda: not is_alive(child), 5, f"sleep child {child} to end")
    assert signals_after_reaping(signal_log) == []


# ---- what a task's subprocesses inherit -------------------------------------------------------


def sigint_of_a_python_child():
    command = [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT))"]
    return subprocess.run(command, capture_output=True, text=True, timeout=WAIT).stdout.strip()


def sigint_ignored_by_a_child():
    """Whether a non-Python child (cat) has SIGINT in its ignored set (/proc/<pid>/status SigIgn)."""
    status = subprocess.run(["cat", "/proc/self/status"], capture_output=True, text=True, timeout=WAIT).stdout
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)
    return bool(mask & (1 << (signal.SIGINT - 1)))


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_tasks_subprocesses_get_the_default_sigint(method):
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        pytest.skip("this test process itself ignores SIGINT (started in the background?)")
    expected = sigint_of_a_python_child()
    assert expected == str(signal.default_int_handler)
    R = runner(method, max_workers=1)
    assert task(runner=R)(sigint_of_a_python_child)().get_result(WAIT) == expected
    assert task(runner=R)(sigint_ignored_by_a_child)().get_result(WAIT) is False


def interrupt_myself():
    os.kill(os.getpid(), signal.SIGINT)
    return "still here"


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_worker_still_shrugs_off_sigint(method):
    """The worker itself keeps ignoring SIGINT (Ctrl-C is the caller's to handle)."""
    run = task(runner=runner(method, max_workers=1))(interrupt_myself)()
    assert run.get_result(WAIT) == "still here"
    assert run.status is Status.SUCCEEDED
