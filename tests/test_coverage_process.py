"""The process runner's remaining branches, each made to happen: the wire read in every split, the worker's
loop driven message by message, what a worker sends that the caller must cope with, and the pool's queues.

The wire and the worker's loop (``_protocol.receive``, ``_worker._serve``) are driven in this process over
pipes, one message at a time, so each race they handle is made deterministic. Everything else goes through
``task`` and a real pool, forcing a fault with a hook where nothing else can.
"""

import fcntl
import functools
import inspect
import logging
import os
import pickle
import random
import signal
import struct
import sys
import termios
import threading
import types

import cloudpickle
import multiprocess
import pytest
from _fifo_bodies import block_on_fifo, log_then_block, release
from _waiting import is_alive, wait_for
from test_process_runner import WAIT, _no_child_processes, read_pid, runner, write_atomic  # noqa: F401

import taskrun
from taskrun import MultiprocessTaskRun, SerializationError, Status, ThreadTaskRun, WorkerDied, _fingerprint, task
from taskrun.runners.process import _functions, _protocol, _worker
from taskrun.runners.process._protocol import CALLS, CANCEL, OK, SKIPPED, UNPICKLABLE, FrameReader, Sender, receive


def frame(data, long_header=False):
    if long_header:
        return struct.pack("!iQ", -1, len(data)) + data
    return struct.pack("!i", len(data)) + data


def unread(fd):
    """Bytes in the pipe that nobody has read yet."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


# ---- the worker's reads: receive() ---------------------------------------------------------------


def feed_in_steps(r, w, chunks, close):
    """Write each chunk once the reader has taken everything before it: its reads then end where the chunks do."""
    for chunk in chunks:
        wait_for(lambda: unread(r) == 0, WAIT, "the reader to take the previous chunk")
        os.write(w, chunk)
    if close:
        wait_for(lambda: unread(r) == 0, WAIT, "the reader to take the last chunk")
        os.close(w)


def receive_all(chunks, close=True):
    """Messages ``receive`` makes of ``chunks`` arriving one by one; then what ends it (None if nothing did)."""
    r, w = os.pipe()
    writer = threading.Thread(target=feed_in_steps, args=(r, w, chunks, close), daemon=True)
    writer.start()
    got, ending = [], None
    try:
        while True:
            try:
                got.append(receive(r))
            except EOFError as exc:
                ending = exc
                break
    finally:
        writer.join(WAIT)
        os.close(r)
    return got, ending


@pytest.mark.parametrize("seed", range(6))
def test_receive_reads_messages_split_at_random_whole_and_in_order(seed):
    rng = random.Random(seed)
    messages = [("m", i, rng.randbytes(rng.choice([0, 1, 5, 100, 5000, 70_000]))) for i in range(25)]
    stream = b"".join(frame(pickle.dumps(m), long_header=rng.random() < 0.3) for m in messages)
    cuts = sorted(rng.sample(range(1, len(stream)), 40))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    got, ending = receive_all(chunks)
    assert got == messages
    assert str(ending) == "the parent closed the call pipe"  # between messages: a clean end


@pytest.mark.parametrize("split", range(1, 12))
def test_receive_reads_a_long_header_split_anywhere(split):
    """The 12-byte header of a 2 GiB frame, arriving in two parts (its size is faked small here)."""
    message = ("big", b"x" * 10)
    data = frame(pickle.dumps(message), long_header=True)
    got, _ = receive_all([data[:split], data[split:]])
    assert got == [message]


def test_receive_says_the_pipe_closed_mid_message():
    data = frame(pickle.dumps(("cut", b"y" * 1000)))
    header_only = receive_all([data[:4]])
    part_of_the_body = receive_all([data[:4], data[4:100]])
    for got, ending in (header_only, part_of_the_body):
        assert got == []
        assert str(ending) == "the parent closed the call pipe in the middle of a message"


# ---- the parent's reads: FrameReader --------------------------------------------------------------


@pytest.mark.parametrize("split", range(1, 13))
def test_the_frame_reader_keeps_a_long_header_that_arrives_in_parts(split):
    first, second = b"a" * 7, b"b" * 3
    stream = frame(first, long_header=True) + frame(second)
    r, w = os.pipe()
    try:
        reader = FrameReader(r)
        os.write(w, stream[:split])
        assert reader.read() == []  # a header that is not whole yet: nothing, and nothing lost
        os.write(w, stream[split:])
        assert [bytes(f) for f in reader.read()] == [first, second]
        assert reader.read() is None
    finally:
        os.close(r)
        os.close(w)


# ---- the worker's loop, message by message ----------------------------------------------------------


def double(x):
    return 2 * x


class Loop:
    """``_worker._serve`` on a thread of this process, with the two pipes the parent would hold."""

    def __init__(self, max_calls=None):
        self.call_r, self.call_w = multiprocess.Pipe(duplex=False)
        self.result_r, result_w = multiprocess.Pipe(duplex=False)
        self.sender = Sender(result_w)
        self.result_w = result_w
        self.thread = threading.Thread(target=_worker._serve, args=(self.call_r, self.sender, max_calls), daemon=True)

    def start(self):
        self.thread.start()
        return self

    def send(self, message):
        self.call_w.send_bytes(pickle.dumps(message))

    def waiting_for_a_message(self):
        """True once the loop has read everything sent and waits in receive() for the next message's header."""
        frame = sys._current_frames().get(self.thread.ident)
        return (
            unread(self.call_r.fileno()) == 0 and frame is not None and frame.f_code is receive.__code__
            and frame.f_lineno == RECEIVE_HEADER_LINE
        )

    def outcome(self):
        assert self.result_r.poll(WAIT), "the worker's loop sent nothing"
        kind, call_id, payload, _seconds = pickle.loads(self.result_r.recv_bytes())
        if kind == 1:  # RAISED: the pickled exception and its traceback
            payload = cloudpickle.loads(payload[0])
        return kind, call_id, payload

    def close(self):
        if self.call_w.closed:
            return
        self.call_w.close()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the worker's loop did not end at end of file"
        for conn in (self.call_r, self.result_r, self.result_w):
            conn.close()


