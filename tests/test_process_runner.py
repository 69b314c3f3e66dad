"""MultiprocessTaskRun: big results, stop, dead workers, pickling failures, remote tracebacks,
timeouts, pool limits, fresh processes, logging/warnings forwarding, threads and fork, configure().

Each behaviour runs under ``fork`` and ``spawn`` (forkserver gets a smoke test). Tasks tell
the test "I have started" by writing a file (atomically) that the test polls for with a
deadline. Every test ends with no child process left (see ``_no_child_processes``).
"""

import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter

import psutil
import pytest
from _waiting import is_alive, shared_helper_pids, wait_for

import taskrun
from taskrun import (
    MultiprocessTaskRun,
    SerializationError,
    Status,
    TaskStopped,
    TaskTimeout,
    WorkerDied,
    task,
)
from taskrun.errors import RemoteTraceback

WAIT = 30
METHODS = ["fork", "spawn"]


def runner(method, **settings):
    settings.setdefault("max_workers", 2)
    return MultiprocessTaskRun.configure(start_method=method, **settings)


# ---- helpers ------------------------------------------------------------------------------




def write_atomic(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_pid(path, timeout=WAIT):
    return int(wait_for(lambda: path.exists() and path.read_text(), timeout, f"{path.name} to be written"))


def _shared_helpers():
    return shared_helper_pids()


def leftover_children():
    shared = _shared_helpers()
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in shared]


@pytest.fixture(autouse=True)
def _no_child_processes():
    """After each test: shut the pools down; no process taskrun started (or its tasks started) is left."""
    yield
    taskrun.shutdown(wait=False)
    deadline = time.monotonic() + 5
    while leftover_children() and time.monotonic() < deadline:
        time.sleep(0.02)
    left = [(p.pid, p.name()) for p in leftover_children()]
    assert not left, f"child processes left after shutdown: {left}"


# ---- task bodies (module level: spawn workers import this module) -------------------------


def getpid():
    return os.getpid()


def double(x):
    return 2 * x


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


def big_bytes(size):
    return bytes(range(256)) * (size // 256)


def write_pid_then_sleep(path, seconds):
    write_atomic(path, str(os.getpid()))
    time.sleep(seconds)
    return "slept"


def ignore_sigterm_then_sleep(path):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    write_atomic(path, str(os.getpid()))
    time.sleep(30)


def exit_with(code):
    os._exit(code)


def kill_myself():
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)


def return_lock():
    return threading.Lock()


def return_generator():
    return (i for i in range(3))


class TwoArgError(Exception):
    """Its own pickle does not load: ``__init__`` needs two arguments, ``args`` holds one."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class LockedError(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


def raise_two_arg_error():
    raise TwoArgError("needs two", 7)


def raise_locked_error():
    raise LockedError("holds a lock")


class CustomError(Exception):
    pass


def _refuse_to_load():
    raise RuntimeError("this object cannot be loaded here")


class UnloadableArgument:
    """Pickles (by reference to a loader), but loading it fails, as a missing class would."""

    def __reduce__(self):
        return (_refuse_to_load, ())


def raise_value_error_in_worker(x):
    raise ValueError(f"bad value {x}")


def raise_custom_error_in_worker():
    raise CustomError("custom message")


def sleep_for(seconds):
    time.sleep(seconds)


def timed_sleep(seconds):
    start = time.time()
    time.sleep(seconds)
    return start, time.time(), os.getpid()


def start_sleep_child(path):
    child = subprocess.Popen(["sleep", "60"])
    write_atomic(path, str(child.pid))
    child.wait()


def log_from_worker(message):
    logging.getLogger("tests.process.forwarded").warning("from the worker: %s", message)
    return os.getpid()


def warn_from_worker(message):
    warnings.warn(f"careful: {message}", UserWarning, stacklevel=1)
    return os.getpid()


# ---- results and stop ----------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_100mb_result_comes_back_intact(method):
    size = 100 * 1024 * 1024
    run = task(runner=runner(method))(big_bytes)(size)
    data = run.get_result(timeout=WAIT)
    assert type(data) is bytes
    assert len(data) == size
    assert data[:256] == bytes(range(256))
    assert data[12_345_678] == 12_345_678 % 256
    assert data[-3:] == bytes([253, 254, 255])
    del data
    assert run.status is Status.SUCCEEDED


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fresh", [None, 1], ids=["reused", "fresh"])
def test_100mb_argument_reaches_the_worker_intact(method, fresh):
    data = bytes(range(256)) * (100 * 1024 * 1024 // 256)
    digest = task(runner=runner(method, max_tasks_per_worker=fresh))(sha256_hex)
    assert digest(data).get_result(timeout=WAIT) == hashlib.sha256(data).hexdigest()
    # Small calls after the big one: the worker is still reading its pipe message by message.
    assert digest.map([b"", b"x" * 70_000]).results(timeout=WAIT) == [
        hashlib.sha256(b"").hexdigest(), hashlib.sha256(b"x" * 70_000).hexdigest()
    ]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fresh", [None, 1], ids=["reused", "fresh"])
def test_stop_running_call_ends_worker_quickly_and_pool_goes_on(method, fresh, tmp_path):
    R = runner(method, max_workers=1, max_tasks_per_worker=fresh)
    sleeper = task(runner=R)(write_pid_then_sleep)
    run = sleeper(tmp_path / "pid", 30)
    pid = read_pid(tmp_path / "pid")
    assert run.status is Status.RUNNING
    began = time.monotonic()
    assert run.stop() is True
    wait_for(lambda: not is_alive(pid), 2 - (time.monotonic() - began), f"worker {pid} to end")
    assert time.monotonic() - began < 2
    assert run.status is Status.STOPPED
    with pytest.raises(TaskStopped):
        run.get_result(timeout=WAIT)
    assert run.stop() is False
    # the pool replaced the worker
    new_pid = task(runner=R)(getpid)().get_result(timeout=WAIT)
    assert new_pid != pid


STOP_RACE = """
import random, sys, time
from taskrun import MultiprocessTaskRun, task

