"""API.md section 2: every member of a run handle, for ThreadTaskRun, SequentialTaskRun and AsyncTaskRun alike
(and DaskTaskRun, through conftest's ``any_runner``, for the tests whose task bodies need not see the caller's memory).

A SequentialTaskRun has finished by the time the call returns, so "while it runs" is seen from
inside the task body: the runner is subclassed with a ``prepare`` hook that records each handle,
and the body looks at its own handle. The same tests run unchanged on ThreadTaskRun, and on
AsyncTaskRun with each body run as a coroutine (see tests/_async_bodies.py); a body that would
block the event loop (a wait on its own handle, ``time.sleep``) has a coroutine of its own there.
"""

import asyncio
import logging
import re
import threading
import time

import pytest
from _async_bodies import AsyncGate, is_async, task

import taskrun
from taskrun import AsyncTaskRun, BaseTaskRun, SequentialTaskRun, Status, TaskStillRunning, TaskStopped, ThreadTaskRun
from taskrun.errors import RemoteTraceback

RUNNERS = [ThreadTaskRun, SequentialTaskRun, AsyncTaskRun]
WAIT = 10  # seconds: the cap on every wait; never reached when things work


@pytest.fixture(params=RUNNERS, ids=lambda r: r.__name__)
def runner(request):
    return request.param


class Spy:
    """A runner subclass whose handles are recorded in ``prepare``, so a task body can see its own handle."""

    def __init__(self, runner):
        handles = self.handles = []

        class SpyRun(runner):
            def prepare(self):
                super().prepare()
                handles.append(self)

        self.runner = SpyRun

    def me(self):
        return self.handles[-1]


# ---- get_result ---------------------------------------------------------------------------


def test_get_result_returns_the_value(any_runner):
    runner = any_runner
    @task(runner=runner)
    def add(x, y=0):
        return x + y

    run = add(2, y=3)
    assert isinstance(run, BaseTaskRun)
    assert isinstance(run, runner)
    assert run.get_result(timeout=WAIT) == 5
    assert run.get_result(timeout=WAIT) == 5  # again: same value
    assert run.status is Status.SUCCEEDED


def test_get_result_returns_none_and_falsy_values(any_runner):
    runner = any_runner
    @task(runner=runner)
    def ident(x):
        return x

    for value in (None, 0, "", [], False):
        assert ident(value).get_result(timeout=WAIT) == value


def test_get_result_timeout_raises_timeout_error_and_the_run_goes_on(runner):
    if is_async(runner):  # seen from outside: inside, a wait on the loop thread is refused (test_async_runner.py)
        gate = AsyncGate()
        run = task(runner=runner)(gate.wait)()
        assert gate.entered.wait(WAIT)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            run.get_result(timeout=0.05)
        assert time.monotonic() - t0 >= 0.04
        assert not isinstance(info.value, taskrun.TaskrunError) and run.id in str(info.value)
        assert run.status is Status.RUNNING
        gate.open()
        assert run.get_result(timeout=WAIT) is None
        return
    spy = Spy(runner)
    seen = []

    @task(runner=spy.runner)
    def body():
        me = spy.me()
        t0 = time.monotonic()
        try:
            me.get_result(timeout=0.05)
        except TimeoutError as exc:
            seen.append((exc, time.monotonic() - t0, me.status))
        return "finished"

    run = body()
    assert run.get_result(timeout=WAIT) == "finished"
    assert len(seen) == 1
    exc, waited, status = seen[0]
    assert not isinstance(exc, taskrun.TaskrunError)  # the builtin TimeoutError, not TaskTimeout
    assert waited >= 0.04
    assert status is Status.RUNNING
    assert run.id in str(exc)


def test_get_result_wait_false(runner):
    spy = Spy(runner)
    seen = []

    @task(runner=spy.runner)
    def body():
        try:
            spy.me().get_result(wait=False)
        except TaskStillRunning as exc:
            seen.append(exc)
        return 11

    run = body()
    assert run.wait(WAIT)
    assert len(seen) == 1 and isinstance(seen[0], taskrun.TaskrunError)
    assert run.get_result(wait=False) == 11  # finished: no waiting needed


