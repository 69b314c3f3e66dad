"""AsyncTaskRun, and async def tasks on every runner.

The handle and retry contracts run on AsyncTaskRun in test_handle.py and test_retries.py;
here: concurrency (thousands in flight, max_concurrency), stop and timeout as cancellation,
the blocked-loop watchdog, awaiting from other loops, async def on the other runners,
map/ledger/dependencies/stop_when, shutdown and fork, and a real HTTP client against a
local server with 1,000 requests in flight.
"""

import asyncio
import contextlib
import json
import logging
import os
import pathlib
import resource
import signal
import subprocess
import sys
import threading
import time

import pytest
from _async_bodies import AsyncGate
from _http_server import LocalHTTPServer

import taskrun
from taskrun import (
    AsyncTaskRun,
    Ledger,
    MultiprocessTaskRun,
    SequentialTaskRun,
    Status,
    TaskStopped,
    TaskTimeout,
    ThreadTaskRun,
    UpstreamFailed,
    task,
)
from taskrun.runners.base import registered_pools

WAIT = 10  # seconds: the cap on every wait; never reached when things work


def loop_threads():
    return [t for t in threading.enumerate() if t.name.startswith("taskrun-async-")]


# ---- the decorator and the runner's settings --------------------------------------------------


def test_an_async_def_gets_async_task_run_unless_a_runner_is_given():
    async def fetch(url):
        return url

    assert task(fetch).runner is AsyncTaskRun
    assert task()(fetch).runner is AsyncTaskRun
    assert task(runner=ThreadTaskRun)(fetch).runner is ThreadTaskRun
    assert task(lambda: 1).runner is MultiprocessTaskRun  # plain functions: unchanged


def test_import_taskrun_does_not_import_asyncio():
    code = "import sys, taskrun; assert 'asyncio' not in sys.modules, 'asyncio imported'; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        ({"max_concurrency": 0}, ValueError, "max_concurrency must be >= 1"),
        ({"max_concurrency": 2.5}, TypeError, "max_concurrency must be an int"),
        ({"slow_callback_seconds": 0}, ValueError, "slow_callback_seconds must be > 0"),
        ({"slow_callback_seconds": "1"}, TypeError, "slow_callback_seconds must be a number"),
        ({"max_workers": 4}, TypeError, "unknown setting.*max_workers.*valid settings: max_concurrency, slow_callback_seconds"),
    ],
)
def test_bad_settings_are_refused_naming_them(settings, error, message):
    with pytest.raises(error, match=message):
        AsyncTaskRun.configure(**settings)


def test_settings_of_none_mean_no_limit_and_no_watchdog():
    runner = AsyncTaskRun.configure(max_concurrency=None, slow_callback_seconds=None)
    run = task(runner=runner)(asyncio.sleep)(0, "v")
    assert run.get_result(timeout=WAIT) == "v"
    assert [t.name for t in loop_threads() if t.name.endswith("watchdog")] == []


# ---- many at once ---------------------------------------------------------------------------------


def test_two_thousand_sleeps_run_at_once_and_finish_in_under_5_seconds():
    in_flight = peak = 0

    @task(runner=AsyncTaskRun.configure(max_concurrency=2000))
    async def nap(i):
        nonlocal in_flight, peak
        in_flight += 1  # all on the one loop thread: no lock needed
        peak = max(peak, in_flight)
        await asyncio.sleep(0.5)
        in_flight -= 1
        return i

    t0 = time.monotonic()
    group = nap.map(range(2000))
    assert group.results(timeout=WAIT) == list(range(2000))
    elapsed = time.monotonic() - t0
    assert elapsed < 5, elapsed
    assert peak == 2000
    assert group.summary()["succeeded"] == 2000


def test_max_concurrency_bounds_coroutines_in_flight_and_the_rest_wait_pending():
    gate = AsyncGate()
    in_flight = peak = 0

    @task(runner=AsyncTaskRun.configure(max_concurrency=3))
    async def held(i):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await gate.wait()
        in_flight -= 1
        return i

    runs = [held(i) for i in range(10)]
    assert gate.entered.wait(WAIT)
    deadline = time.monotonic() + WAIT
    while sum(run.status is Status.RUNNING for run in runs) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    statuses = [run.status for run in runs]
    assert statuses[:3] == [Status.RUNNING] * 3
    assert statuses[3:] == [Status.PENDING] * 7
    assert all(run.started_at is None and run.attempts == 0 for run in runs[3:])
    gate.open()
    assert [run.get_result(timeout=WAIT) for run in runs] == list(range(10))
    assert peak == 3


@pytest.fixture
def deadlock_warnings(monkeypatch):
    from taskrun.runners import aio

    monkeypatch.setattr(aio, "STARVED_CHECK_SECONDS", 0.02)
    handler = _Seen("none of them can go on")
    logging.getLogger("taskrun").addHandler(handler)
    yield handler
    logging.getLogger("taskrun").removeHandler(handler)