@task(runner=MultiprocessTaskRun.configure(max_workers=1, start_method="fork"))
def short(i):
    time.sleep(0.001)
    return i

rng = random.Random(1)
for i in range(400):
    run = short(i)
    time.sleep(rng.uniform(0.0, 0.004))  # stop around the moment the call finishes
    run.stop()
    assert run.wait(20), f"run {i} did not end"
print("done")
"""


def test_stopping_calls_as_they_finish_never_wedges_the_pool():
    """stop() drains the worker's pipe from the caller's thread; the supervisor, woken for that
    data, must not then block reading an empty pipe (holding the pool's lock: every call hangs)."""
    result = subprocess.run([sys.executable, "-c", STOP_RACE], capture_output=True, text=True, timeout=40)
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr[-2000:]


@pytest.mark.parametrize("method", METHODS)
def test_a_call_stopped_at_once_does_not_wait_for_the_kill(method, tmp_path):
    """Stopped before its new worker made its process group: SIGTERM still reaches the worker."""
    sleeper = task(runner=runner(method, max_workers=1))(write_pid_then_sleep)
    began = time.monotonic()
    for i in range(6):
        run = sleeper(tmp_path / f"pid{i}", 30)
        assert run.stop() is True
    # SIGKILL only comes after a grace of 1 s per worker: 6 s or more if SIGTERM was lost
    assert time.monotonic() - began < 4


def test_stop_kills_a_worker_that_ignores_sigterm(tmp_path):
    run = task(runner=runner("fork", max_workers=1))(ignore_sigterm_then_sleep)(tmp_path / "pid")
    pid = read_pid(tmp_path / "pid")
    began = time.monotonic()
    assert run.stop() is True
    wait_for(lambda: not is_alive(pid), 2 - (time.monotonic() - began), f"worker {pid} to be killed")
    assert run.status is Status.STOPPED


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "body, args, exitcode, text",
    [(exit_with, (3,), 3, "exit code 3"), (kill_myself, (), -signal.SIGKILL, "SIGKILL")],
    ids=["os._exit", "SIGKILL"],
)
@pytest.mark.parametrize("fresh", [None, 2], ids=["reused", "fresh"])
def test_dead_worker_gives_worker_died_and_pool_goes_on(method, body, args, exitcode, text, fresh):
    """``fresh``: max_tasks_per_worker=2, so the call dies in a child the worker forked."""
    R = runner(method, max_workers=1, max_tasks_per_worker=fresh)
    run = task(runner=R)(body)(*args)
    with pytest.raises(WorkerDied, match=text) as info:
        run.get_result(timeout=WAIT)
    assert info.value.exitcode == exitcode
    assert run.status is Status.FAILED
    assert task(runner=R)(double)(21).get_result(timeout=WAIT) == 42


