"""Retries, waits between attempts, retry_on, per-attempt timeouts, and the retry log lines.

The runner-parametrized tests run on AsyncTaskRun too, each plain body as a coroutine (see
tests/_async_bodies.py); a body that would block the event loop has a coroutine of its own there.
Tests with ``any_runner`` run on DaskTaskRun too (conftest): their task bodies record calls in files.
"""

import asyncio
import itertools
import logging
import pathlib
import random
import re
import tempfile
import threading
import time
from collections.abc import Sequence

import pytest
from _async_bodies import is_async, task

import taskrun
from taskrun import AsyncTaskRun, SequentialTaskRun, Status, TaskStopped, TaskTimeout, ThreadTaskRun
from taskrun._retry import RetryPolicy

RUNNERS = [ThreadTaskRun, SequentialTaskRun, AsyncTaskRun]
WAIT = 10


@pytest.fixture(params=RUNNERS, ids=lambda r: r.__name__)
def runner(request):
    return request.param


_calls_dir = tempfile.TemporaryDirectory(prefix="taskrun-test-retries-")
_call_files = itertools.count()


class CallTimes(Sequence):
    """The ``time.monotonic()`` of each call, read from the file every call appends to (in any process)."""

    def __init__(self, path):
        self.path = path

    def _times(self):
        return [float(line) for line in self.path.read_text().split()] if self.path.exists() else []

    def __getitem__(self, index):
        return self._times()[index]

    def __len__(self):
        return len(self._times())


def flaky(failures, exc_type=OSError, value="ok"):
    """A function failing ``failures`` times, then returning ``value``; ``calls`` records call times.

    The times go to a file, so that the calls count wherever they run (a Dask worker too).
    """
    path = pathlib.Path(_calls_dir.name) / f"calls-{next(_call_files)}"

    def fn():
        with open(path, "a") as f:
            f.write(f"{time.monotonic()}\n")
        made = len(path.read_text().split())
        if made <= failures:
            raise exc_type(f"failure {made}")
        return value

    fn.calls = CallTimes(path)
    return fn


# ---- how many attempts ----------------------------------------------------------------------


def test_no_retries_by_default(any_runner):
    runner = any_runner
    fn = flaky(1)
    run = task(runner=runner)(fn)()
    assert run.wait(WAIT)
    assert run.status is Status.FAILED
    assert run.attempts == 1
    assert len(fn.calls) == 1


def test_retries_until_success(any_runner):
    runner = any_runner
    fn = flaky(2)
    run = task(runner=runner, retries=3)(fn)()
    assert run.get_result(timeout=WAIT) == "ok"
    assert run.attempts == 3
    assert len(fn.calls) == 3
    assert run.status is Status.SUCCEEDED


def test_retries_exhausted_raises_the_last_failure(any_runner):
    runner = any_runner
    fn = flaky(100)
    run = task(runner=runner, retries=2)(fn)()
    with pytest.raises(OSError, match="^failure 3$") as info:
        run.get_result(timeout=WAIT)
    assert info.value.__cause__ is not None  # the traceback of where it ran
    assert run.attempts == 3
    assert len(fn.calls) == 3
    assert run.status is Status.FAILED


def test_retries_are_counted_per_call(any_runner):
    runner = any_runner
    fn = flaky(1)
    t = task(runner=runner, retries=1)(fn)
    first = t()
    assert first.get_result(timeout=WAIT) == "ok"
    second = t()  # a new call starts with a fresh count
    assert second.get_result(timeout=WAIT) == "ok"
    assert (first.attempts, second.attempts) == (2, 1)


# ---- waits: retry_sleep_time, backoff, jitter ------------------------------------------------


def test_retry_sleep_time_and_backoff_space_the_attempts(any_runner):
    runner = any_runner
    fn = flaky(3)
    run = task(runner=runner, retries=3, retry_sleep_time=0.04, backoff=2.0)(fn)()
    assert run.get_result(timeout=WAIT) == "ok"
    gaps = [b - a for a, b in itertools.pairwise(fn.calls)]
    assert len(gaps) == 3
    for gap, expected in zip(gaps, [0.04, 0.08, 0.16], strict=True):
        assert gap >= expected - 0.005, (gaps, expected)
    assert gaps[2] < 2.0  # waits do not grow without bound


