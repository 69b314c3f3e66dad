"""The ledger when things go wrong: a busy or read-only file, a full disk, results that cannot load, shutdown
midway, a failed commit, a dead owner; and the status command, which must only ever read."""

import collections
import contextlib
import hashlib
import json
import logging
import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from _waiting import is_alive, wait_for

import taskrun
from taskrun import Ledger, LedgerError, SequentialTaskRun, SerializationError, Status, TaskStopped, ThreadTaskRun, task
from taskrun.__main__ import main as status_main
from taskrun._ledger import BUSY_TIMEOUT, _owners, _public, store_for
from taskrun._ledger._owners import HOST, MACHINE, process_start

WAIT = 10

MAKE_LEDGER = """
import sys, taskrun
from taskrun import SequentialTaskRun, task

@task(runner=SequentialTaskRun, ledger=sys.argv[1], key=str, name="check")
def check(x):
    if x % 3 == 0:
        raise ValueError(f"{x} is divisible by 3")
    return x

for x in range(1, 8):
    check(x)
"""


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "runs.db")


@pytest.fixture
def gate():
    """An Event tasks wait on; always set at the end so no pool thread is left blocked."""
    event = threading.Event()
    yield event
    event.set()


def make_ledger(path):
    """A ledger with 5 succeeded and 2 failed calls of `check`, made by a process that has ended (no -wal left)."""
    subprocess.run([sys.executable, "-c", MAKE_LEDGER, str(path)], check=True, timeout=30)


def fingerprint(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns


def as_user(command):
    """``command`` with file permissions enforced (root drops the capabilities that bypass them)."""
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: file permissions cannot be enforced")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", *command]


def status(*args, unprivileged=False):
    command = [sys.executable, "-m", "taskrun", "status", *map(str, args)]
    return subprocess.run(as_user(command) if unprivileged else command, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def write_locked(path):
    """Another connection holds the file's write lock (``BEGIN EXCLUSIVE``) while the block runs."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def held(lock):
    """True while another thread holds ``lock``."""
    if lock.acquire(blocking=False):
        lock.release()
        return False
    return True


# ---- 1. python -m taskrun status only reads ----------------------------------------------------


def _empty_sqlite(path):
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE scratch (x)")
    conn.execute("DROP TABLE scratch")  # an SQLite database of one page, without tables
    conn.commit()
    conn.close()


def _foreign(path):
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)")
        conn.execute("INSERT INTO orders (item) VALUES ('tea')")
    conn.close()


@pytest.mark.parametrize("kind", ["ledger", "empty sqlite", "foreign", "random bytes"])
def test_status_changes_no_byte_of_the_file_and_creates_no_file(tmp_path, kind, capsys):
    path = tmp_path / "data.db"
    if kind == "ledger":
        make_ledger(path)
    elif kind == "empty sqlite":
        _empty_sqlite(path)
    elif kind == "foreign":
        _foreign(path)
    else:
        path.write_bytes(b"\x07not sqlite" * 500)
    before, files = fingerprint(path), sorted(os.listdir(tmp_path))
    codes = [status_main(["status", str(path)]), status_main(["status", str(path), "--json"])]
    out, err = capsys.readouterr()
    assert fingerprint(path) == before
    assert sorted(os.listdir(tmp_path)) == files == ["data.db"]  # no -wal, no -shm
    if kind == "ledger":
        assert codes == [0, 0]
        assert out.splitlines()[3].split() == ["check", "5", "2", "0", "0", "0", "7"]
    elif kind == "empty sqlite":
        assert codes == [0, 0]
        assert "no calls recorded yet" in out and '"total": 0' in out
    else:
        assert codes == [2, 2]
        assert "not a taskrun ledger" in err and "data.db" in err


def test_status_of_a_ledger_in_a_read_only_directory_changes_nothing(tmp_path):
    directory = tmp_path / "readonly"
    directory.mkdir()
    path = directory / "runs.db"
    make_ledger(path)
    before = fingerprint(path)
    os.chmod(directory, 0o555)
    try:
        for args in ([path], [path, "--json"]):
            result = status(*args, unprivileged=True)
            assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["tasks"]["check"]["succeeded"] == 5
    finally:
        os.chmod(directory, 0o755)
    assert fingerprint(path) == before
    assert os.listdir(directory) == ["runs.db"]


LIVE = """
import os, sys, time
import taskrun
from taskrun import ThreadTaskRun, task

db, started, release = sys.argv[1:4]

@task(runner=ThreadTaskRun, ledger=db, key=str, name="live")
def live(x):
    if x == "hold":
        open(started, "w").close()
        deadline = time.monotonic() + 30
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.01)
    return x

for x in ("a", "b", "c"):
    live(x).get_result(30)
