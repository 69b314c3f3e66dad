"""Ctrl-C (KeyboardInterrupt) while the caller waits stops what it was waiting for, then propagates.

In this process: a helper thread sends SIGINT to the process once the main thread is blocked
in the wait (it looks at the handle's or group's waiters), for every way of waiting. In a
script (``scripts/interrupt_script.py``): a real Ctrl-C to the script's process group, for the
thread and process runners and a group; the waited run's worker process is gone, the
fire-and-forget run completes. In a Jupyter kernel: the kernel's interrupt, as the notebook's
interrupt button sends it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from _waiting import is_alive, shared_helper_pids, wait_for

import taskrun
from taskrun import Status, ThreadTaskRun, task

WAIT = 10
SCRIPT = Path(__file__).resolve().parent / "scripts" / "interrupt_script.py"
Threads = ThreadTaskRun.configure(max_workers=4)


# ---- in this process ---------------------------------------------------------------------------


@pytest.fixture
def ctrl_c():
    """``ctrl_c(is_waiting)``: SIGINT to this process from a thread, once ``is_waiting()`` is true."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    senders: list[threading.Thread] = []

    def send_when(is_waiting) -> None:
        def target() -> None:
            wait_for(is_waiting, WAIT, "the main thread to wait")
            os.kill(os.getpid(), signal.SIGINT)

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        senders.append(thread)

    yield send_when
    for thread in senders:
        thread.join(WAIT)
    signal.signal(signal.SIGINT, previous)


def blocking_task(stop_seen: list[str] | None = None, name: str = "block"):
    @task(runner=Threads, name=name)
    def block(label: str) -> str:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if taskrun.stop_requested():
                if stop_seen is not None:
                    stop_seen.append(label)
                return "stopped"
            time.sleep(0.005)
        return "ran out"

    return block


@pytest.fixture
def bystander():
    """A fire-and-forget run nobody waits on: it must go on through the interrupt."""
    release = threading.Event()

    @task(runner=Threads, name="bystander")
    def other() -> int:
        assert release.wait(WAIT)
        return 42

    run = other()
    yield run
    assert run.status in (Status.PENDING, Status.RUNNING)
    release.set()
    assert run.get_result(timeout=WAIT) == 42


@pytest.mark.parametrize(
    "how",
    [
        lambda run: run.get_result(),
        lambda run: run.get_result(timeout=WAIT),
        lambda run: run.wait(),
        lambda run: run.exception(timeout=WAIT),
    ],
    ids=["get_result", "get_result-timeout", "wait", "exception-timeout"],
)
def test_ctrl_c_while_waiting_for_a_run_stops_it(how, ctrl_c, bystander) -> None:
    seen: list[str] = []
    run = blocking_task(seen)("waited")
    ctrl_c(lambda: run._waiters)
    with pytest.raises(KeyboardInterrupt):
        how(run)
    assert run.status is Status.STOPPED
    wait_for(lambda: seen == ["waited"], WAIT, "the function to see stop_requested()")
    assert not run._waiters  # the interrupted wait left nothing behind


def caller_waits(group) -> bool:
    """True once a thread other than the feeder (which waits for room) waits on the group."""
    return group._waiting > group._feeder_waits


def group_waits():
    def first_of_as_completed(group):
        return next(group.as_completed())

    return pytest.mark.parametrize(
        "how",
        [
            lambda group: group.wait(),
            lambda group: group.results(),
            lambda group: group.results(timeout=WAIT),
            first_of_as_completed,
            lambda group: group[7],  # waits for the feeder, which waits for room
        ],
        ids=["wait", "results", "results-timeout", "as_completed", "index"],
    )


@group_waits()
def test_ctrl_c_while_waiting_for_a_group_stops_the_whole_group(how, ctrl_c, bystander) -> None:
    seen: list[str] = []
    group = blocking_task(seen).map([f"item{i}" for i in range(8)], max_concurrency=2)
    wait_for(
        lambda: len(group._runs) >= 2 and all(run.status is Status.RUNNING for run in group._runs[:2]), WAIT, "two runs to start"
    )
    ctrl_c(lambda: caller_waits(group))
    with pytest.raises(KeyboardInterrupt):
        how(group)
    statuses = [run.status for run in group]  # follows the feeder to the end of the input
    assert statuses == [Status.STOPPED] * 8
    assert group.summary()["stopped"] == 8 and group.wait(timeout=WAIT)
    wait_for(lambda: sorted(seen) == ["item0", "item1"], WAIT, "the running functions to see stop_requested()")
    assert [run.attempts for run in group] == [1, 1] + [0] * 6


