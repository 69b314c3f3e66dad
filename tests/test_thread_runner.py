"""ThreadTaskRun: the bounded pool, stop() of queued and running runs, configure(), shutdown, a stress run."""

import os
import threading
import time

import pytest

import taskrun
from taskrun import Status, TaskStopped, ThreadTaskRun, task

WAIT = 10


def taskrun_threads():
    return [t for t in threading.enumerate() if t.name.startswith("taskrun-") and t.is_alive()]


@pytest.fixture
def gate():
    """An Event tasks wait on; always set at the end so no pool thread is left blocked."""
    event = threading.Event()
    yield event
    event.set()


class Concurrency:
    """Counts how many task bodies are inside at once (guarded by a lock) and the most ever seen."""

    def __init__(self):
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.threads = set()

    def __enter__(self):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.threads.add(threading.current_thread().name)

    def __exit__(self, *exc):
        with self.lock:
            self.now -= 1


# ---- the pool -----------------------------------------------------------------------------


@pytest.mark.parametrize("max_workers", [1, 3])
def test_never_more_than_max_workers_at_once(max_workers):
    seen = Concurrency()
    barrier = threading.Barrier(max_workers, timeout=WAIT)

    @task(runner=ThreadTaskRun.configure(max_workers=max_workers))
    def work(i):
        with seen:
            barrier.wait()  # max_workers bodies are inside together: the pool does run them in parallel
            time.sleep(0.005)  # work; a body beyond the limit would be counted meanwhile
        return i

    runs = [work(i) for i in range(4 * max_workers)]
    assert [r.get_result(timeout=WAIT) for r in runs] == list(range(4 * max_workers))
    assert seen.most == max_workers
    assert len(seen.threads) <= max_workers
    assert all(name.startswith("taskrun-") for name in seen.threads)


def test_default_max_workers():
    expected = min(32, (os.cpu_count() or 1) + 4)
    assert ThreadTaskRun.max_workers == expected  # the documented default, readable on the class
    seen = Concurrency()
    barrier = threading.Barrier(expected, timeout=WAIT)

    @task(runner=ThreadTaskRun)
    def work():
        with seen:
            barrier.wait()
            time.sleep(0.005)

    runs = [work() for _ in range(2 * expected)]
    for run in runs:
        assert run.wait(WAIT)
    assert all(run.status is Status.SUCCEEDED for run in runs)
    assert seen.most == expected


def test_threads_are_daemons_named_taskrun_and_reused():
    names = []

    @task(runner=ThreadTaskRun.configure(max_workers=2))
    def where():
        t = threading.current_thread()
        names.append(t.name)
        return t.daemon

    for _ in range(30):  # one after another: one thread is enough
        assert where().get_result(timeout=WAIT) is True
    assert all(name.startswith("taskrun-") for name in names)
    assert len(set(names)) <= 2


def test_failures_do_not_cost_threads():
    names = set()

    @task(runner=ThreadTaskRun.configure(max_workers=1))
    def fails():
        names.add(threading.current_thread().name)
        raise RuntimeError("x")

    for _ in range(20):
        assert fails().wait(WAIT)
    assert len(names) == 1


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_a_task_raising_keyboardinterrupt_or_systemexit_fails_and_keeps_its_thread(exc_type):
    names = set()
    runner = ThreadTaskRun.configure(max_workers=1)

    @task(runner=runner)
    def interrupted():
        names.add(threading.current_thread().name)
        raise exc_type()

    @task(runner=runner)
    def ok():
        names.add(threading.current_thread().name)
        return "ok"

    for _ in range(3):
        run = interrupted()
        assert run.wait(WAIT) and run.status is Status.FAILED
        assert isinstance(run.exception(), exc_type)
    assert ok().get_result(timeout=WAIT) == "ok"  # the one thread still serves
    assert len(names) == 1


def test_pools_are_per_configured_class(gate):
    """A busy pool of one configured runner does not hold up another's."""
    busy = ThreadTaskRun.configure(max_workers=1)
    other = ThreadTaskRun.configure(max_workers=2)
    started = threading.Event()

    @task(runner=busy)
    def hog():
        started.set()
        return gate.wait(WAIT)

    first = hog()
    assert started.wait(WAIT)
    assert task(runner=other)(lambda: "free")().get_result(timeout=WAIT) == "free"
    gate.set()
    assert first.get_result(timeout=WAIT) is True