def test_slots_all_held_by_runs_awaiting_runs_of_the_same_runner_are_warned_of(deadlock_warnings):
    runner = AsyncTaskRun.configure(max_concurrency=3)

    @task(runner=runner, name="child")
    async def child(x):
        return x

    @task(runner=runner, name="parent")
    async def parent(x):
        return await child(x)  # waits for a slot that its caller holds

    group = parent.map(range(4))
    assert deadlock_warnings.event.wait(WAIT)
    message = deadlock_warnings.records[0].getMessage()
    assert "all 3 of its slots" in message and ("parent#" in message or "child#" in message), message
    assert "`await child.fn(x)`" in message
    assert group.summary()["running"] == 3  # indeed stuck
    group.stop()
    assert len(deadlock_warnings.records) == 1


def test_slots_all_held_by_runs_awaiting_something_else_are_not_warned_of(deadlock_warnings):
    gate = AsyncGate()
    checked = threading.Event()
    runner = AsyncTaskRun.configure(max_concurrency=2)
    other = AsyncTaskRun.configure(max_concurrency=2, slow_callback_seconds=None)

    @task(runner=other)
    async def elsewhere():
        await gate.wait()

    @task(runner=runner)
    async def held():
        return await elsewhere()  # a run of another runner: that one can go on

    @task(runner=runner)
    async def plain():
        await gate.wait()

    from taskrun.runners import aio

    calls = [held(), plain(), plain(), plain()]
    original = aio.LoopPool._check_starved

    def counted(self):
        original(self)
        checked.set()

    aio.LoopPool._check_starved = counted
    try:
        assert checked.wait(WAIT)  # it looked, with every slot taken and calls waiting
        assert checked.clear() is None and checked.wait(WAIT)  # and again, as the slots stay full
    finally:
        aio.LoopPool._check_starved = original
        gate.open()
    assert [run.wait(WAIT) for run in calls] == [True] * 4
    assert deadlock_warnings.records == []


def test_a_run_stopped_while_waiting_for_a_slot_never_starts():
    gate = AsyncGate()
    started = []

    @task(runner=AsyncTaskRun.configure(max_concurrency=1))
    async def body(i):
        started.append(i)
        await gate.wait()
        return i

    first, second = body(1), body(2)
    assert gate.entered.wait(WAIT)
    assert second.status is Status.PENDING
    assert second.stop() is True
    assert second.status is Status.STOPPED and second.attempts == 0
    gate.open()
    assert first.get_result(timeout=WAIT) == 1
    third = body(3)  # starts after the stopped one was passed over
    assert third.get_result(timeout=WAIT) == 3
    assert started == [1, 3]


# ---- stop and timeout: cancellation ---------------------------------------------------------------


def test_stop_cancels_the_coroutine_its_cleanup_runs_and_the_run_is_stopped_at_once():
    gate = AsyncGate()
    seen = []
    cleaned = threading.Event()

    @contextlib.asynccontextmanager
    async def resource():
        seen.append("open")
        try:
            yield
        finally:
            seen.append("closed")

    @task
    async def body():
        try:
            async with resource():
                await gate.wait(timeout=WAIT)
                seen.append("not reached")
        except asyncio.CancelledError:
            seen.append(("cancelled", taskrun.stop_requested()))
            raise
        finally:
            await asyncio.sleep(0)  # a finally block may still await
            seen.append("finally")
            cleaned.set()

    run = body()
    assert gate.entered.wait(WAIT)
    assert run.stop() is True
    assert run.status is Status.STOPPED  # at once, before the coroutine has even seen the cancel
    assert cleaned.wait(WAIT)
    assert seen == ["open", "closed", ("cancelled", True), "finally"]
    with pytest.raises(TaskStopped):
        run.get_result()
    assert run.stop() is False


def test_a_coroutine_that_swallows_the_cancel_still_ends_stopped():
    gate = AsyncGate()
    returned = threading.Event()

    @task
    async def stubborn():
        try:
            await gate.wait()
        except asyncio.CancelledError:
            pass
        returned.set()
        return "ignored"

    run = stubborn()
    assert gate.entered.wait(WAIT)
    run.stop()
    assert returned.wait(WAIT)
    assert run.status is Status.STOPPED
    assert isinstance(run.exception(), TaskStopped)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_a_stopped_coroutine_that_goes_on_gives_up_its_slot_and_shutdown_abandons_it_after_the_grace():
    from taskrun.runners import aio

    gate = AsyncGate()
    cleaned = threading.Event()

    @task(runner=AsyncTaskRun.configure(max_concurrency=1), name="stubborn")
    async def stubborn():
        try:
            while True:
                try:
                    await gate.wait(timeout=WAIT * 10)
                except asyncio.CancelledError:
                    pass  # goes on, for good
        finally:
            cleaned.set()

    @task(runner=AsyncTaskRun.configure(max_concurrency=1), name="next_call")
    async def next_call():
        return "ran"

    records = _Records()
    logging.getLogger("taskrun").addHandler(records)
    try:
        run = stubborn()
        assert gate.entered.wait(WAIT)
        assert run.stop() is True
        # Its only slot is given up: the next call does not wait for a coroutine that never ends.
        assert next_call().get_result(timeout=WAIT) == "ran"
        before = time.monotonic()
        taskrun.shutdown(wait=True)
        took = time.monotonic() - before
    finally:
        logging.getLogger("taskrun").removeHandler(records)
    assert took < aio.CANCEL_GRACE + 2, f"shutdown took {took:.1f} s"
    assert loop_threads() == []
    assert cleaned.is_set()  # its coroutine was closed where it waited: its finally ran
    assert run.status is Status.STOPPED
    messages = [r.getMessage() for r in records.records]
    assert len(messages) == 1 and run.id in messages[0] and "abandoned" in messages[0], messages