def test_ctrl_c_while_iterating_a_generators_group_stops_it(ctrl_c, bystander) -> None:
    gate = threading.Event()

    def items():
        yield "a"
        gate.wait(WAIT)  # the feeder blocks in the input: iteration waits for the next handle
        yield "b"

    group = blocking_task().map(items())
    wait_for(lambda: len(group._runs) == 1, WAIT, "the first handle")
    ctrl_c(lambda: caller_waits(group))
    seen = []
    try:
        with pytest.raises(KeyboardInterrupt):
            for run in group:
                seen.append(run)
    finally:
        gate.set()
    assert len(seen) == 1 and seen[0].status is Status.STOPPED
    assert group.wait(timeout=WAIT) and len(group) == 1


def test_cancelling_an_await_does_not_stop_the_run() -> None:
    import asyncio

    gate = threading.Event()

    @task(runner=Threads)
    def slow() -> int:
        assert gate.wait(WAIT)
        return 1

    run = slow()

    async def main() -> None:
        waiting = asyncio.ensure_future(_await(run))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(main())
    assert run.status in (Status.PENDING, Status.RUNNING)
    gate.set()
    assert run.get_result(timeout=WAIT) == 1


async def _await(run):
    return await run


# ---- in a script, with a real Ctrl-C ---------------------------------------------------------------


def _shared_helpers() -> set[int]:
    return shared_helper_pids()


class Script:
    def __init__(self, tmp_path: Path) -> None:
        self.out = tmp_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: set[int] = set()

    def start(self, mode: str) -> subprocess.Popen[bytes]:
        self.stderr = self.out / "stderr.txt"
        with open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), mode, str(self.out)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,  # its own process group, as a program started from a shell
            )
        return self.proc

    def wait_for_file(self, name: str, timeout: float = 30) -> str:
        path = self.out / name

        def there() -> bool:
            if self.proc is not None and self.proc.poll() is not None and not path.exists():
                raise AssertionError(f"the script exited ({self.proc.returncode}) early: {self.stderr.read_text()}")
            return path.exists()

        wait_for(there, timeout, f"the script to write {name}")
        return path.read_text()

    def remember_children(self) -> None:
        assert self.proc is not None
        self.seen |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(WAIT)
        for pid in self.seen:
            if is_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def script(tmp_path: Path):
    helper = Script(tmp_path)
    yield helper
    helper.cleanup()
    left = [(p.pid, p.name()) for p in psutil.Process().children(recursive=True) if p.pid not in _shared_helpers()]
    assert not left, f"child processes left: {left}"


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_ctrl_c_in_a_script_stops_the_waited_run_and_not_the_others(mode: str, script: Script) -> None:
    proc = script.start(mode)
    waited_pid = int(script.wait_for_file("started-w"))
    ff_pid = int(script.wait_for_file("started-ff"))
    script.wait_for_file("waiting")
    script.remember_children()
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C: the foreground process group

    record = json.loads(script.wait_for_file("interrupted.json", WAIT))
    # The fire-and-forget run goes on (its worker may not have told the parent it began yet).
    assert record.pop("ff_status") in ("pending", "running")
    assert record == {"interrupted": True, "status": "stopped"}
    if mode == "process":
        assert waited_pid != ff_pid != proc.pid
        wait_for(lambda: not is_alive(waited_pid), 5, f"the waited run's worker {waited_pid} to end")
        assert is_alive(ff_pid)  # the fire-and-forget call's worker goes on
    else:
        script.wait_for_file("saw-stop-w", WAIT)  # the thread task saw stop_requested()

    (script.out / "release").write_text("")
    proc.wait(30)
    err = script.stderr.read_text()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert script.wait_for_file("done-ff") == str(ff_pid)  # it completed, in the worker it started in


def test_ctrl_c_in_a_script_stops_the_waited_group_and_its_items_not_started(script: Script) -> None:
    proc = script.start("group")
    pids = {int(script.wait_for_file(f"started-g{i}")) for i in range(2)}
    ff_pid = int(script.wait_for_file("started-ff"))
    script.wait_for_file("waiting")
    script.remember_children()
    os.killpg(proc.pid, signal.SIGINT)

    record = json.loads(script.wait_for_file("interrupted.json", WAIT))
    assert record["interrupted"] is True and record["ff_status"] in ("pending", "running")
    assert record["len"] == 6 and record["statuses"] == ["stopped"] * 6
    assert record["attempts"][2:] == [0, 0, 0, 0]  # the items not started never had an attempt
    assert record["summary"]["stopped"] == 6
    wait_for(lambda: not any(is_alive(pid) for pid in pids), 5, f"the group's workers {sorted(pids)} to end")
    for i in range(2, 6):
        assert not (script.out / f"started-g{i}").exists()

    (script.out / "release").write_text("")
    proc.wait(30)
    err = script.stderr.read_text()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert script.wait_for_file("done-ff") == str(ff_pid)


