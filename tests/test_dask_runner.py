"""DaskTaskRun on a real dask.distributed cluster (extra ``taskrun[dask]``).

Most tests share one module-scoped ``LocalCluster`` (conftest ``dask_client``: 2 worker
processes, 1 thread each, no dashboard, 1 GiB each) through a ``client=`` runner; one test
starts the runner's own local cluster, and one connects by address to a scheduler and two
workers started with the ``dask`` command, as a real cluster runs. Tasks say "I have
started" by writing a file that the test waits for, with a deadline. Everything skips, saying
why, only when the extra is missing.
"""

from __future__ import annotations

import asyncio
import linecache
import logging
import multiprocessing.resource_tracker
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from _dask_bodies import log_then_hang
from _waiting import is_alive, wait_for

import taskrun
from taskrun import (
    Ledger,
    SerializationError,
    Status,
    TaskrunError,
    TaskStopped,
    TaskTimeout,
    UpstreamFailed,
    WorkerDied,
    task,
)
from taskrun.errors import RemoteTraceback

WAIT = 30
HERE = pathlib.Path(__file__).resolve().parent


# ---- task bodies (module level: the workers import this module) -----------------------------


def write_atomic(path, text=""):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def add(x, y=0):
    return x + y


def echo(value):
    return value


def fail_with(message):
    raise ValueError(message)


class NeedsTwo(Exception):
    def __init__(self, a, b):
        super().__init__(f"needs {a} and {b}")
        self.a = a


def raise_needs_two():
    raise NeedsTwo(1, 2)


class NoSuchPath(OSError):
    def __init__(self, path):
        super().__init__(2, "no such path", path)


def return_a_lock():
    return threading.Lock()


def count_run(path, value=None):
    """Append a line to ``path`` (one per execution, on any worker), then return ``value``."""
    with open(path, "a") as f:
        f.write("run\n")
    return value


def runs_of(path):
    path = pathlib.Path(path)
    return len(path.read_text().splitlines()) if path.exists() else 0


def fail_first(path, failures, exc_type=OSError):
    count_run(path)
    if runs_of(path) <= failures:
        raise exc_type(f"failure {runs_of(path)}")
    return "ok"


def wait_for_file(started, gate, value=None):
    """Say "started", then wait (at most WAIT s) for the ``gate`` file."""
    write_atomic(started, str(os.getpid()))
    deadline = time.monotonic() + WAIT
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


def poll_stop_requested(started, seen, seconds=WAIT):
    """Say "started", then poll taskrun.stop_requested() and write ``seen`` once it is True."""
    write_atomic(started, str(os.getpid()))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if taskrun.stop_requested():
            write_atomic(seen, "stop requested")
            return "saw it"
        time.sleep(0.01)
    return "never told"


def watch_own_stop_event(started, seen):
    """Say "started", then poll the distributed.Event that stop() sets for this attempt."""
    from distributed import Event, get_worker

    event = Event(f"taskrun-stop-{get_worker().get_current_task()}")
    write_atomic(started, "")
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if event.is_set():
            write_atomic(seen, "event set")
            return
        time.sleep(0.02)


def start_grandchild_then_sleep(path):
    """Start a subprocess, write "<own pid> <its pid>", then sleep: a stop must end both."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    write_atomic(path, f"{os.getpid()} {child.pid}")
    time.sleep(60)


def sleep_and_say(path, seconds):
    write_atomic(path, str(os.getpid()))
    time.sleep(seconds)
    return "slept"


def exit_with(code):
    os._exit(code)


def log_warning(name, text):
    logging.getLogger(name).warning("from the worker: %s", text)
    return text


async def async_add(x, y):
    await asyncio.sleep(0.01)
    return x + y


FACTOR = 3
ITEMS = [1]


def helper(v):
    return v * FACTOR


def scaled(v):
    return helper(v), list(ITEMS)


@pytest.mark.parametrize("isolate", ["thread", "process"])
def test_a_call_sees_the_functions_globals_closure_and_helpers_as_they_are_when_made(dask_client, isolate,
                                                                                      monkeypatch):
    """Regression: the function was pickled at its first call and that pickle reused for good, so a rebound
    global, a redefined helper or an appended item never reached the workers (API.md: under every runner)."""
    from taskrun import DaskTaskRun

    runner = DaskTaskRun.configure(client=dask_client, isolate=isolate)
    t = task(runner=runner)(scaled)
    module = sys.modules[__name__]
    assert t(2).get_result(timeout=WAIT) == (6, [1])
    monkeypatch.setattr(module, "FACTOR", 10)
    assert t(2).get_result(timeout=WAIT) == (20, [1])
    monkeypatch.setattr(module, "ITEMS", [1])  # restored at the end, as the module had it
    module.ITEMS.append(2)
    assert t(2).get_result(timeout=WAIT) == (20, [1, 2])
    monkeypatch.setattr(module, "helper", lambda v: -v)
    assert t(2).get_result(timeout=WAIT) == (-2, [1, 2])

    def counter_task():
        count = 0

        def bump():
            return count

        def set_count(value):
            nonlocal count
            count = value

        return bump, set_count

    bump, set_count = counter_task()
    counted = task(runner=runner)(bump)
    assert counted().get_result(timeout=WAIT) == 0
    set_count(5)
    assert counted().get_result(timeout=WAIT) == 5  # the closure as it is now


async def forgets_to_await(x, y):
    return async_add(x, y)  # a coroutine, not its value


def by_value_failure():
    """A function defined in a test: cloudpickle sends it by value (its code), as it does those of a main script."""

    def fail_here(text):
        raise ValueError(text)  # the line the traceback must show

    return fail_here


def worker_pid():
    """The pid of the Dask worker running this (its parent, in an isolated attempt's child process)."""
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return os.getppid()
    return os.getpid()


def http_ports():
    """The ports of the HTTP servers of the scheduler and of each worker, as the scheduler lists them."""
    from distributed import get_client

    info = get_client().scheduler_info()
    return [info["services"]["dashboard"], *(w["services"]["dashboard"] for w in info["workers"].values())]


def dask_dependencies(value):
    """The value, and the keys of the Dask tasks this one depended on (as the worker saw them)."""
    from distributed import get_worker

    worker = get_worker()
    state = worker.state.tasks[worker.get_current_task()]
    return value, sorted(str(dep.key) for dep in state.dependencies)


def interval(path, seconds):
    """Record when this call ran, as "start end" on a line of ``path``."""
    start = time.time()
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"{start} {time.time()}\n")