STUBBORN_SCRIPT = """
import asyncio, logging, sys, time
logging.basicConfig(level=logging.WARNING)
import taskrun
from taskrun import task

async def poll():
    await asyncio.sleep(0.05)

@task(timeout=float(sys.argv[1]) if sys.argv[1] != "none" else None, name="stubborn")
async def stubborn():
    kind = sys.argv[2]
    try:
        while True:
            if kind == "bare-except":
                try:
                    await poll()
                except:  # noqa: E722 - catches the GeneratorExit of its closing too, and awaits again
                    pass
            else:
                try:
                    await asyncio.wait_for(asyncio.Event().wait(), 100)  # an inner task, left behind when abandoned
                except asyncio.CancelledError:
                    pass
    finally:
        print("finally", flush=True)
        if kind == "awaits-in-finally":
            await asyncio.sleep(0.1)
            print("not reached", flush=True)

runs = [stubborn() for _ in range(int(sys.argv[3]) if len(sys.argv) > 3 else 1)]
run = runs[0]
for each in runs:
    if sys.argv[1] == "none":
        while each.status.value != "running":
            time.sleep(0.01)
        each.stop()
    else:
        each.wait(10)
print(run.status.value, flush=True)
"""


@pytest.mark.parametrize("timeout", ["none", "0.2"], ids=["stopped", "timed-out"])
@pytest.mark.parametrize("kind", ["swallows-cancel", "bare-except", "awaits-in-finally"])
def test_a_script_whose_stopped_coroutine_never_ends_exits_quietly_after_the_grace(tmp_path, timeout, kind):
    """Regression: closing a coroutine with a bare `except:` around an await, with no loop running, looped for
    good inside close() (each await failed at once, and was caught), so the script never exited."""
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN_SCRIPT)
    before = time.monotonic()
    out = subprocess.run([sys.executable, "-X", "dev", str(script), timeout, kind], capture_output=True, text=True,
                         timeout=WAIT * 2)
    took = time.monotonic() - before
    assert out.returncode == 0, out.stderr
    printed = out.stdout.split()
    assert printed[0] == ("stopped" if timeout == "none" else "failed")
    assert printed[1:] == ([] if kind == "bare-except" else ["finally"])  # a finally runs up to its first await
    assert took < WAIT, f"exit took {took:.1f} s"
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert "stubborn#1 still running" in lines[0] and "abandoned" in lines[0], out.stderr
    if kind == "swallows-cancel":
        assert len(lines) == 1, out.stderr
    else:  # it awaited again while being closed: said so, and held (never collected: a collection would close it again)
        assert len(lines) == 2 and "stubborn#1 awaited again while being closed" in lines[1], out.stderr


def test_many_abandoned_coroutines_are_named_in_two_warnings_not_one_each(tmp_path):
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN_SCRIPT)
    out = subprocess.run([sys.executable, str(script), "none", "bare-except", "30"], capture_output=True, text=True,
                         timeout=WAIT * 2)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, out.stderr
    assert "and 20 more still running" in lines[0] and "and 20 more awaited again while being closed" in lines[1]


def test_a_timeout_cancels_the_attempt_and_fails_it_with_task_timeout_within_2_seconds():
    cancelled = threading.Event()

    @task(timeout=0.3)
    async def sleepy():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    t0 = time.monotonic()
    run = sleepy()
    with pytest.raises(TaskTimeout, match=r"timeout of 0\.3 s"):
        run.get_result(timeout=WAIT)
    assert time.monotonic() - t0 < 2
    assert run.status is Status.FAILED and run.attempts == 1
    assert cancelled.wait(WAIT)


def test_a_timed_out_attempt_is_retried_and_the_retry_can_succeed():
    calls = []

    @task(timeout=0.1, retries=2)
    async def first_hangs():
        calls.append(1)
        if len(calls) == 1:
            await asyncio.sleep(WAIT)
        return len(calls)

    run = first_hangs()
    assert run.get_result(timeout=WAIT) == 2
    assert run.attempts == 2


def test_a_cancelled_error_the_task_raises_itself_fails_the_run():
    @task
    async def raises_it():
        raise asyncio.CancelledError("not from taskrun")

    run = raises_it()
    assert run.wait(WAIT)
    assert run.status is Status.FAILED
    assert isinstance(run.exception(), asyncio.CancelledError)