@pytest.fixture
def loop():
    made = Loop()
    yield made
    if not made.thread.is_alive() and made.thread.ident is None:
        made.start()  # never started: it reads end of file and returns
    made.close()


RECEIVE_HEADER_LINE = next(
    receive.__code__.co_firstlineno + i for i, line in enumerate(inspect.getsourcelines(receive)[0])
    if "header = os.read(fd, 4)" in line
)
FN = (cloudpickle.dumps(double), {}, ())  # the function as the first call of it carries it
BAD_FN = (b"this is no pickle", {}, ())


def test_the_loop_runs_calls_in_order_with_functions_sent_once(loop):
    loop.start().send((CALLS, [(1, 7, FN, (3,)), (2, 7, None, pickle.dumps(((4,), {})))]))
    assert loop.outcome() == (OK, 1, 6)
    assert loop.outcome() == (OK, 2, 8)


def test_a_cancel_for_a_call_that_already_ran_is_ignored(loop):
    """The parent cancels a call it thinks is queued, but the worker already ran it: nothing to skip."""
    loop.start().send((CALLS, [(1, 7, FN, (1,))]))
    assert loop.outcome() == (OK, 1, 2)
    loop.send((CANCEL, 1))  # arrives while the worker waits with nothing queued
    wait_for(loop.waiting_for_a_message, WAIT, "the loop to take the cancel and wait again")
    loop.send((CALLS, [(2, 7, None, (2,))]))
    assert loop.outcome() == (OK, 2, 4)


def test_a_cancelled_call_is_skipped_but_the_function_it_carried_is_kept(loop):
    loop.send((CALLS, [(1, 7, FN, (1,)), (2, 7, None, (2,))]))
    loop.send((CANCEL, 1))
    loop.start()  # both messages wait in the pipe: the cancel is read before call 1 runs
    assert loop.outcome() == (SKIPPED, 1, None)
    assert loop.outcome() == (OK, 2, 4)  # the function came with the skipped call


