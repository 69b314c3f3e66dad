"""The process pool's failure branches, each made to happen: the supervisor failing, stopping a call
sent ahead (CANCEL), sending to a dead worker, an outcome the caller cannot unpickle, a worker
that dies while idle."""

import logging
import os
import signal
import sys
import tempfile
import threading

import pytest
from _fifo_bodies import block_on_fifo, release
from _waiting import is_alive, wait_for
from test_process_runner import WAIT, _no_child_processes, read_pid, runner, write_atomic  # noqa: F401

from taskrun import SerializationError, Status, TaskrunError, WorkerDied, _lifecycle, task
from taskrun.runners.process._pool import ProcessPool


def double(x):
    return 2 * x


def getpid():
    return os.getpid()






def record(path, value):
    with open(path, "a") as f:
        f.write(f"{value}\n")
    return os.getpid()


# ---- the supervisor fails ----------------------------------------------------------------------


def test_a_failing_supervisor_fails_the_calls_it_holds_delivers_what_it_read_and_is_replaced(
    tmp_path, monkeypatch, caplog
):
    R = runner("fork", max_workers=2)
    started, fifo = tmp_path / "started", tmp_path / "fifo"
    os.mkfifo(fifo)
    stuck = task(runner=R)(block_on_fifo)(str(started), str(fifo))
    read_pid(started)
    old_pool = R._pool()
    real = ProcessPool._escalate_kills
    failed = []

    def fail_once_after_a_result(self):
        # Fails in the loop pass that has just read an outcome: that one must still be delivered.
        if not failed and (self.outbox or self.successes):
            failed.append(True)
            raise RuntimeError("injected supervisor failure")
        return real(self)

    monkeypatch.setattr(ProcessPool, "_escalate_kills", fail_once_after_a_result)
    quick = task(runner=R)(double)(21)
    assert quick.get_result(WAIT) == 42  # read before the failure: delivered, not failed
    assert quick.status is Status.SUCCEEDED
    with pytest.raises(TaskrunError, match="the process pool failed .RuntimeError: injected supervisor failure"):
        stuck.get_result(WAIT)
    assert stuck.status is Status.FAILED
    assert failed == [True]
    assert any("supervisor failed" in r.getMessage() for r in caplog.records if r.name == "taskrun")
    assert old_pool.closed.wait(WAIT)
    assert _lifecycle.pools.get(R) is not old_pool  # forgotten
    wait_for(lambda: not is_alive(int(started.read_text())), WAIT, "the stuck call's worker to be ended")
    assert task(runner=R)(double)(5).get_result(WAIT) == 10  # the next call works, on a new pool
    assert R._pool() is not old_pool


# ---- stop a call sent ahead to a busy worker (CANCEL) -------------------------------------------


def log_then_block(started, go, fifo):
    """Say "started"; when told, log (which wakes the pool's supervisor, so it sends the backlog ahead); block."""
    write_atomic(started, str(os.getpid()))
    with open(go, "rb") as f:
        f.read(1)
    logging.getLogger("tests.failures").warning("send the calls behind me")
    with open(fifo, "rb") as f:
        f.read(1)
    return os.getpid()


def test_stopping_a_call_sent_ahead_to_a_busy_worker_skips_it_there(tmp_path):
    one = runner("fork", max_workers=1)
    tiny, rec = task(runner=one)(double), task(runner=one)(record)
    tiny.map(range(300)).results(timeout=WAIT)  # calls are short here: they are sent ahead
    started, go, fifo = (tmp_path / n for n in ("started", "go", "fifo"))
    os.mkfifo(go)
    os.mkfifo(fifo)
    log = tmp_path / "log"
    first = task(runner=one)(log_then_block)(str(started), str(go), str(fifo))
    worker_pid = read_pid(started)
    queued = [rec(str(log), name) for name in ("q1", "q2", "q3")]
    release(go)
    pool = one._pool()

    def in_the_workers_queue():
        with pool.lock:
            state = queued[1]._current.runner_state  # (call id, payload, function) while the pool holds it
            return state is not None and any(state[0] in list(w.in_flight)[1:] for w in pool.workers)

    wait_for(in_the_workers_queue, WAIT, "q2 to be sent ahead to the busy worker")
    assert queued[1].stop() is True  # in the worker's queue: cancelled there, the worker goes on
    assert queued[1].status is Status.STOPPED
    release(fifo)
    assert first.get_result(WAIT) == worker_pid
    assert [queued[0].get_result(WAIT), queued[2].get_result(WAIT)] == [worker_pid, worker_pid]  # same worker
    assert log.read_text().split() == ["q1", "q3"]  # q2 never ran
    assert tiny(1).get_result(WAIT) == 2


# ---- sending to a worker that has died --------------------------------------------------------


