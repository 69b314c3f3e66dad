"""Calls made while their pool shuts down: each one ends, by running or as STOPPED, never pending forever."""

import os
import random
import sys
import threading
import time
from collections import deque

import pytest
from _waiting import wait_for
from test_process_runner import WAIT, _no_child_processes, read_pid, runner, write_atomic  # noqa: F401

from taskrun import Status, TaskStopped, task


def double(x):
    return 2 * x


@pytest.fixture
def fast_thread_switches():
    """Switch threads every microsecond, so the race windows between two lines get hit."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


def submit_some(twice, go, runs):
    go.wait(WAIT)
    for i in range(5):
        runs.append(twice(i))  # list.append is atomic


def test_every_call_made_during_a_shutdown_ends(fast_thread_switches):
    R = runner("fork", max_workers=1)
    twice = task(runner=R)(double)
    rng = random.Random(7)
    began = time.monotonic()
    rounds = 0
    # At least 5 rounds, then as many as 4 s allow (the windows themselves are forced by the tests below).
    while rounds < 150 and (rounds < 5 or time.monotonic() - began < 4):
        rounds += 1
        twice(0).get_result(WAIT)  # a pool, its one worker busy or not
        runs: list = []
        go = threading.Event()
        callers = [threading.Thread(target=submit_some, args=(twice, go, runs)) for _ in range(3)]
        for t in callers:
            t.start()
        go.set()
        R.shutdown(wait=rng.random() < 0.5)
        for t in callers:
            t.join(WAIT)
        deadline = time.monotonic() + 10
        for run in runs:
            assert run.wait(max(0.0, deadline - time.monotonic())), f"round {rounds}: {run!r} never ended"
            if run.status is Status.STOPPED:
                assert "shut down" in str(run.exception())
                assert isinstance(run.exception(), TaskStopped)
            else:
                assert run.status is Status.SUCCEEDED, run
        R.shutdown(wait=False)  # the calls made after the shutdown started a new pool
    assert rounds >= 5


def test_a_call_on_a_pool_closed_under_it_ends_stopped():
    """The pool a call was handed to has closed (its retry's pool, or a race): the call ends STOPPED."""
    R = runner("fork", max_workers=1)
    twice = task(runner=R)(double)
    twice(1).get_result(WAIT)
    pool = R._pool()
    R.shutdown(wait=True)
    assert pool.closing == "closed"
    run = twice.runner(twice, (3,), {})
    run.prepare()
    run._pool_used = pool  # as a retry of a call of this pool would
    run._begin_attempt()
    assert run.wait(WAIT) and run.status is Status.SUCCEEDED  # start_attempt takes a new pool
    from taskrun._run import Attempt

    late = twice.runner(twice, (4,), {})
    late.prepare()
    attempt = late._current = Attempt(late, 1)
    late._attempts = 1
    pool.submit(attempt, late._payload, late._function)  # straight to the closed pool
    assert late.wait(WAIT)
    assert late.status is Status.STOPPED and "shut down" in str(late.exception())


# ---- the two windows, made to happen: the shutdown lands between submit's check and its queueing


def block_on_fifo(started, fifo):
    write_atomic(started, "1")
    with open(fifo, "rb") as f:
        f.read(1)


def test_a_call_queued_lock_free_as_the_pool_shuts_down_ends_stopped(tmp_path):
    """Every worker busy: submit queues without the lock. A shutdown right before the append must not strand it."""
    R = runner("fork", max_workers=1)
    started, fifo = tmp_path / "started", tmp_path / "fifo"
    os.mkfifo(fifo)
    busy = task(runner=R)(block_on_fifo)(str(started), str(fifo))
    read_pid(started)
    pool = R._pool()
    wait_for(lambda: not pool.has_room, WAIT, "the pool to be full")

    class ShutdownBeforeAppend(deque):
        def append(self, item):
            pool.shutdown(wait=False)  # as if another thread's shutdown ran just before this append
            super().append(item)

    pool.submitted = ShutdownBeforeAppend()
    run = task(runner=R)(double)(1)
    assert run.wait(10), f"{run!r} stayed pending after its pool shut down"
    assert run.status is Status.STOPPED and "shut down" in str(run.exception())
    assert busy.status is Status.STOPPED


class _ShutdownOnFirstEnter:
    """Stands in for the pool's lock: the test thread's first ``with`` waits for a shutdown to start first."""

    def __init__(self, pool):
        self.pool, self.lock, self.armed, self.shutter = pool, pool.lock, True, None

    def __enter__(self):
        if self.armed and threading.current_thread() is threading.main_thread():
            self.armed = False
            self.shutter = threading.Thread(target=self.pool.shutdown, args=(False,))
            self.shutter.start()
            wait_for(lambda: self.pool.closing is not None, WAIT, "the shutdown to begin")
        return self.lock.__enter__()

    def __exit__(self, *exc_info):
        return self.lock.__exit__(*exc_info)


def test_a_call_handed_to_an_idle_worker_as_the_pool_shuts_down_ends_stopped():
    """A worker is idle: submit takes the lock. A shutdown that takes it first must not strand the call."""
    R = runner("fork", max_workers=1)
    twice = task(runner=R)(double)
    twice(0).get_result(WAIT)
    pool = R._pool()
    assert pool.has_room
    pool.lock = stand_in = _ShutdownOnFirstEnter(pool)
    run = twice(1)
    try:
        assert run.wait(10), f"{run!r} stayed pending after its pool shut down"
        assert run.status is Status.STOPPED and "shut down" in str(run.exception())
    finally:
        stand_in.shutter.join(WAIT)
