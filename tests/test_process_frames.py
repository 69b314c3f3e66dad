"""Result frames from workers: the reader never blocks, keeps partial frames, and loses nothing.

The frame reader is tested on its own over an os.pipe fed in random chunk sizes; the pool
with pipes above fd 1024 (where select() cannot go), with a worker that pauses in the middle
of a big frame (the supervisor must go on serving others meanwhile), and with a worker that
dies in the middle of one (the complete outcomes before it must still arrive).
"""

import logging
import os
import random
import resource
import select
import struct
import threading

import pytest
from test_process_runner import WAIT, _no_child_processes, read_pid, runner, write_atomic  # noqa: F401

from taskrun import Status, WorkerDied, task
from taskrun.runners.process._protocol import FrameReader as _FrameReader


def frame(data, long_header=False):
    """``data`` framed as Connection.send_bytes frames it (the 12-byte header is its form for 2 GiB and more)."""
    if long_header:
        return struct.pack("!iQ", -1, len(data)) + data
    return struct.pack("!i", len(data)) + data


def read_frames(reader, expected_count, timeout=WAIT):
    """Read from ``reader`` whenever poll says so until ``expected_count`` frames or end of file."""
    poller = select.poll()
    poller.register(reader.fd, select.POLLIN)
    frames = []
    while len(frames) < expected_count and not reader.eof:
        if not poller.poll(timeout * 1000):
            raise AssertionError(f"no data for {timeout} s after {len(frames)} frames")
        got = reader.read()
        if got is not None:
            frames.extend(bytes(f) for f in got)
    return frames


def write_in_chunks(fd, data, rng, close=True):
    view = memoryview(data)
    while view:
        n = os.write(fd, view[: rng.choice([1, 2, 3, 7, 100, 4096, 65536, 200_000])])
        view = view[n:]
    if close:
        os.close(fd)


@pytest.mark.parametrize("seed", range(8))
def test_frames_split_at_random_come_out_whole_and_in_order(seed):
    rng = random.Random(seed)
    sizes = [0, 1, 3, 4, 100, 4095, 65_535, 65_536, 65_537, 70_000, 300_000, 1_500_000]
    messages = [rng.randbytes(rng.choice(sizes)) for _ in range(60)]
    long_form = {i for i in range(len(messages)) if rng.random() < 0.1}
    stream = b"".join(frame(m, i in long_form) for i, m in enumerate(messages))
    r, w = os.pipe()
    writer = threading.Thread(target=write_in_chunks, args=(w, stream, rng))
    writer.start()
    try:
        reader = _FrameReader(r)
        assert read_frames(reader, len(messages)) == messages
        assert read_frames(reader, 1) == []  # then the end of the pipe, and nothing more
        assert reader.eof
    finally:
        writer.join(WAIT)
        os.close(r)


def test_a_big_frame_is_filled_in_place_not_copied_per_read():
    """A 4 MB frame that arrives 64 KiB at a time is one bytearray filled by the reads, not rebuilt by each."""
    message = random.Random(1).randbytes(4 * 1024 * 1024)
    r, w = os.pipe()
    writer = threading.Thread(target=write_in_chunks, args=(w, frame(message), random.Random(2)))
    writer.start()
    try:
        reader = _FrameReader(r)
        poller = select.poll()
        poller.register(r, select.POLLIN)
        partial = None
        frames = []
        while not frames:
            assert poller.poll(WAIT * 1000)
            got = reader.read()
            if reader.frame is not None:
                partial = partial or reader.frame
                assert reader.frame is partial  # the same buffer all along
                assert len(reader.frame) == len(message)
            if got:
                frames = got
        assert frames[0] is partial and bytes(frames[0]) == message
    finally:
        writer.join(WAIT)
        os.close(r)


def test_a_read_with_nothing_there_returns_none_without_waiting():
    r, w = os.pipe()
    try:
        reader = _FrameReader(r)
        assert reader.read() is None
        os.write(w, frame(b"x" * 100_000)[:1000])  # the start of a big frame: kept, not waited for
        assert reader.read() == []
        assert reader.read() is None
        assert reader.frame is not None and reader.filled == 996
    finally:
        os.close(r)
        os.close(w)


def test_a_writer_that_dies_mid_frame_loses_only_that_frame():
    """Whole frames before the cut all come out, in the same read as the start of the cut one."""
    r, w = os.pipe()
    try:
        os.write(w, frame(b"one") + frame(b"two") + frame(b"three") + frame(b"y" * 200_000)[:5000])
        os.close(w)
        reader = _FrameReader(r)
        assert [bytes(f) for f in reader.read()] == [b"one", b"two", b"three"]
        assert reader.read() == []
        assert reader.eof and reader.frame is None
    finally:
        os.close(r)


# ---- the pool ------------------------------------------------------------------------------