def _failing():
    raise ValueError("boom 42")


def test_failed_run_reraises_the_task_exception_with_its_traceback(any_runner):
    runner = any_runner
    run = task(runner=runner)(_failing)()
    assert run.wait(WAIT)
    with pytest.raises(ValueError, match="^boom 42$") as info:
        run.get_result()
    exc = info.value
    assert type(exc) is ValueError
    cause = exc.__cause__
    assert isinstance(cause, RemoteTraceback)
    text = str(cause)
    assert "in _failing" in text
    assert 'raise ValueError("boom 42")' in text
    assert "ValueError: boom 42" in text
    assert run.status is Status.FAILED
    assert run.exception() is exc


def test_raise_exceptions_false_returns_the_exception(any_runner):
    runner = any_runner
    run = task(runner=runner)(_failing)()
    exc = run.get_result(timeout=WAIT, raise_exceptions=False)
    assert isinstance(exc, ValueError)
    assert str(exc) == "boom 42"
    assert exc is run.exception()
    # the success path is unchanged by the flag
    assert task(runner=runner)(lambda: 3)().get_result(timeout=WAIT, raise_exceptions=False) == 3


def test_base_exception_subclasses_fail_the_run(any_runner):
    runner = any_runner
    class Quit(BaseException):
        pass

    def body():
        raise Quit("bye")

    run = task(runner=runner)(body)()
    assert run.wait(WAIT)
    assert run.status is Status.FAILED
    assert isinstance(run.exception(), Quit)


# ---- stop -----------------------------------------------------------------------------------


def test_stop_while_running_stops_discards_result_and_is_idempotent(runner):
    spy = Spy(runner)
    inside = {}

    @task(runner=spy.runner)
    def body():
        me = spy.me()
        inside["before"] = taskrun.stop_requested()
        inside["first"] = me.stop()
        inside["second"] = me.stop()
        inside["after"] = taskrun.stop_requested()
        inside["status"] = me.status
        inside["done"] = me.done()
        return "discarded"

    run = body()
    assert run.wait(WAIT)
    assert inside == {"before": False, "first": True, "second": False, "after": True,
                      "status": Status.STOPPED, "done": True}
    assert run.status is Status.STOPPED
    with pytest.raises(TaskStopped, match=re.escape(run.id)):
        run.get_result()
    stopped = run.get_result(raise_exceptions=False)
    assert isinstance(stopped, TaskStopped)
    assert run.exception() is stopped
    assert run.stop() is False
    assert run.attempts == 1


def test_stop_after_finish_returns_false_and_changes_nothing(any_runner):
    runner = any_runner
    run = task(runner=runner)(lambda: "kept")()
    assert run.get_result(timeout=WAIT) == "kept"
    finished_at = run.finished_at
    assert run.stop() is False
    assert run.stop() is False
    assert run.status is Status.SUCCEEDED
    assert run.get_result() == "kept"
    assert run.finished_at == finished_at

    failed = task(runner=runner)(_failing)()
    assert failed.wait(WAIT)
    assert failed.stop() is False
    assert failed.status is Status.FAILED


def test_stop_requested_is_false_outside_a_task():
    assert taskrun.stop_requested() is False


# ---- wait, is_running, done, status -------------------------------------------------------


def test_wait_is_running_done_and_status_over_a_life(runner):
    spy = Spy(runner)
    inside = {}
    gate = AsyncGate()

    if is_async(runner):  # wait(0.01) from outside, while the coroutine waits

        @task(runner=spy.runner)
        async def body():
            me = spy.me()
            inside.update(is_running=me.is_running(), done=me.done(), status=me.status)
            await gate.wait()
            return 1

    else:

        @task(runner=spy.runner)
        def body():
            me = spy.me()
            inside["wait"] = me.wait(0.01)
            inside["is_running"] = me.is_running()
            inside["done"] = me.done()
            inside["status"] = me.status
            return 1

    run = body()
    if is_async(runner):
        assert gate.entered.wait(WAIT)
        inside["wait"] = run.wait(0.01)
        gate.open()
    assert run.wait(WAIT) is True
    assert inside == {"wait": False, "is_running": True, "done": False, "status": Status.RUNNING}
    assert run.wait() is True
    assert run.wait(0) is True
    assert run.is_running() is False
    assert run.done() is True
    assert run.status is Status.SUCCEEDED
    assert run.status == "succeeded" and str(run.status) == "succeeded"


