"""Task.map / Task.starmap and RunGroup: order, completion, concurrency bound, stop_when, laziness, progress."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

import taskrun
from taskrun import RunGroup, SequentialTaskRun, Status, TaskStopped, ThreadTaskRun, task
from taskrun._group import DEFAULT_WINDOW

Threads = ThreadTaskRun.configure(max_workers=4)
TwoThreads = ThreadTaskRun.configure(max_workers=2)
WAIT = 10  # seconds any wait in these tests may take before the test fails


def test_results_come_back_in_input_order() -> None:
    @task(runner=Threads)
    def slow_square(x: int) -> int:
        time.sleep(0.001 * ((7 * x) % 5))  # finish out of order
        return x * x

    group = slow_square.map(range(30))
    assert isinstance(group, RunGroup)
    assert group.results(timeout=WAIT) == [x * x for x in range(30)]
    assert len(group) == 30
    assert [run.get_result() for run in group] == [x * x for x in range(30)]
    assert group[3].get_result() == 9 and [r.get_result() for r in group[:2]] == [0, 1]
    assert group.done()


def test_map_passes_each_item_whole_and_starmap_unpacks() -> None:
    @task(runner=Threads)
    def describe(*args: object) -> tuple[object, ...]:
        return args

    assert describe.map([(1, 2), (3, 4)]).results(timeout=WAIT) == [((1, 2),), ((3, 4),)]
    assert describe.starmap([(1, 2), [3, 4], ()]).results(timeout=WAIT) == [(1, 2), (3, 4), ()]


def test_as_completed_yields_each_run_once_in_finishing_order() -> None:
    gates = [threading.Event() for _ in range(5)]

    @task(runner=ThreadTaskRun.configure(max_workers=5))
    def gated(i: int) -> int:
        assert gates[i].wait(WAIT)
        return i

    group = gated.map(range(5))
    finished = group.as_completed(timeout=WAIT)
    order = []
    for i in reversed(range(5)):  # only run i may finish next
        gates[i].set()
        order.append(next(finished).get_result())
    assert order == [4, 3, 2, 1, 0]
    assert list(finished) == []  # nothing yielded twice


def test_as_completed_times_out_while_runs_are_unfinished() -> None:
    gate = threading.Event()

    @task(runner=TwoThreads)
    def blocked(i: int) -> int:
        assert gate.wait(WAIT)
        return i

    group = blocked.map(range(2))
    try:
        with pytest.raises(TimeoutError, match="unfinished"):
            list(group.as_completed(timeout=0.05))
        assert group.wait(timeout=0.01) is False
        with pytest.raises(TimeoutError):
            group.results(timeout=0.01)
    finally:
        gate.set()
    assert sorted(r.get_result() for r in group.as_completed(timeout=WAIT)) == [0, 1]


def test_max_concurrency_bounds_the_runs_in_flight() -> None:
    stamps: list[tuple[float, float]] = []
    lock = threading.Lock()

    @task(runner=ThreadTaskRun.configure(max_workers=8))
    def work(i: int) -> int:
        start = time.monotonic()
        time.sleep(0.02)
        with lock:
            stamps.append((start, time.monotonic()))
        return i

    assert work.map(range(15), max_concurrency=3).results(timeout=WAIT) == list(range(15))
    overlap = max(sum(1 for s, e in stamps if s <= start < e) for start, _ in stamps)
    assert overlap <= 3
    assert overlap >= 2  # it did run calls side by side


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"max_concurrency": 0}, ValueError, "max_concurrency must be >= 1"),
        ({"max_concurrency": 2.5}, TypeError, "max_concurrency"),
        ({"max_concurrency": True}, TypeError, "max_concurrency"),
        ({"stop_when": 5}, TypeError, "stop_when must be a callable"),
    ],
)
def test_bad_options_name_themselves(options: dict[str, object], error: type[Exception], match: str) -> None:
    @task(runner=Threads)
    def ident(x: int) -> int:
        return x

    with pytest.raises(error, match=match):
        ident.map([1], **options)  # type: ignore[arg-type]


def test_items_that_are_not_iterable_fail_at_once() -> None:
    @task(runner=Threads)
    def ident(x: int) -> int:
        return x

    with pytest.raises(TypeError, match="iterable of items, got int"):
        ident.map(5)  # type: ignore[arg-type]


def test_stop_when_leaves_the_rest_stopped_and_not_started() -> None:
    started: list[int] = []

    @task(runner=Threads)
    def record(i: int) -> int:
        started.append(i)
        return i

    group = record.map(range(10), max_concurrency=1, stop_when=lambda: len(started) >= 3)
    assert group.wait(timeout=WAIT)
    assert started == [0, 1, 2]
    assert len(group) == 10  # the rest of the input became handles
    assert [run.status for run in group] == [Status.SUCCEEDED] * 3 + [Status.STOPPED] * 7
    assert all(run.attempts == 0 for run in group[3:])
    assert group.summary()["succeeded"] == 3 and group.summary()["stopped"] == 7
    with pytest.raises(TaskStopped, match="not started: stop_when"):
        group.results()
    values = group.results(raise_exceptions=False)
    assert values[:3] == [0, 1, 2] and all(isinstance(v, TaskStopped) for v in values[3:])


def test_stop_when_stops_runs_already_queued_in_the_pool() -> None:
    """With no max_concurrency every item is queued at once; none of the queued ones may start once stop_when says so."""
    gate = threading.Event()
    both_running = threading.Barrier(3, timeout=WAIT)
    stop = threading.Event()
    calls: list[int] = []

    @task(runner=TwoThreads)
    def gated(i: int) -> int:
        calls.append(i)
        if i < 2:
            both_running.wait()
        assert gate.wait(WAIT)
        return i

    group = gated.map(range(20), stop_when=stop.is_set)
    both_running.wait()  # the two workers are busy; the other 18 wait in the pool's queue
    stop.set()
    gate.set()
    assert group.wait(timeout=WAIT)
    assert sorted(calls) == [0, 1]
    assert group.summary()["succeeded"] == 2 and group.summary()["stopped"] == 18


def test_stop_when_that_raises_stops_the_group_and_is_raised_by_results() -> None:
    @task(runner=Threads)
    def ident(x: int) -> int:
        return x

    def broken() -> bool:
        raise OSError("quota service down")

    group = ident.map(range(5), stop_when=broken)
    assert group.wait(timeout=WAIT)
    assert group.summary()["stopped"] == 5
    with pytest.raises(OSError, match="quota service down"):
        group.results()
    assert "stopped: stop_when raised OSError: quota service down" in repr(group)
    assert "stop_when raised OSError" in str(group[0].exception())


def test_a_generator_is_read_lazily() -> None:
    gate = threading.Event()
    read_past_window = threading.Event()
    consumed = 0

    def items():
        nonlocal consumed
        for i in range(100_000):
            consumed += 1
            if consumed == DEFAULT_WINDOW + 1:
                read_past_window.set()
            yield i

    @task(runner=TwoThreads)
    def gated(i: int) -> int:
        gate.wait(WAIT)
        return i

    try:
        group = gated.map(items())
        # Every run blocks, so the feeder reads one item past the window, then waits for a free slot.
        assert read_past_window.wait(WAIT)
        assert len(group) == DEFAULT_WINDOW
        assert group.stop() == DEFAULT_WINDOW
        assert group.wait(timeout=WAIT)
        assert consumed == DEFAULT_WINDOW + 1
        assert len(group) == DEFAULT_WINDOW
    finally:
        gate.set()


def test_input_is_read_as_the_work_goes_with_max_concurrency() -> None:
    lock = threading.Lock()
    finished = 0
    ahead: list[int] = []  # items read minus calls finished, at every read

    def items():
        consumed = 0
        for i in range(2_000):
            consumed += 1
            with lock:
                ahead.append(consumed - finished)
            yield i

    @task(runner=TwoThreads)
    def count(i: int) -> int:
        nonlocal finished
        with lock:
            finished += 1
        return i

    group = count.map(items(), max_concurrency=5)
    assert group.wait(timeout=WAIT)
    assert len(group) == 2_000
    assert max(ahead) <= 5 + 1


def test_an_input_that_raises_ends_the_group_and_results_raises_it() -> None:
    def items():
        yield from range(3)
        raise LookupError("bad row 4")

    @task(runner=Threads)
    def ident(x: int) -> int:
        return x

    group = ident.map(items())
    assert group.wait(timeout=WAIT)
    assert [run.get_result() for run in group] == [0, 1, 2]
    with pytest.raises(LookupError, match="bad row 4"):
        group.results()


def test_stopping_a_group_stops_running_and_queued_runs() -> None:
    gate = threading.Event()
    calls: list[int] = []

    @task(runner=TwoThreads)
    def gated(i: int) -> int:
        calls.append(i)
        gate.wait(WAIT)
        return i

    try:
        group = gated.map(range(10))
        for run in group:  # iterating follows the feeder to the end of the input
            assert run.status in (Status.PENDING, Status.RUNNING)
        assert group.stop() == 10
        assert group.stop() == 0
        assert group.wait(timeout=WAIT)
        assert group.summary()["stopped"] == 10
        assert len(calls) <= 2
    finally:
        gate.set()


def test_summary_and_repr_count_per_status() -> None:
    @task(runner=Threads, name="check")
    def check(x: int) -> int:
        if x == 2:
            raise ValueError("two")
        return x

    group = check.map(range(4))
    assert group.wait(timeout=WAIT)
    assert group.summary() == {
        "pending": 0, "running": 0, "succeeded": 3, "failed": 1, "stopped": 0, "skipped": 0, "cached": 0,
    }
    assert repr(group) == "<RunGroup check: 4 runs, 3 succeeded, 1 failed (done)>"
    with pytest.raises(ValueError, match="two"):
        group.results()
    assert isinstance(group.results(raise_exceptions=False)[2], ValueError)


def test_progress_bar_shows_counts_and_is_closed_when_the_group_finishes(capfd: pytest.CaptureFixture[str]) -> None:
    @task(runner=Threads, name="fetch")
    def fetch(x: int) -> int:
        if x == 3:
            raise ConnectionError("down")
        return x

    group = fetch.map(range(5), progress=True)
    assert group.wait(timeout=WAIT)
    err = capfd.readouterr().err
    assert "fetch" in err
    assert "5/5" in err
    assert "succeeded=4" in err and "failed=1" in err
    assert err.endswith("\n")  # closed: the final line is finished


def test_progress_bar_counts_stopped_runs_as_stopped(capfd: pytest.CaptureFixture[str]) -> None:
    @task(runner=Threads, name="fetch")
    def fetch(x: int) -> int:
        return x

    group = fetch.map(range(5), stop_when=lambda: True, progress=True)
    assert group.wait(timeout=WAIT)
    last_line = capfd.readouterr().err.rstrip("\n").split("\r")[-1]
    assert "succeeded=0" in last_line and "stopped=5" in last_line


def test_progress_without_tqdm_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("tqdm", "tqdm.std", "tqdm.auto"):  # as if tqdm were not installed
        monkeypatch.setitem(sys.modules, name, None)

    @task(runner=Threads)
    def ident(x: int) -> int:
        return x

    with pytest.raises(ImportError, match=r"pip install taskrun\[progress\]"):
        ident.map([1], progress=True)


def test_cached_runs_are_counted_and_shown(capfd: pytest.CaptureFixture[str]) -> None:
    class FakeLedgerRun(ThreadTaskRun):
        """Answers even items the way the ledger answers a stored call: SUCCEEDED, cached, nothing runs."""

        def _launch(self) -> None:
            if self.args[0] % 2 == 0:
                self.cached = True
                self._conclude(Status.SUCCEEDED, value=-self.args[0])
            else:
                super()._launch()

    calls: list[int] = []

    @task(runner=FakeLedgerRun, name="fetch")
    def fetch(x: int) -> int:
        calls.append(x)
        return x

    group = fetch.map(range(6), progress=True)
    assert group.results(timeout=WAIT) == [0, 1, -2, 3, -4, 5]
    assert sorted(calls) == [1, 3, 5]
    summary = group.summary()
    # A cached run is a success, counted as succeeded and also as cached (on the bar too).
    assert summary["succeeded"] == 6 and summary["cached"] == 3 and summary["skipped"] == 0
    bar = capfd.readouterr().err
    assert "succeeded=6" in bar and "cached=3" in bar


def test_an_inline_runner_maps_in_the_caller() -> None:
    threads: set[str] = set()

    @task(runner=SequentialTaskRun)
    def where(x: int) -> int:
        threads.add(threading.current_thread().name)
        return x + 1

    group = where.map(range(5))
    assert group.done()  # finished before map returned
    assert group.results() == [1, 2, 3, 4, 5]
    assert threads == {threading.current_thread().name}


@pytest.mark.parametrize("sized", [True, False], ids=["range", "generator"])
def test_shutdown_ends_the_feeder_thread(sized: bool) -> None:
    gate = threading.Event()

    @task(runner=TwoThreads)
    def gated(i: int) -> int:
        gate.wait(WAIT)
        return i

    try:
        group = gated.map(range(100) if sized else iter(range(100)), max_concurrency=1)
        feeders = [t for t in threading.enumerate() if t.name.startswith("taskrun-map-")]
        assert feeders and all(t.daemon for t in feeders)
        taskrun.shutdown(wait=False)
        for thread in feeders:
            thread.join(WAIT)
            assert not thread.is_alive()
    finally:
        gate.set()
    assert group.wait(timeout=WAIT)
    if sized:  # the whole sequence: the items not started became STOPPED handles
        assert len(group) == 100 and group.summary()["stopped"] == 100
    else:
        assert len(group) < 100  # the input was left unread


def test_with_a_ledger_a_stopped_batch_resumes_where_it_stopped(tmp_path: Path) -> None:
    ledger = taskrun.Ledger(tmp_path / "runs.db")
    calls: list[int] = []

    @task(runner=Threads, ledger=ledger, name="square")
    def square(x: int) -> int:
        calls.append(x)
        return x * x

    first = square.map(range(8), max_concurrency=1, stop_when=lambda: len(calls) >= 3)
    assert first.wait(timeout=WAIT)
    assert first.summary()["succeeded"] == 3 and first.summary()["stopped"] == 5

    second = square.map(range(8))
    assert second.results(timeout=WAIT) == [x * x for x in range(8)]
    assert sorted(calls) == list(range(8))  # the stopped items ran now, the done ones did not run again
    summary = second.summary()
    assert summary["cached"] == 3 and summary["skipped"] == 0 and summary["succeeded"] == 8
    assert [run.cached for run in second] == [True] * 3 + [False] * 5


def test_an_empty_input_gives_a_finished_empty_group() -> None:
    @task(runner=Threads)
    def ident(x: int) -> int:
        return x

    group = ident.map([], progress=False)
    assert group.results(timeout=WAIT) == []
    assert group.done() and len(group) == 0 and list(group.as_completed(timeout=WAIT)) == []


def test_stop_when_on_an_endless_generator_ends_the_group() -> None:
    """A generator is read no further once stop_when says stop (it may never end); a sized input is (see above)."""
    read = 0

    def endless():
        nonlocal read
        while True:
            read += 1
            yield read

    @task(runner=Threads)
    def ident(x: int) -> int:
        return x

    group = ident.map(endless(), max_concurrency=1, stop_when=lambda: read > 3)
    assert group.wait(timeout=WAIT)
    assert read == 4  # the item that met stop_when was read, nothing after it
    assert [run.status for run in group] == [Status.SUCCEEDED] * 3 + [Status.STOPPED]
    assert group.results(raise_exceptions=False)[:3] == [1, 2, 3]


@pytest.mark.parametrize("runner", [Threads, SequentialTaskRun], ids=["threads", "sequential"])
def test_stop_when_is_asked_once_before_each_run_so_a_quota_can_count_calls(runner: type) -> None:
    asked = 0

    def quota() -> bool:
        nonlocal asked
        asked += 1
        return asked > 5  # five runs, then stop

    @task(runner=runner)
    def ident(x: int) -> int:
        return x

    group = ident.map(range(20), stop_when=quota)
    assert group.wait(timeout=WAIT)
    assert group.summary()["succeeded"] == 5 and group.summary()["stopped"] == 15
    assert asked == 6


@pytest.mark.parametrize("runner", [Threads, SequentialTaskRun], ids=["threads", "sequential"])
def test_a_quota_with_a_ledger_goes_on_where_the_last_run_stopped(runner: type, tmp_path: Path) -> None:
    """Regression: stop_when was asked for runs the ledger answers too, so a quota of N calls spent itself on
    the N calls done last time, and a rerun never got past them."""
    ran: list[int] = []

    @task(runner=runner, ledger=str(tmp_path / "runs.db"))
    def ident(x: int) -> int:
        ran.append(x)
        return x

    for batch in range(3):
        asked = 0

        def quota() -> bool:
            nonlocal asked
            asked += 1
            return asked > 4  # four calls per run of the script

        group = ident.map(range(20), stop_when=quota)
        assert group.wait(timeout=WAIT)
        summary = group.summary()
        assert summary["succeeded"] == 4 * (batch + 1) and summary["cached"] == 4 * batch, summary
        assert sorted(ran) == list(range(4 * (batch + 1)))  # each call ran once, in order of the input
        assert asked == 5  # asked for the runs that would run, not for those the ledger answered


def test_stop_does_not_wait_for_an_input_that_blocks() -> None:
    gate = threading.Event()
    blocked = threading.Event()

    def slow_input():
        yield 1
        yield 2
        blocked.set()
        gate.wait(WAIT)  # the feeder sits here, inside the input, when the group is stopped
        yield 3

    @task(runner=Threads)
    def ident(x: int) -> int:
        return x

    group = ident.map(slow_input())
    try:
        assert blocked.wait(WAIT)
        assert len(group) == 2 and [run.get_result(timeout=WAIT) for run in group[:2]] == [1, 2]
        group.stop()
        assert group.wait(timeout=WAIT) and group.done()
        assert not gate.is_set()  # it did not wait for the input
        with pytest.raises(TaskStopped, match="before its input was all read"):
            group.results()
        assert group.results(raise_exceptions=False) == [1, 2]
        assert [run.get_result() for run in group] == [1, 2]  # iteration ends too
    finally:
        gate.set()
    group._thread.join(WAIT)  # the feeder gets item 3 from the input, and drops it
    assert not group._thread.is_alive()
    assert len(group) == 2


def test_a_run_group_as_an_argument_asks_for_a_list_of_its_runs() -> None:
    @task(runner=Threads)
    def ident(x: int) -> int:
        return x

    @task(runner=Threads)
    def total(values: list[int]) -> int:
        return sum(values)

    group = ident.map(range(4))
    with pytest.raises(TypeError, match=r"RunGroup of a map: pass list\(group\)"):
        total(group)
    assert total(list(group)).get_result(timeout=WAIT) == 6


def test_waiting_for_the_group_inside_its_stop_when_raises_instead_of_hanging() -> None:
    @task(runner=Threads)
    def ident(x: int) -> int:
        return x

    made: dict[str, RunGroup[int]] = {}
    ready = threading.Event()

    def stop_when() -> bool:
        assert ready.wait(WAIT)
        made["group"].wait(timeout=1)  # on the feeder thread: it would wait for itself
        return False

    group = made["group"] = ident.map(range(3), stop_when=stop_when)
    ready.set()
    assert group.wait(timeout=WAIT)
    with pytest.raises(RuntimeError, match="would block it for good"):
        group.results()


MAP_AT_EXIT = """
import os, sys, time
from taskrun import MultiprocessTaskRun, ThreadTaskRun, task

out = sys.argv[2]

@task(runner={"threads": ThreadTaskRun, "processes": MultiprocessTaskRun.configure(max_workers=2)}[sys.argv[1]])
def work(x):
    time.sleep(0.005)
    open(os.path.join(out, str(x)), "w").close()

if __name__ == "__main__":
    work.map(range(300), max_concurrency=4)  # left to finish: nobody waits on these groups
    work.map(x for x in range(300, 400))
"""


@pytest.mark.parametrize("runner", ["threads", "processes"])
def test_a_script_that_ends_with_maps_running_waits_for_all_their_items(runner: str, tmp_path: Path) -> None:
    """Regression: at exit taskrun halted every map's feeder, so the items it had not read yet never ran
    (1 of 20 with the process runner): fire-and-forget lost most of a map, silently."""
    import subprocess

    script = tmp_path / "maps.py"
    script.write_text(MAP_AT_EXIT)
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run([sys.executable, str(script), runner, str(out)], capture_output=True, text=True,
                          timeout=6 * WAIT)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert sorted(int(name) for name in os.listdir(out)) == list(range(400))