def test_a_cancelled_call_whose_function_cannot_load_leaves_the_error_to_the_next_call(loop):
    loop.send((CALLS, [(1, 8, BAD_FN, (1,)), (2, 8, None, (2,))]))
    loop.send((CANCEL, 1))
    loop.start()
    assert loop.outcome() == (SKIPPED, 1, None)
    kind, call_id, (reason, _tb) = loop.outcome()
    assert (kind, call_id) == (UNPICKLABLE, 2)
    assert reason == "the task's function could not be loaded in the worker process"


def test_a_function_that_cannot_load_fails_every_call_of_it_and_nothing_else(loop):
    loop.start().send((CALLS, [(1, 8, BAD_FN, (1,)), (2, 8, None, (2,)), (3, 7, FN, (3,))]))
    kind, call_id, (reason, _tb) = loop.outcome()
    assert (kind, call_id) == (UNPICKLABLE, 1)
    assert reason.startswith("the task's function could not be loaded in the worker process: UnpicklingError")
    kind, call_id, (reason, _tb) = loop.outcome()
    assert (kind, call_id, reason) == (UNPICKLABLE, 2, "the task's function could not be loaded in the worker process")
    assert loop.outcome() == (OK, 3, 6)


def test_arguments_that_cannot_be_unpickled_fail_only_their_call(loop):
    loop.start().send((CALLS, [(1, 7, FN, b"not a pickle"), (2, 7, None, (5,))]))
    kind, call_id, (reason, _tb) = loop.outcome()
    assert (kind, call_id) == (UNPICKLABLE, 1)
    assert reason.startswith("the call's arguments could not be unpickled in the worker process")
    assert loop.outcome() == (OK, 2, 10)


def test_a_fresh_loop_serves_its_share_of_calls_then_returns():
    fresh = Loop(max_calls=2).start()
    try:
        fresh.send((CALLS, [(1, 7, FN, (1,))]))
        fresh.send((CALLS, [(2, 7, None, (2,))]))
        assert [fresh.outcome(), fresh.outcome()] == [(OK, 1, 2), (OK, 2, 4)]
        fresh.thread.join(WAIT)
        assert not fresh.thread.is_alive(), "the loop went on past max_calls"
    finally:
        fresh.close()


# ---- what a worker sends that the caller must cope with -----------------------------------------------


def log_an_exception():
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        logging.getLogger("tests.cov.worker").exception("the task caught this")
    return os.getpid()


def test_a_logged_exception_arrives_with_the_workers_traceback(caplog):
    caplog.set_level(logging.INFO, logger="tests.cov.worker")
    run = task(runner=runner("fork", max_workers=1))(log_an_exception)()
    pid = run.get_result(WAIT)
    record = wait_for(lambda: next((r for r in caplog.records if r.getMessage() == "the task caught this"), None),
                      WAIT, "the forwarded record")
    assert record.process == pid and record.exc_info is None
    assert "ZeroDivisionError: division by zero" in record.exc_text and "log_an_exception" in record.exc_text


def log_what_cannot_be_pickled():
    logging.getLogger("tests.cov.worker").warning("with a lock", extra={"lock": threading.Lock()})
    logging.getLogger("tests.cov.worker").warning("after the lock")
    return 5


def test_a_log_record_that_cannot_be_sent_is_logging_s_error_and_the_call_goes_on(caplog, capfd):
    caplog.set_level(logging.INFO, logger="tests.cov.worker")
    run = task(runner=runner("fork", max_workers=1))(log_what_cannot_be_pickled)()
    assert run.get_result(WAIT) == 5
    wait_for(lambda: any(r.getMessage() == "after the lock" for r in caplog.records), WAIT, "the next record")
    assert not any(r.getMessage() == "with a lock" for r in caplog.records)
    assert "--- Logging error ---" in capfd.readouterr().err  # said where logging says it: the worker's stderr


def warn_with_a_local_category():
    import warnings

    class LocalWarning(UserWarning):
        pass

    warnings.warn("of a class only this call has", LocalWarning, stacklevel=1)
    return 1


