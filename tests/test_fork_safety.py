"""Locks of taskrun's that another thread holds at a fork must not block the child.

And a script whose thread tasks were stopped or timed out while stuck exits at once: their
abandoned threads are not waited for.
"""

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from taskrun import ThreadTaskRun, _config

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _child_exit_status(pid, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return None


def test_configure_in_a_child_forked_while_another_thread_configures():
    held, release = threading.Event(), threading.Event()

    def hold_the_lock():
        with _config._lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    assert held.wait(10)
    try:
        pid = os.fork()
        if pid == 0:
            try:
                ThreadTaskRun.configure(max_workers=7)
            finally:
                os._exit(0)
        assert _child_exit_status(pid, 10) == 0, "configure() blocked in the child on a lock held at the fork"
    finally:
        release.set()
        holder.join(10)


@pytest.mark.parametrize("how", ["timeout", "stop"])
def test_a_script_with_a_stuck_abandoned_thread_task_exits_at_once(how, tmp_path):
    script = textwrap.dedent(f"""
        import threading
        from taskrun import task, ThreadTaskRun

        @task(runner=ThreadTaskRun, timeout={0.2 if how == "timeout" else None})
        def stuck(started):
            open(started, "w").close()
            threading.Event().wait()  # a dead socket: never returns

        import os, sys, time
        run = stuck(sys.argv[1])
        while not os.path.exists(sys.argv[1]):
            time.sleep(0.01)
        if "{how}" == "stop":
            run.stop()
        run.wait(10)
        print(run.status)
    """)
    marker = str(tmp_path / "started")
    out = subprocess.run([sys.executable, "-c", script, marker], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("failed" if how == "timeout" else "stopped")
