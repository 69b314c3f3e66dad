"""The timer on its own: order, cancelling, callbacks that raise, shutdown's drops, restart, compaction; and
what a drop means for a run waiting to retry when taskrun shuts down.

The unit tests use a Timer of their own (never the library's), shut down at the end.
"""

import logging
import os
import threading

import pytest
from _waiting import wait_for

import taskrun
from taskrun import MultiprocessTaskRun, Status, TaskStopped, ThreadTaskRun, task
from taskrun._timer import COMPACT_MIN, Timer

WAIT = 10


@pytest.fixture
def own():
    timer = Timer()
    yield timer
    timer.shutdown()


def test_callbacks_run_in_deadline_order_not_submission_order(own):
    order, done, busy, release = [], threading.Event(), threading.Event(), threading.Event()
    own.call_later(0, lambda: (busy.set(), release.wait(WAIT)))  # holds the timer thread while we submit
    assert busy.wait(WAIT)
    own.call_later(0.02, lambda: (order.append("late"), done.set()))
    own.call_later(0.01, lambda: order.append("early"))
    own.call_later(0, lambda: order.append("now"))
    release.set()
    assert done.wait(WAIT)
    assert order == ["now", "early", "late"]


def test_cancel_is_idempotent_and_a_cancelled_callback_never_runs(own):
    ran = []
    handle = own.call_later(0.05, lambda: ran.append("cancelled"))
    handle.cancel()
    handle.cancel()  # a second cancel changes nothing (and is not counted twice)
    assert handle.cancelled and handle.callback is None and handle.on_drop is None
    assert own._cancelled == 1
    fired = threading.Event()
    own.call_later(0.1, fired.set)  # due after the cancelled one: the thread went past it
    assert fired.wait(WAIT)
    assert ran == [] and own._cancelled == 0 and len(own) == 0


def test_cancelling_a_handle_that_already_ran_changes_no_count(own):
    fired = threading.Event()
    handle = own.call_later(0, fired.set)
    assert fired.wait(WAIT)
    assert not handle.in_heap  # taken out of the heap before it ran
    handle.cancel()
    assert handle.cancelled and own._cancelled == 0


def test_a_callback_that_raises_is_logged_and_the_timer_goes_on(own, caplog):
    caplog.set_level(logging.ERROR, logger="taskrun")

    def boom():
        raise RuntimeError("callback failed")

    own.call_later(0, boom)
    fired = threading.Event()
    own.call_later(0.01, fired.set)
    assert fired.wait(WAIT), "the timer thread ended with the failing callback"
    (record,) = [r for r in caplog.records if "timer callback" in r.getMessage()]
    assert record.exc_info[0] is RuntimeError and "boom" in record.getMessage()


def test_shutdown_drops_pending_callbacks_running_their_on_drop_even_if_one_raises(own, caplog):
    caplog.set_level(logging.ERROR, logger="taskrun")
    ran, dropped = [], []

    def bad_drop():
        raise ValueError("drop failed")

    own.call_later(3600, lambda: ran.append(1), on_drop=bad_drop)
    own.call_later(3600, lambda: ran.append(2), on_drop=lambda: dropped.append(2))
    own.call_later(3600, lambda: ran.append(3))  # no on_drop
    cancelled = own.call_later(3600, lambda: ran.append(4), on_drop=lambda: dropped.append(4))
    cancelled.cancel()  # cancelled: its on_drop is gone with it
    thread = own._thread
    own.shutdown()
    assert not thread.is_alive()
    assert ran == [] and dropped == [2]
    assert len(own) == 0 and own._cancelled == 0
    (record,) = [r for r in caplog.records if "timer drop callback" in r.getMessage()]
    assert record.exc_info[0] is ValueError


def test_the_timer_starts_again_after_shutdown(own):
    own.call_later(3600, lambda: None)
    own.shutdown()
    own.shutdown()  # no thread: nothing to stop
    fired = threading.Event()
    own.call_later(0, fired.set)
    assert fired.wait(WAIT)
    assert own._thread is not None and own._thread.is_alive()


def test_shutdown_from_a_callback_does_not_join_its_own_thread(own):
    done = threading.Event()

    def stop_from_inside():
        own.shutdown()  # on the timer's own thread: it must not wait for itself
        done.set()

    own.call_later(0, stop_from_inside)
    assert done.wait(WAIT)
    assert own._thread is None


def test_compaction_keeps_live_entries_and_marks_the_dropped_ones(own):
    live = [own.call_later(3600 + i, lambda: None) for i in range(10)]
    doomed = [own.call_later(7200 + i, lambda: None) for i in range(COMPACT_MIN)]
    for handle in doomed:
        handle.cancel()
    assert len(own) == len(live)  # compacted once the cancelled ones were the majority
    assert own._cancelled == 0
    assert all(not h.in_heap for h in doomed) and all(h.in_heap for h in live)
    below = [own.call_later(9000 + i, lambda: None) for i in range(COMPACT_MIN - 1)]
    for handle in below:
        handle.cancel()
    assert own._cancelled == COMPACT_MIN - 1 and len(own) == len(live) + len(below)  # too few to compact


def fail_once(path):
    """Fails the first time (no file yet), leaving the file behind."""
    if not os.path.exists(path):
        open(path, "w").close()
        raise ConnectionError("first attempt fails")
    return "retried"


@pytest.mark.parametrize("runner", [ThreadTaskRun.configure(max_workers=1),
                                    MultiprocessTaskRun.configure(start_method="fork", max_workers=1)],
                         ids=["thread", "process"])
def test_shutdown_while_a_run_waits_to_retry_ends_it_stopped(runner, tmp_path):
    flaky = task(runner=runner, retries=1, retry_sleep_time=3600)(fail_once)
    run = flaky(str(tmp_path / "attempted"))
    wait_for(lambda: run.attempts == 1 and run._retry_timer is not None, WAIT, "the run to wait for its retry")
    assert run.status is Status.PENDING or run.status is Status.RUNNING
    taskrun.shutdown()
    assert run.done() and run.status is Status.STOPPED and run.attempts == 1
    with pytest.raises(TaskStopped, match="taskrun shut down before its retry"):
        run.get_result(timeout=0)