# ---- helpers ---------------------------------------------------------------------------------


def taskrun_keys_on_scheduler(client):
    return client.run_on_scheduler(
        lambda dask_scheduler: [str(k) for k in dask_scheduler.tasks if str(k).startswith("taskrun-")]
    )


def taskrun_plugins_on_scheduler(client):
    return client.run_on_scheduler(
        lambda dask_scheduler: [name for name in dask_scheduler.worker_plugins if name.startswith("taskrun-fn-")]
    )


def read_pids(path):
    return [int(p) for p in wait_for(lambda: path.exists() and path.read_text(), WAIT, path.name).split()]


# ---- results and errors ----------------------------------------------------------------------


def test_results_of_every_kind(dask_runner):
    t = task(runner=dask_runner)(add)
    assert t(2, y=3).get_result(timeout=WAIT) == 5
    assert t([1], [2]).get_result(timeout=WAIT) == [1, 2]  # arguments pickled by taskrun
    assert t("a", "b").get_result(timeout=WAIT) == "ab"  # plain arguments, passed to Dask as they are
    e = task(runner=dask_runner)(echo)
    for value in (None, 0, "", [], False, {"k": (1, 2.5)}):
        run = e(value)
        assert run.get_result(timeout=WAIT) == value
        assert run.status is Status.SUCCEEDED and not run.cached and run.attempts == 1
    big = os.urandom(5 * 1024 * 1024)
    assert e(big).get_result(timeout=WAIT) == big


def test_a_failure_is_the_task_exception_with_the_workers_traceback(dask_runner):
    run = task(runner=dask_runner)(fail_with)("boom 42")
    with pytest.raises(ValueError, match="^boom 42$") as info:
        run.get_result(timeout=WAIT)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "fail_with" in cause.tb_text and 'raise ValueError(message)' in cause.tb_text
    assert run.status is Status.FAILED and run.attempts == 1
    assert run.get_result(raise_exceptions=False) is run.exception()


@pytest.mark.parametrize("isolate", ["thread", "process"])
def test_an_exception_whose_pickle_does_not_load_keeps_type_message_and_attributes(dask_client, isolate):
    """Regression (isolate="process"): the rebuilt exception named the child's bare `_outcome` module, which the
    caller cannot import: a SerializationError came back instead of the task's exception."""
    from taskrun import DaskTaskRun

    runner = DaskTaskRun.configure(client=dask_client, isolate=isolate)
    run = task(runner=runner)(raise_needs_two)()
    with pytest.raises(NeedsTwo, match="needs 1 and 2") as info:
        run.get_result(timeout=WAIT)
    assert info.value.a == 1

    def missing():
        raise NoSuchPath("/nowhere")

    with pytest.raises(NoSuchPath) as info:
        task(runner=runner)(missing)().get_result(timeout=WAIT)
    assert (info.value.errno, info.value.filename, str(info.value)) == (2, "/nowhere", "[Errno 2] no such path: '/nowhere'")


def test_arguments_that_cannot_be_pickled_fail_at_the_call(dask_runner):
    t = task(runner=dask_runner)(echo)
    with pytest.raises(SerializationError, match="could not be pickled"):
        t(threading.Lock())


def test_a_result_that_cannot_be_pickled_fails_naming_its_type(dask_runner):
    run = task(runner=dask_runner)(return_a_lock)()
    with pytest.raises(SerializationError, match="lock") as info:
        run.get_result(timeout=WAIT)
    assert "could not be pickled" in str(info.value)


@pytest.mark.parametrize("isolate", ["thread", "process"])
def test_an_async_def_task_runs_to_completion_on_the_worker(dask_client, isolate, recwarn):
    from taskrun import DaskTaskRun

    runner = DaskTaskRun.configure(client=dask_client, isolate=isolate)
    assert task(runner=runner)(async_add)(2, 3).get_result(timeout=WAIT) == 5  # its value, never a coroutine
    assert task(runner=runner)(forgets_to_await)(2, 3).get_result(timeout=WAIT) == 5  # ...even if it returns one
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


