"""The ledger in one process: cached reruns, failures and stops, keys, racing calls, bad files, inspection."""

import hashlib
import logging
import os
import pickle
import sqlite3
import subprocess
import sys
import threading

import pytest

import taskrun
from taskrun import Ledger, LedgerError, SequentialTaskRun, SerializationError, Status, TaskStopped, ThreadTaskRun, task
from taskrun._ledger import SCHEMA_VERSION, make_key, store_for
from taskrun._ledger._owners import MACHINE

WAIT = 10


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "runs.db")


@pytest.fixture
def gate():
    """An Event tasks wait on; always set at the end so no pool thread is left blocked."""
    event = threading.Event()
    yield event
    event.set()


def fingerprint(path):
    """Bytes and modification time of a file, to prove it was not touched."""
    with open(path, "rb") as f:
        data = f.read()
    return hashlib.sha256(data).hexdigest(), os.stat(path).st_mtime_ns


def row(path, task_name, key):
    """The row of a call, read with a connection of its own (what another process would see)."""
    conn = sqlite3.connect(path)
    try:
        sql = "SELECT status, attempts, error_type FROM runs WHERE task = ? AND key = ?"
        return conn.execute(sql, (task_name, key)).fetchone()
    finally:
        conn.close()


# ---- idempotent reruns --------------------------------------------------------------------


@pytest.mark.parametrize("runner", [SequentialTaskRun, ThreadTaskRun])
def test_a_succeeded_call_returns_the_stored_result_without_running(db, runner):
    calls = []

    @task(runner=runner, ledger=db)
    def double(x):
        calls.append(x)
        return {"value": x * 2}

    first = double(21)
    assert first.get_result(timeout=WAIT) == {"value": 42}
    assert first.status is Status.SUCCEEDED and not first.cached
    second = double(21)
    assert second.get_result(timeout=WAIT) == {"value": 42}
    assert second.status is Status.SUCCEEDED and second.cached  # a cached call is a success
    assert second.attempts == 0 and second.key == first.key
    assert calls == [21]
    assert double(22).get_result(timeout=WAIT) == {"value": 44}
    assert calls == [21, 22]


def test_a_cached_call_never_reaches_the_runner(db):
    prepared = []

    class Counting(SequentialTaskRun):
        def prepare(self):
            prepared.append(self.args)

    @task(runner=Counting, ledger=db, name="inc")
    def inc(x):
        return x + 1

    assert inc(1).get_result() == 2
    assert inc(1).cached
    assert prepared == [(1,)]


def test_failed_calls_run_again_and_record_the_error(db):
    fail = {1}
    calls = []

    @task(runner=SequentialTaskRun, ledger=db, retries=1, name="flaky")
    def flaky(x):
        calls.append(x)
        if x in fail:
            raise ValueError(f"bad input {x}")
        return x

    run = flaky(1)
    assert run.status is Status.FAILED and run.attempts == 2
    assert row(db, "flaky", run.key) == ("failed", 2, "ValueError")
    [record] = Ledger(db).runs(task=flaky, status="failed")
    assert record.error == "ValueError: bad input 1"
    assert "raise ValueError" in record.traceback
    assert record.call == "flaky(1)"

    fail.clear()
    again = flaky(1)
    assert again.get_result() == 1 and not again.cached
    assert calls == [1, 1, 1]
    assert row(db, "flaky", run.key) == ("succeeded", 1, None)


def test_a_stopped_call_is_recorded_stopped_and_runs_again(db, gate):
    calls = []

    @task(runner=ThreadTaskRun, ledger=db, name="slow")
    def slow(x):
        calls.append(x)
        gate.wait(WAIT)
        return x

    run = slow(5)
    assert run.stop()
    assert run.status is Status.STOPPED
    with pytest.raises(TaskStopped):
        run.get_result(timeout=WAIT)
    gate.set()
    taskrun.shutdown()  # commits the stopped record
    assert row(db, "slow", run.key)[0] == "stopped"
    assert Ledger(db).summary() == {"slow": {"stopped": 1}}
    again = slow(5)
    assert again.get_result(timeout=WAIT) == 5 and not again.cached