live("hold").get_result(60)
"""


def test_status_sees_the_latest_commits_of_a_ledger_in_use(tmp_path):
    """Read through the WAL of a live process: its commits and its running call are seen, and its files stay."""
    db, started, release = (str(tmp_path / name) for name in ("runs.db", "started", "release"))
    proc = subprocess.Popen([sys.executable, "-c", LIVE, db, started, release])
    try:
        wait_for(lambda: os.path.exists(started), WAIT, "the live process to run its held call")
        files = sorted(os.listdir(tmp_path))
        assert "runs.db-wal" in files
        result = status(db, "--json")
        assert result.returncode == 0, result.stderr
        counts = json.loads(result.stdout)["tasks"]["live"]
        assert counts["succeeded"] == 3 and counts["running"] == 1
        assert sorted(os.listdir(tmp_path)) == files
    finally:
        open(release, "w").close()
        proc.wait(WAIT)
    assert proc.returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["release", "runs.db", "started"]  # its process cleaned up as usual


def test_status_reads_again_when_a_process_opens_the_file_meanwhile(db, monkeypatch, capsys):
    """Read as immutable (no -wal), then a process opens it and commits: status reads again, through the WAL."""
    make_ledger(db)
    writer = []
    summary = _public.summary_of

    def summary_then_a_writer_commits(conn):
        found = summary(conn)
        if not writer:
            writer.append(sqlite3.connect(db, isolation_level=None))
            writer[0].execute("INSERT INTO runs (task, key, status) VALUES ('late', 'k', 'succeeded')")
        return found

    monkeypatch.setattr(_public, "summary_of", summary_then_a_writer_commits)
    try:
        assert status_main(["status", db, "--json"]) == 0
    finally:
        for conn in writer:
            conn.close()
    assert json.loads(capsys.readouterr().out)["tasks"]["late"]["succeeded"] == 1


def test_status_errors_in_process(tmp_path, capsys):
    assert status_main(["status", str(tmp_path / "missing.db")]) == 2
    assert status_main(["status", str(tmp_path)]) == 2
    (tmp_path / "empty.db").touch()
    assert status_main(["status", str(tmp_path / "empty.db"), "--errors", "0"]) == 0
    out, err = capsys.readouterr()
    assert "does not exist" in err and "is a directory" in err and "no calls recorded yet" in out
    assert sorted(os.listdir(tmp_path)) == ["empty.db"]


def test_ledger_inspection_does_not_wait_behind_a_busy_write(db, gate):
    """summary/runs/result/last_errors read through a read-only connection: no wait behind the ledger thread."""
    ledger = Ledger(db, busy_timeout=3)

    @task(runner=ThreadTaskRun, ledger=ledger, key=str, name="work")
    def work(x):
        return x

    assert work("a").get_result(timeout=WAIT) == "a"
    storage = store_for(ledger).storage
    with write_locked(db):
        run = work("b")  # its claim waits up to 3 s for the write lock, holding the connection's lock
        wait_for(lambda: held(storage.lock), WAIT, "the ledger thread to wait for the write lock")
        started = time.monotonic()
        assert ledger.summary() == {"work": {"succeeded": 1}}
        assert [r.key for r in ledger.runs()] == ["a"]
        assert ledger.result("a") == "a" and ledger.last_errors() == []
        assert time.monotonic() - started < 2  # answered while the write still waits
    assert run.wait(timeout=WAIT)  # claimed once the lock went, or failed if it took longer than 3 s


# ---- 2. a busy file: a bounded wait, then LedgerError; nothing recorded is lost ---------------------


def test_a_busy_ledger_fails_new_calls_after_busy_timeout_and_keeps_what_was_recorded(db):
    ledger = Ledger(db, busy_timeout=0.3)
    calls = []

    @task(runner=ThreadTaskRun, ledger=ledger, key=str, name="work")
    def work(x):
        calls.append(x)
        return x * 10

    assert work(1).get_result(timeout=WAIT) == 10
    with write_locked(db):
        started = time.monotonic()
        run = work(2)
        error = run.exception(timeout=WAIT)
        waited = time.monotonic() - started
        assert isinstance(error, LedgerError), error
        message = str(error)
        assert db in message and "busy" in message and "write lock" in message and "busy_timeout=" in message
        assert "no other taskrun process is running calls on it" in message
        assert 0.25 <= waited < 5
        assert run.status is Status.FAILED and calls == [1]
        again = work(1)
        assert again.status is Status.SUCCEEDED and again.cached  # what was recorded still answers
    assert work(2).get_result(timeout=WAIT) == 20
    assert calls == [1, 2]
    assert ledger.summary() == {"work": {"succeeded": 2}}


@pytest.mark.parametrize("runner", [SequentialTaskRun, ThreadTaskRun])
def test_an_outcome_that_cannot_be_recorded_while_busy_reaches_the_caller_and_runs_again(db, runner, caplog):
    ledger = Ledger(db, busy_timeout=0.2)
    calls = []
    lock = []

    @task(runner=runner, ledger=ledger, key=str, name="work")
    def work(x):
        calls.append(x)
        if not lock:  # the claim is made; the record will find the file locked
            lock.append(sqlite3.connect(db, isolation_level=None, check_same_thread=False))
            lock[0].execute("BEGIN EXCLUSIVE")
        return x.upper()

    try:
        with caplog.at_level(logging.ERROR, logger="taskrun"):
            run = work("locked")
            assert run.get_result(timeout=WAIT) == "LOCKED" and run.status is Status.SUCCEEDED
    finally:
        lock[0].execute("ROLLBACK")
        lock[0].close()
    assert "1 outcome(s) were not recorded" in caplog.text and "run again next time" in caplog.text
    assert "busy" in caplog.text and "key locked" in caplog.text
    again = work("locked")
    assert again.get_result(timeout=WAIT) == "LOCKED" and not again.cached
    assert calls == ["locked", "locked"]


HOLDER = """
import os, sqlite3, sys, time
from taskrun._ledger._owners import HOST, MACHINE, process_start