@pytest.mark.parametrize("isolate", ["thread", "process"])
def test_tracebacks_of_code_sent_by_value_name_its_file_line_and_source(dask_client, isolate):
    from taskrun import DaskTaskRun

    runner = DaskTaskRun.configure(client=dask_client, isolate=isolate)
    fn = by_value_failure()
    line = fn.__code__.co_firstlineno + 1
    with pytest.raises(ValueError, match="from a test") as info:
        task(runner=runner)(fn)("from a test").get_result(timeout=WAIT)
    tb_text = info.value.__cause__.tb_text
    assert f'File "{__file__}", line {line}, in fail_here' in tb_text, tb_text
    assert "raise ValueError(text)  # the line the traceback must show" in tb_text
    # Code whose file the workers cannot read (a notebook cell): its lines travel along.
    source = "def from_a_cell(x):\n    return 1 / x  # in the cell\n"
    filename = str(HERE / "no-such-dir" / f"cell-{isolate}.py")
    namespace = {"__name__": "__main__"}
    exec(compile(source, filename, "exec"), namespace)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    try:
        with pytest.raises(ZeroDivisionError) as info:
            task(runner=runner)(namespace["from_a_cell"])(0).get_result(timeout=WAIT)
    finally:
        del linecache.cache[filename]
    tb_text = info.value.__cause__.tb_text
    assert f'File "{filename}", line 2, in from_a_cell' in tb_text and "return 1 / x  # in the cell" in tb_text, tb_text


def test_the_function_goes_once_per_client_and_every_attempt_is_a_new_dask_task(dask_runner, dask_client, tmp_path):
    counter = tmp_path / "runs"
    t = task(runner=dask_runner)(count_run)
    runs = [t(str(counter), 7) for _ in range(4)]  # identical calls: Dask must not merge them
    assert [run.get_result(timeout=WAIT) for run in runs] == [7] * 4
    assert runs_of(counter) == 4
    assert len(taskrun_plugins_on_scheduler(dask_client)) == 1
    taskrun.shutdown()
    assert taskrun_plugins_on_scheduler(dask_client) == []  # the user's cluster is left as it was
    assert dask_client.status == "running"  # and the user's client open


# ---- where it runs, when it starts -----------------------------------------------------------


def test_a_queued_call_is_pending_and_its_timeout_counts_from_its_start_on_a_worker(dask_runner, tmp_path):
    gate = tmp_path / "gate"
    blocker = task(runner=dask_runner, name="blocker")(wait_for_file)
    blockers = [blocker(str(tmp_path / f"b{i}"), str(gate)) for i in range(2)]  # both worker threads busy
    for i in range(2):
        wait_for(lambda i=i: (tmp_path / f"b{i}").exists(), WAIT, f"blocker {i} to start")
    wait_for(lambda: all(b.status is Status.RUNNING for b in blockers), WAIT, "the blockers to be seen running")
    queued = task(runner=dask_runner, timeout=0.5)(echo)("queued")
    assert not queued.wait(1.0)  # twice its timeout in the queue: not an overrun
    assert queued.status is Status.PENDING and queued.started_at is None
    before = time.time()
    gate.write_text("")
    assert queued.get_result(timeout=WAIT) == "queued"
    assert queued.started_at >= before - 0.5  # when it began on the worker, not when it was queued
    for b in blockers:
        b.get_result(timeout=WAIT)


def test_a_running_call_is_running_with_its_start_time(dask_runner, tmp_path):
    gate = tmp_path / "gate"
    before = time.time()
    run = task(runner=dask_runner)(wait_for_file)(str(tmp_path / "started"), str(gate), "done")
    wait_for(lambda: (tmp_path / "started").exists(), WAIT, "the call to start")
    wait_for(lambda: run.status is Status.RUNNING, WAIT, "the run to turn RUNNING")
    assert before <= run.started_at <= time.time()
    assert "running" in repr(run)
    gate.write_text("")
    assert run.get_result(timeout=WAIT) == "done"
    assert run.duration is not None and run.duration >= 0


# ---- stop --------------------------------------------------------------------------------------


def test_stop_marks_the_run_stopped_at_once_and_the_task_sees_stop_requested(dask_runner, tmp_path):
    started, seen = tmp_path / "started", tmp_path / "seen"
    run = task(runner=dask_runner)(poll_stop_requested)(str(started), str(seen))
    wait_for(started.exists, WAIT, "the call to start")
    assert run.stop() is True
    assert run.status is Status.STOPPED  # at once, not when the worker thread returns
    with pytest.raises(TaskStopped):
        run.get_result(timeout=0)
    wait_for(seen.exists, WAIT, "taskrun.stop_requested() to turn True in the worker")
    assert run.stop() is False


def test_a_stopped_attempt_that_runs_on_in_its_worker_is_said_to_once(dask_runner, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="taskrun")
    said = []
    for i in range(2):
        started, seen = tmp_path / f"started{i}", tmp_path / f"seen{i}"
        run = task(runner=dask_runner)(poll_stop_requested)(str(started), str(seen))
        wait_for(started.exists, WAIT, "the call to start")
        wait_for(lambda run=run: run.status is Status.RUNNING, WAIT, "the run to turn RUNNING")
        run.stop()
        wait_for(seen.exists, WAIT, "the task to see the stop and return")
        said += [r for r in caplog.records if "runs on there until it returns" in r.getMessage() and run.id in r.getMessage()]
    assert len(said) == 2, [r.getMessage() for r in said]
    assert 'isolate="process"' in said[0].getMessage() and "tcp://" in said[0].getMessage()
    assert [r.levelno for r in said].count(logging.WARNING) <= 1  # a WARNING once (per cluster), then DEBUG
    assert said[1].levelno == logging.DEBUG