def test_every_outcome_is_committed_before_its_handle_reports_it(db):
    seen = []

    @task(runner=ThreadTaskRun, ledger=db, name="inc")
    def inc(x):
        return x + 1

    all_seen = threading.Event()

    def look(run):  # a done callback: runs once the handle reports the outcome
        seen.append(row(db, "inc", run.key))
        if len(seen) == 50:
            all_seen.set()

    runs = [inc(i) for i in range(50)]
    for run in runs:
        run.add_done_callback(look)
    assert all_seen.wait(WAIT)
    assert all(status == ("succeeded", 1, None) for status in seen)
    assert [run.get_result() for run in runs] == list(range(1, 51))


def test_records_stay_visible_when_other_processes_open_and_close_the_file(db):
    """Opening the file again (another Ledger here, a reader elsewhere) keeps this process's SQLite locks.

    Closing any descriptor of the file drops them all (POSIX locks belong to the process);
    another process's reader then takes itself for the last user, checkpoints and deletes the
    WAL this process still writes to, and later commits reach nobody.
    """

    @task(runner=ThreadTaskRun, ledger=db, key=str, name="work")
    def work(x):
        return x

    assert work(1).get_result(timeout=WAIT) == 1
    Ledger(db)  # another Ledger object of the same file, as a script's "look inside" code makes
    reader = "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('SELECT count(*) FROM runs').fetchone(); c.close()"
    subprocess.run([sys.executable, "-c", reader, db], check=True, timeout=WAIT)
    assert work(2).get_result(timeout=WAIT) == 2
    count = (
        "import sqlite3, sys; "
        "print(sqlite3.connect(sys.argv[1]).execute(\"SELECT count(*) FROM runs WHERE status = 'succeeded'\").fetchone()[0])"
    )
    seen = subprocess.run([sys.executable, "-c", count, db], check=True, timeout=WAIT, capture_output=True, text=True)
    assert seen.stdout.strip() == "2"


def test_shutdown_flushes_records_and_a_new_ledger_object_sees_them(db):
    @task(runner=ThreadTaskRun, ledger=db, name="square")
    def square(x):
        return x * x

    runs = [square(i) for i in range(200)]
    taskrun.shutdown()
    assert all(run.done() for run in runs)
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM runs WHERE status = 'succeeded'").fetchone() == (200,)
    conn.close()
    assert [square(i).get_result(timeout=WAIT) for i in range(200)] == [i * i for i in range(200)]


def test_results_large_or_only_cloudpickle_can_store_come_back(db):
    def make(kind):
        if kind == "large":
            return b"x" * 100_000
        return lambda y: y + 1  # only cloudpickle can store a lambda

    @task(runner=SequentialTaskRun, ledger=db)
    def produce(kind):
        return make(kind)

    assert len(produce("large").get_result()) == 100_000
    assert produce("func").get_result()(1) == 2
    large, func = produce("large"), produce("func")
    assert large.cached and large.get_result() == b"x" * 100_000
    assert func.cached and func.get_result()(41) == 42


def test_a_result_that_cannot_be_pickled_reaches_the_caller_and_is_recorded_failed(db, caplog):
    calls = []

    @task(runner=SequentialTaskRun, ledger=db, name="make_lock")
    def make_lock(x):
        calls.append(x)
        return threading.Lock()

    with caplog.at_level(logging.WARNING, logger="taskrun"):
        run = make_lock(1)
    assert run.status is Status.SUCCEEDED
    assert hasattr(run.get_result(), "acquire")
    assert "could not be pickled for the ledger" in caplog.text
    [record] = Ledger(db).runs()
    assert record.status == "failed" and record.error_type == "taskrun.errors.SerializationError"
    assert "runs again next time" in record.error_message
    assert not make_lock(1).cached
    assert calls == [1, 1]


# ---- keys ---------------------------------------------------------------------------------


def test_a_key_function_names_the_calls(db):
    @task(runner=SequentialTaskRun, ledger=db, key=lambda url, timeout=10: url, name="fetch")
    def fetch(url, timeout=10):
        return f"{url} in {timeout}"

    assert fetch("a", timeout=1).get_result() == "a in 1"
    again = fetch("a", timeout=99)  # the key ignores the timeout: the same call
    assert again.cached and again.get_result() == "a in 1"
    assert [r.key for r in Ledger(db).runs()] == ["a"]
    assert Ledger(db).result("a") == "a in 1"