def test_calls_sent_to_a_dead_worker_run_elsewhere():
    R = runner("fork", max_workers=1)
    first_pid = task(runner=R)(getpid)().get_result(WAIT)
    pool = R._pool()
    (worker,) = pool.workers
    real_send = worker.call_w.send_bytes

    def die_then_send(data):
        # The worker dies between the pool's choice of it and the send (it is not reaped yet).
        os.kill(worker.pid, signal.SIGKILL)
        os.waitid(os.P_PID, worker.pid, os.WEXITED | os.WNOWAIT)  # dead, left a zombie for the pool to reap
        worker.call_w.send_bytes = real_send
        return real_send(data)  # BrokenPipeError: the worker's end is closed

    worker.call_w.send_bytes = die_then_send
    run = task(runner=R)(getpid)()
    assert run.get_result(WAIT) not in (first_pid, None)  # requeued, then run by the replacement
    assert run.status is Status.SUCCEEDED and run.attempts == 1


# ---- an outcome the caller cannot unpickle ------------------------------------------------------


def result_of_a_class_only_the_worker_has():
    import sys
    import types

    module = types.ModuleType("only_in_the_worker")

    class Thing:
        pass

    Thing.__module__ = module.__name__
    Thing.__qualname__ = "Thing"
    module.Thing = Thing
    sys.modules[module.__name__] = module
    return Thing()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_an_outcome_the_caller_cannot_unpickle_is_a_serialization_error(method):
    R = runner(method, max_workers=1)
    run = task(runner=R)(result_of_a_class_only_the_worker_has)()
    with pytest.raises(SerializationError, match="could not be unpickled here.*only_in_the_worker"):
        run.get_result(WAIT)
    assert run.status is Status.FAILED
    assert task(runner=R)(double)(2).get_result(WAIT) == 4  # the worker and the pool go on


# ---- a worker dies while idle -------------------------------------------------------------------


def test_a_worker_that_dies_while_idle_is_logged_and_replaced(caplog):
    caplog.set_level(logging.WARNING, logger="taskrun")
    R = runner("fork", max_workers=1)
    pid = task(runner=R)(getpid)().get_result(WAIT)
    os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: any("died while idle" in r.getMessage() and str(pid) in r.getMessage() for r in caplog.records),
        WAIT, "the warning about the idle worker",
    )
    record_ = next(r for r in caplog.records if "died while idle" in r.getMessage())
    assert record_.levelno == logging.WARNING and "SIGKILL" in record_.getMessage()
    assert task(runner=R)(getpid)().get_result(WAIT) != pid


# ---- calls that cannot start ------------------------------------------------------------------


def test_a_function_that_cannot_be_pickled_fails_at_call_time():
    lock = threading.Lock()

    def holds_a_lock():
        return lock.locked()

    with pytest.raises(SerializationError, match="the function of task .*holds_a_lock could not be pickled"):
        task(runner=runner("fork"))(holds_a_lock)()


def test_a_worker_process_that_cannot_be_started_fails_the_call_and_the_pool_goes_on(monkeypatch):
    import multiprocess.context

    R = runner("fork", max_workers=1)
    real_start = multiprocess.context.ForkProcess.start
    calls = []

    def start_fails_once(self):
        if not calls:
            calls.append(self)
            raise BlockingIOError(11, "Resource temporarily unavailable (fork)")
        return real_start(self)

    monkeypatch.setattr(multiprocess.context.ForkProcess, "start", start_fails_once)
    run = task(runner=R)(getpid)()
    with pytest.raises(BlockingIOError, match="fork"):
        run.get_result(WAIT)
    pool = R._pool()
    assert pool.workers == []  # the half-made worker was not kept
    assert task(runner=R)(getpid)().get_result(WAIT) != os.getpid()


def test_a_spawned_worker_that_cannot_start_says_why_in_process(monkeypatch, tmp_path):
    """The main module names a file that is gone: the worker's FileNotFoundError comes back with the calls."""
    main = sys.modules["__main__"]
    monkeypatch.setattr(main, "__spec__", None, raising=False)
    monkeypatch.setattr(main, "__file__", str(tmp_path / "gone.py"), raising=False)
    R = runner("spawn", max_workers=1)
    runs = [task(runner=R)(getpid)() for _ in range(2)]
    for run in runs:
        exc = run.exception(WAIT)
        assert isinstance(exc, WorkerDied), exc
        assert "could not start (exit code 1): FileNotFoundError" in str(exc) and "gone.py" in str(exc)
        assert "The worker's traceback is this error's __cause__." in str(exc)
        assert "FileNotFoundError" in exc.__cause__.tb_text
    assert not list(tmp_path.iterdir())
    assert not [f for f in os.listdir(tempfile.gettempdir()) if f.startswith(f"taskrun-start-{os.getpid()}-")]


# ---- a function goes with the first call that really goes ----------------------------------------


def triple(x):
    return 3 * x


def test_a_call_held_back_from_a_batch_still_takes_its_function_along():
    """A call with a timeout is never sent ahead: the batch stops before it. Its function must then
    go with it when it does go, not be counted as sent with the batch it was held back from."""
    R = runner("fork", max_workers=1)
    tiny = task(runner=R)(double)
    tiny.map(range(300)).results(timeout=WAIT)  # calls are short here: they are sent ahead
    for _ in range(5):
        backlog = [tiny(i) for i in range(60)]
        timed = task(runner=R, timeout=30)(triple)(3)
        assert timed.get_result(WAIT) == 9
        assert [r.get_result(WAIT) for r in backlog] == [2 * i for i in range(60)]