def big_result(size):
    return bytes(range(256)) * (size // 256)


@pytest.fixture
def fds_above_1024():
    """Open enough file descriptors that the pool's pipes come after fd 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 1200
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {needed}: cannot open fds above 1024")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    opened = []
    try:
        while True:
            fd = os.open(os.devnull, os.O_RDONLY)
            opened.append(fd)
            if fd > 1030:
                break
        yield
    finally:
        import taskrun

        taskrun.shutdown(wait=False)  # the pools' pipes go before the limit is restored
        for fd in opened:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_multi_mb_result_through_pipes_above_fd_1024(method, fds_above_1024):
    R = runner(method, max_workers=1)
    size = 8 * 1024 * 1024
    run = task(runner=R)(big_result)(size)
    data = run.get_result(timeout=WAIT)
    pool = R._pool()
    assert all(w.result_r.fileno() > 1024 for w in pool.workers)
    assert len(data) == size and data[-1] == 255 and data[12345] == 12345 % 256
    assert run.status is Status.SUCCEEDED


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def result_sent_in_two_parts(started, fifo, size):
    """Return ``size`` bytes; the worker writes half of that result's frame, waits for the fifo, then the rest."""
    from taskrun.runners.process import _protocol as _worker

    original = _worker.Sender.send

    def send(self, message):
        _worker.Sender.send = original
        data = frame(_worker.dumps(message))
        half = len(data) // 2
        with self.lock:
            _write_all(self.fd, data[:half])
            write_atomic(started, "1")
            with open(fifo, "rb") as f:
                f.read(1)
            _write_all(self.fd, data[half:])

    _worker.Sender.send = send
    return b"z" * size


def double(x):
    return 2 * x


def test_the_supervisor_serves_other_workers_while_a_big_frame_is_half_written(tmp_path):
    """The rest of a frame is read when it comes, never waited for: the pool does not stall meanwhile."""
    R = runner("fork", max_workers=2)
    started, fifo = tmp_path / "started", tmp_path / "fifo"
    os.mkfifo(fifo)
    slow = task(runner=R)(result_sent_in_two_parts)(str(started), str(fifo), 3_000_000)
    try:
        read_pid(started)
        results = []
        caller = threading.Thread(target=lambda: results.append(task(runner=R)(double)(21).get_result(WAIT)))
        caller.start()
        caller.join(10)
        assert results == [42], "a call on the other worker did not finish while a frame was half read"
    finally:
        with open(fifo, "wb") as f:
            f.write(b"x")
    assert slow.get_result(WAIT) == b"z" * 3_000_000
    caller.join(WAIT)


def hold_outcomes(started, fifo):
    """From now on the worker keeps its outcomes instead of sending them (see die_mid_frame).

    It waits for the test to queue the calls behind it, then logs: the log record (sent as
    usual) wakes the parent's supervisor, which sends the queued calls to this worker.
    """
    from taskrun.runners.process import _protocol as _worker

    original = _worker.Sender.send
    held = _worker._held_for_test = []

    def keep(self, message):
        if message[0] == _worker.LOG:
            original(self, message)
            return
        _worker._held_fd_for_test = self.fd
        held.append(message)

    _worker.Sender.send = keep
    write_atomic(started, str(os.getpid()))
    with open(fifo, "rb") as f:
        f.read(1)
    logging.getLogger("tests.frames").warning("the calls behind me may come")
    return "held"


def die_mid_frame():
    """Write every held outcome and the start of a big frame in one go, then die."""
    from taskrun.runners.process import _protocol as _worker

    data = b"".join(frame(_worker.dumps(message)) for message in _worker._held_for_test)
    data += frame(b"x" * 300_000)[:2000]
    _write_all(_worker._held_fd_for_test, data)
    os._exit(7)


def record(path, value):
    with open(path, "a") as f:
        f.write(f"{value}\n")
    return value


def test_a_worker_that_dies_mid_frame_still_delivers_the_outcomes_before_it(tmp_path):
    """Three outcomes and the start of a fourth reach the parent in one read, then the worker dies:
    the three succeed (and ran once), the fourth fails with WorkerDied, the calls behind it run elsewhere."""
    R = runner("fork", max_workers=1)
    log = tmp_path / "log"
    rec, twice = task(runner=R)(record), task(runner=R)(double)
    twice.map(range(300)).results(timeout=WAIT)  # calls are short here: they are sent ahead
    started, fifo = tmp_path / "started", tmp_path / "fifo"
    os.mkfifo(fifo)
    runs = [task(runner=R)(hold_outcomes)(str(started), str(fifo))]
    read_pid(started)
    runs += [rec(str(log), "a"), rec(str(log), "b"), task(runner=R)(die_mid_frame)()]
    behind = [twice(i) for i in range(40)]
    with open(fifo, "wb") as f:
        f.write(b"x")
    with pytest.raises(WorkerDied, match="exit code 7"):
        runs[3].get_result(WAIT)
    assert [r.get_result(WAIT) for r in runs[:3]] == ["held", "a", "b"]
    assert all(r.status is Status.SUCCEEDED and r.attempts == 1 for r in runs[:3])
    assert [r.get_result(WAIT) for r in behind] == [2 * i for i in range(40)]
    assert log.read_text().split() == ["a", "b"]  # nothing ran twice
