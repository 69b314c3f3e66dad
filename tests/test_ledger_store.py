"""The ledger's run side, driven directly: the decisions it returns, from a run's public attributes only.

A run handle asks the store (``taskrun._ledger.store_for(ledger)``) and applies its answers; the
store never reaches into the handle. Here the "run" is a stub with exactly the public attributes
the ledger may read (``__slots__``: any other attribute would raise), so each test also checks
that contract.
"""

import sqlite3
import threading
import time

import pytest

from taskrun import Ledger, LedgerError, Status, TaskStopped
from taskrun._ledger import store_for

WAIT = 10


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "runs.db")


class PublicRun:
    """A run as the ledger may see it: public attributes only (``__slots__`` refuses the rest)."""

    __slots__ = ("name", "key", "id", "args", "kwargs", "attempts", "started_at", "status", "_done", "_callbacks")

    def __init__(self, name, key):
        self.name, self.key, self.id = name, key, f"{name}#{key}"
        self.args, self.kwargs = (key,), {}
        self.attempts, self.started_at, self.status = 1, time.time(), Status.PENDING
        self._done = threading.Event()
        self._callbacks = []

    def done(self):
        return self._done.is_set()

    def add_done_callback(self, fn):
        if self.done():
            fn(self)
        else:
            self._callbacks.append(fn)

    def wait(self, timeout=None):
        return self._done.wait(timeout)

    def stop(self, reason=None):
        self.finish(Status.STOPPED)
        return True

    def finish(self, status):
        self.status = status
        self._done.set()
        for fn in self._callbacks:
            fn(self)


class Replies:
    """Collects the replies of one admission or record, and waits for them."""

    def __init__(self):
        self.got = []
        self.event = threading.Event()

    def __call__(self, *args):
        self.got.append(args)
        self.event.set()

    def one(self):
        assert self.event.wait(WAIT), "no reply"
        assert len(self.got) == 1, self.got
        return self.got[0]


def test_a_claim_a_record_and_a_lookup(db):
    store = store_for(Ledger(db))
    run = PublicRun("work", "k")
    assert store.lookup("work", "k") == (False, None)
    admitted = Replies()
    store.admit(run, admitted)
    assert admitted.one() == ("claimed", None)
    run.status = Status.RUNNING
    recorded = Replies()
    store.record(run, Status.SUCCEEDED, "value", None, recorded)
    assert recorded.one() == (Status.SUCCEEDED, "value", None, None)  # written
    run.finish(Status.SUCCEEDED)
    assert store.lookup("work", "k") == (True, "value")
    assert Ledger(db).result("k") == "value"


def test_a_second_run_of_a_key_is_told_to_wait_for_the_first_then_finds_its_result(db):
    store = store_for(Ledger(db))
    first, second = PublicRun("work", "k"), PublicRun("work", "k")
    admitted = Replies()
    store.admit(first, admitted)
    assert admitted.one() == ("claimed", None)
    waiting = Replies()
    store.admit(second, waiting)
    assert waiting.one() == ("wait", first)
    assert store.record_here(first, Status.SUCCEEDED, 42, None) is None
    first.finish(Status.SUCCEEDED)
    assert store.lookup("work", "k") == (True, 42)  # what the handle asks once the first finished


def test_inline_decisions_in_the_caller(db):
    store = store_for(Ledger(db))
    run = PublicRun("inline", "k")
    assert store.admit_here(run) == ("claimed", None)
    assert store.admit_here(PublicRun("inline", "k"))[0] == "wait"
    error = ValueError("bad")
    assert store.record_here(run, Status.FAILED, None, error) is None
    run.finish(Status.FAILED)
    [record] = Ledger(db).runs(task="inline")
    assert record.status == "failed" and record.error == "ValueError: bad"
    again = PublicRun("inline", "k")
    assert store.admit_here(again) == ("claimed", None)  # a failed call runs again


def test_a_stopped_run_frees_its_key_at_once_and_its_record_needs_no_reply(db):
    store = store_for(Ledger(db))
    run = PublicRun("work", "k")
    admitted = Replies()
    store.admit(run, admitted)
    assert admitted.one() == ("claimed", None)
    run.finish(Status.STOPPED)  # the handle publishes a stop first...
    store.record(run, Status.STOPPED, None, TaskStopped("stopped"), None)  # ...then records it on the side
    again = PublicRun("work", "k")
    assert store.admit_here(again) == ("claimed", None)
    assert store.record_here(again, Status.SUCCEEDED, 1, None) is None
    assert Ledger(db).summary() == {"work": {"succeeded": 1}}


def test_claims_refused_while_shutting_down_are_answered_stopped(db):
    store = store_for(Ledger(db))
    warm, admitted = PublicRun("work", "warm"), Replies()
    store.admit(warm, admitted)  # the ledger thread runs
    assert admitted.one()[0] == "claimed"
    assert store.record_here(warm, Status.SUCCEEDED, 1, None) is None
    warm.finish(Status.SUCCEEDED)
    store.writer.close_gate()  # as taskrun.shutdown() does first
    try:
        refused = Replies()
        store.admit(PublicRun("work", "late"), refused)
        verdict, error = refused.one()
        assert verdict == "stopped" and isinstance(error, TaskStopped) and "shutting down" in str(error)
    finally:
        store.writer.open_gate()


def test_a_claim_that_cannot_be_written_is_answered_failed_and_its_failure_is_not_recorded(db, monkeypatch):
    store = store_for(Ledger(db))

    def broken(body, **kwargs):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store.storage, "transaction", broken)
    run = PublicRun("work", "k")
    verdict, error = store.admit_here(run)
    assert verdict == "failed" and isinstance(error, LedgerError) and "disk I/O error" in str(error)
    assert store.record_here(run, Status.FAILED, None, error) is None  # nothing to record: no write tried
    monkeypatch.undo()
    assert Ledger(db).summary() == {}


def test_successes_with_numbers_of_any_size_are_stored_exactly(db):
    """A batch of successes is packed into one statement: no number may overflow its field and turn into another."""
    storage = store_for(Ledger(db)).storage
    finished = time.time()
    long_ago = finished - 5 * 365 * 86400  # 1.6e14 microseconds before the end
    successes = [
        ("old", 1_234_567, b"\x00" * 5000, long_ago, finished, 12_345_678_901),
        ("new", 1, b"yy", None, finished, None),
        ("mid", 3, b"", finished - 1.5, finished - 0.5, 7),
    ]
    storage.write_successes("t", successes)
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT key, status, attempts, result, started_at, finished_at, duration, claim FROM runs ORDER BY key"
        ).fetchall()
    finally:
        conn.close()
    assert [(r[0], r[1], r[2], r[3], r[7]) for r in rows] == [
        ("mid", "succeeded", 3, b"", 7),
        ("new", "succeeded", 1, b"yy", None),
        ("old", "succeeded", 1_234_567, b"\x00" * 5000, 12_345_678_901),
    ]
    mid, new, old = rows
    assert mid[4] == pytest.approx(finished - 1.5, abs=1e-5) and mid[6] == pytest.approx(1.0, abs=1e-5)
    assert new[4] is None and new[5] == pytest.approx(finished, abs=1e-5) and new[6] is None
    assert old[4] == pytest.approx(long_ago, abs=1e-5) and old[6] == pytest.approx(finished - long_ago, abs=1e-5)