def test_a_key_function_must_return_a_str(db):
    @task(runner=SequentialTaskRun, ledger=db, key=lambda x: x)
    def ident(x):
        return x

    with pytest.raises(TypeError, match=r"key function .* returned 3 \(int\); it must return a str"):
        ident(3)


def test_arguments_that_cannot_be_keyed_suggest_a_key_function(db):
    @task(runner=SequentialTaskRun, ledger=db)
    def use(lock):
        return 1

    with pytest.raises(SerializationError, match="cannot be pickled.*pass key="):
        use(threading.Lock())


def test_default_keys_are_stable_digests_of_the_name_and_arguments():
    @task(runner=SequentialTaskRun, name="f")
    def f(*args, **kwargs):
        return None

    @task(runner=SequentialTaskRun, name="other")
    def g(*args, **kwargs):
        return None

    key = make_key(f, (1, "a"), {"x": 1, "y": [2]})
    assert key == make_key(f, (1, "a"), {"y": [2], "x": 1})  # keyword order does not matter
    assert len(key) == 32 and int(key, 16) >= 0
    assert key != make_key(g, (1, "a"), {"x": 1, "y": [2]})
    assert make_key(f, (1,), {}) != make_key(f, (1.0,), {})
    # Fixed here: a change of the key format would make every ledger re-run everything.
    expected = hashlib.blake2b(b"f\x00" + pickle.dumps((1, 2), 4), digest_size=16).hexdigest()
    assert make_key(f, (1, 2), {}) == expected


def test_tasks_sharing_a_ledger_and_a_key_do_not_mix(db):
    @task(runner=SequentialTaskRun, ledger=db, key=str, name="fetch")
    def fetch(x):
        return f"fetched {x}"

    @task(runner=SequentialTaskRun, ledger=db, key=str, name="parse")
    def parse(x):
        return f"parsed {x}"

    assert fetch(1).get_result() == "fetched 1"
    assert parse(1).get_result() == "parsed 1"
    assert parse(1).get_result() == "parsed 1"
    ledger = Ledger(db)
    assert ledger.result("1", task=fetch) == "fetched 1"
    with pytest.raises(ValueError, match="several tasks.*pass task="):
        ledger.result("1")


# ---- calls of one key at the same time -----------------------------------------------------