def test_stopping_a_map_group_cancels_running_coroutines_and_never_starts_the_rest():
    gate = AsyncGate()
    entered, cancelled = [], []

    @task(runner=AsyncTaskRun.configure(max_concurrency=5))
    async def held(i):
        entered.append(i)
        try:
            await gate.wait()
        except asyncio.CancelledError:
            cancelled.append(i)
            raise
        return i

    group = held.map(range(50))
    deadline = time.monotonic() + WAIT
    while len(entered) < 5 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sorted(entered) == [0, 1, 2, 3, 4]
    group.stop()
    assert group.wait(WAIT)
    assert group.summary()["stopped"] == 50
    deadline = time.monotonic() + WAIT
    while len(cancelled) < 5 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sorted(cancelled) == [0, 1, 2, 3, 4]


# ---- the blocked-loop watchdog ------------------------------------------------------------------


class _Seen(logging.Handler):
    """Sets an Event when a record containing ``text`` arrives."""

    def __init__(self, text):
        super().__init__(logging.WARNING)
        self.text = text
        self.event = threading.Event()
        self.records = []

    def emit(self, record):
        if self.text in record.getMessage():
            self.records.append(record)
            self.event.set()


@pytest.fixture
def blocked_warnings():
    handler = _Seen("blocked the event loop")
    logger = logging.getLogger("taskrun")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_a_coroutine_that_blocks_the_loop_is_logged_with_its_name(blocked_warnings):
    @task(runner=AsyncTaskRun.configure(slow_callback_seconds=0.05), name="sleeps_badly")
    async def sleeps_badly():
        # Blocks the loop (time.sleep, not await) until the watchdog has said so, or WAIT passes.
        blocked_warnings.event.wait(WAIT)
        return "done"

    run = sleeps_badly()
    assert run.get_result(timeout=WAIT * 2) == "done"
    assert blocked_warnings.event.is_set()
    record = blocked_warnings.records[0]
    assert record.levelno == logging.WARNING and record.name == "taskrun"
    message = record.getMessage()
    assert run.id in message and "slow_callback_seconds=0.05" in message and "asyncio.sleep" in message
    assert len(blocked_warnings.records) == 1  # once per block


def test_coroutines_that_await_are_not_reported_as_blocking(blocked_warnings):
    @task  # awaiting for longer than slow_callback_seconds (0.1 s) is not blocking
    async def polite(i):
        await asyncio.sleep(0.2)
        return i

    assert polite.map(range(100)).results(timeout=WAIT) == list(range(100))
    assert blocked_warnings.records == []


def test_a_done_callback_that_blocks_the_loop_is_logged(blocked_warnings):
    gate = AsyncGate()

    @task(runner=AsyncTaskRun.configure(slow_callback_seconds=0.05))
    async def body():
        await gate.wait()

    run = body()
    assert gate.entered.wait(WAIT)
    run.add_done_callback(lambda r: blocked_warnings.event.wait(WAIT))  # runs on the loop thread, blocking it
    gate.open()
    assert blocked_warnings.event.wait(WAIT)
    message = blocked_warnings.records[0].getMessage()
    assert f"the done callbacks of {run.id} have blocked the event loop" in message, message


@pytest.mark.timing
def test_a_burst_of_quick_coroutines_is_not_reported_as_blocking(blocked_warnings):
    """Regression: a loop iteration running thousands of quick steps took longer than the threshold, and
    whichever task was current then was named as blocking the loop."""

    @task(runner=AsyncTaskRun.configure(slow_callback_seconds=0.05))
    async def quick(i):
        await asyncio.sleep(0)
        return i

    assert quick.map(range(20_000)).results(timeout=WAIT * 3) == list(range(20_000))
    assert [r.getMessage() for r in blocked_warnings.records] == []


# ---- waiting and awaiting -------------------------------------------------------------------------


def test_await_from_the_callers_loop_does_not_block_it_while_the_runner_loop_runs_the_task():
    gate = AsyncGate()

    @task
    async def gated():
        await gate.wait()
        return threading.current_thread().name

    async def main():
        run = gated()

        async def opener():
            await asyncio.sleep(0.01)  # runs only if awaiting the run left this loop free
            gate.open()
            return "opened"

        return await asyncio.wait_for(asyncio.gather(run, opener()), WAIT)

    thread_name, opened = asyncio.run(main())
    assert thread_name.startswith("taskrun-async-") and opened == "opened"


