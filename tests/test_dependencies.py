"""A handle passed as an argument: the call waits for it and receives its result, or fails with UpstreamFailed."""

from __future__ import annotations

import threading

import pytest

from taskrun import SequentialTaskRun, Status, ThreadTaskRun, UpstreamFailed, task

Threads = ThreadTaskRun.configure(max_workers=4)
WAIT = 10


@task(runner=Threads)
def inc(x: int) -> int:
    return x + 1


@task(runner=Threads)
def add(*xs: int) -> int:
    return sum(xs)


@task(runner=Threads)
def total(values: list[int]) -> int:
    return sum(values)


@task(runner=Threads)
def fail(message: str) -> int:
    raise ValueError(message)


def test_a_handle_argument_is_replaced_by_its_result() -> None:
    assert inc(inc(inc(1))).get_result(timeout=WAIT) == 4


def test_the_caller_is_not_blocked_while_the_upstream_runs() -> None:
    gate = threading.Event()

    @task(runner=Threads)
    def gated(x: int) -> int:
        assert gate.wait(WAIT)
        return x

    upstream = gated(41)
    dependent = inc(upstream)  # returns at once although upstream cannot finish yet
    assert dependent.status is Status.PENDING and not dependent.done()
    gate.set()
    assert dependent.get_result(timeout=WAIT) == 42
    assert dependent.attempts == 1


def test_a_failed_upstream_fails_the_dependent_without_calling_it() -> None:
    calls: list[object] = []

    @task(runner=Threads, name="load")
    def load(x: object) -> object:
        calls.append(x)
        return x

    upstream = fail("bad input")
    dependent = load(upstream)
    assert dependent.wait(timeout=WAIT)
    assert dependent.status is Status.FAILED
    exc = dependent.exception()
    assert isinstance(exc, UpstreamFailed)
    message = str(exc)
    assert upstream.id in message and dependent.id in message
    assert "ValueError: bad input" in message
    assert exc.upstream_id == upstream.id and exc.upstream_status is Status.FAILED  # type: ignore[attr-defined]
    assert exc.__cause__ is upstream.exception()
    with pytest.raises(UpstreamFailed):
        dependent.get_result()
    assert calls == []
    assert dependent.attempts == 0


def test_a_stopped_upstream_fails_the_dependent() -> None:
    gate = threading.Event()
    calls: list[int] = []

    @task(runner=Threads)
    def gated(x: int) -> int:
        gate.wait(WAIT)
        return x

    @task(runner=Threads)
    def record(x: int) -> int:
        calls.append(x)
        return x

    try:
        upstream = gated(1)
        dependent = record(upstream)
        assert upstream.stop()
        assert dependent.wait(timeout=WAIT)
    finally:
        gate.set()
    exc = dependent.exception()
    assert isinstance(exc, UpstreamFailed) and "was stopped" in str(exc)
    assert calls == []


def test_fan_in_fails_as_soon_as_one_upstream_fails() -> None:
    gate = threading.Event()

    @task(runner=Threads)
    def gated(x: int) -> int:
        gate.wait(WAIT)
        return x

    try:
        slow = gated(1)
        dependent = add(slow, fail("boom"))
        assert dependent.wait(timeout=WAIT)  # does not wait for the slow upstream
        assert not slow.done()
        assert isinstance(dependent.exception(), UpstreamFailed)
    finally:
        gate.set()


def test_diamond() -> None:
    calls: list[int] = []

    @task(runner=Threads)
    def source(x: int) -> int:
        calls.append(x)
        return x

    top = source(10)
    left, right = inc(top), add(top, 5)
    bottom = add(left, right, top)
    assert bottom.get_result(timeout=WAIT) == 11 + 15 + 10
    assert calls == [10]  # the shared upstream ran once


def test_fan_in_of_a_list_of_handles() -> None:
    parts = [inc(i) for i in range(10)]
    assert total(parts).get_result(timeout=WAIT) == sum(range(1, 11))


def test_handles_inside_dicts_tuples_and_nested_containers() -> None:
    @task(runner=Threads)
    def echo(*args: object, **kwargs: object) -> tuple[object, object]:
        return args, kwargs

    one = inc(0)
    args, kwargs = echo({"a": one, "b": 2}, (one, [one, {"deep": one}]), {one}, config={"n": inc(one)}).get_result(
        timeout=WAIT
    )
    assert args == ({"a": 1, "b": 2}, (1, [1, {"deep": 1}]), {1})
    assert kwargs == {"config": {"n": 2}}


def test_arguments_without_handles_are_passed_as_they_are() -> None:
    shared: list[int] = []

    @task(runner=Threads)
    def same(items: list[int], x: int) -> bool:
        return items is shared

    assert same(shared, inc(1)).get_result(timeout=WAIT) is True


def test_a_dependent_stopped_while_waiting_never_starts() -> None:
    gate = threading.Event()
    upstream_callbacks_done = threading.Event()
    calls: list[int] = []

    @task(runner=Threads)
    def gated(x: int) -> int:
        assert gate.wait(WAIT)
        return x

    @task(runner=Threads)
    def record(x: int) -> int:
        calls.append(x)
        return x

    upstream = gated(1)
    dependent = record(upstream)
    upstream.add_done_callback(lambda _run: upstream_callbacks_done.set())  # runs after the dependent's
    assert dependent.stop()
    gate.set()
    assert upstream.get_result(timeout=WAIT) == 1
    assert upstream_callbacks_done.wait(WAIT)
    assert dependent.status is Status.STOPPED
    assert calls == [] and dependent.attempts == 0


def test_an_inline_dependent_waits_in_the_caller() -> None:
    @task(runner=SequentialTaskRun)
    def double(x: int) -> int:
        return 2 * x

    run = double(inc(1))
    assert run.done() and run.get_result() == 4
    failed = double(fail("no"))
    assert isinstance(failed.exception(), UpstreamFailed)


def test_map_over_handles_chains_stages() -> None:
    extracted = [inc(i) for i in range(5)]
    doubled = total.map([[run, run] for run in extracted])
    assert doubled.results(timeout=WAIT) == [2 * (i + 1) for i in range(5)]


def test_a_cached_upstream_counts_as_succeeded() -> None:
    class FakeLedgerRun(ThreadTaskRun):
        def _launch(self) -> None:
            self.cached = True
            self._conclude(Status.SUCCEEDED, value=7)

    @task(runner=FakeLedgerRun)
    def stored(x: int) -> int:
        raise AssertionError("a cached call never runs")

    upstream = stored(1)
    assert upstream.status is Status.SUCCEEDED and upstream.cached
    assert inc(upstream).get_result(timeout=WAIT) == 8