def test_a_warning_whose_category_cannot_be_pickled_arrives_as_a_user_warning():
    with pytest.warns(UserWarning, match="of a class only this call has") as caught:
        run = task(runner=runner("fork", max_workers=1))(warn_with_a_local_category)()
        assert run.get_result(WAIT) == 1
        wait_for(lambda: len(caught), WAIT, "the forwarded warning")
    assert caught[0].category is UserWarning


class NoArguments(Exception):
    """Its class takes no arguments, so pickle cannot make it again from its args."""

    def __new__(cls):
        return super().__new__(cls)

    def __init__(self):
        super().__init__("made without arguments")


def raise_no_arguments():
    raise NoArguments()


def test_an_exception_whose_class_takes_no_arguments_comes_back_as_itself():
    run = task(runner=runner("fork", max_workers=1))(raise_no_arguments)()
    exc = run.exception(WAIT)
    assert type(exc) is NoArguments and exc.args == ("made without arguments",)
    assert "raise NoArguments()" in exc.__cause__.tb_text


def raise_what_only_the_worker_has():
    module = types.ModuleType("cov_only_in_the_worker")

    class Unknown(Exception):
        pass

    Unknown.__module__ = module.__name__
    Unknown.__qualname__ = "Unknown"
    module.Unknown = Unknown
    sys.modules[module.__name__] = module
    raise Unknown("from the worker")


def test_an_exception_the_caller_cannot_unpickle_is_a_serialization_error():
    R = runner("fork", max_workers=1)
    run = task(runner=R)(raise_what_only_the_worker_has)()
    exc = run.exception(WAIT)
    assert isinstance(exc, SerializationError)
    assert "the exception raised by" in str(exc) and "could not be unpickled here" in str(exc)
    assert "cov_only_in_the_worker" in str(exc) and "from the worker" in exc.__cause__.tb_text
    assert task(runner=R)(double)(4).get_result(WAIT) == 8


def test_a_function_the_worker_cannot_load_fails_each_of_its_calls(monkeypatch):
    R = runner("fork", max_workers=1)
    pid = task(runner=R)(os.getpid)().get_result(WAIT)  # the worker exists before the module below
    module = types.ModuleType("cov_only_in_the_parent")
    exec("class Marker:\n    pass\n", vars(module))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    marker = module.Marker()

    def uses_a_marker(m=marker):
        return type(m).__name__

    fn = task(runner=R)(uses_a_marker)
    first, second = fn().exception(WAIT), fn().exception(WAIT)
    assert isinstance(first, SerializationError) and isinstance(second, SerializationError)
    assert "could not be loaded in the worker process: ModuleNotFoundError" in str(first)
    assert "cov_only_in_the_parent" in str(first)
    assert str(second).endswith("could not be loaded in the worker process")  # the first call said why
    assert task(runner=R)(os.getpid)().get_result(WAIT) == pid  # the same worker goes on


# ---- workers that cannot start -------------------------------------------------------------------------


def test_a_forked_worker_whose_setup_fails_says_why(monkeypatch):
    def no_logging(sender, levels):
        raise RuntimeError("logging cannot be set up here")

    monkeypatch.setattr(_worker, "_forward_logging", no_logging)  # the forked worker inherits it
    R = runner("fork", max_workers=1)
    exc = task(runner=R)(double)(1).exception(WAIT)
    assert isinstance(exc, WorkerDied), exc
    assert "could not start (exit code 1): RuntimeError: logging cannot be set up here" in str(exc)
    assert "no_logging" in exc.__cause__.tb_text
    monkeypatch.undo()
    assert task(runner=R)(double)(2).get_result(WAIT) == 4


def test_without_a_temporary_directory_a_failed_start_says_the_exit_code(monkeypatch):
    import tempfile

    def no_logging(sender, levels):
        raise RuntimeError("logging cannot be set up here")

    def no_temp_dir():
        raise FileNotFoundError("No usable temporary directory found")

    monkeypatch.setattr(_worker, "_forward_logging", no_logging)
    monkeypatch.setattr(tempfile, "gettempdir", no_temp_dir)
    exc = task(runner=runner("fork", max_workers=1))(double)(1).exception(WAIT)
    assert isinstance(exc, WorkerDied), exc
    assert "died: exit code 1" in str(exc)