def test_zero_sleep_retries_at_once(any_runner):
    runner = any_runner
    fn = flaky(3)
    run = task(runner=runner, retries=3)(fn)()
    assert run.get_result(timeout=WAIT) == "ok"
    assert fn.calls[-1] - fn.calls[0] < 1.0


def test_retry_policy_delays():
    policy = RetryPolicy(retries=4, retry_sleep_time=0.5, backoff=3.0)
    assert [policy.delay(n) for n in (1, 2, 3)] == [0.5, 1.5, 4.5]
    assert RetryPolicy(retries=2, retry_sleep_time=1).delay(5) == 1.0  # backoff 1: constant


def test_jitter_adds_up_to_jitter_seconds_to_each_wait(any_runner, monkeypatch, caplog):
    runner = any_runner
    drawn = []

    def fake_uniform(low, high):
        drawn.append((low, high))
        return high * 0.5

    monkeypatch.setattr(random, "uniform", fake_uniform)
    fn = flaky(2)
    with caplog.at_level(logging.INFO, logger="taskrun"):
        run = task(runner=runner, retries=2, retry_sleep_time=0.01, backoff=2, jitter=0.04)(fn)()
        assert run.get_result(timeout=WAIT) == "ok"
    assert drawn == [(0, 0.04), (0, 0.04)]
    waits = [float(m) for m in re.findall(r"retrying in ([\d.]+) s", caplog.text)]
    assert waits == [pytest.approx(0.03), pytest.approx(0.04)]  # 0.01 + 0.02, 0.02 + 0.02
    gaps = [b - a for a, b in itertools.pairwise(fn.calls)]
    assert gaps[0] >= 0.025 and gaps[1] >= 0.035


def test_real_jitter_stays_within_bounds():
    policy = RetryPolicy(retries=10, retry_sleep_time=0.1, jitter=0.2)
    for _ in range(200):
        assert 0.1 <= policy.delay(1) <= 0.3 + 1e-9
    assert len({policy.delay(1) for _ in range(20)}) > 1  # it is random


# ---- retry_on -------------------------------------------------------------------------------


def test_retry_on_retries_only_the_listed_errors(any_runner):
    runner = any_runner
    fn = flaky(5, exc_type=KeyError)
    run = task(runner=runner, retries=3, retry_on=ValueError)(fn)()
    with pytest.raises(KeyError):
        run.get_result(timeout=WAIT)
    assert run.attempts == 1
    assert len(fn.calls) == 1


def test_retry_on_retries_subclasses_and_tuples(any_runner):
    runner = any_runner
    fn = flaky(2, exc_type=ConnectionResetError)  # an OSError subclass
    run = task(runner=runner, retries=2, retry_on=(KeyError, OSError))(fn)()
    assert run.get_result(timeout=WAIT) == "ok"
    assert run.attempts == 3


def test_retry_on_stops_at_the_first_unlisted_error(runner):
    errors = [ConnectionError("net"), ConnectionError("net"), TypeError("bug"), ConnectionError("net")]
    calls = []

    def fn():
        calls.append(1)
        raise errors[len(calls) - 1]

    run = task(runner=runner, retries=5, retry_on=ConnectionError)(fn)()
    with pytest.raises(TypeError, match="bug"):
        run.get_result(timeout=WAIT)
    assert run.attempts == 3


# ---- timeouts -------------------------------------------------------------------------------


def test_thread_timeout_ends_the_attempt_with_task_timeout():
    saw_stop = threading.Event()
    returned = threading.Event()

    @task(runner=ThreadTaskRun, timeout=0.05)
    def slow():
        try:
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline:
                if taskrun.stop_requested():
                    saw_stop.set()
                    return "too late"
                time.sleep(0.005)
        finally:
            returned.set()

    t0 = time.monotonic()
    run = slow()
    with pytest.raises(TaskTimeout, match=r"timeout of 0\.05 s") as info:
        run.get_result(timeout=WAIT)
    assert time.monotonic() - t0 < WAIT / 2  # ended by the timeout, not by the function
    assert isinstance(info.value, taskrun.TaskrunError)
    assert run.status is Status.FAILED
    assert run.attempts == 1
    assert saw_stop.wait(WAIT)  # the function was told to stop
    assert returned.wait(WAIT)
    assert run.status is Status.FAILED  # its late return changed nothing