conn = sqlite3.connect(sys.argv[1], isolation_level=None)
pid = os.getpid()
conn.execute("INSERT INTO owners VALUES ('holder', ?, ?, ?, ?, ?)", (HOST, MACHINE, pid, process_start(pid), time.time() + 60))
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


def test_a_busy_error_names_the_taskrun_process_that_may_hold_the_lock(db):
    """forget/reset wait busy_timeout too; the error names live taskrun processes of the owners table."""

    @task(runner=SequentialTaskRun, ledger=db, key=str, name="work")
    def work(x):
        return x

    work("k")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, db], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        ledger = Ledger(db, busy_timeout=0.2)
        with pytest.raises(LedgerError, match=rf"busy.*taskrun processes running calls on it: pid {holder.pid} on {HOST}"):
            ledger.forget("k")
        with pytest.raises(LedgerError, match="busy"):
            ledger.reset()
        with pytest.raises(LedgerError, match="busy"):
            ledger.reset(status="interrupted")
        assert ledger.result("k") == "k"  # nothing was deleted
    finally:
        holder.communicate("\n", timeout=WAIT)
    assert Ledger(db).forget("k")


def test_busy_timeout_is_a_setting_of_the_file(db):
    assert Ledger(db).busy_timeout == BUSY_TIMEOUT == 30.0
    assert Ledger(db, busy_timeout=2).busy_timeout == 2.0
    assert Ledger(db).busy_timeout == 2.0  # kept: @task(ledger=path) makes Ledger(path) with no setting
    assert pickle.loads(pickle.dumps(Ledger(db))).busy_timeout == 2.0
    for bad in ("1", True, [1]):
        with pytest.raises(TypeError, match="busy_timeout must be a number of seconds"):
            Ledger(db, busy_timeout=bad)
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="busy_timeout must be a finite number of seconds >= 0"):
            Ledger(db, busy_timeout=bad)


# ---- 3. a read-only file, a full disk -------------------------------------------------------------


REFUSE = """
import sys, taskrun
for attempt in (lambda: taskrun.Ledger(sys.argv[1]), lambda: taskrun.task(ledger=sys.argv[1])(lambda: 1)):
    try:
        attempt()
    except taskrun.LedgerError as exc:
        print(exc)
    else:
        print("opened")
"""