def test_status_values():
    assert [s.name for s in Status] == ["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED", "SKIPPED"]


def test_cached_is_false_when_the_task_ran(any_runner):
    runner = any_runner
    run = task(runner=runner)(lambda: 1)()
    assert run.cached is False
    run.wait(WAIT)
    assert run.cached is False


def test_exception(runner):
    spy = Spy(runner)
    inside = []
    gate = AsyncGate()

    if is_async(runner):  # exception(timeout=0.01) from outside, while the coroutine waits

        @task(runner=spy.runner)
        async def body():
            await gate.wait()
            return 1

    else:

        @task(runner=spy.runner)
        def body():
            try:
                spy.me().exception(timeout=0.01)
            except TimeoutError as exc:
                inside.append(exc)
            return 1

    ok = body()
    if is_async(runner):
        assert gate.entered.wait(WAIT)
        with pytest.raises(TimeoutError) as info:
            ok.exception(timeout=0.01)
        inside.append(info.value)
        gate.open()
    assert ok.exception(timeout=WAIT) is None
    assert len(inside) == 1
    bad = task(runner=runner)(_failing)()
    exc = bad.exception(timeout=WAIT)
    assert isinstance(exc, ValueError) and str(exc) == "boom 42"


# ---- attempts, name, id, times ------------------------------------------------------------


def test_attempts_count_up_with_retries(runner):
    spy = Spy(runner)
    seen = []

    @task(runner=spy.runner, retries=3)
    def flaky():
        seen.append(spy.me().attempts)
        if len(seen) < 3:
            raise OSError("again")
        return "ok"

    run = flaky()
    assert run.get_result(timeout=WAIT) == "ok"
    assert seen == [1, 2, 3]
    assert run.attempts == 3


def test_attempts_is_one_for_a_plain_success(any_runner):
    runner = any_runner
    run = task(runner=runner)(lambda: 0)()
    run.wait(WAIT)
    assert run.attempts == 1


def test_name_and_unique_id(any_runner):
    runner = any_runner
    @task(runner=runner, name="inc")
    def inc(x):
        return x + 1

    runs = [inc(i) for i in range(5)]
    for run in runs:
        run.wait(WAIT)
        assert run.name == "inc"
        assert re.fullmatch(r"inc#\d+", run.id)
    assert len({run.id for run in runs}) == 5
    other = task(runner=runner)(inc.fn)(0)
    assert other.name == inc.fn.__qualname__
    assert other.id.startswith(inc.fn.__qualname__ + "#")
    assert other.id not in {run.id for run in runs}


def test_started_finished_and_duration(runner):
    spy = Spy(runner)
    inside = {}

    if is_async(runner):

        @task(runner=spy.runner)
        async def body():
            me = spy.me()
            inside.update(started_at=me.started_at, finished_at=me.finished_at, duration=me.duration)
            await asyncio.sleep(0.02)  # work
            return 1

    else:

        @task(runner=spy.runner)
        def body():
            me = spy.me()
            inside.update(started_at=me.started_at, finished_at=me.finished_at, duration=me.duration)
            time.sleep(0.02)  # work
            return 1

    t0 = time.time()
    run = body()
    assert run.wait(WAIT)
    t1 = time.time()
    assert inside["started_at"] is not None
    assert inside["finished_at"] is None
    assert inside["duration"] is None
    assert t0 <= run.started_at <= run.finished_at <= t1
    assert run.started_at == inside["started_at"]
    assert run.duration == pytest.approx(run.finished_at - run.started_at)
    assert run.duration >= 0.015