# ---- stop -----------------------------------------------------------------------------------


def test_stop_of_a_queued_run_means_it_never_starts(gate):
    one = ThreadTaskRun.configure(max_workers=1)
    started = threading.Event()
    ran = []
    calls = []

    @task(runner=one)
    def blocker():
        started.set()
        return gate.wait(WAIT)

    @task(runner=one)
    def queued(i):
        ran.append(i)
        return i

    first = blocker()
    assert started.wait(WAIT)
    victim = queued(1)
    victim.add_done_callback(lambda r: calls.append(r.status))
    assert victim.status is Status.PENDING
    assert victim.stop() is True
    assert victim.stop() is False
    assert victim.status is Status.STOPPED
    assert calls == [Status.STOPPED]
    assert victim.started_at is None
    gate.set()
    assert first.get_result(timeout=WAIT) is True
    after = queued(2)  # FIFO on the one worker: once this has run, the victim's turn has passed
    assert after.get_result(timeout=WAIT) == 2
    assert ran == [2]
    assert victim.status is Status.STOPPED
    with pytest.raises(TaskStopped):
        victim.get_result()


def test_stop_of_a_running_run_is_immediate_and_discards_the_result(gate):
    started = threading.Event()
    returned = threading.Event()

    @task(runner=ThreadTaskRun)
    def ignores_stop():
        started.set()
        gate.wait(WAIT)  # does not poll stop_requested(): keeps going until released
        returned.set()
        return "discarded"

    run = ignores_stop()
    assert started.wait(WAIT)
    assert run.stop() is True
    # STOPPED at once, while the function is still inside
    assert run.status is Status.STOPPED
    assert run.done() and not run.is_running()
    assert not returned.is_set()
    with pytest.raises(TaskStopped):
        run.get_result(timeout=0)
    gate.set()
    assert returned.wait(WAIT)
    assert run.status is Status.STOPPED
    assert isinstance(run.get_result(raise_exceptions=False), TaskStopped)


def test_function_can_poll_stop_requested_and_end_early():
    started = threading.Event()
    ended = threading.Event()
    polls = []

    @task(runner=ThreadTaskRun)
    def polite():
        started.set()
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            flag = taskrun.stop_requested()
            polls.append(flag)
            if flag:
                ended.set()
                return "early"
            time.sleep(0.002)
        return "late"

    run = polite()
    assert started.wait(WAIT)
    t0 = time.monotonic()
    assert run.stop() is True
    assert ended.wait(WAIT)
    assert time.monotonic() - t0 < WAIT / 2
    assert polls[0] is False and polls[-1] is True
    assert run.status is Status.STOPPED


def test_stopped_thread_does_not_cost_capacity(gate):
    """With one worker, a stopped run still stuck in its function must not block the next call."""
    one = ThreadTaskRun.configure(max_workers=1)
    started = threading.Event()

    @task(runner=one)
    def stuck():
        started.set()
        gate.wait(WAIT)

    run = stuck()
    assert started.wait(WAIT)
    run.stop()
    assert task(runner=one)(lambda: "next")().get_result(timeout=WAIT) == "next"
    gate.set()


def test_stop_requested_belongs_to_its_own_run(gate):
    started = threading.Barrier(3, timeout=WAIT)
    flags = {}
    recorded = {"a": threading.Event(), "b": threading.Event()}

    @task(runner=ThreadTaskRun.configure(max_workers=2))
    def body(i):
        started.wait()
        gate.wait(WAIT)
        flags[i] = taskrun.stop_requested()
        recorded[i].set()

    a, b = body("a"), body("b")
    started.wait()  # both are running
    assert a.stop() is True
    gate.set()
    assert b.get_result(timeout=WAIT) is None
    assert recorded["a"].wait(WAIT)
    assert a.status is Status.STOPPED and b.status is Status.SUCCEEDED
    assert flags == {"a": True, "b": False}


# ---- configure ----------------------------------------------------------------------------


def test_configure_returns_a_cached_subclass_with_the_setting():
    four = ThreadTaskRun.configure(max_workers=4)
    assert issubclass(four, ThreadTaskRun) and four is not ThreadTaskRun
    assert four.max_workers == 4
    assert ThreadTaskRun.max_workers == min(32, (os.cpu_count() or 1) + 4)  # the base class is untouched
    assert ThreadTaskRun.configure(max_workers=4) is four
    assert ThreadTaskRun.configure(max_workers=5) is not four
    assert "max_workers=4" in four.__name__
    assert ThreadTaskRun.configure() is ThreadTaskRun.configure()