def test_a_read_only_ledger_file_is_refused_at_open_with_the_fix(tmp_path):
    path = tmp_path / "runs.db"
    make_ledger(path)
    os.chmod(path, 0o444)
    before = fingerprint(path)
    try:
        result = subprocess.run(as_user([sys.executable, "-c", REFUSE, str(path)]), capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert len(lines) == 2 and all("is read-only" in line and f"chmod u+w {path}" in line for line in lines), lines
        assert "python -m taskrun status" in lines[0]
        assert result.stderr == ""  # refused once, up front: no errors logged later
        assert status(path, unprivileged=True).returncode == 0  # still readable
    finally:
        os.chmod(path, 0o644)
    assert fingerprint(path) == before
    assert os.listdir(tmp_path) == ["runs.db"]


@pytest.mark.parametrize("runner", [SequentialTaskRun, ThreadTaskRun])
def test_on_a_full_disk_the_outcome_reaches_the_caller_and_the_call_runs_again(db, runner, caplog):
    ledger = Ledger(db)
    calls = []

    @task(runner=runner, ledger=ledger, key=str, name="big")
    def big(n):
        calls.append(n)
        return b"x" * n

    @task(runner=runner, ledger=ledger, key=str, name="fails")
    def fails(n):
        raise ValueError("y" * n)  # a failure's record holds its message

    assert big(10).get_result(timeout=WAIT) == b"x" * 10
    storage = store_for(ledger).storage
    with storage.lock:  # SQLite's "database or disk is full" once the file would grow
        pages = storage.connection().execute("PRAGMA page_count").fetchone()[0]
        storage.connection().execute(f"PRAGMA max_page_count = {pages}")
    with caplog.at_level(logging.ERROR, logger="taskrun"):
        run = big(100_000)  # its claim fits in the file; its result does not
        assert run.get_result(timeout=WAIT) == b"x" * 100_000 and run.status is Status.SUCCEEDED
        failed = fails(100_000)
        assert isinstance(failed.exception(timeout=WAIT), ValueError)
    assert caplog.text.count("1 outcome(s) were not recorded") == 2
    assert "full" in caplog.text and "run again next time" in caplog.text
    with storage.lock:
        storage.connection().execute("PRAGMA max_page_count = 1073741823")
    again = big(100_000)
    assert again.get_result(timeout=WAIT) == b"x" * 100_000 and not again.cached
    assert calls == [10, 100_000, 100_000]
    assert big(100_000).cached
    # Only its claim was written (held by this process, which may claim it again), none of its failure.
    [claim] = Ledger(db).runs(task="fails")
    assert claim.status == "running" and claim.error_type is None


# ---- 4. a cached run is a success -------------------------------------------------------------------


def test_a_cached_run_is_succeeded_and_counted_as_succeeded_and_cached(db, capfd):
    calls = []

    @task(runner=ThreadTaskRun, ledger=db, key=str, name="square")
    def square(x):
        calls.append(x)
        return x * x

    assert square.map(range(5)).results(timeout=WAIT) == [x * x for x in range(5)]
    capfd.readouterr()
    group = square.map(range(8), progress=True)
    assert group.wait(timeout=WAIT)
    assert [run.status for run in group] == [Status.SUCCEEDED] * 8
    assert [run.cached for run in group] == [True] * 5 + [False] * 3
    assert group.summary() == {
        "pending": 0, "running": 0, "succeeded": 8, "failed": 0, "stopped": 0, "skipped": 0, "cached": 5,
    }
    bar = capfd.readouterr().err
    assert "succeeded=8" in bar and "cached=5" in bar
    assert sorted(calls) == list(range(8))
    # A dependent of a cached run gets its result.
    plus_one = task(runner=ThreadTaskRun)(lambda y: y + 1)
    assert plus_one(square(3)).get_result(timeout=WAIT) == 10
    with pytest.raises(ValueError, match="records no skipped calls"):
        Ledger(db).runs(status=Status.SKIPPED)


# ---- 5. a ledger is code: status never loads a result ------------------------------------------------


class _Boobytrap:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))  # loading this pickle makes a directory


def test_status_never_unpickles_a_stored_result(tmp_path):
    path = tmp_path / "runs.db"
    make_ledger(path)
    marker = tmp_path / "loaded"
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE runs SET result = ? WHERE key = '1'", (pickle.dumps(_Boobytrap(str(marker))),))
    conn.close()
    for args in ([path], [path, "--json"], [path, "--errors", "50"]):
        result = status(*args)
        assert result.returncode == 0, result.stderr
        assert not marker.exists()
    # The pickle is live: reading the result (only from a ledger you trust) runs it.
    subprocess.run([sys.executable, "-c", "import sys, taskrun; taskrun.Ledger(sys.argv[1]).result('1')", str(path)],
                   check=True, timeout=30)
    assert marker.is_dir()


# ---- failure branches of the ledger thread -------------------------------------------------------------


def _lease(db):
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT lease_until FROM owners").fetchone()[0]
    finally:
        conn.close()


def test_the_ledger_thread_renews_the_lease_of_a_claim(db, gate, monkeypatch):
    monkeypatch.setattr(_owners, "LEASE", 0.3)
    started = threading.Event()

    @task(runner=ThreadTaskRun, ledger=db, name="hold")
    def hold():
        started.set()
        gate.wait(WAIT)
        return "done"

    run = hold()
    assert started.wait(WAIT)
    first = _lease(db)
    wait_for(lambda: _lease(db) > first, WAIT, "the lease to be renewed")
    gate.set()
    assert run.get_result(timeout=WAIT) == "done"


def test_a_lease_that_cannot_be_renewed_is_warned_about_and_the_run_goes_on(db, gate, monkeypatch, caplog):
    monkeypatch.setattr(_owners, "LEASE", 0.3)
    ledger = Ledger(db, busy_timeout=0.05)
    started = threading.Event()

    @task(runner=ThreadTaskRun, ledger=ledger, name="hold")
    def hold():
        started.set()
        gate.wait(WAIT)
        return "done"

    with caplog.at_level(logging.WARNING, logger="taskrun"):
        run = hold()
        assert started.wait(WAIT)
        with write_locked(db):
            wait_for(lambda: "could not renew this process's lease" in caplog.text, WAIT, "the renewal to fail")
    gate.set()
    assert run.get_result(timeout=WAIT) == "done"
    assert ledger.summary() == {"hold": {"succeeded": 1}}