def test_runs_stopped_by_a_shutdown_are_not_said_to_run_on(dask_client, tmp_path, caplog):
    """A shutdown (taskrun.shutdown(wait=False), or the exit after an uncaught exception) stops every run: no
    warning for each, as if the user had stopped it."""
    from taskrun import DaskTaskRun

    caplog.set_level(logging.DEBUG, logger="taskrun")
    runner = DaskTaskRun.configure(client=dask_client, isolate="thread")
    started, seen = tmp_path / "started", tmp_path / "seen"
    run = task(runner=runner)(poll_stop_requested)(str(started), str(seen))
    wait_for(started.exists, WAIT, "the call to start")
    wait_for(lambda: run.status is Status.RUNNING, WAIT, "the run to turn RUNNING")
    runner.shutdown(wait=False)
    assert run.status is Status.STOPPED
    assert not [r for r in caplog.records if "runs on there until it returns" in r.getMessage()]
    wait_for(seen.exists, WAIT, "the task to see the stop and return")


def test_stop_sets_the_attempts_distributed_event(dask_runner, tmp_path):
    started, seen = tmp_path / "started", tmp_path / "seen"
    run = task(runner=dask_runner)(watch_own_stop_event)(str(started), str(seen))
    wait_for(started.exists, WAIT, "the call to start")
    wait_for(lambda: run.status is Status.RUNNING, WAIT, "the run to turn RUNNING")
    run.stop()
    assert wait_for(seen.exists, WAIT, "the stop Event to be set")


def test_stop_of_a_queued_call_means_it_never_runs(dask_runner, tmp_path):
    gate = tmp_path / "gate"
    blocker = task(runner=dask_runner, name="blocker")(wait_for_file)
    blockers = [blocker(str(tmp_path / f"b{i}"), str(gate)) for i in range(2)]
    for i in range(2):
        wait_for(lambda i=i: (tmp_path / f"b{i}").exists(), WAIT, f"blocker {i} to start")
    counter = tmp_path / "queued-ran"
    queued = task(runner=dask_runner)(count_run)(str(counter))
    assert queued.stop() is True
    assert queued.status is Status.STOPPED and queued.attempts == 0
    gate.write_text("")
    for b in blockers:
        b.get_result(timeout=WAIT)
    after = task(runner=dask_runner)(count_run)(str(tmp_path / "after"))  # the workers are free again
    after.get_result(timeout=WAIT)
    assert runs_of(counter) == 0


def test_stop_with_process_isolation_ends_the_attempts_process_group(dask_client, tmp_path):
    from taskrun import DaskTaskRun

    isolated = DaskTaskRun.configure(client=dask_client, isolate="process")
    path = tmp_path / "pids"
    run = task(runner=isolated)(start_grandchild_then_sleep)(str(path))
    child, grandchild = read_pids(path)
    worker_pids = {p.pid for p in psutil.Process().children(recursive=True)} - {child, grandchild}
    assert psutil.Process(child).ppid() in worker_pids  # a child of its worker process
    assert run.stop() is True
    assert run.status is Status.STOPPED
    wait_for(lambda: not is_alive(child) and not is_alive(grandchild), WAIT, "the attempt's processes to end")
    assert task(runner=isolated)(add)(1, 2).get_result(timeout=WAIT) == 3  # the worker goes on


# ---- timeouts and retries ---------------------------------------------------------------------


def test_a_timeout_fails_the_attempt_and_is_retried(dask_runner, tmp_path):
    run = task(runner=dask_runner, timeout=0.5, retries=1)(poll_stop_requested)(str(tmp_path / "s"), str(tmp_path / "z"))
    with pytest.raises(TaskTimeout, match="timeout of 0.5 s"):
        run.get_result(timeout=WAIT)
    assert run.attempts == 2
    wait_for((tmp_path / "z").exists, WAIT, "the timed-out function to see stop_requested()")


def test_a_timeout_with_process_isolation_ends_the_attempts_process(dask_client, tmp_path):
    from taskrun import DaskTaskRun

    isolated = DaskTaskRun.configure(client=dask_client, isolate="process")
    path = tmp_path / "pid"
    run = task(runner=isolated, timeout=2)(sleep_and_say)(str(path), 60)
    with pytest.raises(TaskTimeout):
        run.get_result(timeout=WAIT)
    (pid,) = read_pids(path)
    wait_for(lambda: not is_alive(pid), WAIT, "the timed-out attempt's process to end")


def test_retries_stay_in_the_caller_each_attempt_a_new_dask_task(dask_runner, tmp_path):
    counter = tmp_path / "runs"
    run = task(runner=dask_runner, retries=3, retry_sleep_time=0.05)(fail_first)(str(counter), 2)
    assert run.get_result(timeout=WAIT) == "ok"
    assert run.attempts == 3 and runs_of(counter) == 3
    other = tmp_path / "other"
    not_listed = task(runner=dask_runner, retries=3, retry_on=KeyError)(fail_first)(str(other), 2)
    with pytest.raises(OSError, match="failure 1"):
        not_listed.get_result(timeout=WAIT)
    assert runs_of(other) == 1


# ---- many calls, the ledger, dependencies -------------------------------------------------------


