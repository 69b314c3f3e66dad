"""MultiprocessTaskRun and the life of the calling program: SIGKILL of the parent, Ctrl-C,
normal exit with fire-and-forget calls.

Each test runs ``scripts/process_pool_script.py`` in a child interpreter (under ``fork`` and
``spawn``). The script's calls write their worker's pid to files in ``tmp_path``; the test
polls for those files with a deadline, then checks with psutil that every process the script
started is gone in time. A zombie (dead, not yet reaped by whoever adopted it) counts as gone.
"""

import multiprocessing.resource_tracker
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import multiprocess.forkserver
import multiprocess.resource_tracker
import psutil
import pytest
from _waiting import is_alive, wait_for

WAIT = 30
METHODS = ["fork", "spawn"]
SCRIPT = Path(__file__).resolve().parent / "scripts" / "process_pool_script.py"




class Scripts:
    """Starts the script; at teardown kills whatever is left of it (only after a failed test)."""

    def __init__(self):
        self.procs = []
        self.seen = set()  # pids of processes the scripts started

    def start(self, mode, method, out, *extra):
        # stderr goes to a file, not a pipe: workers that outlive the script must not keep a reader waiting
        self.stderr = out / "stderr.txt"
        with open(self.stderr, "w") as err:
            proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), mode, method, str(out), *extra],
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,  # its own process group, like a program started from a shell
            )
        self.procs.append(proc)
        return proc

    def finish(self, proc, timeout):
        """Wait for the script to exit; its stderr."""
        proc.wait(timeout)
        return self.stderr.read_text()

    def wait_ready(self, proc, out):
        def ready():
            if proc.poll() is not None:
                raise AssertionError(f"the script exited early ({proc.returncode}): {self.stderr.read_text()}")
            return (out / "ready").exists()

        wait_for(ready, WAIT, "the script's calls to start")
        pids = {int((out / f"pid-{i}").read_text()) for i in range(2)}
        descendants = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        self.seen |= descendants
        assert pids <= descendants
        return descendants

    def cleanup(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(WAIT)
        for pid in self.seen:
            if is_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def scripts():
    helper = Scripts()
    yield helper
    helper.cleanup()
    # multiprocess's own long-lived helpers, and the standard library's resource tracker (Dask's worker
    # processes start it), if other tests in this session started them
    shared = {multiprocess.forkserver._forkserver._forkserver_pid, multiprocess.resource_tracker._resource_tracker._pid,
              multiprocessing.resource_tracker._resource_tracker._pid}
    left = [(p.pid, p.name()) for p in psutil.Process().children(recursive=True) if p.pid not in shared]
    assert not left, f"child processes left: {left}"


@pytest.mark.parametrize("method, extra", [("fork", ()), ("spawn", ()), ("fork", ("1",))], ids=["fork", "spawn", "fork-fresh"])
def test_parent_killed_with_sigkill_leaves_no_worker(method, extra, tmp_path, scripts):
    """``fork-fresh``: max_tasks_per_worker=1, so the calls run in children the workers forked."""
    proc = scripts.start("block", method, tmp_path, *extra)
    started = scripts.wait_ready(proc, tmp_path)
    proc.kill()
    scripts.finish(proc, WAIT)
    assert proc.returncode == -signal.SIGKILL
    wait_for(lambda: not any(is_alive(pid) for pid in started), 5, f"the workers {sorted(started)} to end")


@pytest.mark.parametrize("method", METHODS)
def test_ctrl_c_ends_the_program_and_its_workers(method, tmp_path, scripts):
    proc = scripts.start("block", method, tmp_path)
    started = scripts.wait_ready(proc, tmp_path)
    began = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C: the foreground group
    err = scripts.finish(proc, 5)
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err
    remaining = max(0.0, 5 - (time.monotonic() - began))
    wait_for(lambda: not any(is_alive(pid) for pid in started), remaining, f"the workers {sorted(started)} to end")


@pytest.mark.parametrize("method", METHODS)
def test_normal_exit_waits_for_fire_and_forget_calls(method, tmp_path, scripts):
    proc = scripts.start("fire", method, tmp_path)
    err = scripts.finish(proc, WAIT)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    done = [tmp_path / f"done-{i}" for i in range(3)]
    assert all(path.exists() for path in done), err
    workers = {int(path.read_text()) for path in done}
    assert proc.pid not in workers
    wait_for(lambda: not any(is_alive(pid) for pid in workers), 5, f"the workers {sorted(workers)} to end")