def _store_result(db, task_name, key, blob):
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(
            "INSERT OR REPLACE INTO runs (task, key, status, attempts, result) VALUES (?, ?, 'succeeded', 1, ?)",
            (task_name, key, blob),
        )
    conn.close()


UNLOADABLE = b"\x80\x04cno_such_module_anywhere\nThing\n)\x81."  # a class this process cannot import


@pytest.mark.parametrize("when", ["read at the first call", "found when claiming"])
def test_a_stored_result_that_cannot_be_unpickled_here_runs_again_with_a_warning(db, when, caplog):
    calls = []

    @task(runner=ThreadTaskRun, ledger=db, key=str, name="make")
    def make(x):
        calls.append(x)
        return f"made {x}"

    Ledger(db)  # the file and its tables
    if when == "found when claiming":
        assert make("other").get_result(timeout=WAIT) == "made other"  # the task's stored keys are read now
    _store_result(db, "make", "k", UNLOADABLE)  # as if a process with another environment had stored it
    with pytest.raises(SerializationError, match="cannot be unpickled"):
        Ledger(db).result("k")
    with caplog.at_level(logging.WARNING, logger="taskrun"):
        run = make("k")
        assert run.get_result(timeout=WAIT) == "made k" and not run.cached
    assert "cannot be unpickled here" in caplog.text and "running the call again" in caplog.text
    assert "k" in calls
    assert Ledger(db).result("k") == "made k"  # replaced by the new result
    assert make("k").cached


def test_shutdown_without_waiting_stops_queued_claims_and_loses_none(db, gate):
    started = threading.Event()

    @task(runner=ThreadTaskRun.configure(max_workers=1), ledger=db, key=str, name="queued")
    def queued(x):
        started.set()
        gate.wait(WAIT)
        return x

    runs = [queued(i) for i in range(60)]
    assert started.wait(WAIT)
    began = time.monotonic()
    taskrun.shutdown(wait=False)
    assert time.monotonic() - began < WAIT
    gate.set()
    assert all(run.wait(WAIT) for run in runs)  # every handle finished: none lost, none hanging
    assert collections.Counter(run.status for run in runs) == {Status.STOPPED: 60}
    assert all(isinstance(run.exception(), TaskStopped) for run in runs)
    assert "succeeded" not in Ledger(db).summary().get("queued", {})
    again = queued(59)  # nothing was recorded as done: it runs on the next call
    assert again.get_result(timeout=WAIT) == 59 and not again.cached


def test_a_failed_commit_keeps_what_was_committed_and_fails_only_the_rest(db, monkeypatch, caplog):
    """One batch: a record and claims of two tasks. The record and the first task's claim commit; the second's fails."""
    opened, in_callback, block = threading.Event(), threading.Event(), threading.Event()
    finish = threading.Event()

    @task(runner=ThreadTaskRun, ledger=db, key=str, name="opener")
    def opener(x):
        opened.wait(WAIT)
        return x

    @task(runner=ThreadTaskRun, ledger=db, key=str, name="record")
    def record(x):
        finish.wait(WAIT)
        return x

    first = task(runner=ThreadTaskRun, ledger=db, key=str, name="first")(lambda x: f"first {x}")
    second = task(runner=ThreadTaskRun, ledger=db, key=str, name="second")(lambda x: f"second {x}")
    try:
        to_record = record(1)
        head = opener(0)
        head.add_done_callback(lambda run: (in_callback.set(), block.wait(WAIT)))  # runs on the ledger thread
        opened.set()
        assert in_callback.wait(WAIT)  # the ledger thread is busy: what comes now waits in its queue
        store = store_for(Ledger(db))
        finish.set()
        wait_for(lambda: len(store.writer.queue) == 1, WAIT, "the record to be queued")
        a, b = first(1), second(1)
        wait_for(lambda: len(store.writer.queue) == 3, WAIT, "a record and two claims to be queued")
        original = store.claims.claim

        def claim(storage, task_name, admissions, *rest):
            if task_name == "second":
                raise sqlite3.OperationalError("disk I/O error")
            return original(storage, task_name, admissions, *rest)

        monkeypatch.setattr(store.claims, "claim", claim)
        with caplog.at_level(logging.ERROR, logger="taskrun"):
            block.set()
            assert a.get_result(timeout=WAIT) == "first 1"  # its claim was committed: it ran
            error = b.exception(timeout=WAIT)
        assert isinstance(error, LedgerError) and "disk I/O error" in str(error) and "was not run" in str(error)
        assert to_record.get_result(timeout=WAIT) == 1
    finally:
        opened.set(), block.set(), finish.set()
    assert "1 call(s) were not run" in caplog.text and "not recorded" not in caplog.text
    monkeypatch.undo()
    assert record(1).cached and first(1).cached  # both were recorded
    assert second(1).get_result(timeout=WAIT) == "second 1"