def test_map_with_a_ledger_reruns_all_cached(dask_runner, tmp_path):
    counter = tmp_path / "runs"
    ledger = Ledger(tmp_path / "runs.db")
    t = task(runner=dask_runner, ledger=ledger, name="square", key=lambda path, x: str(x))(count_run)
    first = t.starmap([(str(counter), i) for i in range(12)])
    assert first.results(timeout=WAIT) == list(range(12))
    assert runs_of(counter) == 12
    again = t.starmap([(str(counter), i) for i in range(12)])
    assert again.results(timeout=WAIT) == list(range(12))
    assert again.summary()["cached"] == 12
    assert all(run.cached for run in again)
    assert runs_of(counter) == 12  # nothing ran the second time


def test_map_keeps_at_most_max_concurrency_calls_submitted(dask_runner, tmp_path):
    path = tmp_path / "intervals"
    group = task(runner=dask_runner)(interval).starmap([(str(path), 0.05)] * 4, max_concurrency=1)
    group.wait(WAIT)
    assert group.summary()["succeeded"] == 4
    spans = sorted(tuple(map(float, line.split())) for line in path.read_text().splitlines())
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False))


def test_a_dependency_receives_its_upstreams_dask_future_then_lets_it_go(dask_runner, dask_client):
    first = task(runner=dask_runner, name="first")(add)
    keyed = task(runner=dask_runner, name="keyed")(dask_dependencies)
    a = first(1, 2)
    b = keyed(a)  # made while a may still run: a keeps its future for b
    value, deps = b.get_result(timeout=WAIT)
    assert value == 3
    assert [k for k in deps if k.startswith("taskrun-first-")]  # the data went worker to worker
    chain = first(first(first(1, 1), 1), 1)
    assert chain.get_result(timeout=WAIT) == 4
    del a, b, chain
    wait_for(lambda: not taskrun_keys_on_scheduler(dask_client), WAIT, "every taskrun key to be released")


def test_a_failed_upstream_fails_the_dependent_with_upstream_failed(dask_runner, tmp_path):
    counter = tmp_path / "dependent-ran"
    bad = task(runner=dask_runner)(fail_with)("no")
    dependent = task(runner=dask_runner)(count_run)(str(counter), bad)
    with pytest.raises(UpstreamFailed) as info:
        dependent.get_result(timeout=WAIT)
    assert info.value.upstream_id == bad.id
    assert runs_of(counter) == 0


def test_a_dependent_with_a_ledger_is_keyed_by_its_upstreams_value(dask_runner, tmp_path):
    counter = tmp_path / "runs"
    first = task(runner=dask_runner)(add)
    counted = task(runner=dask_runner, ledger=Ledger(tmp_path / "runs.db"))(count_run)
    assert counted(str(counter), first(1, 2)).get_result(timeout=WAIT) == 3
    again = counted(str(counter), first(1, 2))  # another upstream run, the same value: the same call
    assert again.get_result(timeout=WAIT) == 3 and again.cached
    assert runs_of(counter) == 1


# ---- a worker dies --------------------------------------------------------------------------


def test_a_worker_killed_mid_task_gives_worker_died_and_the_batch_goes_on(dask_runner, dask_client, tmp_path):
    path = tmp_path / "pid"
    slow = task(runner=dask_runner, name="victim")(sleep_and_say)(str(path), 60)
    (pid,) = read_pids(path)
    wait_for(lambda: slow.status is Status.RUNNING, WAIT, "the victim to be seen running")
    others = task(runner=dask_runner)(add).map(range(8))  # some queued on the victim's worker: they run elsewhere
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerDied, match=r"Dask worker tcp://\S+ \(pid \d+\) running attempt 1 of victim#\d+ died"):
        slow.get_result(timeout=WAIT)
    others.wait(WAIT)
    assert [run.get_result(timeout=0, raise_exceptions=False) for run in others] == list(range(8)), list(others)
    dask_client.wait_for_workers(2, timeout=WAIT)  # the nanny restarts it, for the tests after this one


def test_an_isolated_attempt_whose_process_dies_gives_worker_died(dask_client):
    from taskrun import DaskTaskRun

    isolated = DaskTaskRun.configure(client=dask_client, isolate="process")
    with pytest.raises(WorkerDied, match=r"process \(pid \d+\) running attempt 1 of exit_with#\d+ on Dask worker "
                                         r"tcp://\S+ died: exit code 3") as info:
        task(runner=isolated)(exit_with)(3).get_result(timeout=WAIT)
    assert info.value.exitcode == 3
    assert task(runner=isolated)(log_warning)("tests.dask.isolated", "still here").get_result(timeout=WAIT) == "still here"


def test_shutdown_without_waiting_stops_what_runs_on_a_users_cluster(dask_runner, dask_client, tmp_path):
    started, seen = tmp_path / "started", tmp_path / "seen"
    run = task(runner=dask_runner)(poll_stop_requested)(str(started), str(seen))
    wait_for(started.exists, WAIT, "the call to start")
    taskrun.shutdown(wait=False)
    assert run.status is Status.STOPPED
    wait_for(seen.exists, WAIT, "the call to be told to stop")
    wait_for(lambda: not taskrun_keys_on_scheduler(dask_client), WAIT, "its Dask task to be released")
    assert dask_client.status == "running"
    assert task(runner=dask_runner)(add)(2, 2).get_result(timeout=WAIT) == 4  # and the runner works again