def test_a_worker_killed_before_it_is_ready_fails_its_call(monkeypatch, tmp_path):
    setting_up, fifo = tmp_path / "setting-up", tmp_path / "fifo"
    os.mkfifo(fifo)
    real = _worker._forward_logging

    def slow_setup(sender, levels):
        write_atomic(setting_up, str(os.getpid()))
        with open(fifo, "rb") as f:  # never written: the test kills us here
            f.read(1)
        real(sender, levels)

    monkeypatch.setattr(_worker, "_forward_logging", slow_setup)
    run = task(runner=runner("fork", max_workers=1))(double)(1)
    os.kill(read_pid(setting_up), signal.SIGKILL)
    exc = run.exception(WAIT)
    assert isinstance(exc, WorkerDied) and "died: killed by SIGKILL" in str(exc), exc


def start_a_thread_pool():
    return task(runner=ThreadTaskRun)(double)(3).get_result(WAIT)


def test_pools_a_task_started_in_a_worker_that_cannot_be_shut_down_are_logged(monkeypatch, caplog):
    import taskrun.runners.base

    def cannot_shut_down(wait=True):
        raise RuntimeError("shutdown is broken here")

    monkeypatch.setattr(taskrun.runners.base, "shutdown", cannot_shut_down)  # what the worker calls as it ends
    caplog.set_level(logging.ERROR, logger="taskrun")
    run = task(runner=runner("fork", max_workers=1, max_tasks_per_worker=1))(start_a_thread_pool)()
    assert run.get_result(WAIT) == 6
    record = wait_for(
        lambda: next((r for r in caplog.records if "could not shut down the pools of a worker" in r.getMessage()), None),
        WAIT, "the worker's log record",
    )
    assert "shutdown is broken here" in record.exc_text


# ---- the pool's queues -------------------------------------------------------------------------------








def record(path, value):
    with open(path, "a") as f:
        f.write(f"{value}\n")
    return value


def fifos(tmp_path, *names):
    paths = [tmp_path / name for name in names]
    for path in paths:
        os.mkfifo(path)
    return paths


def test_a_call_stopped_while_queued_in_the_parent_never_runs(tmp_path):
    one = runner("fork", max_workers=1)
    started, (fifo,) = tmp_path / "started", fifos(tmp_path, "fifo")
    holder = task(runner=one)(block_on_fifo)(str(started), str(fifo))
    read_pid(started)
    log = tmp_path / "log"
    rec = task(runner=one)(record)
    queued = [rec(str(log), name) for name in ("a", "b", "c")]
    assert queued[1].stop() is True
    release(fifo)
    holder.get_result(WAIT)
    assert [queued[0].get_result(WAIT), queued[2].get_result(WAIT)] == ["a", "c"]
    assert queued[1].status is Status.STOPPED
    assert log.read_text().split() == ["a", "c"]


def test_a_call_stopped_in_the_backlog_is_left_out_of_the_next_batch(tmp_path):
    from taskrun.runners.process._batching import BatchPolicy

    class ShortCalls(BatchPolicy):
        """Judges calls short whatever they take, so the backlog goes to the worker in one batch."""

        __slots__ = ()

        def observe(self, seconds):
            pass

    one = runner("fork", max_workers=1)
    started, (fifo,) = tmp_path / "started", fifos(tmp_path, "fifo")
    holder = task(runner=one)(block_on_fifo)(str(started), str(fifo))
    read_pid(started)
    pool = one._pool()
    pool.batching = ShortCalls()
    pool.batching.call_seconds = 1e-5
    log = tmp_path / "log"
    rec = task(runner=one)(record)
    backlog = [rec(str(log), i) for i in range(20)]  # queued in the parent: the worker is busy
    assert backlog[10].stop() is True
    release(fifo)
    holder.get_result(WAIT)
    assert [r.get_result(WAIT) for r in backlog if r is not backlog[10]] == [i for i in range(20) if i != 10]
    assert [int(line) for line in log.read_text().split()] == [i for i in range(20) if i != 10]