# ---- pickling ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("body, type_name", [(return_lock, "lock"), (return_generator, "generator")])
def test_unpicklable_result_gives_serialization_error(method, body, type_name):
    R = runner(method, max_workers=1)
    run = task(runner=R)(body)()
    with pytest.raises(SerializationError, match="result") as info:
        run.get_result(timeout=WAIT)
    assert type_name in str(info.value)
    assert run.status is Status.FAILED
    assert task(runner=R)(double)(4).get_result(timeout=WAIT) == 8  # the worker survived it


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "body, type_name, message",
    [(raise_locked_error, "LockedError", "holds a lock")],
)
def test_unpicklable_exception_gives_serialization_error(method, body, type_name, message):
    run = task(runner=runner(method))(body)()
    with pytest.raises(SerializationError) as info:
        run.get_result(timeout=WAIT)
    assert type_name in str(info.value)
    assert message in str(info.value)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert body.__name__ in cause.tb_text


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [threading.Lock(), (i for i in range(2))], ids=["lock", "generator"])
def test_unpicklable_argument_raises_at_call_time(method, bad):
    echo = task(runner=runner(method))(double)
    with pytest.raises(SerializationError, match="argument"):
        echo(bad)
    with pytest.raises(SerializationError, match="argument"):
        echo(x=bad)


@pytest.mark.parametrize("method", METHODS)
def test_exception_keeps_type_message_and_worker_traceback(method):
    R = runner(method)
    run = task(runner=R)(raise_value_error_in_worker)(7)
    with pytest.raises(ValueError) as info:
        run.get_result(timeout=WAIT)
    exc = info.value
    assert type(exc) is ValueError
    assert str(exc) == "bad value 7"
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "raise_value_error_in_worker" in exc.__cause__.tb_text
    assert "ValueError: bad value 7" in exc.__cause__.tb_text
    assert "raise_value_error_in_worker" in str(exc.__cause__)
    assert run.exception() is exc
    assert run.get_result(raise_exceptions=False) is exc

    custom = task(runner=R)(raise_custom_error_in_worker)()
    exc = custom.exception(timeout=WAIT)
    assert type(exc) is CustomError
    assert str(exc) == "custom message"
    assert "raise_custom_error_in_worker" in exc.__cause__.tb_text


@pytest.mark.parametrize("method", METHODS)
def test_an_exception_whose_init_takes_other_arguments_comes_back_as_itself(method):
    exc = task(runner=runner(method))(raise_two_arg_error)().exception(timeout=WAIT)
    assert type(exc) is TwoArgError
    assert str(exc) == "needs two" and exc.code == 7
    assert "raise_two_arg_error" in exc.__cause__.tb_text


@pytest.mark.parametrize("method", METHODS)
def test_arguments_the_worker_cannot_load_are_a_serialization_error(method):
    run = task(runner=runner(method))(len)(UnloadableArgument())
    with pytest.raises(SerializationError, match="arguments could not be unpickled in the worker process"):
        run.get_result(timeout=WAIT)


