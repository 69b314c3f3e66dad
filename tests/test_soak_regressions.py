"""Bugs the soak (tests/test_soak.py, benchmarks/soak.py) found, each made to happen on purpose."""

import os
import select
import signal
import threading

from _fifo_bodies import log_then_block, release
from _waiting import wait_for
from test_process_runner import WAIT, _no_child_processes, read_pid, write_atomic  # noqa: F401

from taskrun import MultiprocessTaskRun, Status, WorkerDied, task


def exit_3():
    os._exit(3)


def getpid():
    return os.getpid()


def test_a_worker_forked_while_another_pool_starts_one_does_not_hide_that_workers_death(monkeypatch):
    """Two pools start workers at the same moment: the one forked second must not keep the first one's pipes.

    A fork copies every open fd. Forked while another pool's worker is being started, a worker
    took along that worker's child-side pipe ends, its exit sentinel among them; when that
    worker died, its pool never saw it (the sentinel stayed open in the other pool's worker),
    and its call stayed RUNNING for as long as the other worker lived.
    """
    a_runner = MultiprocessTaskRun.configure(start_method="fork", max_workers=1)
    b_runner = MultiprocessTaskRun.configure(start_method="fork", max_workers=2)
    dies = task(runner=a_runner)(exit_3)
    lives = task(runner=b_runner)(getpid)

    real_fork = os.fork
    a_thread: list[threading.Thread] = []
    a_forking, b_forked = threading.Event(), threading.Event()

    def fork():
        # Pool A's worker start pauses just before its fork, its pipes made (its window), until
        # pool B has forked a worker; where B cannot fork meanwhile, A goes on after a second.
        me = threading.current_thread()
        if a_thread and me is a_thread[0] and not a_forking.is_set():
            a_forking.set()
            b_forked.wait(1)
            return real_fork()
        pid = real_fork()
        if pid and a_forking.is_set():
            b_forked.set()
        return pid

    monkeypatch.setattr(os, "fork", fork)
    runs = {}
    starter = threading.Thread(target=lambda: runs.setdefault("a", dies()))
    a_thread.append(starter)
    starter.start()
    assert a_forking.wait(WAIT)
    runs["b"] = lives()
    starter.join(WAIT)
    assert isinstance(runs["b"].get_result(timeout=WAIT), int)  # B's worker is up and stays up, idle

    run = runs["a"]
    assert run.wait(10), f"{run!r}: its worker died, but its pool never noticed"
    assert run.status is Status.FAILED
    error = run.exception()
    assert isinstance(error, WorkerDied) and error.exitcode == 3


# ---- stopping a call sent ahead just as its worker begins it ------------------------------------






def say_then_exit(started):
    write_atomic(started, str(os.getpid()))
    os._exit(7)


def double(x):
    return 2 * x


def test_a_call_stopped_as_its_worker_begins_it_is_not_blamed_on_the_call_queued_behind_it(tmp_path):
    """stop() of a call sent ahead races with the worker beginning it: the call may run anyway.

    The pool told the worker to skip it, as it still looked queued there, and forgot it at once;
    but the worker had begun it already. When it then ended the worker (here ``os._exit``), the
    death was charged to the next call queued in that worker, which had never run: it failed
    with WorkerDied. The stopped call's outcome, its death included, is its own (and dropped).
    """
    one = MultiprocessTaskRun.configure(start_method="fork", max_workers=1)
    tiny = task(runner=one)(double)
    tiny.map(range(300)).results(timeout=WAIT)  # calls are short here: they are sent ahead
    started, go, fifo, x_started = (tmp_path / n for n in ("started", "go", "fifo", "x_started"))
    os.mkfifo(go)
    os.mkfifo(fifo)
    first = task(runner=one)(log_then_block)(str(started), str(go), str(fifo))
    worker_pid = read_pid(started)
    x = task(runner=one)(say_then_exit)(str(x_started))
    behind = [task(runner=one)(getpid)() for _ in range(2)]
    release(go)
    pool = one._pool()

    def sent_ahead():
        with pool.lock:
            ids = [run._current.runner_state for run in (x, behind[0])]
            return all(s is not None and any(s[0] in list(w.in_flight)[1:] for w in pool.workers) for s in ids)

    wait_for(sent_ahead, WAIT, "the calls to be sent ahead to the busy worker")
    (worker,) = pool.workers
    real_send = worker.call_w.send_bytes

    def cancel_too_late(data):
        # The pool's "skip it" reaches the worker only once the worker has begun the call.
        worker.call_w.send_bytes = real_send
        release(fifo)
        read_pid(x_started)
        return real_send(data)

    worker.call_w.send_bytes = cancel_too_late
    assert x.stop() is True
    assert x.status is Status.STOPPED
    assert first.get_result(WAIT) == worker_pid
    for run in behind:
        assert run.get_result(WAIT) not in (worker_pid, None)  # run again on the replacement, not failed
        assert run.status is Status.SUCCEEDED and run.attempts == 1
    assert x.status is Status.STOPPED