def test_a_call_with_a_timeout_is_not_sent_ahead_to_a_busy_worker(tmp_path):
    one = runner("fork", max_workers=1)
    tiny = task(runner=one)(double)
    tiny.map(range(300)).results(timeout=WAIT)
    started, (go, fifo) = tmp_path / "started", fifos(tmp_path, "go", "fifo")
    holder = task(runner=one)(log_then_block)(str(started), str(go), str(fifo))
    read_pid(started)
    timed = task(runner=one, timeout=60)(double)(100)  # first in the backlog: nothing goes ahead of it
    backlog = [tiny(i) for i in range(40)]
    pool = one._pool()
    release(go)  # the worker logs: the supervisor wakes and tries to top it up
    wait_for(lambda: not pool.submitted, WAIT, "the supervisor to take the backlog")
    with pool.lock:
        (worker,) = pool.workers
        assert len(worker.in_flight) == 1  # only the holder: the timed call held the backlog back
    release(fifo)
    assert timed.get_result(WAIT) == 200
    assert [r.get_result(WAIT) for r in backlog] == [2 * i for i in range(40)]
    holder.get_result(WAIT)


def test_calls_sent_ahead_never_fill_the_workers_pipe_past_its_budget(tmp_path):
    from taskrun.runners.process._batching import PIPE_BUDGET

    one = runner("fork", max_workers=1)
    task(runner=one)(double).map(range(300)).results(timeout=WAIT)
    started, (go, fifo) = tmp_path / "started", fifos(tmp_path, "go", "fifo")
    holder = task(runner=one)(log_then_block)(str(started), str(go), str(fifo))
    read_pid(started)
    blob = task(runner=one)(len)
    backlog = [blob(bytes(PIPE_BUDGET // 8)) for _ in range(30)]
    pool = one._pool()
    release(go)
    wait_for(lambda: not pool.submitted, WAIT, "the supervisor to take the backlog")
    wait_for(lambda: len(pool.workers[0].in_flight) > 1, WAIT, "calls to be sent ahead")
    with pool.lock:
        ahead = len(pool.workers[0].in_flight) - 1
        assert 0 < ahead < 8 and pool.workers[0].bytes_in_flight <= PIPE_BUDGET
    release(fifo)
    assert [r.get_result(WAIT) for r in backlog] == [PIPE_BUDGET // 8] * 30
    holder.get_result(WAIT)


def test_a_cancel_that_cannot_be_sent_still_stops_the_call_here(tmp_path):
    one = runner("fork", max_workers=1)
    task(runner=one)(double).map(range(300)).results(timeout=WAIT)
    started, (go, fifo) = tmp_path / "started", fifos(tmp_path, "go", "fifo")
    first = task(runner=one)(log_then_block)(str(started), str(go), str(fifo))
    read_pid(started)
    log = tmp_path / "log"
    queued = [task(runner=one)(record)(str(log), name) for name in ("q1", "q2", "q3")]
    pool = one._pool()
    release(go)

    def in_the_workers_queue():
        with pool.lock:
            state = queued[1]._current.runner_state
            return state is not None and any(state[0] in list(w.in_flight)[1:] for w in pool.workers)

    wait_for(in_the_workers_queue, WAIT, "q2 to be sent ahead to the busy worker")
    (worker,) = pool.workers
    real_send = worker.call_w.send_bytes

    def broken_pipe(data):
        raise BrokenPipeError(32, "Broken pipe")

    worker.call_w.send_bytes = broken_pipe
    try:
        assert queued[1].stop() is True  # said STOPPED here, though the worker never heard
    finally:
        worker.call_w.send_bytes = real_send
    release(fifo)
    assert [queued[0].get_result(WAIT), queued[2].get_result(WAIT)] == ["q1", "q3"]
    assert queued[1].status is Status.STOPPED
    first.get_result(WAIT)


def test_a_done_callback_on_the_pools_thread_can_stop_another_process_call(tmp_path):
    R = runner("fork", max_workers=2)
    started_a, started_b = tmp_path / "a", tmp_path / "b"
    fifo_a, fifo_b = fifos(tmp_path, "fifo_a", "fifo_b")
    a = task(runner=R)(block_on_fifo)(str(started_a), str(fifo_a))
    b = task(runner=R)(block_on_fifo)(str(started_b), str(fifo_b))
    read_pid(started_a)
    b_pid = read_pid(started_b)
    seen = []

    def stop_b(run):
        seen.append((threading.current_thread().name, b.stop()))

    a.add_done_callback(stop_b)
    release(fifo_a)
    a.get_result(WAIT)
    wait_for(lambda: seen, WAIT, "the callback")
    assert seen == [("taskrun-process-pool", True)]  # from the supervisor itself: it did not wait for itself
    assert b.wait(WAIT) and b.status is Status.STOPPED
    wait_for(lambda: not is_alive(b_pid), WAIT, "b's worker to be ended")


def test_taskrun_shutdown_from_a_done_callback_on_the_pools_thread(tmp_path):
    R = runner("fork", max_workers=2)
    started, started_quick = tmp_path / "started", tmp_path / "started_quick"
    fifo, fifo_quick = fifos(tmp_path, "fifo", "fifo_quick")
    blocked = task(runner=R)(block_on_fifo)(str(started), str(fifo))
    quick = task(runner=R)(block_on_fifo)(str(started_quick), str(fifo_quick))
    read_pid(started)
    read_pid(started_quick)
    pool = R._pool()
    done = []
    quick.add_done_callback(lambda run: (taskrun.shutdown(wait=False), done.append(threading.current_thread().name)))
    release(fifo_quick)
    quick.get_result(WAIT)
    wait_for(lambda: done, WAIT, "the callback")
    assert done == ["taskrun-process-pool"]  # shut down from the supervisor: it did not wait for itself
    assert blocked.wait(WAIT) and blocked.status is Status.STOPPED
    assert pool.closed.wait(WAIT)


def log_twice(value):
    logging.getLogger("tests.cov.filtered").warning("refused by the caller's filter")
    logging.getLogger("tests.cov.filtered").warning("delivered")
    return value


def test_a_log_record_the_caller_cannot_handle_loses_nothing_else(caplog):
    def refuse(record):
        if record.getMessage().startswith("refused"):
            raise ValueError("this filter raises")
        return True

    R = runner("fork", max_workers=1)
    assert task(runner=R)(double)(1).get_result(WAIT) == 2  # the worker is forked before the filter exists
    target = logging.getLogger("tests.cov.filtered")
    target.addFilter(refuse)  # here only: the worker's records pass, the caller's handling raises
    try:
        caplog.set_level(logging.INFO)
        assert task(runner=R)(log_twice)(7).get_result(WAIT) == 7
        wait_for(lambda: any(r.getMessage() == "delivered" for r in caplog.records), WAIT, "the second record")
        failure = next(r for r in caplog.records if "could not deliver a message from a worker" in r.getMessage())
        assert failure.exc_info[0] is ValueError
    finally:
        target.removeFilter(refuse)


def log_info_and_warning():
    logging.getLogger("tests.cov.level").info("below the level the caller has now")
    logging.getLogger("tests.cov.level").warning("at the level the caller has now")
    return 1


def test_the_callers_current_level_decides_which_forwarded_records_are_handled(caplog):
    target = logging.getLogger("tests.cov.level")
    caplog.set_level(logging.INFO, logger="tests.cov.level")
    R = runner("fork", max_workers=1)
    assert task(runner=R)(double)(1).get_result(WAIT) == 2  # the worker forwards INFO from now on
    target.setLevel(logging.WARNING)
    assert task(runner=R)(log_info_and_warning)().get_result(WAIT) == 1
    wait_for(lambda: any(r.getMessage().startswith("at the level") for r in caplog.records), WAIT, "the warning")
    assert not any(r.getMessage().startswith("below the level") for r in caplog.records)


class PrepareOfItsOwn(MultiprocessTaskRun):
    """A subclass whose prepare() does not call MultiprocessTaskRun's."""

    def prepare(self):
        self.prepared_by_subclass = True


def test_a_subclass_that_does_not_call_prepare_still_sends_its_calls():
    R = PrepareOfItsOwn.configure(start_method="fork", max_workers=1)
    run = task(runner=R)(double)(21)
    assert run.get_result(WAIT) == 42 and run.prepared_by_subclass


# ---- the function as sent ------------------------------------------------------------------------------


def test_a_function_that_cannot_be_pickled_even_by_reference_fails_at_call_time():
    unpicklable = functools.partial(print, threading.Lock())  # of no module of the program: no fallback
    with pytest.raises(SerializationError, match="the function of task holds_a_lock could not be pickled"):
        task(name="holds_a_lock", runner=runner("fork"))(unpicklable)()


SHARED = "first"


def _shared():
    return SHARED


def _left():
    return _shared()


def _right():
    return _left()  # so the walk meets _left twice before it has looked at it once


def both_paths():
    return _left() + "/" + _right()


def test_a_helper_reached_by_two_paths_is_sent_again_once_it_changes(monkeypatch):
    fn = task(runner=runner("fork", max_workers=1))(both_paths)
    assert fn().get_result(WAIT) == "first/first"
    monkeypatch.setattr(sys.modules[__name__], "SHARED", "second")
    assert fn().get_result(WAIT) == "second/second"


def test_code_whose_file_is_gone_runs_and_its_traceback_names_the_file():
    namespace = {}
    exec(compile("def generated(x):\n    raise ValueError(x)\n", "/nonexistent/generated.py", "exec"), namespace)
    run = task(runner=runner("fork", max_workers=1))(namespace["generated"])("no source")
    exc = run.exception(WAIT)
    assert isinstance(exc, ValueError) and str(exc) == "no source"
    assert 'File "/nonexistent/generated.py", line 2, in generated' in exc.__cause__.tb_text


def test_container_checks_see_changes_and_treat_a_dict_changing_size_as_changed():
    class Resizing(dict):
        def __iter__(self):
            raise RuntimeError("dictionary changed size during iteration")

    key, value = "a", object()
    assert _fingerprint._same_dict({key: value}, ((key,), (value,))) is True
    assert _fingerprint._same_dict({key: object()}, ((key,), (value,))) is False  # compared by identity
    assert _fingerprint._same_dict(Resizing({key: value}), ((key,), (value,))) is False
    assert _fingerprint._still_empty([], None) is True and _fingerprint._still_empty([0], None) is False


def test_cloudpickle_rules_that_fail_fall_back_to_the_module_name(monkeypatch):
    def broken_rule(obj):
        raise TypeError("no rule for this")

    monkeypatch.setattr(_fingerprint, "_by_reference", broken_rule)
    main_class = type("InMain", (), {"__module__": "__main__"})
    assert _fingerprint._dynamic_class(main_class) is True and _fingerprint._dynamic_class(int) is False
    by_value = _fingerprint.by_value_rule(None)
    assert by_value(double) is False  # this test module: importable, so by reference
    main_function = types.FunctionType(double.__code__, {"__name__": "__main__"})
    main_function.__module__ = "__main__"
    assert by_value(main_function) is True


def test_without_cloudpickles_hooks_functions_pickle_as_cloudpickle_does(monkeypatch):
    from taskrun import _pickling

    monkeypatch.setattr(_pickling, "_CAN_CUSTOMISE", False)
    data, sources = _pickling.dumps_function(double, vars(sys.modules[__name__]))
    assert sources == {} and cloudpickle.loads(data)(4) == 8


def test_main_objects_without_a_main_module_and_main_references_of_what_cannot_be_pickled(monkeypatch):
    assert _functions.main_references_known(threading.Lock(), {}) is False
    monkeypatch.delitem(sys.modules, "__main__")
    assert _functions.main_objects() == {}


def test_the_protocol_dumps_what_pickle_cannot_with_cloudpickle():
    data = _protocol.dumps(lambda x: x + 1)
    assert cloudpickle.loads(data)(1) == 2