def test_calls_inside_a_running_loop_return_at_once_even_when_they_must_wait():
    gate = AsyncGate()

    @task(runner=AsyncTaskRun.configure(max_concurrency=1))
    async def held(x):
        await gate.wait()
        return x

    @task(runner=AsyncTaskRun.configure(max_concurrency=1))
    async def plus_one(x):
        return x + 1

    async def main():
        first = held(1)  # takes the only slot
        queued = [held(i) for i in range(2, 50)]  # wait for it
        dependent = plus_one(first)  # waits for an unfinished run
        statuses = [run.status for run in queued] + [dependent.status]
        gate.open()  # only this loop can open the gate: a call that had blocked it would never return
        return statuses, await first, await asyncio.gather(*queued), await dependent

    statuses, first, rest, dependent = asyncio.run(asyncio.wait_for(main(), WAIT))
    assert statuses == [Status.PENDING] * 49
    assert (first, rest, dependent) == (1, list(range(2, 50)), 2)


def test_await_from_a_loop_in_another_thread_and_from_many_loops_at_once():
    @task
    async def double(x):
        await asyncio.sleep(0.01)
        return 2 * x

    results = {}

    def in_a_thread(i):
        async def main():
            return await double(i)  # a notebook's top-level await is this: the kernel's loop awaits

        results[i] = asyncio.run(main())

    threads = [threading.Thread(target=in_a_thread, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert results == {i: 2 * i for i in range(4)}


KERNEL_CELL = """
import asyncio, threading, time
from taskrun import task

@task
async def double(x):
    await asyncio.sleep(0.01)
    return 2 * x

t0 = time.monotonic()
handle = double(21)  # in the kernel's running loop: a handle at once
returned_at_once = time.monotonic() - t0 < 1 and not handle.done()
one = await handle  # top-level await, on the kernel's own loop
many = await asyncio.gather(*(double(i) for i in range(100)))
print("result:", one, sum(many), returned_at_once, threading.current_thread() is threading.main_thread())
"""


def test_top_level_await_in_a_jupyter_kernel(tmp_path):
    """A notebook's top-level await: a real ipykernel runs the cell in its own event loop."""
    pytest.importorskip("jupyter_client", reason="the notebook extra (pip install taskrun[notebook]) is not installed")
    pytest.importorskip("ipykernel", reason="the notebook extra (pip install taskrun[notebook]) is not installed")
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    spec_dir = tmp_path / "kernels" / "taskrun-test"  # this interpreter, whatever kernels the machine has
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec_dir / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "taskrun test", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    km = KernelManager(kernel_name="taskrun-test", kernel_spec_manager=specs, connection_file=str(tmp_path / "c.json"))
    km.start_kernel(cwd=str(tmp_path))
    kc = km.client()
    kc.start_channels()
    out = []
    try:
        kc.wait_for_ready(timeout=60)

        def collect(message):
            if message["msg_type"] == "stream":
                out.append(message["content"]["text"])
            elif message["msg_type"] == "error":
                out.append("\n".join(message["content"]["traceback"]))

        reply = kc.execute_interactive(KERNEL_CELL, output_hook=collect, timeout=60)
        assert reply["content"]["status"] == "ok", "".join(out)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    assert "result: 42 9900 True True" in "".join(out), "".join(out)


def test_an_async_task_awaits_another_on_the_same_loop():
    @task
    async def leaf(x):
        await asyncio.sleep(0)
        return x * 10

    @task
    async def parent(xs):
        return sum(await asyncio.gather(*(leaf(x) for x in xs)))

    assert parent([1, 2, 3]).get_result(timeout=WAIT) == 60


def test_a_blocking_wait_on_the_loop_thread_is_refused_with_the_await_advice():
    gate = AsyncGate()

    @task
    async def other():
        await gate.wait()

    target = other()

    @task
    async def waits_badly():
        try:
            target.get_result(timeout=1)  # a handle from the closure: not an argument, so not waited for first
        except RuntimeError as exc:
            return str(exc)

    try:
        message = waits_badly().get_result(timeout=WAIT)
    finally:
        gate.open()
    assert target.id in message and "event loop thread" in message and "await run" in message


def test_a_blocking_wait_for_a_group_on_the_loop_thread_is_refused_with_the_await_advice():
    @task
    async def inner(x):
        return x

    @task
    async def waits_badly():
        group = inner.map(range(3))
        try:
            group.results(timeout=1)
        except RuntimeError as exc:
            return str(exc), await group

    message, values = waits_badly().get_result(timeout=WAIT)
    assert values == [0, 1, 2]
    assert "event loop thread" in message and "`await group`" in message and "map" in message, message


def test_await_a_group_gives_its_results_without_blocking_the_loop():
    gate = AsyncGate()

    @task
    async def gated(x):
        await gate.wait()
        return x * 10

    async def main():
        group = gated.map(range(50))

        async def opener():
            await asyncio.sleep(0.01)  # runs only if awaiting the group left this loop free
            gate.open()

        values, _ = await asyncio.wait_for(asyncio.gather(group, opener()), WAIT)
        return values, await group  # a settled group is awaited again at once

    values, again = asyncio.run(main())
    assert values == again == [x * 10 for x in range(50)]


def test_await_a_group_of_thread_runs_from_a_generator_and_a_failure_raises():
    @task(runner=ThreadTaskRun)
    def half(x):
        if x == 3:
            raise ValueError("three")
        return x / 2

    async def main():
        ok = await half.map(x for x in (0, 2, 4))
        with pytest.raises(ValueError, match="three"):
            await half.map(range(5))
        return ok

    assert asyncio.run(asyncio.wait_for(main(), WAIT)) == [0, 1, 2]


def test_cancelling_an_await_of_a_group_leaves_its_runs_going_and_forgets_the_waiter():
    gate = AsyncGate()

    @task
    async def gated(x):
        await gate.wait()
        return x

    group = gated.map(range(3))

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(group, 0.05)

    asyncio.run(main())
    assert group._async_waiters == [] and group._waiting == 0
    gate.open()
    assert group.results(timeout=WAIT) == [0, 1, 2]


def test_an_async_def_done_callback_is_refused_and_one_that_returns_a_coroutine_is_reported(caplog):
    import functools
    import warnings

    @task
    async def one():
        return 1

    async def callback(run, tag):
        raise AssertionError("never runs")

    run = one()
    with pytest.raises(TypeError, match=r"add_done_callback\(.*callback\) got an async def.*`await run`"):
        run.add_done_callback(callback)
    assert run.get_result(timeout=WAIT) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "coroutine was never awaited" RuntimeWarning
        run.add_done_callback(functools.partial(callback, tag="x"))  # not seen as async: called, and reported
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "returned a coroutine, which nothing awaits" in errors[0] and run.id in errors[0]


def test_a_done_callback_on_the_loop_thread_that_waits_gets_the_runtime_error():
    never, soon = AsyncGate(), AsyncGate()
    seen = []
    called = threading.Event()

    @task
    async def gated(gate):
        await gate.wait()

    target = gated(never)

    def callback(run):
        try:
            target.wait()
        except RuntimeError as exc:
            seen.append((threading.current_thread().name, str(exc)))
        called.set()

    first = gated(soon)
    assert soon.entered.wait(WAIT)
    first.add_done_callback(callback)  # added while it runs: called where it finishes, on the loop thread
    soon.open()
    assert called.wait(WAIT)
    never.open()
    assert target.wait(WAIT)
    assert len(seen) == 1
    name, message = seen[0]
    assert name.startswith("taskrun-async-") and target.id in message and "await run" in message


def test_stop_requested_is_true_inside_an_async_task_once_stopped_and_false_elsewhere():
    gate = AsyncGate()
    seen = []
    done = threading.Event()

    @task
    async def body():
        seen.append(taskrun.stop_requested())
        try:
            await gate.wait()
        finally:
            seen.append(taskrun.stop_requested())
            done.set()

    @task
    async def bystander():
        return taskrun.stop_requested()

    run = body()
    assert gate.entered.wait(WAIT)
    run.stop()
    assert done.wait(WAIT)
    assert seen == [False, True]
    assert bystander().get_result(timeout=WAIT) is False  # another task on the same loop thread
    assert taskrun.stop_requested() is False


def test_a_plain_function_on_async_task_run_runs_and_an_awaitable_it_returns_is_awaited():
    async def later(x):
        await asyncio.sleep(0)
        return x + 1

    assert task(runner=AsyncTaskRun)(lambda x: x * 2)(21).get_result(timeout=WAIT) == 42
    assert task(runner=AsyncTaskRun)(lambda x: later(x))(41).get_result(timeout=WAIT) == 42


# ---- async def on the other runners ---------------------------------------------------------------


async def _async_square(x):
    await asyncio.sleep(0.001)
    return x * x


async def _async_fails():
    await asyncio.sleep(0)
    raise KeyError("async boom")


@pytest.mark.parametrize("runner", [ThreadTaskRun, SequentialTaskRun, MultiprocessTaskRun.configure(max_workers=1)],
                         ids=["ThreadTaskRun", "SequentialTaskRun", "MultiprocessTaskRun"])
def test_other_runners_run_an_async_def_to_completion_never_returning_a_coroutine(runner):
    square = task(runner=runner)(_async_square)
    run = square(7)
    assert run.get_result(timeout=WAIT) == 49
    assert square.map(range(5)).results(timeout=WAIT) == [0, 1, 4, 9, 16]
    failed = task(runner=runner)(_async_fails)()
    with pytest.raises(KeyError, match="async boom"):
        failed.get_result(timeout=WAIT)
    assert "_async_fails" in str(failed.exception().__cause__)


async def _forgets_to_await(x):
    return _async_square(x)  # a coroutine, not its value


@pytest.mark.parametrize("runner", [AsyncTaskRun, ThreadTaskRun, SequentialTaskRun,
                                    MultiprocessTaskRun.configure(max_workers=1)],
                         ids=["AsyncTaskRun", "ThreadTaskRun", "SequentialTaskRun", "MultiprocessTaskRun"])
def test_an_async_def_that_returns_a_coroutine_gives_its_value_never_a_coroutine(runner, recwarn):
    assert task(runner=runner)(_forgets_to_await)(4).get_result(timeout=WAIT) == 16
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


def test_a_plain_function_returning_a_coroutine_is_run_too():
    run = task(runner=ThreadTaskRun)(lambda x: _async_square(x))(3)
    assert run.get_result(timeout=WAIT) == 9


def test_an_async_def_on_the_thread_runner_sees_stop_requested():
    started = threading.Event()
    saw = threading.Event()

    @task(runner=ThreadTaskRun)
    async def polls():
        started.set()
        deadline = time.monotonic() + WAIT
        while not taskrun.stop_requested() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if taskrun.stop_requested():
            saw.set()

    run = polls()
    assert started.wait(WAIT)
    run.stop()
    assert run.status is Status.STOPPED
    assert saw.wait(WAIT)


def test_sequential_refuses_an_async_def_inside_a_running_loop_with_a_clear_error():
    square = task(runner=SequentialTaskRun)(_async_square)

    async def main():
        with pytest.raises(RuntimeError, match=r"inside a running event loop.*AsyncTaskRun"):
            square(2)
        return "refused"

    assert asyncio.run(main()) == "refused"
    assert square(2).get_result() == 4  # outside a loop: inline


def test_thread_runner_inside_a_running_loop_is_fine_and_sequential_plain_returning_a_coroutine_fails_clearly():
    returns_coroutine = task(runner=SequentialTaskRun)(lambda x: _async_square(x))

    async def main():
        on_thread = await task(runner=ThreadTaskRun)(_async_square)(5)  # its own loop, in a pool thread
        run = returns_coroutine(2)  # cannot be told apart before it runs: it fails, not blocking the loop
        return on_thread, run

    on_thread, run = asyncio.run(main())
    assert on_thread == 25
    assert run.status is Status.FAILED
    assert "inside a running event loop" in str(run.exception())


# ---- map, dependencies, stop_when, progress, ledger -----------------------------------------------


def test_async_and_process_handles_feed_each_other():
    async_square = task(runner=AsyncTaskRun)(_async_square)
    process_inc = task(runner=MultiprocessTaskRun.configure(max_workers=1))(_inc)

    first = async_square(3)  # 9
    second = process_inc(first)  # 10, in a process
    third = async_square(second)  # 100, back on the loop
    assert third.get_result(timeout=WAIT) == 100

    failed = task(_async_fails)()
    dependent = process_inc(failed)
    assert dependent.wait(WAIT)
    assert isinstance(dependent.exception(), UpstreamFailed)


def _inc(x):
    return x + 1


def test_stop_when_stops_new_async_runs_from_starting():
    finished = []

    @task(runner=AsyncTaskRun.configure(max_concurrency=2))
    async def step(i):
        await asyncio.sleep(0.001)
        finished.append(i)
        return i

    group = step.map(range(100), stop_when=lambda: len(finished) >= 10)
    assert group.wait(WAIT)
    counts = group.summary()
    assert counts["succeeded"] >= 10 and counts["stopped"] >= 80
    assert counts["succeeded"] + counts["stopped"] == 100
    assert counts["succeeded"] <= 10 + 2  # no more than the runs in flight when it turned true


def test_progress_bar_counts_async_runs(capsys):
    pytest.importorskip("tqdm")

    @task
    async def step(i):
        await asyncio.sleep(0)
        return i

    assert step.map(range(50), progress=True).results(timeout=WAIT) == list(range(50))
    assert "50/50" in capsys.readouterr().err


def test_an_async_map_with_a_ledger_runs_once_and_is_answered_from_it_next_time(tmp_path):
    """Needs the ledger (ported on another branch at the time of writing)."""
    ledger = Ledger(tmp_path / "runs.db")
    calls = []

    @task(ledger=ledger, name="fetch")
    async def fetch(i):
        calls.append(i)
        await asyncio.sleep(0.001)
        return i * 2

    first = fetch.map(range(200))
    assert first.results(timeout=WAIT) == [i * 2 for i in range(200)]
    again = fetch.map(range(200))
    assert again.results(timeout=WAIT) == [i * 2 for i in range(200)]
    assert again.summary()["cached"] == 200
    assert sorted(calls) == list(range(200))


def test_a_stopped_async_run_with_a_ledger_runs_again_next_time(tmp_path):
    """Needs the ledger (ported on another branch at the time of writing)."""
    ledger = Ledger(tmp_path / "runs.db")
    gate = AsyncGate()

    @task(ledger=ledger, name="slow")
    async def slow(i):
        await gate.wait()
        return i

    run = slow(1)
    assert gate.entered.wait(WAIT)
    run.stop()
    assert run.status is Status.STOPPED
    gate.open()
    again = slow(1)
    assert again.get_result(timeout=WAIT) == 1 and not again.cached


# ---- shutdown and fork ----------------------------------------------------------------------------


def test_shutdown_with_wait_lets_running_coroutines_finish_and_ends_the_loop_thread():
    @task
    async def nap(i):
        await asyncio.sleep(0.05)
        return i

    runs = [nap(i) for i in range(20)]
    assert loop_threads()
    taskrun.shutdown(wait=True)
    assert [run.get_result(wait=False) for run in runs] == list(range(20))
    assert loop_threads() == []
    assert nap(5).get_result(timeout=WAIT) == 5  # the next call starts a new loop


def test_shutdown_without_wait_stops_running_coroutines_and_their_cleanup_runs():
    gate = AsyncGate()
    cleaned = []

    @task(runner=AsyncTaskRun.configure(max_concurrency=2))
    async def held(i):
        try:
            await gate.wait()
        finally:
            cleaned.append(i)

    runs = [held(i) for i in range(5)]
    deadline = time.monotonic() + WAIT
    while sum(run.status is Status.RUNNING for run in runs) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    taskrun.shutdown(wait=False)
    assert [run.status for run in runs] == [Status.STOPPED] * 5
    assert sorted(cleaned) == [0, 1]  # the two that were running; the rest never started
    assert loop_threads() == []


def test_shutdown_ends_the_watchdog_even_when_closing_the_loop_runs_it_once_more():
    """Regression: the loop runs again while it closes (here: waiting for its executor's thread), and a
    heartbeat due then told the watchdog "idle" after shutdown had told it "ended": shutdown() hung."""
    runner = AsyncTaskRun.configure(slow_callback_seconds=0.02)
    started = threading.Event()

    @task(runner=runner)
    async def leaves_executor_work():
        asyncio.get_running_loop().run_in_executor(None, time.sleep, 0.3)  # still running when the loop closes
        started.set()
        await asyncio.sleep(0.1)  # running when shutdown() begins: the watchdog is watching
        return "ok"

    class LateToLook(threading.Event):
        """The watchdog's event, looked at 50 ms late: the heartbeat gets its turn first."""

        def wait(self, timeout=None):
            time.sleep(0.05)
            return super().wait(timeout)

    run = leaves_executor_work()
    assert started.wait(WAIT)
    pool = registered_pools[runner]
    late = LateToLook()
    if pool.busy.is_set():
        late.set()
    pool.busy = late
    finished = threading.Event()
    closer = threading.Thread(target=lambda: (taskrun.shutdown(wait=True), finished.set()), daemon=True)
    closer.start()
    try:
        assert finished.wait(WAIT), "taskrun.shutdown() hung waiting for the watchdog"
    finally:
        pool.ended = True
        late.set()  # let a stuck watchdog go, so that this test leaves no thread behind
    assert run.get_result() == "ok"


def test_an_async_task_may_call_shutdown_itself():
    @task
    async def ends_everything():
        taskrun.shutdown(wait=False)
        return "returned"

    run = ends_everything()
    assert run.wait(WAIT)
    deadline = time.monotonic() + WAIT
    while loop_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loop_threads() == []


def test_a_forked_child_runs_async_tasks_on_a_loop_of_its_own():
    double = task(_async_square)
    assert double(3).get_result(timeout=WAIT) == 9  # the parent's loop thread exists
    pid = os.fork()
    if pid == 0:
        signal.alarm(10)
        try:
            ok = double(4).get_result(timeout=5) == 16
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert double(5).get_result(timeout=WAIT) == 25  # the parent's loop goes on


# ---- a real client and server -----------------------------------------------------------------------


def test_an_http_client_fetches_from_a_local_server_with_1000_requests_in_flight():
    aiohttp = pytest.importorskip("aiohttp")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 <= hard:  # 1,000 connections, both of their ends in this process
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
    sessions = {}

    def session():
        # One session per loop, made on the loop that uses it; no connection limit, so 1,000 are in flight.
        loop = asyncio.get_running_loop()
        if loop not in sessions:
            sessions[loop] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return sessions[loop]

    @task
    async def fetch(url):
        async with session().get(url) as response:
            response.raise_for_status()
            return await response.text()

    @task
    async def close_sessions():
        for each in sessions.values():
            await each.close()

    with LocalHTTPServer(hold_until=1000, hold_timeout=WAIT) as server:
        urls = [server.url(f"page/{i}") for i in range(1000)]
        try:
            pages = fetch.map(urls).results(timeout=WAIT * 2)
        finally:
            close_sessions().wait(WAIT)
        assert pages == [f"echo:page/{i}" for i in range(1000)]
        assert server.requests == 1000
        assert server.peak == 1000  # all of them were in flight at once


def test_the_async_fetch_example_fetches_1000_pages_then_answers_them_from_its_ledger(tmp_path):
    """Needs the ledger (ported on another branch at the time of writing)."""
    pytest.importorskip("aiohttp")
    example = pathlib.Path(__file__).resolve().parent.parent / "examples" / "async_fetch.py"
    command = [sys.executable, str(example), "--ledger", str(tmp_path / "pages.db")]
    first = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "1000 pages" in first.stdout and "1000 fetched, 0 from the ledger" in first.stdout
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "0 fetched, 1000 from the ledger" in again.stdout