def test_times_of_a_failed_and_a_stopped_run(runner):
    spy = Spy(runner)

    @task(runner=spy.runner)
    def stops_itself():
        spy.me().stop()

    failed = task(runner=runner)(_failing)()
    stopped = stops_itself()
    for run in (failed, stopped):
        assert run.wait(WAIT)
        assert run.started_at is not None and run.finished_at is not None
        assert run.duration >= 0


# ---- callbacks ------------------------------------------------------------------------------


def test_done_callback_added_while_running_is_called_once_after_the_end(runner):
    spy = Spy(runner)
    calls = []
    called = threading.Event()

    def callback(run):
        calls.append((run, run.done(), run.status, run.get_result(wait=False)))
        called.set()

    @task(runner=spy.runner)
    def body():
        me = spy.me()
        me.add_done_callback(callback)
        me.add_done_callback(lambda run: calls.append("second"))
        assert not calls  # nothing is called before the end
        return "v"

    run = body()
    assert called.wait(WAIT)
    run.wait(WAIT)
    assert calls == [(run, True, Status.SUCCEEDED, "v"), "second"]


def test_done_callback_added_after_the_end_is_called_at_once(any_runner):
    runner = any_runner
    run = task(runner=runner)(_failing)()
    assert run.wait(WAIT)
    calls = []
    run.add_done_callback(lambda r: calls.append((r, threading.current_thread())))
    assert calls == [(run, threading.current_thread())]  # synchronously, in the caller


def test_done_callback_of_a_stopped_run(runner):
    spy = Spy(runner)
    calls = []

    @task(runner=spy.runner)
    def body():
        me = spy.me()
        me.add_done_callback(lambda r: calls.append(r.status))
        me.stop()

    run = body()
    assert run.wait(WAIT)
    assert calls == [Status.STOPPED]


def test_raising_callback_is_logged_and_never_breaks_the_run(runner, caplog):
    spy = Spy(runner)
    calls = []

    def bad(run):
        raise RuntimeError("callback exploded")

    @task(runner=spy.runner)
    def body():
        me = spy.me()
        me.add_done_callback(bad)
        me.add_done_callback(lambda r: calls.append("after bad"))
        return "fine"

    with caplog.at_level(logging.ERROR, logger="taskrun"):
        run = body()
        assert run.get_result(timeout=WAIT) == "fine"
        assert run.status is Status.SUCCEEDED
        # a raising callback added after the end: logged too, add_done_callback does not raise
        run.add_done_callback(bad)
        run.add_done_callback(lambda r: calls.append("late"))
    assert calls == ["after bad", "late"]
    records = [r for r in caplog.records if r.name == "taskrun" and "callback" in r.getMessage()]
    assert len(records) == 2
    for record in records:
        assert record.levelno == logging.ERROR
        assert run.id in record.getMessage()
        assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
        assert "callback exploded" in str(record.exc_info[1])


# ---- await ----------------------------------------------------------------------------------


def test_await_returns_the_value(any_runner):
    runner = any_runner
    @task(runner=runner)
    def add(x, y):
        return x + y

    async def main():
        return await add(1, 2), await add(3, 4)

    assert asyncio.run(main()) == (3, 7)


def test_await_raises_the_failure_and_task_stopped(runner):
    spy = Spy(runner)

    @task(runner=spy.runner)
    def stops_itself():
        spy.me().stop()

    async def main():
        with pytest.raises(ValueError, match="boom 42"):
            await task(runner=runner)(_failing)()
        with pytest.raises(TaskStopped):
            await stops_itself()
        return "checked"

    assert asyncio.run(main()) == "checked"


def test_await_does_not_block_the_event_loop():
    release = threading.Event()

    @task(runner=ThreadTaskRun)
    def waits_for_the_loop():
        return release.wait(WAIT)  # True only if the loop got to run the releaser below

    async def releaser():
        await asyncio.sleep(0.01)
        release.set()
        return "released"

    async def main():
        run = waits_for_the_loop()

        async def awaiting():
            return await run

        return await asyncio.wait_for(asyncio.gather(awaiting(), releaser()), WAIT)

    assert asyncio.run(main()) == [True, "released"]


