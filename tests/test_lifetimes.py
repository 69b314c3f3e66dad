"""What a finished run keeps alive (nothing, once nobody refers to it), and the timer's heap.

A finished run that nobody references must be freed with its arguments and result, under
every runner; a cancelled timer (a timeout that did not fire, a retry that was stopped)
lets go of its run at once, and the heap is compacted.
"""

import gc
import threading
import weakref

import pytest

import taskrun
from taskrun import BaseTaskRun, MultiprocessTaskRun, SequentialTaskRun, ThreadTaskRun, task
from taskrun._timer import Timer, timer

COMPACT_MIN = 64


class Payload:
    """A weakly referenceable argument and result."""

    def __init__(self, n):
        self.n = n


def make_payload(arg):
    return Payload(arg.n + 1)


RUNNERS = [
    SequentialTaskRun,
    ThreadTaskRun.configure(max_workers=2),
    MultiprocessTaskRun.configure(max_workers=1),
]


def _collect():
    for _ in range(3):
        gc.collect()


@pytest.mark.parametrize("runner", RUNNERS, ids=lambda r: r.__name__)
def test_a_finished_run_nobody_references_holds_nothing(runner):
    fn = task(runner=runner)(make_payload)
    arg = Payload(1)
    run = fn(arg)
    assert run.get_result(timeout=30).n == 2
    refs = [weakref.ref(run), weakref.ref(arg), weakref.ref(run.get_result())]
    del run, arg
    _collect()
    alive = [ref() for ref in refs if ref() is not None]
    assert not alive, f"still alive after the run finished and was dropped: {alive}"


@pytest.mark.parametrize("runner", RUNNERS, ids=lambda r: r.__name__)
def test_a_finished_run_with_a_timeout_is_freed_before_its_deadline(runner):
    fn = task(runner=runner, timeout=3600)(make_payload)
    run = fn(Payload(1))
    assert run.get_result(timeout=30).n == 2
    ref = weakref.ref(run)
    del run
    _collect()
    assert ref() is None, "a cancelled timeout timer keeps the run alive until its deadline"


def test_a_dropped_map_with_timeouts_leaves_nothing_in_the_timer():
    fn = task(runner=ThreadTaskRun.configure(max_workers=4), timeout=3600)(make_payload)
    group = fn.map(Payload(i) for i in range(2000))
    assert group.wait(60)
    refs = [weakref.ref(run) for run in group]
    del group
    _collect()
    assert sum(ref() is not None for ref in refs) == 0
    assert len(timer) < COMPACT_MIN * 2, f"{len(timer)} cancelled entries left in the timer's heap"


def test_cancelling_drops_the_callback_and_compacts_the_heap():
    own = Timer()
    try:
        owners = [Payload(i) for i in range(1000)]
        handles = [own.call_later(3600, owner.__repr__) for owner in owners]  # bound: refers to its owner
        refs = [weakref.ref(owner) for owner in owners]
        del owners
        for handle in handles:
            handle.cancel()
        _collect()
        assert sum(ref() is not None for ref in refs) == 0
        assert len(own) < COMPACT_MIN * 2
        fired = threading.Event()
        own.call_later(0, fired.set)
        assert fired.wait(10), "the timer stopped firing after compaction"
    finally:
        own.shutdown()


def test_a_timeout_armed_while_the_attempt_finishes_is_cancelled():
    """The attempt's outcome can be reported by the runner while the run arms its timeout timer."""
    attempts = []

    class HandRun(BaseTaskRun):
        def start_attempt(self, attempt):
            attempts.append(attempt)

    fn = task(runner=HandRun, timeout=3600)(make_payload)
    run = fn(Payload(1))
    attempt = attempts[0]
    real_call_later = timer.call_later
    finisher = threading.Thread(target=attempt.set_result, args=(Payload(2),))

    def call_later_as_the_outcome_lands(delay, callback, on_drop=None):
        finisher.start()  # the runner reports from its own thread, right now
        if not run._lock.locked():
            finisher.join(10)  # it is not kept out: let it land before the timer is armed
        return real_call_later(delay, callback, on_drop)

    timer.call_later = call_later_as_the_outcome_lands
    try:
        attempt.mark_started()
    finally:
        timer.call_later = real_call_later
    finisher.join(10)
    assert run.wait(10)
    live = [h for _when, _seq, h in timer._heap if not h.cancelled]
    assert not live, "the timeout timer of a finished attempt is still armed"


def test_a_thread_call_stopped_as_its_thread_takes_it_is_abandoned(monkeypatch):
    """stop() landing between the pool thread's 'stopped?' check and its taking the call."""
    release = threading.Event()
    started = threading.Event()

    def stuck():
        started.set()
        release.wait(30)

    fn = task(runner=ThreadTaskRun.configure(max_workers=1))(stuck)
    original = taskrun.Attempt.reported
    target = []

    def reported_then_stopped(self):
        value = original.fget(self)
        if target and self.run is target[0] and not value:
            target.clear()
            self.run.stop()  # lands right after the check read "not stopped"
        return value

    monkeypatch.setattr(taskrun.Attempt, "reported", property(reported_then_stopped))
    pool_thread_busy = threading.Event()
    blocker = task(runner=fn.runner)(pool_thread_busy.wait)(30)  # holds the one thread while we set up
    run = fn()
    target.append(run)
    pool_thread_busy.set()
    assert blocker.wait(10)
    assert started.wait(10)  # the stopped call still ran: its thread had taken it
    assert run.status is taskrun.Status.STOPPED
    done = threading.Event()
    closer = threading.Thread(target=lambda: (taskrun.shutdown(wait=True), done.set()))
    closer.start()
    try:
        assert done.wait(5), "shutdown(wait=True) waits for the thread of a stopped call"
    finally:
        release.set()
        closer.join(10)