def test_a_call_that_kills_its_worker_at_once_is_not_run_again(dask_runner, dask_client, tmp_path):
    def count_then_exit(path):  # defined here, so that it loads at once (nothing to import): it dies unannounced
        with open(path, "a") as f:
            f.write("run\n")
        os._exit(1)

    counter = tmp_path / "runs"
    run = task(runner=dask_runner)(count_then_exit)(str(counter))
    with pytest.raises(WorkerDied, match="count_then_exit#"):
        run.get_result(timeout=WAIT)
    assert runs_of(counter) == 1  # not sent to the next worker, to kill it too
    dask_client.wait_for_workers(2, timeout=WAIT)


# ---- the rest of the handle ---------------------------------------------------------------


@pytest.mark.parametrize("isolate", ["thread", "process"])
def test_logging_from_the_task_reaches_the_callers_handlers(dask_client, caplog, isolate):
    from taskrun import DaskTaskRun

    runner = DaskTaskRun.configure(client=dask_client, isolate=isolate)
    caplog.set_level(logging.WARNING, logger="tests.dask.forwarded")
    assert task(runner=runner)(log_warning)("tests.dask.forwarded", "hello").get_result(timeout=WAIT) == "hello"
    records = [r for r in caplog.records if r.name == "tests.dask.forwarded"]
    assert [r.getMessage() for r in records] == ["from the worker: hello"]
    assert records[0].levelno == logging.WARNING and records[0].process != os.getpid()


@pytest.mark.parametrize("isolate", ["thread", "process"])
@pytest.mark.parametrize("end", ["stop", "timeout"])
def test_what_a_stopped_or_timed_out_attempt_logged_reaches_the_caller(dask_client, caplog, tmp_path, isolate, end):
    from taskrun import DaskTaskRun

    runner = DaskTaskRun.configure(client=dask_client, isolate=isolate)
    name = f"tests.dask.hung.{isolate}.{end}"
    caplog.set_level(logging.WARNING, logger=name)
    started = tmp_path / "started"
    timeout = {"stop": None, "timeout": 0.5 if isolate == "thread" else 2}[end]
    run = task(runner=runner, timeout=timeout)(log_then_hang)(name, str(started))
    (pid,) = read_pids(started)
    if end == "stop":
        run.stop()
    else:
        with pytest.raises(TaskTimeout):
            run.get_result(timeout=WAIT)
    records = wait_for(lambda: [r for r in caplog.records if r.name == name], WAIT, "the hung attempt's record")
    assert [r.getMessage() for r in records] == [f"before the hang, pid {pid}"]
    assert records[0].process == pid


def test_done_callbacks_and_await(dask_runner):
    seen = []
    done = threading.Event()
    run = task(runner=dask_runner)(add)(20, 22)
    run.add_done_callback(lambda r: (seen.append(r.get_result()), done.set()))
    assert done.wait(WAIT) and seen == [42]

    async def main():
        return await task(runner=dask_runner)(add)(1, 1)

    assert asyncio.run(main()) == 2


# ---- connecting ------------------------------------------------------------------------------


def test_settings_are_checked():
    pytest.importorskip("distributed", reason='the dask extra is not installed: pip install "taskrun[dask]"')
    from taskrun import DaskTaskRun

    with pytest.raises(ValueError, match="isolate"):
        DaskTaskRun.configure(isolate="container")
    with pytest.raises(TypeError, match="client must be a distributed.Client"):
        DaskTaskRun.configure(client="tcp://x:8786")
    with pytest.raises(TypeError, match="n_workers"):
        DaskTaskRun.configure(n_workers=0.5)