def test_await_many_runs_concurrently():
    barrier = threading.Barrier(3, timeout=WAIT)

    @task(runner=ThreadTaskRun.configure(max_workers=3))
    def meet(i):
        barrier.wait()  # all three must be running at once
        return i

    async def main():
        return await asyncio.gather(*(meet(i) for i in range(3)))

    assert asyncio.run(main()) == [0, 1, 2]


# ---- repr -----------------------------------------------------------------------------------


def test_repr_while_running_and_after(runner):
    spy = Spy(runner)
    inside = []

    @task(runner=spy.runner, name="inc", retries=3)
    def inc(x):
        inside.append(repr(spy.me()))
        return x + 1

    run = inc(1)
    assert run.wait(WAIT)
    number = run.id.split("#")[1]
    assert re.fullmatch(rf"<TaskRun inc#{number} running \d+\.\ds attempt 1/4>", inside[0]), inside[0]
    assert re.fullmatch(rf"<TaskRun inc#{number} succeeded \d+\.\ds attempt 1/4>", repr(run)), repr(run)


def test_repr_of_a_failed_run_shows_the_error(any_runner):
    runner = any_runner
    @task(runner=runner, name="bad")
    def bad():
        raise KeyError("nope")

    run = bad()
    assert run.wait(WAIT)
    assert re.fullmatch(r"<TaskRun bad#\d+ failed \d+\.\ds attempt 1/1: KeyError: 'nope'>", repr(run)), repr(run)


def test_repr_of_a_failed_run_keeps_a_long_error_on_one_short_line(any_runner):
    runner = any_runner
    @task(runner=runner, name="bad")
    def bad():
        raise ValueError("first line\nsecond line " + "x" * 10_000)

    run = bad()
    assert run.wait(WAIT)
    text = repr(run)
    assert "\n" not in text and len(text) < 200, text
    assert "ValueError: first line second line xxx" in text and text.endswith("...>")


def test_an_infinite_timeout_waits_for_good():
    gate = threading.Event()

    @task(runner=ThreadTaskRun)
    def gated(_=None):
        assert gate.wait(WAIT)
        return "done"

    run = gated()
    group = gated.map(range(2))
    outcomes = []
    waiter = threading.Thread(
        target=lambda: outcomes.extend(
            [run.wait(float("inf")), run.get_result(timeout=float("inf")), group.wait(float("inf")),
             group.results(timeout=float("inf"))]
        )
    )
    waiter.start()
    gate.set()
    waiter.join(WAIT)
    assert outcomes == [True, "done", True, ["done", "done"]]


def test_repr_of_a_retried_run_counts_attempts(runner):
    spy = Spy(runner)
    inside = []

    @task(runner=spy.runner, name="flaky", retries=2)
    def flaky():
        inside.append(repr(spy.me()))
        if len(inside) < 2:
            raise OSError("once")

    run = flaky()
    assert run.wait(WAIT)
    assert "attempt 1/3>" in inside[0] and "attempt 2/3>" in inside[1]
    assert re.fullmatch(r"<TaskRun flaky#\d+ succeeded \d+\.\ds attempt 2/3>", repr(run)), repr(run)


# ---- ThreadTaskRun: the same members seen from outside, while the run is queued or running ----


@pytest.fixture
def gate():
    """An Event a task waits on; always set at the end so no thread is left blocked."""
    event = threading.Event()
    yield event
    event.set()


def _occupy_one_thread(gate):
    """A one-thread runner whose thread is busy until ``gate`` is set: the runner and the busy run."""
    one = ThreadTaskRun.configure(max_workers=1)
    started = threading.Event()

    @task(runner=one, name="blocker")
    def blocker():
        started.set()
        return gate.wait(WAIT)

    first = blocker()
    assert started.wait(WAIT)
    return one, first