# ---- a worker forked while another pool closes a dead worker's pipes ---------------------------


def block_on(fifo):
    with open(fifo, "rb") as f:
        f.read(1)
    return os.getpid()


def test_a_worker_forked_while_another_pool_closes_a_dead_workers_pipes_keeps_its_own(tmp_path):
    """A forked child closes the parent's ends of every worker's pipes: never one of its own.

    The child closes them by the numbers their connections hold. When it was forked while
    another pool's thread was closing a dead worker's pipe end (closed, but its connection not
    yet told), that number could already be one of the new worker's own pipes: the child
    closed it, and the new worker died as it started (exit code 0 or 1, "Bad file
    descriptor"), failing the call it had been given with WorkerDied.
    """
    q_runner = MultiprocessTaskRun.configure(start_method="fork", max_workers=1)
    p_runner = MultiprocessTaskRun.configure(start_method="fork", max_workers=2)
    q_pid = task(runner=q_runner)(getpid)().get_result(timeout=WAIT)
    p_task = task(runner=p_runner)(getpid)
    p_task().get_result(timeout=WAIT)  # p's pool and first worker exist
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (q_worker,) = q_runner._pool().workers
    closing, forked = threading.Event(), threading.Event()
    conn = q_worker.call_w
    number, real_close = conn.fileno(), conn._close
    fillers = []

    def close_then_pause():
        # The fd is closed, and is the lowest free one (the next pipe made gets it); the connection
        # forgets it only when this returns. Where no worker can be started meanwhile, the pause
        # ends after a second.
        real_close()
        fillers.extend(os.open(os.devnull, os.O_RDONLY) for fd in range(number) if not _is_open(fd))
        closing.set()
        forked.wait(1)

    conn._close = close_then_pause
    try:
        os.kill(q_pid, signal.SIGKILL)  # q's supervisor reaps its worker and closes its pipes
        assert closing.wait(WAIT)
        busy = task(runner=p_runner)(block_on)(str(fifo))  # p's first worker is busy...
        run = p_task()  # ...so this call starts p's second worker, forked now
        forked.set()
        assert isinstance(run.get_result(timeout=WAIT), int)
        assert run.status is Status.SUCCEEDED and run.attempts == 1
        release(fifo)
        assert busy.get_result(timeout=WAIT) != run.get_result()
    finally:
        for fd in fillers:
            os.close(fd)


def _is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# ---- stop() reads the results that free a worker: the backlog must still go out ------------------


def test_a_stop_that_reads_the_results_freeing_a_worker_lets_the_waiting_calls_go_on(tmp_path, monkeypatch):
    """stop() reads what the call's worker has sent (to know where the call is); the calls waiting must go on.

    When that read brought in the results that freed the worker, nobody sent it the calls
    waiting for a worker: the pool's thread only does so when it reads results itself, and
    there was nothing left for it to read. With every worker busy before, new calls queued
    behind them and the pool stalled for good.
    """
    from taskrun.runners.process._pool import ProcessPool

    one = MultiprocessTaskRun.configure(start_method="fork", max_workers=1)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    first = task(runner=one)(block_on)(str(fifo))
    pool = one._pool()
    wait_for(lambda: first.status is Status.RUNNING, WAIT, "the first call to run")  # the worker's READY is read
    waiting = task(runner=one)(getpid)()  # every worker is busy: it waits for one
    (worker,) = pool.workers

    parked, unpark = threading.Event(), threading.Event()
    real_deliver = ProcessPool._deliver

    def deliver(self, out):
        real_deliver(self, out)
        if threading.current_thread() is self.thread and not unpark.is_set():
            parked.set()  # the pool's thread waits here, outside its lock, before it polls again
            unpark.wait(WAIT)

    monkeypatch.setattr(ProcessPool, "_deliver", deliver)
    pool._wake()
    assert parked.wait(WAIT)
    release(fifo)  # the first call ends; its result waits in the pipe, unread
    wait_for(lambda: select.select([worker.result_r.fileno()], [], [], 0)[0], WAIT, "the first call's result")
    assert first.stop() is True  # reads that result: the worker is free
    unpark.set()
    assert waiting.wait(10), f"{waiting!r} never went to the free worker"
    assert waiting.get_result() == worker.pid