def test_address_and_client_together_are_refused_by_configure(dask_client):
    from taskrun import DaskTaskRun

    with pytest.raises(ValueError, match=r"address= .* or client= .*not both; got address='tcp://127.0.0.1:1' and client="):
        DaskTaskRun.configure(client=dask_client, address="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="not both"):  # one after the other, too
        DaskTaskRun.configure(address="tcp://127.0.0.1:1").configure(client=dask_client)
    assert DaskTaskRun.configure(address="tcp://127.0.0.1:1").configure(address=None, client=dask_client).client is dask_client


def test_import_taskrun_does_not_import_dask_and_a_missing_extra_names_the_fix():
    code = (
        "import sys\n"
        "import taskrun\n"
        "assert 'distributed' not in sys.modules and 'dask' not in sys.modules, 'import taskrun imported dask'\n"
        "assert 'DaskTaskRun' in taskrun.__all__\n"
        "sys.modules['distributed'] = None  # as if the extra were not installed\n"
        "try:\n"
        "    from taskrun import DaskTaskRun\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 0, out.stderr
    assert 'pip install "taskrun[dask]"' in out.stdout


def test_a_local_cluster_of_its_own_starts_lazily_and_closes(tmp_path):
    pytest.importorskip("distributed", reason='the dask extra is not installed: pip install "taskrun[dask]"')
    from taskrun import DaskTaskRun

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    own = DaskTaskRun.configure(n_workers=1, memory_limit="512MiB")
    t = task(runner=own)(add)
    assert {p.pid for p in psutil.Process().children(recursive=True)} == before  # nothing until the first call
    assert t(1, 2).get_result(timeout=WAIT) == 3
    started = {p.pid for p in psutil.Process().children(recursive=True)} - before
    started.discard(multiprocessing.resource_tracker._resource_tracker._pid)  # the standard library's, for good
    assert started  # its nanny and worker processes
    taskrun.shutdown()
    wait_for(lambda: not any(is_alive(pid) for pid in started), WAIT, "the cluster's processes to end")


def test_at_exit_calls_already_sent_finish_before_the_local_cluster_closes(tmp_path):
    pytest.importorskip("distributed", reason='the dask extra is not installed: pip install "taskrun[dask]"')
    done = tmp_path / "done"
    script = tmp_path / "fire_and_forget.py"
    script.write_text(
        "import time\n"
        "from taskrun import DaskTaskRun, task\n"
        "def slow_write(path):\n"
        "    time.sleep(0.5)\n"
        "    open(path, 'w').write('written')\n"
        "if __name__ == '__main__':\n"
        f"    task(runner=DaskTaskRun.configure(n_workers=1, memory_limit='512MiB'))(slow_write)({str(done)!r})\n"
        "    print('leaving', flush=True)\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=2 * WAIT)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "leaving\n"
    assert done.read_text() == "written"  # the call went on after the script's last line
    assert "Traceback" not in out.stderr and "ERROR" not in out.stderr, out.stderr


def test_the_first_call_in_async_code_returns_at_once_while_the_local_cluster_starts(tmp_path):
    pytest.importorskip("distributed", reason='the dask extra is not installed: pip install "taskrun[dask]"')
    from taskrun import DaskTaskRun

    t = task(runner=DaskTaskRun.configure(n_workers=1, memory_limit="512MiB"))(add)

    async def main():
        before = time.monotonic()
        run = t(1, 2)  # starts the cluster: not in this thread, whose event loop would wait meanwhile
        took = time.monotonic() - before
        status = run.status
        return took, status, await run

    took, status, value = asyncio.run(main())
    assert value == 3 and status is Status.PENDING
    assert took < 0.3, f"the call took {took:.2f} s"  # starting the cluster takes about 1 s here


def test_the_local_cluster_serves_no_http_and_runners_that_do_not_change_it_share_it():
    pytest.importorskip("distributed", reason='the dask extra is not installed: pip install "taskrun[dask]"')
    import urllib.error
    import urllib.request

    from taskrun import DaskTaskRun

    plain = DaskTaskRun.configure(n_workers=1, memory_limit="512MiB")
    isolated = plain.configure(isolate="process")
    pids = [task(runner=runner)(worker_pid)().get_result(timeout=WAIT) for runner in (plain, isolated)]
    assert pids[0] == pids[1]  # one cluster (of one worker) for both
    ports = task(runner=plain)(http_ports)().get_result(timeout=WAIT)
    assert len(ports) == 2 and 8787 not in ports
    for port in ports:  # Dask opens them whatever its settings say: they answer nothing
        for path in ("/health", "/info/main/workers.html", "/metrics", "/status"):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=WAIT)
            assert info.value.code == 404, (port, path)


def test_calls_to_an_unreachable_scheduler_return_at_once_fail_together_and_a_later_call_tries_again():
    pytest.importorskip("distributed", reason='the dask extra is not installed: pip install "taskrun[dask]"')
    import socket

    import dask
    from distributed import LocalCluster

    from taskrun import DaskTaskRun

    with socket.socket() as sock:  # a port nothing listens on (yet)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    t = task(runner=DaskTaskRun.configure(address=address))(add)
    with dask.config.set({"distributed.comm.timeouts.connect": "30s"}):  # Dask's default; refused at once all the same
        before = time.monotonic()
        runs = [t(i) for i in range(5)]
        took = time.monotonic() - before
        assert took < 0.5, f"5 calls took {took:.2f} s"  # each waited for Dask's connect timeout
        assert all(run.status is Status.PENDING for run in runs)
        for run in runs:
            with pytest.raises(TaskrunError, match=rf"could not connect to the Dask scheduler at {address} .*"
                                                   r"is the scheduler running"):
                run.get_result(timeout=WAIT)
        assert time.monotonic() - before < 5  # one connection tried for all, refused at once (not after 30 s)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, scheduler_port=port, host="127.0.0.1",
                      dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}) as cluster:
        assert cluster.scheduler_address == address
        assert t(41, 1).get_result(timeout=WAIT) == 42  # not the failure again: it connected
        taskrun.shutdown()


def test_a_script_that_calls_tasks_outside_the_main_guard_fails_the_call_saying_so(tmp_path):
    pytest.importorskip("distributed", reason='the dask extra is not installed: pip install "taskrun[dask]"')
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from taskrun import DaskTaskRun, task\n"
        "def add(x, y):\n"
        "    return x + y\n"
        "print(task(runner=DaskTaskRun.configure(n_workers=1))(add)(1, 2).get_result(timeout=60))\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=2 * WAIT)
    assert out.returncode == 1 and out.stdout == ""
    assert "TaskrunError" in out.stderr and "did not start its local Dask cluster" in out.stderr, out.stderr
    assert f"main script ({script}) again" in out.stderr and "line 4" in out.stderr
    assert 'Put the code that starts tasks under `if __name__ == "__main__":`' in out.stderr
    assert "Nanny" not in out.stderr and len(out.stderr.splitlines()) < 30, out.stderr  # not Dask's hundreds of lines