def test_two_threads_calling_one_key_at_once_run_it_once(db, gate):
    calls = []
    barrier = threading.Barrier(2, timeout=WAIT)
    handles = []

    @task(runner=ThreadTaskRun, ledger=db, name="slow")
    def slow(x):
        calls.append(x)
        gate.wait(WAIT)
        return x * 10

    def caller():
        barrier.wait()
        handles.append(slow(7))

    threads = [threading.Thread(target=caller) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert len(handles) == 2
    assert all(h.status in (Status.PENDING, Status.RUNNING) for h in handles)
    gate.set()
    assert [h.get_result(timeout=WAIT) for h in handles] == [70, 70]
    assert calls == [7]
    assert sorted(h.cached for h in handles) == [False, True]


def test_a_second_call_waits_without_blocking_and_runs_if_the_first_fails(db, gate):
    calls = []

    @task(runner=ThreadTaskRun, ledger=db)
    def job(x):
        calls.append(x)
        gate.wait(WAIT)
        if len(calls) == 1:
            raise RuntimeError("first try fails")
        return "done"

    first = job(1)
    second = job(1)  # returns at once, waiting on the first
    assert second.status is Status.PENDING
    gate.set()
    assert isinstance(first.exception(timeout=WAIT), RuntimeError)
    assert second.get_result(timeout=WAIT) == "done" and not second.cached
    assert calls == [1, 1]


def test_a_done_callback_of_a_ledger_run_holds_no_ledger_lock(db, gate):
    """Callbacks run after the batch that recorded their run, outside the ledger's locks: a callback may wait
    for a call that another thread makes on the same ledger (it used to wait behind the callback's own batch)."""

    @task(runner=ThreadTaskRun, ledger=db, key=str, name="pooled")
    def pooled(x):
        gate.wait(WAIT)
        return x

    inline = task(runner=SequentialTaskRun, ledger=db, key=str, name="inline")(lambda x: x * 2)
    results, alive = [], []
    called = threading.Event()

    def callback(run):
        other = threading.Thread(target=lambda: results.append(inline(run.get_result()).get_result()))
        other.start()
        other.join(WAIT)
        alive.append(other.is_alive())
        called.set()

    run = pooled(3)
    run.add_done_callback(callback)
    gate.set()
    assert called.wait(2 * WAIT)
    assert alive == [False] and results == [6]


def test_many_calls_of_few_keys_run_each_key_once(db):
    calls = []
    lock = threading.Lock()

    @task(runner=ThreadTaskRun.configure(max_workers=8), ledger=db)
    def work(x):
        with lock:
            calls.append(x)
        return x

    runs = [work(i % 10) for i in range(300)]
    assert [run.get_result(timeout=WAIT) for run in runs] == [i % 10 for i in range(300)]
    assert sorted(calls) == list(range(10))
    assert sum(not run.cached for run in runs) == 10


def test_map_with_a_ledger_resumes(db):
    calls = []

    @task(runner=ThreadTaskRun, ledger=db, name="inc")
    def inc(x):
        calls.append(x)
        return x + 1

    assert inc.map(range(20)).results() == list(range(1, 21))
    group = inc.map(range(25))
    assert group.results() == list(range(1, 26))
    assert sorted(calls) == list(range(25))
    assert group.summary()["cached"] == 20


# ---- claims left by a process that is gone -------------------------------------------------


def test_a_claim_left_by_a_dead_process_is_taken_over(db, caplog):
    @task(runner=SequentialTaskRun, ledger=db, key=str, name="work")
    def work(x):
        return x

    assert work(1).get_result() == 1  # makes the file and its tables
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("INSERT INTO owners VALUES ('gone', 'host', ?, ?, '', 0)", (MACHINE, pid))
        conn.execute("INSERT INTO runs (task, key, status, owner, claim) VALUES ('work', '2', 'running', 'gone', 1)")
    conn.close()
    ledger = Ledger(db)
    assert ledger.summary() == {"work": {"succeeded": 1, "interrupted": 1}}
    assert [r.key for r in ledger.runs(status="interrupted")] == ["2"]
    with caplog.at_level(logging.INFO, logger="taskrun"):
        run = work(2)
    assert run.get_result() == 2 and not run.cached
    assert "was interrupted" in caplog.text
    assert ledger.summary() == {"work": {"succeeded": 2}}


# ---- files that are not ledgers -------------------------------------------------------------


def test_random_bytes_are_refused_and_left_alone(tmp_path):
    path = tmp_path / "random.db"
    path.write_bytes(os.urandom(4096))
    before = fingerprint(path)
    with pytest.raises(LedgerError, match=r"random\.db.*not an SQLite database"):
        Ledger(path)
    with pytest.raises(LedgerError, match="not an SQLite database"):
        task(ledger=str(path))(lambda: None)
    assert fingerprint(path) == before
    assert sorted(os.listdir(tmp_path)) == ["random.db"]


def test_another_applications_database_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO customers (name) VALUES ('ada')")
    conn.close()
    before = fingerprint(path)
    with pytest.raises(LedgerError, match=r"app\.db.*SQLite database but not a taskrun ledger.*customers"):
        Ledger(path)
    assert fingerprint(path) == before
    assert sorted(os.listdir(tmp_path)) == ["app.db"]


def test_a_ledger_from_a_newer_taskrun_asks_for_an_upgrade(db):
    Ledger(db)
    taskrun.shutdown()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    before = fingerprint(db)
    with pytest.raises(LedgerError, match="newer taskrun.*upgrade taskrun"):
        Ledger(db)
    assert fingerprint(db) == before


def test_an_sqlite_file_with_a_damaged_body_is_refused_and_left_alone(db):
    subprocess.run([sys.executable, "-c", "import sys, taskrun; taskrun.Ledger(sys.argv[1])", db], check=True, timeout=WAIT)
    assert sorted(os.listdir(os.path.dirname(db))) == ["runs.db"]
    with open(db, "r+b") as f:  # keep the 100-byte header, damage the pages after it
        f.seek(100)
        f.write(os.urandom(3000))
    before = fingerprint(db)
    with pytest.raises(LedgerError, match=r"runs\.db.*(not a usable taskrun ledger|not a taskrun ledger)"):
        Ledger(db)
    assert fingerprint(db) == before
    assert sorted(os.listdir(os.path.dirname(db))) == ["runs.db"]  # no -wal or -shm made by looking


def test_a_directory_that_cannot_be_written_is_refused(tmp_path):
    blocker = tmp_path / "somefile"
    blocker.write_text("not a directory")
    with pytest.raises(LedgerError, match="somefile.*not a directory"):
        Ledger(blocker / "runs.db")
    with pytest.raises(LedgerError, match="is a directory"):
        Ledger(tmp_path)


def test_an_empty_file_becomes_a_ledger(tmp_path):
    path = tmp_path / "empty.db"
    path.touch()

    @task(runner=SequentialTaskRun, ledger=Ledger(path))
    def one():
        return 1

    assert one().get_result() == 1
    assert one().cached


# ---- inspection ---------------------------------------------------------------------------


def test_summary_runs_result_forget_and_reset(db):
    @task(runner=SequentialTaskRun, ledger=db, key=str, name="check")
    def check(x):
        if x % 3 == 0:
            raise ValueError(f"{x} is divisible by 3")
        return x

    for x in range(1, 10):
        check(x)
    ledger = Ledger(db)
    assert ledger.summary() == {"check": {"succeeded": 6, "failed": 3}}
    assert [r.key for r in ledger.runs(status=Status.FAILED)] == ["3", "6", "9"]
    assert [r.key for r in ledger.runs(task="check")][:3] == ["1", "2", "3"]
    assert ledger.runs(task="nothing") == []
    assert ledger.result("2") == 2
    assert [r.key for r in ledger.last_errors(2)] == ["9", "6"]
    with pytest.raises(KeyError, match="its status is failed"):
        ledger.result("3")
    with pytest.raises(KeyError, match="no call with key '42'"):
        ledger.result("42")
    with pytest.raises(ValueError, match="unknown ledger status"):
        ledger.runs(status="finished")
    with pytest.raises(TypeError, match="task= must be a task or a task's name"):
        ledger.runs(task=5)

    assert ledger.forget("2") and not ledger.forget("2")
    assert not check(2).cached  # forgotten: it runs again
    assert ledger.reset(status="failed") == 3
    assert ledger.summary() == {"check": {"succeeded": 6}}
    assert ledger.reset() == 6
    assert ledger.summary() == {}
    assert not check(1).cached


def test_a_ledger_opened_read_only_reads_and_changes_nothing(tmp_path):
    path = str(tmp_path / "runs.db")
    made = "import sys, taskrun\n@taskrun.task(runner=taskrun.SequentialTaskRun, ledger=sys.argv[1], key=str, name='w')\n"
    made += "def w(x):\n    if x == 3: raise ValueError('three')\n    return x * 10\nfor x in range(1, 5): w(x)"
    subprocess.run([sys.executable, "-c", made, path], check=True, timeout=30)  # its process ends: no -wal left
    before = fingerprint(path)
    ledger = Ledger.open_read_only(path)
    assert ledger.read_only and not Ledger(tmp_path / "other.db").read_only
    assert repr(ledger) == f"Ledger.open_read_only({path!r})"
    assert ledger.summary() == {"w": {"succeeded": 3, "failed": 1}}
    assert [r.key for r in ledger.runs(status="failed")] == ["3"] and ledger.last_errors()[0].error == "ValueError: three"
    assert ledger.result("2") == 20
    with pytest.raises(LedgerError, match="opened read-only: it cannot forget"):
        ledger.forget("2")
    with pytest.raises(LedgerError, match="opened read-only: it cannot reset"):
        ledger.reset()
    copy = pickle.loads(pickle.dumps(ledger))
    assert copy.read_only and copy.summary() == ledger.summary()
    recorded = task(runner=SequentialTaskRun, ledger=ledger, key=str, name="w")(lambda x: x)
    with pytest.raises(LedgerError, match="opened read-only: tasks cannot record calls in it"):
        recorded(9)
    assert fingerprint(path) == before
    assert sorted(os.listdir(tmp_path)) == ["other.db", "other.db-shm", "other.db-wal", "runs.db"]


def test_opening_read_only_what_is_not_a_ledger_is_an_error_and_an_empty_file_holds_no_calls(tmp_path):
    with pytest.raises(LedgerError, match="no ledger at .*missing.db.*does not exist"):
        Ledger.open_read_only(tmp_path / "missing.db")
    with pytest.raises(LedgerError, match="is a directory"):
        Ledger.open_read_only(tmp_path)
    (tmp_path / "random.db").write_bytes(b"\x00\x01not sqlite at all" * 100)
    with pytest.raises(LedgerError, match="not a taskrun ledger.*pass the path of a ledger$"):
        Ledger.open_read_only(tmp_path / "random.db")
    (tmp_path / "empty.db").touch()
    empty = Ledger.open_read_only(tmp_path / "empty.db")
    assert empty.summary() == {} and empty.runs() == [] and empty.last_errors() == []
    with pytest.raises(KeyError):
        empty.result("k")
    assert sorted(os.listdir(tmp_path)) == ["empty.db", "random.db"]


def test_ledger_threads_are_named_daemon_and_end_at_shutdown(db):
    @task(runner=ThreadTaskRun, ledger=db, name="inc")
    def inc(x):
        return x + 1

    inc(1).get_result(timeout=WAIT)
    threads = [t for t in threading.enumerate() if t.name.startswith("taskrun-ledger-")]
    assert threads and all(t.daemon for t in threads)
    taskrun.shutdown()
    assert not any(t.is_alive() for t in threads)
    assert inc(1).cached  # and it starts again


# ---- other runners, and a file that stops working -------------------------------------------


def test_multiprocess_runs_are_recorded_and_workers_can_use_the_ledger_too(db):
    runner = taskrun.MultiprocessTaskRun.configure(max_workers=2)

    @task(runner=runner, ledger=db, name="outer")
    def outer(x):
        inner = task(runner=SequentialTaskRun, ledger=db, name="inner")(lambda y: y + 1)
        return inner(x).get_result() * 10

    assert [outer(i).get_result(timeout=WAIT) for i in range(3)] == [10, 20, 30]
    again = [outer(i) for i in range(3)]
    assert all(run.cached for run in again)
    assert Ledger(db).summary() == {"inner": {"succeeded": 3}, "outer": {"succeeded": 3}}


def test_when_the_file_cannot_be_written_outcomes_still_arrive_and_claims_fail(db, monkeypatch, caplog):
    @task(runner=ThreadTaskRun, ledger=db, name="inc")
    def inc(x):
        return x + 1

    assert inc(1).get_result(timeout=WAIT) == 2
    storage = store_for(Ledger(db)).storage

    def broken(*args, **kwargs):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(storage, "transaction", broken)  # every write of the file
    with caplog.at_level(logging.ERROR, logger="taskrun"):
        run = inc(2)
        error = run.exception(timeout=WAIT)
    assert isinstance(error, LedgerError) and "could not be written" in str(error)
    assert "disk I/O error" in caplog.text
    assert inc(1).get_result(timeout=WAIT) == 2  # stored results still answer from memory


def test_a_runner_shuts_down_while_a_ledger_is_open(tmp_path):
    """Runner.shutdown() ends that runner's pools only, next to a ledger's own threads."""
    recorded = task(runner=ThreadTaskRun, ledger=str(tmp_path / "runs.db"), name="echo")(lambda x: x)
    assert recorded(1).get_result(10) == 1
    ThreadTaskRun.shutdown()
    assert recorded(2).get_result(10) == 2  # the pool starts again; the ledger still records
    assert Ledger(tmp_path / "runs.db").summary()["echo"]["succeeded"] == 2