def test_configure_unknown_setting_is_named():
    with pytest.raises(TypeError) as info:
        ThreadTaskRun.configure(max_worker=4)
    assert "max_worker" in str(info.value)
    assert "max_workers" in str(info.value)  # and the valid ones are listed
    with pytest.raises(TypeError, match="start_method"):
        ThreadTaskRun.configure(max_workers=2, start_method="fork")


@pytest.mark.parametrize(
    ("value", "error"), [(0, ValueError), (-3, ValueError), (2.5, TypeError), ("4", TypeError), (True, TypeError)]
)
def test_configure_bad_value(value, error):
    with pytest.raises(error) as info:
        ThreadTaskRun.configure(max_workers=value)
    assert "max_workers" in str(info.value)
    assert repr(value) in str(info.value)


def test_configure_none_means_default():
    assert ThreadTaskRun.configure(max_workers=None).max_workers is None


# ---- shutdown -----------------------------------------------------------------------------


def test_shutdown_wait_true_finishes_queued_runs():
    one = ThreadTaskRun.configure(max_workers=1)

    @task(runner=one)
    def work(i):
        time.sleep(0.002)
        return i

    runs = [work(i) for i in range(20)]
    one.shutdown(wait=True)
    assert [r.status for r in runs] == [Status.SUCCEEDED] * 20
    assert not taskrun_threads()
    assert work(99).get_result(timeout=WAIT) == 99  # the pool starts again on the next call


def test_shutdown_wait_false_stops_queued_and_running_runs(gate):
    one = ThreadTaskRun.configure(max_workers=1)
    started = threading.Event()
    ran = []

    @task(runner=one)
    def blocker():
        started.set()
        while not taskrun.stop_requested() and not gate.is_set():
            time.sleep(0.002)
        return "late"

    @task(runner=one)
    def queued(i):
        ran.append(i)

    first = blocker()
    assert started.wait(WAIT)
    rest = [queued(i) for i in range(5)]
    one.shutdown(wait=False)
    assert first.status is Status.STOPPED
    assert [r.status for r in rest] == [Status.STOPPED] * 5
    for t in taskrun_threads():
        t.join(WAIT)
    assert not taskrun_threads()
    assert ran == []


def test_taskrun_shutdown_ends_pools_and_the_timer_thread():
    @task(runner=ThreadTaskRun.configure(max_workers=2), timeout=5, retries=1, retry_sleep_time=0.001)
    def flaky(i):
        if i % 2:
            raise OSError("retry me")  # the retry wait goes through the timer thread
        return i

    runs = [flaky(i) for i in range(10)]
    for run in runs:
        assert run.wait(WAIT)
    assert any(t.name == "taskrun-timer" for t in taskrun_threads())
    taskrun.shutdown()
    assert taskrun_threads() == []


# ---- stress -------------------------------------------------------------------------------


def test_stress_10000_tiny_calls_then_runner_shutdown():
    assert taskrun_threads() == []

    @task(runner=ThreadTaskRun)
    def inc(x):
        return x + 1

    runs = [inc(i) for i in range(10_000)]
    results = [run.get_result(timeout=WAIT) for run in runs]
    assert results == list(range(1, 10_001))
    assert all(run.status is Status.SUCCEEDED and run.attempts == 1 for run in runs)
    assert len({run.id for run in runs}) == 10_000
    assert taskrun_threads()  # the pool was there
    ThreadTaskRun.shutdown()
    assert taskrun_threads() == []


def test_stress_10000_tiny_calls_with_options_then_taskrun_shutdown():
    calls = []
    done = threading.Semaphore(0)

    @task(runner=ThreadTaskRun.configure(max_workers=8), timeout=30, retries=1)
    def inc(x):
        calls.append(x)
        return x + 1

    runs = [inc(i) for i in range(10_000)]
    for run in runs:
        run.add_done_callback(lambda r: done.release())
    for _ in range(10_000):
        assert done.acquire(timeout=WAIT)
    assert sorted(r.get_result(wait=False) for r in runs) == list(range(1, 10_001))
    assert len(calls) == 10_000
    taskrun.shutdown()
    assert taskrun_threads() == []