def test_timeout_wins_over_a_function_that_returns_as_soon_as_it_is_told_to_stop():
    """Regression: the timeout used to set stop_requested() before claiming the outcome, so a
    function polling it could return first and the run SUCCEEDED with the abandoned value."""

    @task(runner=ThreadTaskRun.configure(max_workers=8), timeout=0.01)
    def polite():
        while not taskrun.stop_requested():
            time.sleep(0.0005)
        return "late"

    runs = [polite() for _ in range(64)]
    for run in runs:
        assert run.wait(WAIT)
    outcomes = [type(run.exception()).__name__ for run in runs]
    assert outcomes == ["TaskTimeout"] * 64


def test_thread_timed_out_attempt_is_retried():
    attempts = []

    @task(runner=ThreadTaskRun, timeout=0.2, retries=2)
    def first_attempt_hangs():
        attempts.append(1)
        if len(attempts) == 1:
            while not taskrun.stop_requested():
                time.sleep(0.005)
            return "late"
        return "second"

    run = first_attempt_hangs()
    assert run.get_result(timeout=WAIT) == "second"
    assert run.attempts == 2


def test_timeout_is_per_attempt_not_per_run(runner):
    calls = []

    if is_async(runner):

        async def fn():
            calls.append(1)
            await asyncio.sleep(0.05)  # the same work, awaited
            if len(calls) < 4:
                raise OSError("again")
            return "ok"

    else:

        def fn():
            calls.append(1)
            time.sleep(0.05)  # work: each attempt well within its timeout, all of them together not
            if len(calls) < 4:
                raise OSError("again")
            return "ok"

    run = task(runner=runner, timeout=0.15, retries=3)(fn)()
    assert run.get_result(timeout=WAIT) == "ok"
    assert run.attempts == 4
    assert run.duration >= 0.15


def test_sequential_overrun_fails_with_task_timeout_when_it_returns():
    calls = []

    @task(runner=SequentialTaskRun, timeout=0.02, retries=1)
    def slow():
        calls.append(1)
        time.sleep(0.04)  # work that overruns
        return "value lost"

    run = slow()
    assert run.status is Status.FAILED
    assert isinstance(run.exception(), TaskTimeout)
    assert len(calls) == 2 and run.attempts == 2  # the timeout was retried like any failure


def test_sequential_task_sees_stop_requested_once_its_timeout_passed():
    polls = []

    @task(runner=SequentialTaskRun, timeout=0.05)
    def patient():
        deadline = time.monotonic() + WAIT
        while not taskrun.stop_requested():  # the timeout ends this loop, not the deadline
            polls.append(1)
            assert time.monotonic() < deadline, "stop_requested() never became True"
            time.sleep(0.005)
        return "stopped early"

    began = time.monotonic()
    run = patient()
    assert time.monotonic() - began < WAIT
    assert polls and run.status is Status.FAILED
    assert isinstance(run.exception(), TaskTimeout)
    assert taskrun.stop_requested() is False  # outside the task


def test_timeout_not_retried_when_retry_on_excludes_it(runner):
    if is_async(runner):

        async def fn():
            await asyncio.sleep(WAIT)  # ended by the cancel the timeout sends

    else:

        def fn():
            if runner is SequentialTaskRun:
                time.sleep(0.04)
            else:
                while not taskrun.stop_requested():
                    time.sleep(0.005)

    run = task(runner=runner, timeout=0.02, retries=3, retry_on=OSError)(fn)()
    assert run.wait(WAIT)
    assert isinstance(run.exception(), TaskTimeout)
    assert run.attempts == 1


def test_timeout_can_be_listed_in_retry_on(runner):
    calls = []

    if is_async(runner):

        async def fn():
            calls.append(1)
            if len(calls) == 1:
                await asyncio.sleep(WAIT)  # ended by the cancel the timeout sends
            return len(calls)

    else:

        def fn():
            calls.append(1)
            if len(calls) == 1:
                if runner is SequentialTaskRun:
                    time.sleep(0.15)
                else:
                    while not taskrun.stop_requested():
                        time.sleep(0.005)
            return len(calls)

    run = task(runner=runner, timeout=0.1, retries=1, retry_on=TaskTimeout)(fn)()
    assert run.get_result(timeout=WAIT) == 2