def test_a_key_a_live_process_holds_is_taken_over_when_that_process_dies(db, caplog, monkeypatch):
    calls = []

    @task(runner=ThreadTaskRun, ledger=db, key=str, name="work")
    def work(x):
        calls.append(x)
        return x * 10

    assert work(0).get_result(timeout=WAIT) == 0  # the file, its tables, this process in owners
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        conn = sqlite3.connect(db)
        with conn:
            conn.execute(
                "INSERT INTO owners VALUES ('other', ?, ?, ?, ?, ?)",
                (HOST, MACHINE, other.pid, process_start(other.pid), time.time() + 60),
            )
            conn.execute("INSERT INTO runs (task, key, status, owner, claim) VALUES ('work', '5', 'running', 'other', 1)")
        conn.close()
        ledger = Ledger(db)
        assert ledger.summary() == {"work": {"succeeded": 1, "running": 1}}
        store, polls = store_for(ledger), []
        poll = store.poll
        monkeypatch.setattr(store, "poll", lambda: (polls.append(1), poll())[1])
        with caplog.at_level(logging.INFO, logger="taskrun"):
            run = work(5)
            wait_for(lambda: len(polls) >= 2, WAIT, "the ledger thread to look at the key twice")
            assert ("work", "5") in store.claims.watching  # still held by the live process: the call waits
            assert run.status is Status.PENDING and calls == [0]
            other.stdin.close()
            other.wait(WAIT)
            assert run.get_result(timeout=WAIT) == 50 and not run.cached
    finally:
        if other.poll() is None:
            other.kill()
            other.wait(WAIT)
    assert calls == [0, 5]
    assert "was interrupted" in caplog.text
    assert ledger.summary() == {"work": {"succeeded": 2}}


def test_a_call_waiting_for_another_processs_key_can_be_stopped_and_ends_stopped_at_shutdown(db):
    @task(runner=ThreadTaskRun, ledger=db, key=str, name="work")
    def work(x):
        return x

    assert work(0).get_result(timeout=WAIT) == 0
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        _claimed_by(db, other.pid, ["5", "6"])
        store = store_for(Ledger(db))
        stopped, at_shutdown = work(5), work(6)
        watched = store.claims.watching
        wait_for(lambda: {("work", "5"), ("work", "6")} <= set(watched), WAIT, "both calls to wait for the other process")
        assert stopped.stop() and stopped.status is Status.STOPPED
        assert ("work", "5") not in store.claims.watching
        taskrun.shutdown()
        assert at_shutdown.status is Status.STOPPED
        with pytest.raises(TaskStopped, match="another process ran its key"):
            at_shutdown.get_result(timeout=0)
    finally:
        other.stdin.close()
        other.wait(WAIT)
    assert Ledger(db).reset(status="interrupted") == 2  # the other process is gone now
    assert Ledger(db).summary() == {"work": {"succeeded": 1}}


def _claimed_by(db, pid, keys, task_name="work"):
    """Rows of ``keys`` claimed by the live process ``pid`` (its row in owners says how to tell it is alive)."""
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(
            "INSERT INTO owners VALUES ('other', ?, ?, ?, ?, ?)", (HOST, MACHINE, pid, process_start(pid), time.time() + 60)
        )
        conn.executemany(
            "INSERT INTO runs (task, key, status, owner, claim) VALUES (?, ?, 'running', 'other', 1)",
            [(task_name, key) for key in keys],
        )
    conn.close()


def test_an_inline_call_waits_in_the_caller_for_a_key_another_process_holds(db):
    @task(runner=SequentialTaskRun, ledger=db, key=str, name="work")
    def work(x):
        return x * 2

    work(0)
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    results = []
    caller = threading.Thread(target=lambda: results.append(work(4)))
    try:
        _claimed_by(db, other.pid, ["4"])
        caller.start()
        wait_for(lambda: ("work", "4") in store_for(Ledger(db)).claims.active, WAIT, "the call to be waiting")
        assert caller.is_alive()  # the inline call waits in its caller while the other process holds the key
    finally:
        other.stdin.close()
        other.wait(WAIT)
        caller.join(WAIT)
    assert [run.get_result() for run in results] == [8] and not results[0].cached


