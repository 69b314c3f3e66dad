"""The ledger's remaining branches, each made to happen: SQLite refusing to open, read or write the file, owners
that cannot be looked up in /proc, claims that fail or race, replies that raise, and the writer with no thread.

The run side is driven through the store with the public-attributes-only run of test_ledger_store; faults
are forced by replacing one function (a connect, a claim statement) for the length of a test.
"""

import logging
import os
import pickle
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from _waiting import wait_for
from test_ledger_failures import UNLOADABLE, _claimed_by, _store_result
from test_ledger_store import PublicRun, Replies

from taskrun import Ledger, LedgerError, SequentialTaskRun, Status, TaskStopped, task
from taskrun._ledger import _owners, _storage, _writer, store_for
from taskrun._ledger._claims import Claims

WAIT = 10


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "runs.db")


@pytest.fixture
def other():
    """A live process of this machine, to hold claims in the file."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    yield proc
    proc.stdin.close()
    proc.wait(WAIT)


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(WAIT)
    return proc.pid


def made(db):
    """A ledger file with one succeeded call, and its store in this process."""
    ledger = Ledger(db)
    store = store_for(ledger)
    run = PublicRun("work", "done")
    assert store.admit_here(run) == ("claimed", None)
    assert store.record_here(run, Status.SUCCEEDED, "ok", None) is None
    run.finish(Status.SUCCEEDED)
    return ledger, store


# ---- what the objects say they are ---------------------------------------------------------------


def test_reprs_name_the_file_and_a_read_only_ledger_equals_only_itself(db):
    ledger, store = made(db)
    assert repr(store) == f"<ledger store {db}>" and repr(store.storage) == f"<ledger storage {db}>"
    reader = Ledger.open_read_only(db)
    assert repr(reader._reader) == f"<read-only ledger file {db}>"
    assert reader == reader and reader != Ledger.open_read_only(db) and reader != ledger


# ---- SQLite refuses ---------------------------------------------------------------------------------


def _refuse(*args, **kwargs):
    raise sqlite3.OperationalError("unable to open database file")


def test_a_file_sqlite_cannot_open_is_a_ledger_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite3, "connect", _refuse)
    new = str(tmp_path / "new.db")
    with pytest.raises(LedgerError, match=r"cannot open ledger .*new\.db.*unable to open database file; check that"):
        Ledger(new)
    existing = tmp_path / "existing.db"
    existing.write_bytes(b"x" * 100)
    with pytest.raises(LedgerError, match=r"cannot read ledger .*existing\.db.*unable to open database file"):
        Ledger(str(existing))


def test_a_file_sqlite_cannot_set_up_is_a_ledger_error_and_an_interrupt_goes_through(db, monkeypatch):
    def disk_error(conn, timeout):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(_storage, "_configure", disk_error)
    with pytest.raises(LedgerError, match=r"cannot use ledger .*: disk I/O error; check that the file"):
        Ledger(db)

    def interrupted(conn, timeout):
        raise KeyboardInterrupt

    monkeypatch.setattr(_storage, "_configure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Ledger(db)
    monkeypatch.undo()
    assert Ledger(db).summary() == {}  # nothing was left half made


def test_a_connection_that_cannot_be_opened_again_is_a_ledger_error(db, monkeypatch):
    ledger, store = made(db)
    store.storage.close()
    store.storage.close()  # closing twice is harmless
    monkeypatch.setattr(sqlite3, "connect", _refuse)
    with pytest.raises(LedgerError, match="cannot open ledger .*unable to open database file"):
        ledger.summary()
    monkeypatch.undo()

    def disk_error(conn, timeout):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(_storage, "_configure", disk_error)
    with pytest.raises(LedgerError, match="cannot open ledger .*disk I/O error"):
        store.storage.query(lambda conn: None)
    monkeypatch.undo()
    assert ledger.summary() == {"work": {"succeeded": 1}}  # opened again once SQLite lets it


def test_a_transaction_whose_body_fails_changes_nothing(db):
    ledger, store = made(db)

    def delete_then_fail(conn):
        conn.execute("DELETE FROM runs")
        raise ZeroDivisionError("the body failed")

    with pytest.raises(ZeroDivisionError):
        store.storage.transaction(delete_then_fail)
    assert ledger.summary() == {"work": {"succeeded": 1}}


def test_reads_sqlite_refuses_are_ledger_errors(db, monkeypatch):
    ledger, store = made(db)
    with pytest.raises(LedgerError, match="cannot read ledger .*no such table: nowhere"):
        store.storage.query(lambda conn: conn.execute("SELECT * FROM nowhere"))
    with pytest.raises(LedgerError, match="cannot read ledger .*no such table: nowhere"):
        store.storage.read(lambda conn: conn.execute("SELECT * FROM nowhere"), None)
    reader = Ledger.open_read_only(db)
    monkeypatch.setattr(_storage, "open_read_only", _refuse)
    for read in (ledger.summary, reader.summary):
        with pytest.raises(LedgerError, match="cannot read ledger .*unable to open database file"):
            read()


def test_a_read_only_ledger_whose_file_is_gone_says_so(db):
    made(db)
    reader = Ledger.open_read_only(db)
    os.remove(db)
    with pytest.raises(LedgerError, match="cannot read ledger .*No such file"):
        reader.summary()


def test_setting_up_waits_while_another_process_holds_the_file_locked():
    class Connection:
        def __init__(self, locked_times, error="database is locked"):
            self.locked_times, self.error, self.statements = locked_times, error, []

        def execute(self, sql):
            self.statements.append(sql)
            if sql == "PRAGMA journal_mode = WAL" and self.locked_times:
                self.locked_times -= 1
                raise sqlite3.OperationalError(self.error)

    briefly = Connection(locked_times=2)
    _storage._configure(briefly, timeout=WAIT)
    assert briefly.statements == ["PRAGMA journal_mode = WAL"] * 3 + ["PRAGMA synchronous = NORMAL"]
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        _storage._configure(Connection(locked_times=10**9), timeout=0)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        _storage._configure(Connection(locked_times=1, error="disk I/O error"), timeout=WAIT)


def test_the_head_of_a_file_that_cannot_be_read_is_empty(tmp_path):
    assert _storage._head(str(tmp_path / "missing")) == b""


# ---- owners ------------------------------------------------------------------------------------------


def test_without_proc_an_owner_is_judged_by_signalling_its_pid(monkeypatch, other, dead_pid):
    assert _owners.process_start(dead_pid) == ""

    def no_readlink(path):
        raise OSError("no /proc here")

    monkeypatch.setattr(os, "readlink", no_readlink)
    assert _owners._machine() == f"{_owners.HOST}:"
    monkeypatch.undo()

    def no_proc(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(_owners, "open", no_proc, raising=False)  # shadows the builtin in that module only
    now = time.time()
    assert _owners.owner_alive(_owners.MACHINE, other.pid, "12345", None, now) is True
    assert _owners.owner_alive(_owners.MACHINE, dead_pid, "12345", None, now) is False

    def not_ours(pid, signum):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(_owners.os, "kill", not_ours)
    assert _owners.owner_alive(_owners.MACHINE, other.pid, "12345", None, now) is True  # exists, not ours to signal


# ---- inline admissions (decided in the caller) --------------------------------------------------------


def test_an_inline_call_whose_key_another_process_finished_meanwhile_gets_that_result(db):
    ledger, store = made(db)
    assert store.lookup("work", "k") == (False, None)  # the succeeded keys of "work" are read now
    _store_result(db, "work", "k", pickle.dumps("from the other process"))
    assert store.admit_here(PublicRun("work", "k")) == ("cached", "from the other process")


def test_an_inline_call_whose_key_finished_with_a_result_that_cannot_load_here_runs(db, caplog):
    ledger, store = made(db)
    assert store.lookup("work", "k") == (False, None)
    _store_result(db, "work", "k", UNLOADABLE)
    with caplog.at_level(logging.WARNING, logger="taskrun"):
        assert store.admit_here(PublicRun("work", "k")) == ("claimed", None)  # its row is taken over
    assert "cannot be unpickled here" in caplog.text


def test_an_inline_call_waiting_for_another_process_can_be_stopped(db, other):
    ledger, store = made(db)
    _claimed_by(db, other.pid, ["k"])
    run, answer = PublicRun("work", "k"), []
    caller = threading.Thread(target=lambda: answer.append(store.admit_here(run)))
    caller.start()
    wait_for(lambda: ("work", "k") in store.claims.active, WAIT, "the call to wait for the other process")
    run.finish(Status.STOPPED)
    caller.join(WAIT)
    (verdict, exc), = answer
    assert verdict == "stopped" and isinstance(exc, TaskStopped)
    assert ("work", "k") not in store.claims.active


def test_an_inline_claim_that_cannot_be_read_back_fails_the_call(db, other, monkeypatch):
    ledger, store = made(db)
    _claimed_by(db, other.pid, ["k"])

    def unreadable(*args):
        raise LedgerError("cannot read ledger: injected")

    monkeypatch.setattr(store.storage, "unclaimed", unreadable)
    verdict, exc = store.admit_here(PublicRun("work", "k"))
    assert verdict == "failed" and isinstance(exc, LedgerError)
    assert "its claim could not be written to the ledger: cannot read ledger: injected" in str(exc)


def test_an_inline_run_stopped_while_it_claims_is_recorded_stopped(db, monkeypatch):
    ledger, store = made(db)
    run = PublicRun("work", "k")
    real = store.claims.claim

    def claim_then_stop(*args):
        decision = real(*args)
        run.finish(Status.STOPPED)  # stop() lands while the claim is being written
        return decision

    monkeypatch.setattr(store.claims, "claim", claim_then_stop)
    assert store.admit_here(run) == ("claimed", None)
    wait_for(lambda: {r.key: r.status for r in ledger.runs(task="work")}.get("k") == "stopped", WAIT,
             "the stopped record of the claimed key")


# ---- admissions on the ledger thread --------------------------------------------------------------------


def test_a_claim_that_cannot_be_read_back_fails_the_call_on_the_ledger_thread(db, other, monkeypatch):
    ledger, store = made(db)
    _claimed_by(db, other.pid, ["k"])

    def unreadable(*args):
        raise LedgerError("cannot read ledger: injected")

    monkeypatch.setattr(store.storage, "unclaimed", unreadable)
    reply = Replies()
    store.admit(PublicRun("work", "k"), reply)
    verdict, exc = reply.one()
    assert verdict == "failed" and "cannot read ledger: injected" in str(exc)


def test_a_dead_owners_claim_that_cannot_be_taken_over_fails_the_calls_left(db, dead_pid, monkeypatch, caplog):
    ledger, store = made(db)
    _claimed_by(db, dead_pid, ["k"])

    def refused(*args):
        raise LedgerError("could not write to ledger: injected")

    monkeypatch.setattr(store.storage, "take_over", refused)
    reply = Replies()
    with caplog.at_level(logging.ERROR, logger="taskrun"):
        store.admit(PublicRun("work", "k"), reply)
        verdict, exc = reply.one()
    assert verdict == "failed" and "could not write to ledger: injected" in str(exc)
    assert "1 call(s) were not run" in caplog.text


def test_a_claim_that_changed_while_it_was_taken_over_is_looked_at_again(db, dead_pid, monkeypatch):
    ledger, store = made(db)
    _claimed_by(db, dead_pid, ["k"])
    real, tries = store.storage.take_over, []

    def changed_the_first_time(*args):
        tries.append(args)
        return False if len(tries) == 1 else real(*args)

    monkeypatch.setattr(store.storage, "take_over", changed_the_first_time)
    reply = Replies()
    store.admit(PublicRun("work", "k"), reply)
    assert reply.one() == ("claimed", None)
    assert len(tries) == 2  # watched after the first, claimed at the next look


def test_a_watched_run_that_finished_is_answered_stopped_at_the_next_look(db, other):
    ledger, store = made(db)
    _claimed_by(db, other.pid, ["k"])
    run, reply = PublicRun("work", "k"), Replies()
    store.admit(run, reply)
    wait_for(lambda: ("work", "k") in store.claims.watching, WAIT, "the key to be watched")
    run.finish(Status.STOPPED)  # finished without telling the ledger
    verdict, exc = reply.one()
    assert verdict == "stopped" and isinstance(exc, TaskStopped)


def test_replies_that_raise_are_logged_and_nothing_else_is_lost(db, other, caplog):
    ledger, store = made(db)
    caplog.set_level(logging.ERROR, logger="taskrun")

    def raising(*args):
        raise RuntimeError(f"reply raised for {args[0]}")

    store.admit(PublicRun("work", "a"), raising)  # claimed: starting it raises
    wait_for(lambda: "starting work#a failed" in caplog.text, WAIT, "the claim's failure to be logged")
    run = PublicRun("work", "b")
    store.record(run, Status.SUCCEEDED, 1, None, raising)  # recorded: publishing it raises
    wait_for(lambda: "publishing work#b failed" in caplog.text, WAIT, "the record's failure to be logged")
    assert {r.key: r.status for r in ledger.runs(task="work")}["b"] == "succeeded"
    _claimed_by(db, other.pid, ["c"])
    store.admit(PublicRun("work", "c"), raising)
    wait_for(lambda: ("work", "c") in store.claims.watching, WAIT, "the key to be watched")
    store.settle_claims(wait=False)  # taskrun shuts down: the watched run is told it stopped, which raises
    assert "stopping work#c failed" in caplog.text
    store.writer.open_gate()


# ---- records --------------------------------------------------------------------------------------------


def test_a_record_with_no_ledger_thread_is_committed_in_the_caller(db):
    ledger = Ledger(db)
    store = store_for(ledger)
    assert not store.writer.running
    run, reply = PublicRun("work", "k"), Replies()
    store.record(run, Status.SUCCEEDED, 7, None, reply)
    assert reply.got == [(Status.SUCCEEDED, 7, None, None)]  # already answered: written here
    assert store.lookup("work", "k") == (True, 7)


def test_a_write_that_fails_outside_sqlite_is_said_as_a_write_of_the_file(db, monkeypatch, caplog):
    ledger = Ledger(db)
    store = store_for(ledger)

    def gone(outcomes):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store.storage, "write_outcomes", gone)
    reply = Replies()
    error = ValueError("the task failed")
    with caplog.at_level(logging.ERROR, logger="taskrun"):
        store.record(PublicRun("work", "k"), Status.FAILED, None, error, reply)
    status, value, exc, problem = reply.one()
    assert (status, exc) == (Status.FAILED, error)
    assert isinstance(problem, LedgerError) and isinstance(problem.__cause__, OSError)
    assert str(problem).startswith(f"could not write to ledger {db!r}: OSError: [Errno 5] Input/output error")
    assert "outcome(s) were not recorded" in caplog.text


def test_the_lease_is_not_renewed_before_this_process_is_in_the_file(db):
    store = store_for(Ledger(db))
    store.renew()
    assert not store.storage.registered
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT count(*) FROM owners").fetchone() == (0,)
    finally:
        conn.close()


def test_shutdown_waits_for_a_run_that_still_holds_a_claim(db):
    store = store_for(Ledger(db))
    run, reply = PublicRun("work", "k"), Replies()
    store.admit(run, reply)
    assert reply.one() == ("claimed", None)
    closing = threading.Thread(target=store.shutdown, kwargs={"wait": True})
    closing.start()

    def waiting_for_the_run():
        frame = sys._current_frames().get(closing.ident)
        while frame is not None:
            if frame.f_code is PublicRun.wait.__code__:
                return True
            frame = frame.f_back
        return False

    wait_for(waiting_for_the_run, WAIT, "shutdown to wait for the run holding a claim")
    run.finish(Status.SUCCEEDED)
    closing.join(WAIT)
    assert not closing.is_alive() and not store.writer.running


# ---- claims and the writer on their own -------------------------------------------------------------------


def test_a_finished_run_still_active_gives_its_key_to_the_next_run():
    claims = Claims()
    first, second = PublicRun("work", "k"), PublicRun("work", "k")
    assert claims.enter(first) is None
    assert claims.enter(second) is first  # unfinished: the second waits for it
    first.finish(Status.STOPPED)  # published, not yet told to the ledger
    assert claims.enter(second) is None and claims.active[("work", "k")] is second


def test_nothing_watched_releases_nothing(db):
    ledger, store = made(db)
    assert Claims().released(store.storage, store.storage.owner) == []


def test_a_reply_that_raises_does_not_keep_the_others_from_being_called(caplog):
    called = []

    def raises():
        raise RuntimeError("this reply fails")

    with caplog.at_level(logging.ERROR, logger="taskrun"):
        _writer.call_all([(raises, ()), (called.append, ("next",))])
    assert called == ["next"] and "a ledger reply raised" in caplog.text


class Batcher:
    """A batcher that records what the writer hands it; a tick is due at once, then never."""

    def __init__(self):
        self.batches, self.ticks, self.started = [], 0, 0
        self.due = True
        self.writer = None
        self.stop_inside = False

    def process(self, items):
        self.batches.append(items)
        if self.stop_inside:
            self.writer.stop(WAIT)  # from the writer's own thread: it must not wait for itself
        return []

    def tick(self):
        self.ticks += 1
        self.due = False
        return []

    def sleep_for(self):
        return 0 if self.due else 3600

    def on_start(self):
        self.started += 1


def test_the_writer_takes_what_is_due_and_stops_from_its_own_thread():
    batcher = Batcher()
    writer = batcher.writer = _writer.Writer("test", batcher)
    assert writer.submit_record(("a", "record", 1)) is False  # no thread: the caller commits it
    assert writer.submit_claim(("run", "reply"))
    wait_for(lambda: batcher.ticks and batcher.batches, WAIT, "a batch and the due tick")
    batcher.stop_inside = True
    assert writer.submit_claim(("run2", "reply2"))
    wait_for(lambda: not writer.running, WAIT, "the writer to end")
    assert [item for batch in batcher.batches for item in batch] == [("run", "reply"), ("run2", "reply2")]
    assert batcher.started == 1


def test_an_inline_ledger_task_runs_once_per_key_across_a_shutdown(db):
    calls = []

    @task(runner=SequentialTaskRun, ledger=db, key=str, name="inline")
    def inline(x):
        calls.append(x)
        return x

    assert inline(1).get_result() == 1
    store = store_for(Ledger(db))
    store.records_phase.shutdown(wait=True)
    assert inline(1).cached and calls == [1]
