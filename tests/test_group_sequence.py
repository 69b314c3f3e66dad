"""A RunGroup over an input with a length is the whole sequence from the start: ``len()``,
indexing (waiting for the feeder), negative indexes, slices; ``stop()`` turns the items not
started into STOPPED handles. A generator keeps growing as it is read."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from _waiting import wait_for

import taskrun
from taskrun import Status, TaskStopped, ThreadTaskRun, task
from taskrun._group import DEFAULT_WINDOW

TwoThreads = ThreadTaskRun.configure(max_workers=2)
WAIT = 10


@pytest.fixture
def gate():
    event = threading.Event()
    yield event
    event.set()  # never leave a pool thread blocked


def gated_task(gate: threading.Event, started: list[int] | None = None):
    @task(runner=TwoThreads, name="gated")
    def gated(i: int) -> int:
        if started is not None:
            started.append(i)
        assert gate.wait(WAIT)
        return i

    return gated


def in_thread(fn):
    """Run ``fn()`` in a thread; the returned dict gets its value (or error) under "value"/"error"."""
    out: dict[str, object] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    out["thread"] = thread
    return out


def test_len_is_the_inputs_length_as_soon_as_map_returns(gate: threading.Event) -> None:
    group = gated_task(gate).map(list(range(50)), max_concurrency=2)
    assert len(group) == 50
    assert len(group._runs) <= 3  # the handles are made as the work goes
    assert group.summary()["pending"] + group.summary()["running"] == 50
    assert repr(group).startswith("<RunGroup gated: 50 runs")
    gate.set()
    assert group.results(timeout=WAIT) == list(range(50))
    assert len(group) == 50


def test_indexing_waits_for_the_feeder_to_make_the_handle(gate: threading.Event) -> None:
    group = gated_task(gate).map(range(20), max_concurrency=2)
    assert len(group._runs) < 16
    waiter = in_thread(lambda: group[15])
    # group[15] blocks until the feeder gets there; it gets there once the runs before it finish.
    wait_for(lambda: group._waiting, WAIT, "group[15] to wait for the feeder")
    assert "value" not in waiter and "error" not in waiter
    gate.set()
    waiter["thread"].join(WAIT)
    assert "error" not in waiter, waiter.get("error")
    run = waiter["value"]
    assert run.args == (15,) and run.get_result(timeout=WAIT) == 15
    assert group.wait(timeout=WAIT)


def test_negative_indexes_and_slices_give_the_handles_of_those_items(gate: threading.Event) -> None:
    group = gated_task(gate).map(range(20), max_concurrency=2)
    gate.set()
    assert group[-1].args == (19,)
    assert [run.args[0] for run in group[-3:]] == [17, 18, 19]
    assert [run.args[0] for run in group[::5]] == [0, 5, 10, 15]
    assert [run.args[0] for run in group[18:100]] == [18, 19]
    assert group[5:2] == []
    assert group.wait(timeout=WAIT)


def test_an_index_outside_the_input_raises_at_once(gate: threading.Event) -> None:
    group = gated_task(gate).map(range(20), max_concurrency=1)
    for index in (20, -21, 10**9):
        with pytest.raises(IndexError, match="map of gated has 20 items"):
            group[index]
    with pytest.raises(TypeError):
        group["1"]  # type: ignore[call-overload]
    assert not gate.is_set() and not group.done()  # nothing waited for the runs


def test_a_huge_input_is_not_made_into_handles_up_front(gate: threading.Event) -> None:
    group = gated_task(gate).map(range(100_000))
    assert len(group) == 100_000
    wait_for(lambda: group._feeder_waits, WAIT, "the feeder to fill its window")
    assert len(group._runs) <= DEFAULT_WINDOW + 1
    assert group[-99_000].args == (1_000,)  # made already
    assert group.stop() == 100_000
    assert group.wait(timeout=WAIT)  # the feeder made the rest, stopped, without starting them
    assert len(group._runs) == 100_000 and group.summary()["stopped"] == 100_000


def test_a_generator_grows_as_it_is_read(gate: threading.Event) -> None:
    group = gated_task(gate).map(iter(range(20)), max_concurrency=2)
    wait_for(lambda: group._feeder_waits, WAIT, "the feeder to fill its window")
    made = len(group)
    assert made == len(group._runs) < 20  # the handles made so far
    with pytest.raises(IndexError):
        group[made]  # not made yet: a generator's group does not wait for it
    assert group[-1] is group._runs[-1]
    gate.set()
    assert group.results(timeout=WAIT) == list(range(20))
    assert len(group) == 20


def test_stop_makes_every_item_not_started_a_stopped_handle(gate: threading.Event) -> None:
    started: list[int] = []
    group = gated_task(gate, started).map(range(30), max_concurrency=2)
    wait_for(lambda: len(started) == 2, WAIT, "two runs to start")
    assert group.stop() == 30  # the two running, the one queued, and the 27 items not yet made
    assert group.stop() == 0
    assert group.wait(timeout=WAIT)
    assert len(group) == 30 and len(group._runs) == 30
    assert group.summary()["stopped"] == 30
    assert all(run.status is Status.STOPPED for run in group)
    assert all(run.attempts == 0 for run in group[3:])
    assert group[29].args == (29,)
    with pytest.raises(TaskStopped):
        group.results()
    values = group.results(raise_exceptions=False)
    assert len(values) == 30 and all(isinstance(v, TaskStopped) for v in values)
    assert sorted(started) == [0, 1]


def test_an_index_waited_for_resolves_when_the_group_stops(gate: threading.Event) -> None:
    started: list[int] = []
    group = gated_task(gate, started).map(range(100), max_concurrency=1)
    wait_for(lambda: started == [0], WAIT, "the first run to start")
    waiter = in_thread(lambda: group[90])
    wait_for(lambda: group._waiting, WAIT, "group[90] to wait for the feeder")
    group.stop()
    waiter["thread"].join(WAIT)
    assert "error" not in waiter, waiter.get("error")
    run = waiter["value"]
    assert run.args == (90,) and run.status is Status.STOPPED and run.attempts == 0
    assert started == [0]


def test_after_stop_a_rerun_with_a_ledger_does_the_items_not_started(tmp_path: Path, gate: threading.Event) -> None:
    ledger = taskrun.Ledger(tmp_path / "runs.db")
    calls: list[int] = []

    @task(runner=TwoThreads, ledger=ledger, name="square")
    def square(x: int) -> int:
        calls.append(x)
        if x == 2:
            assert gate.wait(WAIT)
        return x * x

    first = square.map(range(8), max_concurrency=1)
    wait_for(lambda: 2 in calls, WAIT, "item 2 to start")
    first.stop()
    assert first.wait(timeout=WAIT)
    summary = first.summary()
    assert summary["succeeded"] == 2 and summary["stopped"] == 6 and len(first) == 8
    gate.set()

    second = square.map(range(8))
    assert second.results(timeout=WAIT) == [x * x for x in range(8)]
    assert sorted(calls) == [0, 1, 2, 2, 3, 4, 5, 6, 7]
    assert [run.cached for run in second] == [True] * 2 + [False] * 6


def test_stop_on_a_generator_reads_no_further(gate: threading.Event) -> None:
    read: list[int] = []

    def items():
        for i in range(30):
            read.append(i)
            yield i

    started: list[int] = []
    group = gated_task(gate, started).map(items(), max_concurrency=2)
    wait_for(lambda: len(started) == 2, WAIT, "two runs to start")
    made = len(group)
    assert group.stop() == made
    assert group.wait(timeout=WAIT)
    assert len(group) == made and len(read) <= made + 1
    with pytest.raises(TaskStopped, match="before its input was all read"):
        group.results()


def test_an_input_shorter_than_its_length_ends_the_group_at_its_true_end() -> None:
    class Liar:
        def __len__(self) -> int:
            return 5

        def __iter__(self):
            return iter(range(3))

    @task(runner=TwoThreads)
    def ident(x: int) -> int:
        return x

    group = ident.map(Liar())
    with pytest.raises(IndexError, match="its input ended after 3 items"):
        group[4]
    assert group.wait(timeout=WAIT)
    assert len(group) == 3 and group.results() == [0, 1, 2]


def test_summary_counts_the_items_not_yet_made_as_pending(gate: threading.Event) -> None:
    group = gated_task(gate).map(range(10), max_concurrency=1)
    summary = group.summary()
    assert sum(n for status, n in summary.items() if status != "cached") == 10
    gate.set()
    assert group.wait(timeout=WAIT)
    assert group.summary()["succeeded"] == 10 and group.summary()["pending"] == 0


class HeldInput:
    """A list of ``n`` items whose reading stops before item ``held`` until ``release`` is set, and
    before the next one until ``rest`` is set (so the feeding does not end meanwhile)."""

    def __init__(self, n: int, held: int, release: threading.Event, rest: threading.Event) -> None:
        self.n, self.held, self.release, self.rest = n, held, release, rest

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for i in range(self.n):
            if i == self.held:
                assert self.release.wait(WAIT)
            elif i == self.held + 1:
                assert self.rest.wait(WAIT)
            yield i


def settle_before_the_held_item(gate: threading.Event):
    """A group over HeldInput(100, held=12): items 0..11 have finished, the feeder is held inside the
    input, and nothing more will finish (items from 12 on wait for ``gate``). Returns (group, release)."""

    @task(runner=TwoThreads, name="held")
    def held(i: int) -> int:
        if i >= 12:
            assert gate.wait(WAIT)
        return i

    release = threading.Event()
    group = held.map(HeldInput(100, 12, release, gate))
    wait_for(lambda: group.summary()["succeeded"] == 12, WAIT, "items 0..11 to finish")
    return group, release


def test_an_index_is_given_as_soon_as_its_handle_is_made(gate: threading.Event) -> None:
    """Not when a run finishes, nor when the input ends: here nothing finishes once item 12 is made."""
    group, release = settle_before_the_held_item(gate)
    waiter = in_thread(lambda: group[12])
    wait_for(lambda: group._waiting, WAIT, "group[12] to wait")
    release.set()
    waiter["thread"].join(WAIT)
    assert waiter.get("value") is not None and waiter["value"].args == (12,), waiter
    assert not gate.is_set()


def test_iteration_moves_on_as_soon_as_the_next_handle_is_made(gate: threading.Event) -> None:
    group, release = settle_before_the_held_item(gate)

    def first_thirteen() -> list[int]:
        it = iter(group)
        return [next(it).args[0] for _ in range(13)]

    waiter = in_thread(first_thirteen)
    wait_for(lambda: group._waiting, WAIT, "the iteration to wait for handle 12")
    release.set()
    waiter["thread"].join(WAIT)
    assert waiter.get("value") == list(range(13)), waiter
    assert not gate.is_set()