def test_two_inline_calls_of_one_key_run_it_once(db, gate):
    calls, handles = [], []
    started = threading.Event()

    @task(runner=SequentialTaskRun, ledger=db, key=str, name="slow")
    def slow(x):
        calls.append(x)
        started.set()
        gate.wait(WAIT)
        return x

    threads = [threading.Thread(target=lambda: handles.append(slow("k"))) for _ in range(2)]
    threads[0].start()
    assert started.wait(WAIT)
    first = store_for(Ledger(db)).claims.active[("slow", "k")]
    threads[1].start()
    wait_for(lambda: first._waiters, WAIT, "the second call to wait for the first")
    gate.set()
    for thread in threads:
        thread.join(WAIT)
    assert calls == ["k"]
    assert sorted(h.cached for h in handles) == [False, True] and [h.get_result() for h in handles] == ["k", "k"]


def test_the_status_command_shows_interrupted_calls_and_errors_without_a_call(db, capsys):
    make_ledger(db)
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("INSERT INTO runs (task, key, status, owner, claim) VALUES ('check', 'gone', 'running', 'nobody', 1)")
        conn.execute("UPDATE runs SET call = NULL WHERE key = '6'")
    conn.close()
    assert status_main(["status", db]) == 0
    out = capsys.readouterr().out
    assert "1 interrupted (their process is gone): they run again on the next call." in out
    assert out.count("call: check(") == 1  # key 3 shows its call; key 6 has none recorded
    with pytest.raises(SystemExit) as exit_info:
        status_main(["status", db, "--errors", "many"])
    assert exit_info.value.code == 2
    assert "0 or more, got 'many'" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["body", "tables"])
def test_status_of_a_damaged_ledger_is_an_error(db, damage, capsys):
    make_ledger(db)
    if damage == "body":
        with open(db, "r+b") as f:  # keep the 100-byte header, damage what follows
            f.seek(100)
            f.write(b"\xff" * 3000)
    else:
        conn = sqlite3.connect(db)
        conn.execute("DROP TABLE owners")  # says it is a ledger, lacks a table
        conn.close()
    before = fingerprint(db)
    assert status_main(["status", db]) == 2
    err = capsys.readouterr().err
    assert "runs.db" in err and ("not a usable taskrun ledger" in err or "cannot read ledger" in err)
    assert fingerprint(db) == before


def test_owners_decide_running_or_interrupted(db):
    """A claim is running while its owner may be: a live process here, or an unexpired lease from elsewhere."""
    Ledger(db)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_for(lambda: not is_alive(zombie.pid), WAIT, "the child to end (a zombie until reaped)")
    now = time.time()
    owners = [
        ("elsewhere-live", "far", "far:ns", 1, "", now + 60),
        ("elsewhere-expired", "far", "far:ns", 1, "", now - 1),
        ("me-reused", HOST, MACHINE, os.getpid(), "not my start", now + 60),
        ("zombie", HOST, MACHINE, zombie.pid, process_start(zombie.pid), now + 60),
        ("no-start-time", HOST, MACHINE, os.getppid(), "", now + 60),  # pid alone: alive while it exists
    ]
    conn = sqlite3.connect(db)
    with conn:
        conn.executemany("INSERT INTO owners VALUES (?, ?, ?, ?, ?, ?)", owners)
        conn.executemany(
            "INSERT INTO runs (task, key, status, owner, claim) VALUES ('t', ?, 'running', ?, 1)",
            [(owner[0], owner[0]) for owner in owners] + [("unknown", "not-in-owners")],
        )
    conn.close()
    try:
        statuses = {record.key: record.status for record in Ledger(db).runs()}
    finally:
        zombie.wait(WAIT)
    assert statuses == {
        "elsewhere-live": "running", "elsewhere-expired": "interrupted", "me-reused": "interrupted",
        "zombie": "interrupted", "no-start-time": "running", "unknown": "interrupted",
    }
    assert Ledger(db).runs()[0].error is None


def test_a_write_refused_by_sqlite_says_the_file_is_read_only_and_changes_nothing(db):
    ledger = Ledger(db)

    @task(runner=ThreadTaskRun, ledger=ledger, key=str, name="work")
    def work(x):
        return x

    assert work("a").get_result(timeout=WAIT) == "a"
    storage = store_for(ledger).storage
    with storage.lock:
        storage.connection().execute("PRAGMA query_only = ON")  # SQLite refuses writes: "attempt to write a readonly database"
    try:
        error = work("b").exception(timeout=WAIT)
        assert isinstance(error, LedgerError) and "read-only now: make them writable" in str(error)
        with pytest.raises(LedgerError, match="could not write to ledger.*read-only"):
            ledger.forget("a")
    finally:
        with storage.lock:
            storage.connection().execute("PRAGMA query_only = OFF")
    assert ledger.result("a") == "a"
    assert ledger.reset(task="work") == 1 and ledger.summary() == {}
    assert not work("a").cached  # its cached result was dropped too