def test_thread_pending_handle(gate):
    one, first = _occupy_one_thread(gate)

    @task(runner=one, name="queued", retries=2)
    def queued():
        return "q"

    second = queued()
    assert second.status is Status.PENDING
    assert second.is_running() is True and second.done() is False
    assert second.attempts == 0  # queued: its first attempt has not begun executing
    assert second.started_at is None and second.finished_at is None and second.duration is None
    assert re.fullmatch(r"<TaskRun queued#\d+ pending>", repr(second)), repr(second)
    assert second.wait(0.01) is False
    with pytest.raises(TaskStillRunning):
        second.get_result(wait=False)
    gate.set()
    assert first.get_result(timeout=WAIT) is True
    assert second.get_result(timeout=WAIT) == "q"


def test_thread_running_handle_seen_from_outside(gate):
    started = threading.Event()

    @task(runner=ThreadTaskRun, name="slow", retries=3)
    def slow():
        started.set()
        gate.wait(WAIT)
        return "done"

    run = slow()
    assert started.wait(WAIT)
    assert run.status is Status.RUNNING
    assert run.is_running() and not run.done()
    assert run.started_at is not None and run.finished_at is None
    assert run.wait(0.01) is False
    with pytest.raises(TimeoutError):
        run.get_result(timeout=0.01)
    with pytest.raises(TimeoutError):
        run.exception(timeout=0.01)
    with pytest.raises(TaskStillRunning, match="slow#"):
        run.get_result(wait=False)
    assert re.fullmatch(r"<TaskRun slow#\d+ running \d+\.\ds attempt 1/4>", repr(run)), repr(run)
    gate.set()
    assert run.get_result(timeout=WAIT) == "done"  # the earlier timeouts did not end it


def test_thread_many_waiters_all_wake(gate):
    started = threading.Event()

    @task(runner=ThreadTaskRun)
    def slow():
        started.set()
        gate.wait(WAIT)
        return 5

    run = slow()
    assert started.wait(WAIT)
    results = []
    lock = threading.Lock()

    def waiter():
        value = run.get_result(timeout=WAIT)
        with lock:
            results.append(value)

    waiters = [threading.Thread(target=waiter) for _ in range(8)]
    for t in waiters:
        t.start()
    gate.set()
    for t in waiters:
        t.join(WAIT)
    assert results == [5] * 8


def test_thread_callback_sees_final_state_from_a_worker(gate):
    calls = []
    called = threading.Event()

    @task(runner=ThreadTaskRun)
    def slow():
        gate.wait(WAIT)
        return 9

    run = slow()
    run.add_done_callback(lambda r: (calls.append((r.status, r.get_result(wait=False))), called.set()))
    assert calls == []
    gate.set()
    assert called.wait(WAIT)
    assert calls == [(Status.SUCCEEDED, 9)]


def test_sequential_run_has_finished_when_the_call_returns():
    ran_in = []

    @task(runner=SequentialTaskRun)
    def body():
        ran_in.append(threading.current_thread())
        return 1

    run = body()
    assert run.done() and run.status is Status.SUCCEEDED
    assert ran_in == [threading.current_thread()]
    assert run.get_result(wait=False) == 1
    assert run.stop() is False


def test_a_forked_child_can_run_tasks_while_the_parent_holds_run_locks():
    """Runs share a fixed set of locks; a child forked while some were held makes its own."""
    import os
    import signal

    from taskrun import _run

    double = task(runner=SequentialTaskRun)(lambda x: 2 * x)
    assert double(1).get_result() == 2  # the lock set exists
    held = list(_run._locks or [])
    assert held
    for lock in held:
        lock.acquire()
    try:
        pid = os.fork()
        if pid == 0:  # the child: any run would need one of the held locks without a fresh set
            signal.alarm(10)
            os._exit(0 if double(21).get_result() == 42 else 1)
    finally:
        for lock in held:
            lock.release()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_run_stopped_while_queued_made_no_attempt(gate):
    one, first = _occupy_one_thread(gate)
    second = task(runner=one, name="queued")(lambda: "q")()
    assert second.stop() is True
    assert second.status is Status.STOPPED
    assert second.attempts == 0 and second.started_at is None
    assert "attempt" not in repr(second), repr(second)
    gate.set()
    assert first.get_result(timeout=WAIT) is True
    assert first.attempts == 1