def test_instances_of_classes_from_a_python_c_main_reach_a_spawned_worker():
    """Notebook-like: the class lives only in this __main__, which a spawned worker cannot import."""
    script = (
        "from taskrun import MultiprocessTaskRun, task\n"
        "class Point:\n    def __init__(self, x):\n        self.x = x\n"
        "spawn = MultiprocessTaskRun.configure(start_method='spawn', max_workers=1)\n"
        "print(task(runner=spawn)(lambda p: p.x * 2)(Point(21)).get_result(timeout=60))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "42"


@pytest.mark.parametrize("method", METHODS)
def test_lambda_and_closure_defined_in_the_test(method):
    R = runner(method)
    factor = 3

    def times_factor(x):
        return x * factor

    square = task(runner=R, name="square")(lambda x: x * x)
    triple = task(runner=R)(times_factor)
    runs = [square(4), triple(5)]
    assert [r.get_result(timeout=WAIT) for r in runs] == [16, 15]


def test_forkserver_smoke():
    R = runner("forkserver")
    offset = 10
    add = task(runner=R)(lambda x: x + offset)
    assert add(5).get_result(timeout=WAIT) == 15
    run = task(runner=R)(raise_value_error_in_worker)(1)
    with pytest.raises(ValueError, match="bad value 1"):
        run.get_result(timeout=WAIT)
    pid = task(runner=R)(getpid)().get_result(timeout=WAIT)
    assert pid != os.getpid()


# ---- timeouts, limits, fresh processes ------------------------------------------------------


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_new_workers_start_up_does_not_count_against_the_timeout(method):
    """A spawned worker takes longer to start (about 0.2 s here) than this call may run."""
    run = task(runner=runner(method, max_workers=1), timeout=0.05)(os.getpid)()  # a builtin: nothing to import
    assert run.get_result(timeout=WAIT) > 0
    assert run.status is Status.SUCCEEDED and run.attempts == 1


@pytest.mark.parametrize("method", METHODS)
def test_timeout_with_retries_counts_attempts(method):
    run = task(runner=runner(method, max_workers=1), timeout=0.5, retries=2)(sleep_for)(30)
    began = time.monotonic()
    with pytest.raises(TaskTimeout):
        run.get_result(timeout=WAIT)
    assert run.attempts == 3
    assert run.status is Status.FAILED
    assert 1.5 <= time.monotonic() - began < 15


@pytest.mark.parametrize("method", METHODS)
def test_max_workers_bounds_concurrency(method):
    runs = [task(runner=runner(method, max_workers=2))(timed_sleep)(0.3) for _ in range(6)]
    spans = [r.get_result(timeout=WAIT) for r in runs]
    most = max(sum(1 for s, e, _ in spans if s <= start < e) for start, _, _ in spans)
    assert most == 2  # ran in parallel, never more than 2 at once
    assert len({pid for _, _, pid in spans}) <= 2


@pytest.mark.parametrize("method", METHODS)
def test_max_tasks_per_worker_1_gives_a_fresh_process_per_call(method):
    fresh = task(runner=runner(method, max_tasks_per_worker=1))(getpid)
    pids = [r.get_result(timeout=WAIT) for r in [fresh() for _ in range(4)]]
    assert len(set(pids)) == 4
    assert os.getpid() not in pids


def parent_pid() -> int:
    return os.getppid()


def test_fresh_processes_are_reaped_as_they_go():
    # One worker: each call runs in a child it forked. A finished child is reaped right after the
    # next one gets its go, so zombies never pile up, however many calls ran: at most the child
    # that just finished and, if the worker has not got to reaping it yet, the one before.
    fresh = task(runner=runner("fork", max_workers=1, max_tasks_per_worker=1))(parent_pid)
    zygotes = {fresh().get_result(timeout=WAIT) for _ in range(20)}
    assert len(zygotes) == 1
    zombies = [p for p in psutil.Process(zygotes.pop()).children() if p.status() == psutil.STATUS_ZOMBIE]
    assert len(zombies) <= 2


@pytest.mark.parametrize("method", METHODS)
def test_max_tasks_per_worker_3_reuses_a_process_at_most_3_times(method):
    limited = task(runner=runner(method, max_tasks_per_worker=3))(getpid)
    pids = [r.get_result(timeout=WAIT) for r in [limited() for _ in range(9)]]
    uses = Counter(pids)
    # 9 calls over 2 workers: one worker serves >= 5 of them, so some process is reused to the limit
    assert max(uses.values()) == 3
    assert len(uses) >= 3


@pytest.mark.parametrize("method", METHODS)
def test_stop_also_ends_processes_the_task_started(method, tmp_path):
    run = task(runner=runner(method, max_workers=1))(start_sleep_child)(tmp_path / "child")
    child = read_pid(tmp_path / "child")
    assert psutil.Process(child).name() == "sleep"
    assert run.stop() is True
    wait_for(lambda: not is_alive(child), 5, f"sleep child {child} to end")
    assert run.status is Status.STOPPED


# ---- logging and warnings -------------------------------------------------------------------


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.mark.parametrize("method", METHODS)
def test_logging_in_task_reaches_callers_handler(method):
    handler = ListHandler()
    target = logging.getLogger("tests.process.forwarded")
    target.addHandler(handler)
    try:
        run = task(runner=runner(method))(log_from_worker)("hello")
        worker_pid = run.get_result(timeout=WAIT)
    finally:
        target.removeHandler(handler)
    # the record is sent before the result on the same pipe, so it is here once the result is
    records = [r for r in handler.records if r.name == "tests.process.forwarded"]
    assert [r.getMessage() for r in records] == ["from the worker: hello"]
    assert records[0].levelno == logging.WARNING
    assert records[0].process == worker_pid != os.getpid()


def log_to_an_unpropagated_logger(message):
    logging.getLogger("tests.process.app.part").warning("from the worker: %s", message)


@pytest.mark.parametrize("method", METHODS)
def test_logging_to_a_logger_that_does_not_propagate_reaches_its_handler_only(method, capsys):
    """Regression: a worker inherits (fork) or sets up again (spawn's main module) an app logger with
    propagate=False; its records never reached the forwarder on the root logger, and Python's last-resort
    handler printed them to the worker's stderr instead of the caller's handler."""
    handler = ListHandler()
    app = logging.getLogger("tests.process.app")
    app.addHandler(handler)
    app.propagate = False  # before the pool starts: its workers are forked with it
    try:
        task(runner=runner(method))(log_to_an_unpropagated_logger)("hello").get_result(timeout=WAIT)
    finally:
        app.removeHandler(handler)
        app.propagate = True
    assert [r.getMessage() for r in handler.records] == ["from the worker: hello"]
    assert "from the worker" not in capsys.readouterr().err


@pytest.mark.parametrize("method", METHODS)
def test_warning_in_task_shows_up_in_caller(method):
    with pytest.warns(UserWarning, match="careful: watch out") as record:
        run = task(runner=runner(method))(warn_from_worker)("watch out")
        run.get_result(timeout=WAIT)
    assert any("careful: watch out" in str(w.message) for w in record)


@pytest.mark.parametrize("method", METHODS)
def test_warning_that_is_an_error_in_the_caller_is_logged_and_pool_goes_on(method, caplog):
    R = runner(method, max_workers=1)
    task(runner=R)(getpid)().get_result(timeout=WAIT)  # the worker starts under the default filters
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as under pytest -W error: only the caller's filters say so
        run = task(runner=R)(warn_from_worker)("as error")
        assert run.wait(WAIT), "the run never finished: the warning broke the pool"
        assert run.status is Status.SUCCEEDED
    assert task(runner=R)(double)(3).get_result(timeout=WAIT) == 6
    assert any("careful: as error" in r.getMessage() for r in caplog.records if r.name == "taskrun")


# ---- fork from a threaded process ---------------------------------------------------------


def test_fork_pool_while_other_threads_are_busy(tmp_path):
    stop = threading.Event()
    busy_log = logging.getLogger("tests.process.busy")
    busy_log.setLevel(logging.DEBUG)
    sink = logging.StreamHandler(open(os.devnull, "w"))  # closed below
    busy_log.addHandler(sink)
    shared_lock = threading.Lock()

    def busy():
        while not stop.is_set():
            busy_log.debug("tick %s", sum(range(200)))  # takes logging's and the handler's locks
            with shared_lock:
                pass

    threads = [threading.Thread(target=busy, name=f"busy-{i}", daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    try:
        R = runner("fork", max_workers=2)
        runs = [task(runner=R)(double)(i) for i in range(20)]
        assert [r.get_result(timeout=WAIT) for r in runs] == [2 * i for i in range(20)]
        # stop a running call: its replacement is forked while the threads are still busy
        sleeper = task(runner=R)(write_pid_then_sleep)(tmp_path / "pid", 30)
        read_pid(tmp_path / "pid")
        assert sleeper.stop() is True
        fresh = task(runner=runner("fork", max_workers=2, max_tasks_per_worker=1))(double)
        runs = [task(runner=R)(double)(i) for i in range(10)] + [fresh(i) for i in range(4)]
        assert [r.get_result(timeout=WAIT) for r in runs] == [2 * i for i in range(10)] + [0, 2, 4, 6]
    finally:
        stop.set()
        for t in threads:
            t.join(WAIT)
        busy_log.removeHandler(sink)
        sink.stream.close()
    assert not any(t.is_alive() for t in threads)


def test_finished_runs_are_freed_without_the_garbage_collector():
    """No reference cycle through the pool's bookkeeping: a map of 20,000 calls does not
    leave 20,000 cyclic handles for the garbage collector to find."""
    import gc
    import weakref

    twice = task(runner=runner("fork"))(double)
    twice(0).get_result(WAIT)  # the pool exists
    gc.collect()
    gc.disable()
    try:
        group = twice.map(range(50))
        results = group.results(timeout=WAIT)
        refs = [weakref.ref(run) for run in group]
        del group
        # The supervisor may still be returning from handing over the last results.
        wait_for(lambda: all(ref() is None for ref in refs), 5, "the finished runs to be freed without the GC")
    finally:
        gc.enable()
    assert results == [2 * i for i in range(50)]


# ---- as a base class, configure() ------------------------------------------------------------

prepared = []


class CountingRun(MultiprocessTaskRun):
    """A custom runner built on the process runner: counts the calls it prepares."""

    def prepare(self):
        prepared.append(self.id)
        super().prepare()


def test_multiprocess_runner_as_custom_runner_base():
    prepared.clear()
    R = CountingRun.configure(start_method="fork", max_workers=1)
    assert issubclass(R, CountingRun) and issubclass(R, MultiprocessTaskRun)
    assert R.start_method == "fork" and R.max_workers == 1
    assert CountingRun.configure(start_method="fork", max_workers=1) is R
    doubled = task(runner=R, retries=1)(double)
    runs = [doubled(i) for i in range(3)]
    assert [r.get_result(timeout=WAIT) for r in runs] == [0, 2, 4]
    assert all(isinstance(r, CountingRun) for r in runs)
    assert prepared == [r.id for r in runs]
    assert task(runner=CountingRun.configure(start_method="spawn", max_workers=1))(getpid)().get_result(
        timeout=WAIT
    ) != os.getpid()


def test_settings_read_their_defaults_on_the_class():
    assert MultiprocessTaskRun.max_workers == (os.cpu_count() or 1)
    assert MultiprocessTaskRun.start_method == "fork"  # on Linux
    assert MultiprocessTaskRun.max_tasks_per_worker is None
    defaults = {"start_method": "fork", "max_workers": os.cpu_count() or 1, "max_tasks_per_worker": None}
    assert MultiprocessTaskRun.settings == defaults


def test_configure_rejects_bad_settings():
    with pytest.raises(TypeError, match="bogus"):
        MultiprocessTaskRun.configure(bogus=1)
    with pytest.raises(TypeError, match="bogus"):
        CountingRun.configure(start_method="fork", bogus=1)
    with pytest.raises(ValueError, match="threads"):
        MultiprocessTaskRun.configure(start_method="threads")
    with pytest.raises(ValueError, match="max_workers"):
        MultiprocessTaskRun.configure(max_workers=0)
    with pytest.raises(TypeError, match="max_tasks_per_worker"):
        MultiprocessTaskRun.configure(max_tasks_per_worker=1.5)
    assert MultiprocessTaskRun.start_method == "fork"  # configure() never changes the base class


@pytest.mark.timing
def test_a_long_call_does_not_hold_queued_calls_behind_it():
    """Calls that take a while go to workers one at a time: the worker on the long call takes no backlog."""
    slow_runner = runner("fork")

    @task(runner=slow_runner)
    def nap(seconds):
        time.sleep(seconds)
        return os.getpid()

    nap(0.05).get_result(WAIT)  # one measured call: the pool now knows calls here take a while
    pids = nap.map([1.0] + [0.05] * 19).results(timeout=WAIT)
    long_call_pid = pids[0]
    assert pids.count(long_call_pid) <= 2, f"the worker busy with the long call also ran {pids.count(long_call_pid) - 1} others"


def block_on_fifo(started, fifo):
    """Say "started", then block until the test writes a byte to the named pipe."""
    write_atomic(started, str(os.getpid()))
    with open(fifo, "rb") as f:
        f.read(1)
    return "released"


@pytest.mark.timing
def test_calls_sent_ahead_stay_pending_until_the_worker_gets_to_them(tmp_path):
    one = runner("fork", max_workers=1)
    gated, tiny = task(runner=one)(block_on_fifo), task(runner=one)(double)
    tiny.map(range(300)).results(timeout=WAIT)  # the pool has seen calls are short: it sends them ahead
    started_a, fifo_a, started_b, fifo_b = (tmp_path / name for name in ("started_a", "fifo_a", "started_b", "fifo_b"))
    os.mkfifo(fifo_a)
    os.mkfifo(fifo_b)
    holder = gated(str(started_a), str(fifo_a))  # occupies the worker while the rest queue in the parent
    read_pid(started_a)
    first = gated(str(started_b), str(fifo_b))
    queued = [tiny(i) for i in range(3)]
    with open(fifo_a, "wb") as f:
        f.write(b"x")  # the worker is free: the backlog goes out in one batch, `first` in front
    assert holder.get_result(WAIT) == "released"
    read_pid(started_b)
    pool = one._pool()
    assert sum(len(w.in_flight) for w in pool.workers) == 4  # first and the three queued behind it
    assert first.status is Status.RUNNING
    assert all(run.status is Status.PENDING and run.attempts == 0 and run.started_at is None for run in queued)
    released_at = time.time()
    with open(fifo_b, "wb") as f:
        f.write(b"x")
    assert first.get_result(WAIT) == "released"
    assert [run.get_result(WAIT) for run in queued] == [0, 2, 4]
    for run in queued:
        assert run.started_at >= released_at, "a call sent ahead counted its time in the queue as running"
        assert run.duration < 1.0


def test_a_cold_pool_sends_calls_one_at_a_time(tmp_path):
    """Before any call has come back, the pool cannot know calls are short: none waits behind a long one."""
    two = runner("fork")
    gated, tiny = task(runner=two)(block_on_fifo), task(runner=two)(double)
    started, fifo = tmp_path / "started", tmp_path / "fifo"
    os.mkfifo(fifo)
    runs = [gated(str(started), str(fifo))] + [tiny(i) for i in range(5)]
    try:
        assert [run.get_result(WAIT) for run in runs[1:]] == [0, 2, 4, 6, 8]  # the other worker did them all
        # Still running: its worker's "ready" may reach the parent after the other worker's results.
        wait_for(lambda: runs[0].status is Status.RUNNING, WAIT, "the gated call to be running")
        assert not runs[0].done()
    finally:
        read_pid(started)
        with open(fifo, "wb") as f:
            f.write(b"x")
    assert runs[0].get_result(WAIT) == "released"


def start_inner_call_and_return(path):
    """A task that fires a call of another process task and returns before that call has finished."""

    @task(runner=MultiprocessTaskRun.configure(max_workers=1, start_method="fork"))
    def write_later(target):
        time.sleep(0.5)  # the work: still under way when the outer call has returned
        write_atomic(target, "written")

    write_later(path)
    return "returned"


def test_a_worker_lets_the_calls_its_tasks_started_finish_before_it_ends(tmp_path):
    """A worker ends like a process does: its own pools finish their calls (atexit does not run there)."""
    target = tmp_path / "inner"
    outer = task(runner=runner("fork", max_workers=1))(start_inner_call_and_return)
    assert outer(str(target)).get_result(WAIT) == "returned"
    taskrun.shutdown()  # ends the outer worker, which first lets its inner call finish
    assert target.read_text() == "written"


def test_waiting_inside_a_done_callback_raises_instead_of_hanging():
    """A callback on the pool's thread that waits for another run of the pool would block it for good."""
    one_worker = runner("fork", max_workers=1)

    @task(runner=one_worker)
    def nap(x):
        time.sleep(0.3)  # long enough that the callback below is registered before the run ends
        return x

    seen = []

    def callback(run):
        try:
            seen.append(nap(3).get_result(WAIT))
        except RuntimeError as exc:
            seen.append(exc)

    first = nap(1)
    first.add_done_callback(callback)
    assert first.get_result(WAIT) == 1
    wait_for(lambda: seen, WAIT, "the callback")
    assert isinstance(seen[0], RuntimeError) and "done callback" in str(seen[0])
    assert nap(4).get_result(WAIT) == 4  # the pool still serves


def fail_on_odd(x):
    if x % 2:
        raise ValueError(f"odd {x}")
    return x


def test_calls_whose_start_and_end_are_read_together_have_a_start_and_a_duration():
    """A worker's results often arrive many to a read; a call the parent never saw start still gets its times."""
    quick = task(runner=runner("fork", max_workers=1))(fail_on_odd)
    before = time.time()
    group = quick.map(range(2000))
    group.wait(WAIT)
    after = time.time()
    assert group.summary()["succeeded"] == 1000 and group.summary()["failed"] == 1000
    for run in group:
        assert run.started_at is not None and run.finished_at is not None, run
        assert before <= run.started_at <= run.finished_at <= after, run
        assert run.attempts == 1
    assert isinstance(group[1].exception(), ValueError)