def test_a_script_with_logging_configured_prints_each_task_record_once_and_exits_quietly(tmp_path):
    """The workers of a local cluster run the script's top level again (logging.basicConfig too); a second
    local cluster (other settings) and an attempt stopped while it runs must not make Dask talk at exit."""
    pytest.importorskip("distributed", reason='the dask extra is not installed: pip install "taskrun[dask]"')
    started = tmp_path / "started"
    script = tmp_path / "logs.py"
    script.write_text(
        "import logging, os, time\n"
        "from taskrun import DaskTaskRun, task\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s %(message)s')\n"
        "def say(text):\n"
        "    logging.getLogger('script').warning('said %s', text)\n"
        "    return text\n"
        "def hang(path):\n"
        "    open(path, 'w').close()\n"
        "    time.sleep(1)  # stopped meanwhile: it runs on, and is still running at exit\n"
        "if __name__ == '__main__':\n"
        "    One = DaskTaskRun.configure(n_workers=1, memory_limit='512MiB')\n"
        "    Two = DaskTaskRun.configure(n_workers=1, memory_limit='512MiB', threads_per_worker=2)\n"
        "    print(task(runner=One)(say)('hello').get_result(timeout=60), flush=True)\n"
        "    print(task(runner=Two)(say)('again').get_result(timeout=60), flush=True)\n"
        f"    run = task(runner=One)(hang)({str(started)!r})\n"
        f"    while not os.path.exists({str(started)!r}):\n"
        "        time.sleep(0.01)\n"
        "    run.stop()\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=2 * WAIT)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello\nagain\n"
    lines = out.stderr.splitlines()
    assert [line for line in lines if "said" in line] == ["WARNING script said hello", "WARNING script said again"], lines
    assert not [line for line in lines if " - INFO - " in line or "Async instruction" in line], lines


def test_ctrl_c_in_a_terminal_stops_the_runs_and_the_local_clusters_workers_stay_quiet(tmp_path):
    """Regression: Ctrl-C signals the terminal's whole process group, the local cluster's worker processes
    too, which printed screens of KeyboardInterrupt and Dask complaints as taskrun closed them."""
    pytest.importorskip("distributed", reason='the dask extra is not installed: pip install "taskrun[dask]"')
    started = tmp_path / "started"
    script = tmp_path / "interrupted.py"
    script.write_text(
        "import os, time, taskrun\n"
        "from taskrun import DaskTaskRun, task\n"
        "def work(path, i):\n"
        "    open(f'{path}{i}', 'w').close()\n"
        "    while not taskrun.stop_requested():\n"
        "        time.sleep(0.02)\n"
        "if __name__ == '__main__':\n"
        "    group = task(runner=DaskTaskRun.configure(n_workers=2, memory_limit='512MiB'))(work).starmap(\n"
        f"        [({str(started)!r}, i) for i in range(4)], max_concurrency=2)\n"
        "    print('waiting', flush=True)\n"
        "    group.results()\n"
    )
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # a process group of its own, as a terminal's job
    try:
        wait_for(lambda: os.path.exists(f"{started}0") and os.path.exists(f"{started}1"), 3 * WAIT, "both calls to start")
        os.killpg(child.pid, signal.SIGINT)  # what Ctrl-C does
        out, err = child.communicate(timeout=3 * WAIT)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    assert child.returncode in (-signal.SIGINT, 1, 130), err
    assert err.rstrip().endswith("KeyboardInterrupt"), err
    noise = [line for line in err.splitlines() if "distributed" in line or "Process Dask" in line or "Nanny" in line]
    assert noise == [], err


@pytest.fixture
def cli_cluster(tmp_path):
    """A scheduler and two workers started with the ``dask`` command, as separate processes; killed at the end."""
    pytest.importorskip("distributed", reason='the dask extra is not installed: pip install "taskrun[dask]"')
    dask = pathlib.Path(sys.executable).with_name("dask")
    if not dask.exists():
        pytest.skip(f"the dask command is not installed next to {sys.executable}")
    scheduler_file = tmp_path / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    logs = open(tmp_path / "cluster.log", "w")  # noqa: SIM115 - closed at teardown
    procs = [subprocess.Popen([str(dask), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(scheduler_file)], stdout=logs, stderr=logs, env=env,
                              start_new_session=True)]
    try:
        wait_for(scheduler_file.exists, WAIT, "the scheduler file")
        for _ in range(2):
            procs.append(subprocess.Popen([str(dask), "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                                           "--memory-limit", "512MiB", "--no-dashboard", "--host", "127.0.0.1"],
                                          stdout=logs, stderr=logs, env=env, start_new_session=True))
        import json

        yield json.loads(scheduler_file.read_text())["address"]
    finally:
        taskrun.shutdown()
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(WAIT)
        logs.close()


def test_a_cluster_started_with_the_dask_command_connected_by_address(cli_cluster, tmp_path):
    from distributed import Client

    from taskrun import DaskTaskRun

    with Client(cli_cluster, set_as_default=False) as watcher:
        watcher.wait_for_workers(2, timeout=WAIT)
    remote = DaskTaskRun.configure(address=cli_cluster)
    assert task(runner=remote)(add).map(range(10)).results(timeout=WAIT) == list(range(10))
    with pytest.raises(ValueError, match="boom"):
        task(runner=remote)(fail_with)("boom").get_result(timeout=WAIT)
    square = task(runner=remote)(lambda x: x * x)  # defined here: travels by value
    assert square(square(3)).get_result(timeout=WAIT) == 81