# ---- in a Jupyter kernel -----------------------------------------------------------------------------

KERNEL_CELL = """
import os, threading, time
from pathlib import Path
from taskrun import MultiprocessTaskRun, task

out = Path({out!r})

def long_call():
    tmp = out / "started.tmp"
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, out / "started")
    time.sleep(60)

work = task(runner=MultiprocessTaskRun.configure(max_workers=1, start_method="fork"))(long_call)
run = work()

def say_when_waiting():
    deadline = time.monotonic() + 30
    while not run._waiters and time.monotonic() < deadline:
        time.sleep(0.005)
    (out / "waiting").write_text("")

threading.Thread(target=say_when_waiting, daemon=True).start()
run.get_result()
"""


def test_the_notebooks_interrupt_stops_the_waited_run(tmp_path: Path) -> None:
    pytest.importorskip("jupyter_client", reason="the notebook extra (pip install taskrun[notebook]) is not installed")
    pytest.importorskip("ipykernel", reason="the notebook extra (pip install taskrun[notebook]) is not installed")
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    # A kernel spec of our own: this interpreter, whatever kernels the machine has installed.
    spec_dir = tmp_path / "kernels" / "taskrun-test"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec_dir / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "taskrun test", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    km = KernelManager(kernel_name="taskrun-test", kernel_spec_manager=specs, connection_file=str(tmp_path / "connection.json"))
    env = {**os.environ, "IPYTHONDIR": str(tmp_path / "ipython")}
    km.start_kernel(cwd=str(tmp_path), env=env)
    kernel_pid = km.provisioner.pid
    kc = km.client()
    descendants: set[int] = set()
    try:
        kc.start_channels()
        kc.wait_for_ready(timeout=30)
        msg_id = kc.execute(KERNEL_CELL.format(out=str(tmp_path)))
        deadline = time.monotonic() + 30
        started = tmp_path / "started"
        worker_pid = int(wait_for(lambda: started.exists() and started.read_text(), 30, "the task to start"))
        wait_for(lambda: (tmp_path / "waiting").exists(), 30, "the cell to wait for the run")
        descendants = {p.pid for p in psutil.Process(kernel_pid).children(recursive=True)}
        assert worker_pid in descendants

        km.interrupt_kernel()
        while True:
            reply = kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"

        outputs: list[str] = []

        def collect(msg: dict) -> None:
            if msg["msg_type"] == "stream":
                outputs.append(msg["content"]["text"])

        checked = kc.execute_interactive(
            "print(run.status.value, run.attempts)", timeout=10, output_hook=collect, allow_stdin=False
        )
        assert checked["content"]["status"] == "ok"
        assert "".join(outputs).split() == ["stopped", "1"]
        wait_for(lambda: not is_alive(worker_pid), 5, f"the run's worker {worker_pid} to end")

        if importlib.util.find_spec("ipywidgets") is not None and importlib.util.find_spec("tqdm") is not None:
            # While we have a kernel: the progress bar of a map is the notebook's widget.
            shown: list[dict] = []
            checked = kc.execute_interactive(
                "from taskrun import ThreadTaskRun\n"
                "task(runner=ThreadTaskRun, name='shown')(abs).map(range(3), progress=True).wait(30)",
                timeout=20, output_hook=shown.append, allow_stdin=False,
            )
            assert checked["content"]["status"] == "ok"
            kinds = [m["msg_type"] for m in shown]
            widgets = [m for m in shown if m["msg_type"] == "display_data"
                       and "application/vnd.jupyter.widget-view+json" in m["content"]["data"]]
            assert widgets, kinds
            text = "".join(m["content"].get("text", "") for m in shown if m["msg_type"] == "stream")
            assert "IProgress not found" not in text and "Warning" not in text, text
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)  # lets taskrun end its pool at the kernel's exit
        descendants.add(kernel_pid)
        try:
            wait_for(lambda: not any(is_alive(pid) for pid in descendants), 10, "the kernel and its processes to end")
        finally:
            for pid in descendants:
                if is_alive(pid):
                    os.kill(pid, signal.SIGKILL)