def test_the_whole_busy_timeout_is_waited_even_if_sqlite_gives_up_sooner(db):
    ledger = Ledger(db, busy_timeout=0.5)
    Ledger(db).forget("nothing")  # the tables exist
    storage = store_for(ledger).storage
    with storage.lock:
        storage.connection().execute("PRAGMA busy_timeout = 50")  # SQLite reports "locked" after 50 ms...
    with write_locked(db):
        started = time.monotonic()
        with pytest.raises(LedgerError, match=r"busy timeout \(0.5 s\)"):
            ledger.reset()
        assert time.monotonic() - started >= 0.45  # ...and the ledger tries again for the rest of its 0.5 s


@pytest.mark.parametrize("holding", ["a read", "a write"])
def test_opening_a_file_another_connection_holds_waits_busy_timeout_then_says_so(tmp_path, holding):
    path = str(tmp_path / "new.db")
    _empty_sqlite(path)  # not in WAL mode yet: making it a ledger needs the file to itself
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE" if holding == "a write" else "BEGIN")
    other.execute("SELECT * FROM sqlite_master").fetchall()
    try:
        started = time.monotonic()
        with pytest.raises(LedgerError, match=r"new\.db.*busy.*who holds it cannot be read from the file"):
            Ledger(path, busy_timeout=0.2)
        assert 0.15 <= time.monotonic() - started < 5
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert Ledger(path).summary() == {}  # free now: it becomes a ledger


def test_a_large_stored_result_deleted_by_another_process_runs_again(db):
    calls = []

    @task(runner=ThreadTaskRun, ledger=db, key=str, name="big")
    def big(x):
        calls.append(x)
        return x * 10_000  # larger than what is kept in memory: read from the file when asked for

    assert big("ab").get_result(timeout=WAIT) == "ab" * 10_000
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("DELETE FROM runs WHERE key = 'ab'")
    conn.close()
    again = big("ab")
    assert again.get_result(timeout=WAIT) == "ab" * 10_000 and not again.cached
    assert calls == ["ab", "ab"]


def test_ledger_objects_of_one_file_are_equal_and_a_replaced_file_is_opened_anew(db):
    make_ledger(db)  # made by another process
    first = Ledger(db)
    assert first == Ledger(db) and hash(first) == hash(Ledger(db)) and repr(first) == f"Ledger({db!r})"
    assert first != Ledger(db + "2") and first != db
    assert first.summary()["check"]["succeeded"] == 5
    taskrun.shutdown()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    fresh = Ledger(db)
    assert fresh != first and fresh.summary() == {}


def test_a_key_function_may_return_a_str_subclass(db):
    class Name(str):
        pass

    @task(runner=SequentialTaskRun, ledger=db, key=lambda x: Name(f"item-{x}"), name="named")
    def named(x):
        return x

    named(1)
    assert [r.key for r in Ledger(db).runs()] == ["item-1"] and named(1).cached


def test_an_unexpected_error_in_the_ledger_thread_is_logged_and_the_thread_goes_on(db, gate, monkeypatch, caplog):
    monkeypatch.setattr(_owners, "LEASE", 0.3)
    started = threading.Event()

    @task(runner=ThreadTaskRun, ledger=db, name="hold")
    def hold():
        started.set()
        gate.wait(WAIT)
        return "done"

    run = hold()
    assert started.wait(WAIT)
    store = store_for(Ledger(db))
    failures = []

    def renew_fails_once():
        if not failures:
            failures.append(1)
            raise RuntimeError("boom")

    monkeypatch.setattr(store, "renew", renew_fails_once)
    with caplog.at_level(logging.ERROR, logger="taskrun"):
        wait_for(lambda: "the ledger thread failed; it goes on" in caplog.text, WAIT, "the error to be logged")
    gate.set()
    assert run.get_result(timeout=WAIT) == "done"
    assert Ledger(db).summary() == {"hold": {"succeeded": 1}}


def test_status_of_a_killed_batch_in_a_read_only_directory_reads_its_wal(tmp_path):
    """A batch killed with SIGKILL leaves its records in runs.db-wal; status reads them without writing."""
    directory = tmp_path / "readonly"
    directory.mkdir()
    path = directory / "runs.db"
    killed = (
        "import os, sys, taskrun\n"
        "@taskrun.task(runner=taskrun.ThreadTaskRun, ledger=sys.argv[1], key=str, name='w')\ndef w(x): return x\n"
        "for i in range(5): w(i).get_result(30)\nos.kill(os.getpid(), 9)"
    )
    subprocess.run([sys.executable, "-c", killed, str(path)], timeout=30)
    assert sorted(os.listdir(directory)) == ["runs.db", "runs.db-shm", "runs.db-wal"]
    before = {name: fingerprint(directory / name) for name in ("runs.db", "runs.db-wal")}
    os.chmod(directory, 0o555)
    try:
        result = status(path, "--json", unprivileged=True)
    finally:
        os.chmod(directory, 0o755)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tasks"]["w"]["succeeded"] == 5
    assert {name: fingerprint(directory / name) for name in ("runs.db", "runs.db-wal")} == before