# ---- stopped runs are never retried ---------------------------------------------------------


def test_stopped_running_run_is_never_retried():
    one = ThreadTaskRun.configure(max_workers=1)
    started = threading.Event()
    calls = []
    threads = []

    @task(runner=one, retries=5)
    def body():
        calls.append(1)
        threads.append(threading.current_thread())
        started.set()
        while not taskrun.stop_requested():
            time.sleep(0.005)
        raise OSError("raised after the stop: must not cause a retry")

    run = body()
    assert started.wait(WAIT)
    assert run.stop() is True
    assert run.status is Status.STOPPED
    threads[0].join(WAIT)  # the abandoned thread ends once the function has raised and it was reported
    assert not threads[0].is_alive()
    # had that failure counted, a retry (no wait) would now be queued ahead of this probe on the one worker
    probe = task(runner=one)(lambda: "probe")()
    assert probe.get_result(timeout=WAIT) == "probe"
    assert calls == [1]
    assert run.attempts == 1
    assert isinstance(run.exception(), TaskStopped)


class _RetryLogged(logging.Handler):
    """Sets an Event when the taskrun logger announces a retry: "the run is now waiting"."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.event = threading.Event()

    def emit(self, record):
        if "retrying in" in record.getMessage():
            self.event.set()


@pytest.fixture
def retry_logged():
    handler = _RetryLogged()
    logger = logging.getLogger("taskrun")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler.event
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_stop_during_the_wait_before_a_retry_cancels_it(retry_logged):
    second_attempt = threading.Event()
    calls = []

    @task(runner=ThreadTaskRun, retries=3, retry_sleep_time=0.2)
    def body():
        calls.append(1)
        if len(calls) > 1:
            second_attempt.set()
        raise OSError("fail")

    run = body()
    assert retry_logged.wait(WAIT)  # attempt 1 failed; the retry is due in 0.2 s
    assert run.stop() is True
    assert run.status is Status.STOPPED
    assert not second_attempt.wait(0.4)  # the retry was due after 0.2 s: it must never come
    assert calls == [1]
    assert run.attempts == 1


def test_sequential_run_stopped_inside_is_not_retried():
    handles = []

    class Spy(SequentialTaskRun):
        def prepare(self):
            handles.append(self)

    calls = []

    @task(runner=Spy, retries=3)
    def body():
        calls.append(1)
        handles[-1].stop()
        raise OSError("after stop")

    run = body()
    assert run.status is Status.STOPPED
    assert calls == [1]
    assert run.attempts == 1


# ---- logging --------------------------------------------------------------------------------


def test_each_retry_is_logged_at_info_with_attempt_error_and_wait(any_runner, caplog):
    runner = any_runner
    fn = flaky(2, exc_type=ConnectionError)

    with caplog.at_level(logging.INFO, logger="taskrun"):
        run = task(runner=runner, name="fetch", retries=3, retry_sleep_time=0.01, backoff=3)(fn)()
        assert run.get_result(timeout=WAIT) == "ok"
    records = [r for r in caplog.records if r.name == "taskrun" and "retrying" in r.getMessage()]
    assert len(records) == 2
    assert all(r.levelno == logging.INFO for r in records)
    first, second = (r.getMessage() for r in records)
    assert run.id in first
    assert "attempt 1/4" in first and "ConnectionError" in first and "failure 1" in first and "0.01 s" in first
    assert "attempt 2/4" in second and "failure 2" in second and "0.03 s" in second


def test_final_failure_is_not_logged_as_a_retry(any_runner, caplog):
    runner = any_runner
    with caplog.at_level(logging.INFO, logger="taskrun"):
        run = task(runner=runner, retries=1)(flaky(5))()
        assert run.wait(WAIT)
    retry_lines = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retry_lines) == 1  # after attempt 1 only: attempt 2 was the last
    assert "attempt 1/2" in retry_lines[0].getMessage()


def test_no_retry_logged_for_unlisted_errors(any_runner, caplog):
    runner = any_runner
    with caplog.at_level(logging.INFO, logger="taskrun"):
        run = task(runner=runner, retries=3, retry_on=KeyError)(flaky(5))()
        assert run.wait(WAIT)
    assert "retrying" not in caplog.text
