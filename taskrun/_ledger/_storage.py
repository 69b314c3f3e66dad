"""Storage: the ledger file in SQLite, and every SQL statement the ledger runs.

:class:`Storage` owns one file's writing connection in this process: it checks the file
before writing a byte (refusing what is not a ledger this taskrun can use), makes a new
file a ledger, sets WAL journaling, and runs every change through :meth:`Storage.transaction`,
the one place that waits for the file's write lock, at most ``busy_timeout`` seconds. Reads
for people (inspection) go through read-only connections of their own; :class:`ReadOnlyFile`
is a file opened only to be read (``python -m taskrun status``, ``Ledger.open_read_only``).

It knows tables and rows, not runs: the claims, caches and threads that use it are elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

from ..errors import LedgerError
from ._owners import HOST, MACHINE, holder_alive, new_owner, own_process_start, owner_alive

logger = logging.getLogger("taskrun")

T = TypeVar("T")

#: PRAGMA application_id of a taskrun ledger ("TRUN").
APPLICATION_ID = 0x5452554E
#: PRAGMA user_version: the schema this taskrun writes. A newer file is refused.
SCHEMA_VERSION = 1
#: Seconds a write waits in all for the file's write lock while another connection holds it; the
#: calls it was for then get LedgerError. ``Ledger(path, busy_timeout=...)`` sets it per file.
BUSY_TIMEOUT = 30.0
#: Results up to this many bytes are read into memory with their key; larger ones are read per call.
CACHE_LIMIT = 4096

#: What a refused file's error advises: for ``Ledger(path)``, and for a file opened only to be read.
NEW_FILE_ADVICE = "pass the path of a ledger or of a file that does not exist yet"
READ_ADVICE = "pass the path of a ledger"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    task TEXT NOT NULL,
    key TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    result BLOB,
    error_type TEXT,
    error_message TEXT,
    traceback TEXT,
    call TEXT,
    started_at REAL,
    finished_at REAL,
    duration REAL,
    pid INTEGER,
    host TEXT,
    owner TEXT,
    claim INTEGER,
    PRIMARY KEY (task, key)
);
CREATE TABLE IF NOT EXISTS owners (
    owner TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    machine TEXT NOT NULL,
    pid INTEGER NOT NULL,
    pid_start TEXT NOT NULL,
    lease_until REAL NOT NULL
);
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = {SCHEMA_VERSION};
"""

# A row is claimed by (owner, claim): an owner is one process using the ledger (its row in
# `owners` says how to tell whether it is alive), a claim number one batch of its claims.

# A finished run other than a success. It only replaces its own claim, or a row that is neither
# claimed nor succeeded.
_UPSERT_OUTCOME = """
INSERT INTO runs (task, key, status, attempts, result, error_type, error_message, traceback, call,
                  started_at, finished_at, duration, pid, host, owner, claim)
VALUES (?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (task, key) DO UPDATE SET
    status = excluded.status, attempts = excluded.attempts, result = NULL,
    error_type = excluded.error_type, error_message = excluded.error_message,
    traceback = excluded.traceback, call = excluded.call, started_at = excluded.started_at,
    finished_at = excluded.finished_at, duration = excluded.duration, pid = excluded.pid,
    host = excluded.host, owner = excluded.owner, claim = excluded.claim
WHERE (runs.owner = excluded.owner AND runs.claim = excluded.claim) OR runs.status NOT IN ('running', 'succeeded')
"""

# The successes of one task, in one statement: one row per key of a JSON array (?8), its result a
# slice of one BLOB (?2), and its numbers read from ?7: six decimal fields of ?9 characters each per
# row (attempts, result offset, result size, start and end in microseconds after ?6, claim; -1 for
# none). The width is the longest number of the batch, so no number can overflow its field. One
# statement lets SQLite write the whole batch without taking the GIL back per row, as executemany
# would (up to a switch interval per row while other threads run); substr of a BLOB is a constant-time
# slice where json_extract would parse the row once per field (measured: 25% slower batches). A
# success always lands, even over a claim another process took over: the call did succeed.
_SUCCEED_MANY = """
INSERT INTO runs (task, key, status, attempts, result, started_at, finished_at, duration, pid, host, owner, claim)
SELECT ?1, k, 'succeeded', a, substr(?2, o, l), ?6 + s / 1e6, ?6 + f / 1e6, (f - s) / 1e6, ?3, ?4, ?5, c
FROM (SELECT value AS k,
             CAST(substr(?7, key * 6 * ?9 + 1, ?9) AS INTEGER) AS a,
             CAST(substr(?7, key * 6 * ?9 + 1 + ?9, ?9) AS INTEGER) AS o,
             CAST(substr(?7, key * 6 * ?9 + 1 + 2 * ?9, ?9) AS INTEGER) AS l,
             NULLIF(CAST(substr(?7, key * 6 * ?9 + 1 + 3 * ?9, ?9) AS INTEGER), -1) AS s,
             CAST(substr(?7, key * 6 * ?9 + 1 + 4 * ?9, ?9) AS INTEGER) AS f,
             NULLIF(CAST(substr(?7, key * 6 * ?9 + 1 + 5 * ?9, ?9) AS INTEGER), -1) AS c
      FROM json_each(?8))
WHERE true
ON CONFLICT (task, key) DO UPDATE SET
    status = 'succeeded', attempts = excluded.attempts, result = excluded.result, error_type = NULL,
    error_message = NULL, traceback = NULL, call = NULL, started_at = excluded.started_at,
    finished_at = excluded.finished_at, duration = excluded.duration, pid = excluded.pid,
    host = excluded.host, owner = excluded.owner, claim = excluded.claim
"""

_CLAIM_SET = """
    status = 'running', attempts = 0, result = NULL, error_type = NULL, error_message = NULL,
    traceback = NULL, call = NULL, started_at = {started}, finished_at = NULL, duration = NULL,
    pid = {pid}, host = {host}, owner = {owner}, claim = {claim}
"""

# Claims every key of a batch (a JSON array) that is new, failed, stopped, or claimed earlier by this owner.
_CLAIM_MANY = """
INSERT INTO runs (task, key, status, attempts, started_at, pid, host, owner, claim)
SELECT ?1, value, 'running', 0, ?2, ?3, ?4, ?5, ?6 FROM json_each(?7) WHERE true
ON CONFLICT (task, key) DO UPDATE SET""" + _CLAIM_SET.format(
    started="excluded.started_at", pid="excluded.pid", host="excluded.host", owner="excluded.owner",
    claim="excluded.claim",
) + """
WHERE runs.status IN ('failed', 'stopped') OR (runs.status = 'running' AND runs.owner = excluded.owner)
"""

# The rows of a batch that _CLAIM_MANY did not claim, with their owners, as one JSON array.
_SELECT_UNCLAIMED = """
SELECT json_group_array(json_array(r.key, r.status, r.owner, r.claim, o.machine, o.pid, o.pid_start, o.lease_until,
       CASE WHEN r.status = 'succeeded' AND length(r.result) <= ?5 THEN hex(r.result) END))
FROM runs AS r LEFT JOIN owners AS o ON o.owner = r.owner
WHERE r.task = ?1 AND r.key IN (SELECT value FROM json_each(?2)) AND NOT (r.owner IS ?3 AND r.claim IS ?4)
"""

# Claims one row if it is still as it was seen (a dead owner's claim, or a result to redo).
_TAKE_OVER = "UPDATE runs SET" + _CLAIM_SET.format(
    started="?1", pid="?2", host="?3", owner="?4", claim="?5"
) + "WHERE task = ?6 AND key = ?7 AND status = ?8 AND owner IS ?9 AND claim IS ?10"

_OWNER_COLUMNS = "o.machine, o.pid, o.pid_start, o.lease_until"
_RUNS_WITH_OWNERS = "runs AS r LEFT JOIN owners AS o ON o.owner = r.owner"
# The columns of a RunRecord, then its owner's (to tell running from interrupted).
_RECORD_COLUMNS = (
    "r.task, r.key, r.status, r.attempts, r.error_type, r.error_message, r.traceback, r.call, "
    "r.started_at, r.finished_at, r.duration, r.pid, r.host, " + _OWNER_COLUMNS
)

#: The statuses of calls in a ledger, in the order they are shown. ``"interrupted"`` is a call
#: claimed by a process that is gone (its row says ``running``); it runs again on the next call.
STATUSES = ("succeeded", "failed", "stopped", "running", "interrupted")

#: A call in this process: (task name, key). The key is set before the ledger sees a run.
Ident = tuple[str, "str | None"]
#: A success to write: (key, attempts, result, started_at or None, finished_at, claim or None).
Success = tuple[str, int, bytes, "float | None", float, "int | None"]
#: Another outcome: (task, key, status, attempts, error_type, error_message, traceback, call,
#: started_at, finished_at, claim).
Outcome = tuple[Any, ...]
#: A row _SELECT_UNCLAIMED found: key, status, owner, claim, the owner's machine, pid, pid_start,
#: lease_until, and the result in hex if it succeeded and is small.
Unclaimed = list[Any]


class Storage:
    """One ledger file's writing connection in this process, and the statements run on it.

    Every change goes through :meth:`transaction`. ``lock`` is held while the connection is
    used (by that, and by the short reads of the run side: a task's succeeded keys, a large
    result, the rows of watched keys).
    """

    def __init__(self, path: str, real: str, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = path
        self.real = real
        #: Seconds a write waits for the write lock in all (see transaction); a setting of the file.
        self.busy_timeout = busy_timeout
        self.lock = threading.RLock()
        #: This process in the file's ``owners`` table (a forked child takes a new one).
        self.owner = new_owner()
        self.registered = False  # the owner's row is written (before its first claim)
        self._conn: sqlite3.Connection | None = None
        self._conn_timeout = busy_timeout  # what the open connection's busy handler waits
        self._file_id: tuple[int, int] | None = None
        self._orphans: list[sqlite3.Connection] = []  # inherited over fork: never used, never closed

    def __repr__(self) -> str:
        return f"<ledger storage {self.path}>"

    # ---- the file ------------------------------------------------------------------------

    def open(self) -> None:
        """Check the file and open it, creating the ledger if the file is missing or empty."""
        path = self.path
        if os.path.isdir(path):
            raise LedgerError(f"ledger path {path!r} is a directory; pass a file path such as {os.path.join(path, 'runs.db')!r}")
        exists = os.path.exists(path)
        if exists:
            _check_file(path, self.busy_timeout)
        else:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise LedgerError(f"cannot create ledger {path!r}: {parent!r} is not a directory; create the directory first")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise LedgerError(f"cannot create ledger {path!r}: directory {parent!r} is not writable; choose another path")
        if exists and not os.access(path, os.W_OK):
            raise LedgerError(
                f"ledger {path!r} is read-only: this process may not write to it, and a ledger records every call; "
                f"make it writable (chmod u+w {path}) or copy it elsewhere (python -m taskrun status {path} can still read it)"
            )
        try:
            conn = sqlite3.connect(path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open ledger {path!r}: {exc}; check that the file and its directory are writable") from exc
        try:
            self._initialize(conn)
        except LedgerError:
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
            parent = os.path.dirname(os.path.abspath(path))
            if exists and not os.access(parent, os.W_OK | os.X_OK):
                name = os.path.basename(path)
                raise LedgerError(
                    f"cannot use ledger {path!r}: its directory {parent!r} is not writable, and SQLite writes "
                    f"{name}-wal and {name}-shm next to the file; make the directory writable or copy the ledger "
                    f"elsewhere (python -m taskrun status {path} can still read it)"
                ) from exc
            raise LedgerError(f"cannot use ledger {path!r}: {exc}; check that the file and its directory are writable") from exc
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._file_id = self._stat_id()

    def _initialize(self, conn: sqlite3.Connection) -> None:
        """Check what the file is before writing to it, then make it a ledger if it is empty."""
        try:
            app_id, version, tables = _identity(conn)
            _check_identity(self.path, app_id, version, tables, NEW_FILE_ADVICE)
            _configure(conn, self.busy_timeout)
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                raise self._busy_error(conn, exc) from exc
            raise
        if app_id == APPLICATION_ID and version == SCHEMA_VERSION:
            return

        def create(conn: sqlite3.Connection) -> None:  # in one transaction: another process may be creating it too
            app_id, version, tables = _identity(conn)
            _check_identity(self.path, app_id, version, tables, NEW_FILE_ADVICE)
            if app_id != APPLICATION_ID or version < SCHEMA_VERSION:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)

        self._transaction(conn, create)

    def recheck(self) -> None:
        """Check the file again, through the open connection (see :func:`_check_file` for why)."""
        with self.lock:
            if self._conn is None:
                _check_file(self.path, self.busy_timeout)
                return
            try:
                app_id, version, tables = _identity(self._conn)
            except sqlite3.Error as exc:
                raise LedgerError(f"{self.path!r} is no longer a usable taskrun ledger: SQLite cannot read it ({exc})") from exc
        _check_identity(self.path, app_id, version, tables, NEW_FILE_ADVICE)

    def _stat_id(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.real)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def same_file(self) -> bool:
        """False once the file was deleted or replaced: a new Ledger then opens the new one."""
        return self._file_id is not None and self._stat_id() == self._file_id

    def connection(self) -> sqlite3.Connection:
        """The writing connection (opened again after a fork or a close); hold ``lock``."""
        conn = self._conn
        if conn is None:
            timeout = self._conn_timeout = self.busy_timeout
            try:
                conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
                try:
                    _configure(conn, timeout)
                except BaseException:
                    conn.close()
                    raise
            except sqlite3.Error as exc:
                raise LedgerError(f"cannot open ledger {self.path!r}: {exc}") from exc
            self._conn = conn
        return conn

    def close(self) -> None:
        with self.lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def after_fork_in_child(self) -> None:
        """In a forked child: forget the parent's connection (closing it could disturb the parent's use of the file)."""
        self.lock = threading.RLock()
        if self._conn is not None:
            self._orphans.append(self._conn)
            self._conn = None
        self.owner = new_owner()
        self.registered = False

    # ---- writing: the one transaction helper ---------------------------------------------

    def transaction(self, body: Callable[[sqlite3.Connection], T], *, one_statement: bool = False) -> T:
        """``body(conn)`` in one write transaction on the writing connection; its result.

        ``one_statement``: ``body`` runs a single statement, which SQLite commits atomically on its
        own; it then runs without ``BEGIN``/``COMMIT`` (each statement lets go of the GIL and takes
        it back, which costs while other threads run). Waits at most ``busy_timeout`` seconds in
        all for the file's write lock, then raises LedgerError naming the file and who may hold it;
        any other SQLite error is raised as LedgerError saying what it means. A transaction that
        fails changes nothing, so ``body`` may run again (it must only read and write the file).
        """
        with self.lock:
            conn = self.connection()
            if self._conn_timeout != self.busy_timeout:  # changed, or shortened by a retry: restore it
                self._set_busy_timeout(conn, self.busy_timeout)
            try:
                return self._transaction(conn, body, one_statement)
            except sqlite3.Error as exc:
                raise LedgerError(f"could not write to ledger {self.path!r}: {write_problem(exc)}") from exc

    def _transaction(self, conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], T], one_statement: bool = False) -> T:
        # BEGIN IMMEDIATE (or the one statement) takes the write lock first: SQLite's busy handler
        # waits there (it is set to busy_timeout); should it give up early, the transaction is
        # tried again for what is left of busy_timeout.
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                if one_statement:
                    return body(conn)
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = body(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                return result
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                remaining = deadline - time.monotonic()
                if remaining < 0.001:
                    raise self._busy_error(conn, exc) from exc
            time.sleep(min(0.005, remaining))  # SQLite may report "busy" without waiting (e.g. WAL recovery)
            self._set_busy_timeout(conn, remaining)

    def _set_busy_timeout(self, conn: sqlite3.Connection, seconds: float) -> None:
        self._conn_timeout = seconds
        conn.execute(f"PRAGMA busy_timeout = {max(0, round(seconds * 1000))}")

    def _busy_error(self, conn: sqlite3.Connection, exc: sqlite3.Error) -> LedgerError:
        """The error for a file whose write lock another connection held past busy_timeout, naming who may hold it."""
        holders = None
        try:
            self._set_busy_timeout(conn, 0.0)  # reading the owners must not wait again
            now = time.time()
            holders = [
                f"pid {pid} on {host}"
                for owner, host, machine, pid, pid_start, lease_until in conn.execute(
                    "SELECT owner, host, machine, pid, pid_start, lease_until FROM owners"
                )
                if owner != self.owner and owner_alive(machine, pid, pid_start, lease_until, now)
            ]
        except sqlite3.Error:
            pass
        if holders:
            who = f"taskrun processes running calls on it: {', '.join(holders[:5])}" + (" ..." if len(holders) > 5 else "")
        elif holders is not None:
            who = "no other taskrun process is running calls on it: another program holds it, or a Ledger.forget/reset"
        else:
            who = "who holds it cannot be read from the file"
        return LedgerError(
            f"ledger {self.path!r} is busy: another connection has held its write lock for longer than the busy "
            f"timeout ({self.busy_timeout:g} s); {who} (SQLite: {exc}). Let it finish, or wait longer with "
            f"Ledger(path, busy_timeout=...)"
        )

    # ---- the run side's writes: each one transaction (see transaction) --------------------

    def write_successes(self, task: str, successes: Sequence[Success]) -> None:
        """Write the successes of ``task`` in one statement (see _SUCCEED_MANY for how they are packed)."""
        base = min([success[4] for success in successes])
        starts = [success[3] for success in successes if success[3] is not None]
        if starts:
            base = min(base, min(starts))
        offset = 1
        numbers: list[tuple[int, int, int, int, int, int]] = []
        blobs: list[bytes] = []
        for _key, attempts, blob, started, finished, claim in successes:
            size = len(blob)
            numbers.append((
                attempts, offset, size, -1 if started is None else round((started - base) * 1e6),
                round((finished - base) * 1e6), -1 if claim is None else claim,
            ))
            blobs.append(blob)
            offset += size
        # Every number is >= 0 (times count from the earliest of the batch) but the -1 of "none".
        width = max(2, len(str(max(map(max, numbers)))))
        row_format = f"%0{width}d" * 6
        packed = "".join([row_format % row for row in numbers]).encode()  # bytes: substr of a BLOB slices bytes
        keys = json.dumps([success[0] for success in successes])
        params = (task, b"".join(blobs), os.getpid(), HOST, self.owner, base, packed, keys, width)
        self.transaction(lambda conn: conn.execute(_SUCCEED_MANY, params), one_statement=True)

    def write_outcomes(self, outcomes: Iterable[Outcome]) -> None:
        """Write finished runs other than successes (failures, stops), in one transaction."""
        pid, owner = os.getpid(), self.owner
        rows = [
            (task, key, status, attempts, etype, emsg, tb, call, started, finished,
             None if started is None else finished - started, pid, HOST, owner, claim)
            for task, key, status, attempts, etype, emsg, tb, call, started, finished, claim in outcomes
        ]
        self.transaction(lambda conn: conn.executemany(_UPSERT_OUTCOME, rows))

    def register(self, lease: float) -> None:
        """Enter this process in ``owners`` (before its first claim), leased for ``lease`` seconds; drop owners that are gone."""

        def register(conn: sqlite3.Connection) -> None:
            now = time.time()
            dead = [
                (row[0],) for row in conn.execute("SELECT owner, machine, pid, pid_start, lease_until FROM owners")
                if not holder_alive(row[1:], now)
            ]
            conn.executemany("DELETE FROM owners WHERE owner = ?", dead)
            conn.execute(
                "INSERT OR REPLACE INTO owners (owner, host, machine, pid, pid_start, lease_until) VALUES (?, ?, ?, ?, ?, ?)",
                (self.owner, HOST, MACHINE, os.getpid(), own_process_start(), now + lease),
            )

        self.transaction(register)
        self.registered = True

    def renew(self, lease: float) -> None:
        """Extend this process's lease by ``lease`` seconds from now: its claims stay valid for other machines."""
        sql = "UPDATE owners SET lease_until = ? WHERE owner = ?"
        self.transaction(lambda conn: conn.execute(sql, (time.time() + lease, self.owner)), one_statement=True)

    def claim_many(self, task: str, keys: str, now: float, claim: int) -> int:
        """Claim, as claim ``claim``, the keys (a JSON array) nobody holds; how many were claimed."""
        params = (task, now, os.getpid(), HOST, self.owner, claim, keys)
        return self.transaction(lambda conn: conn.execute(_CLAIM_MANY, params).rowcount, one_statement=True)

    def unclaimed(self, task: str, keys: str, claim: int) -> dict[str, Unclaimed]:
        """The rows of the keys (a JSON array) that claim ``claim`` does not hold, by key."""
        params = (task, keys, self.owner, claim, CACHE_LIMIT)
        packed = self.query(lambda conn: conn.execute(_SELECT_UNCLAIMED, params).fetchone()[0])
        return {row[0]: row for row in json.loads(packed or "[]")}

    def take_over(self, task: str, key: str, seen: Unclaimed, now: float, claim: int) -> bool:
        """Claim one row (a compare-and-swap) if it is still as it was ``seen``; False if it changed meanwhile."""
        _key, status, owner, old_claim = seen[:4]
        params = (now, os.getpid(), HOST, self.owner, claim, task, key, status, owner, old_claim)
        return self.transaction(lambda conn: conn.execute(_TAKE_OVER, params).rowcount > 0, one_statement=True)

    # ---- short reads of the run side (on the writing connection) ---------------------------

    def query(self, look: Callable[[sqlite3.Connection], T]) -> T:
        """``look(conn)`` on the writing connection, outside any transaction; SQLite errors as LedgerError."""
        with self.lock:
            try:
                return look(self.connection())
            except sqlite3.Error as exc:
                raise LedgerError(f"cannot read ledger {self.path!r}: {exc}") from exc

    def succeeded(self, task: str) -> list[tuple[str, bytes | None]]:
        """The keys of ``task``'s succeeded calls, each with its result if it is small (else None)."""
        sql = "SELECT key, CASE WHEN length(result) <= ? THEN result END FROM runs WHERE task = ? AND status = 'succeeded'"
        return self.query(lambda conn: conn.execute(sql, (CACHE_LIMIT, task)).fetchall())

    def stored_result(self, task: str, key: str) -> bytes | None:
        """The stored result of a succeeded call; None if it has none (any more)."""
        sql = "SELECT result FROM runs WHERE task = ? AND key = ? AND status = 'succeeded'"
        row = self.query(lambda conn: conn.execute(sql, (task, key)).fetchone())
        return None if row is None else row[0]

    def holders(self, idents: Iterable[Ident]) -> dict[Ident, tuple[Any, ...] | None]:
        """Per (task, key): its row's status and owner, and the owner's machine, pid, pid_start and lease (None: no row)."""
        sql = f"SELECT r.status, r.owner, {_OWNER_COLUMNS} FROM {_RUNS_WITH_OWNERS} WHERE r.task = ? AND r.key = ?"
        return self.query(lambda conn: {ident: conn.execute(sql, ident).fetchone() for ident in idents})

    # ---- inspection and changes (for people) ---------------------------------------------

    @contextlib.contextmanager
    def reading(self) -> Generator[sqlite3.Connection, None, None]:
        """A read-only connection (``mode=ro``) for one look inside, closed after it.

        It cannot write, and it does not take ``lock``, so inspection never waits behind the
        ledger thread (which may be waiting for another connection's write lock). The writing
        connection is opened first, so the file's -wal and -shm exist and this one creates
        neither; closed before it, it lets the writer remove them as usual.
        """
        if self._conn is None:
            with self.lock:
                self.connection()
        try:
            conn = open_read_only(self.real, self.busy_timeout)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot read ledger {self.path!r}: {exc}") from exc
        try:
            yield conn
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot read ledger {self.path!r}: {exc}") from exc
        finally:
            conn.close()

    def read(self, look: Callable[[sqlite3.Connection], T], empty: T) -> T:
        """``look(conn)`` through a read-only connection (``empty``: what a file with no ledger yet holds)."""
        with self.reading() as conn:
            return look(conn)

    def delete_call(self, task: str, key: str) -> None:
        sql = "DELETE FROM runs WHERE task = ? AND key = ?"
        self.transaction(lambda conn: conn.execute(sql, (task, key)), one_statement=True)

    def delete_calls(self, task: str | None, status: str | None) -> int:
        """Delete the rows of ``task`` with ``status`` (None: any); how many."""
        where, params = _filters(task, status, "")
        sql = "DELETE FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
        return self.transaction(lambda conn: conn.execute(sql, params).rowcount, one_statement=True)

    def delete_claims(self, calls: list[tuple[str, str]]) -> int:
        """Delete the rows of ``calls`` (task, key) that are still claimed; how many there were."""
        self.transaction(
            lambda conn: conn.executemany("DELETE FROM runs WHERE task = ? AND key = ? AND status = 'running'", calls)
        )
        return len(calls)


class ReadOnlyFile:
    """A ledger file opened only to be read: no byte of it changes and no file is created, whatever it is.

    Each read opens the file read-only (see :func:`open_read_only`) and checks what it is; an
    empty file or an empty SQLite database holds no calls.
    """

    def __init__(self, path: str, busy_timeout: float = BUSY_TIMEOUT) -> None:
        if not os.path.exists(path):
            raise LedgerError(f"no ledger at {path!r}: the file does not exist")
        if os.path.isdir(path):
            raise LedgerError(f"{path!r} is a directory; pass the path of a ledger file")
        self.path = path
        self.busy_timeout = busy_timeout
        self.read(lambda conn: None, None)  # what it is, checked now

    def __repr__(self) -> str:
        return f"<read-only ledger file {self.path}>"

    def read(self, look: Callable[[sqlite3.Connection], T], empty: T) -> T:
        path = self.path
        try:
            if os.path.getsize(path) == 0:
                return empty
        except OSError as exc:
            raise LedgerError(f"cannot read ledger {path!r}: {exc}") from exc
        while True:
            had_wal = os.path.exists(path + "-wal")
            try:
                conn = open_read_only(path, self.busy_timeout)
            except sqlite3.Error as exc:
                raise LedgerError(f"cannot read ledger {path!r}: {exc}") from exc
            try:
                try:
                    app_id, version, tables = _identity(conn)
                except sqlite3.DatabaseError as exc:
                    raise _unreadable(path, exc, READ_ADVICE) from exc
                _check_identity(path, app_id, version, tables, READ_ADVICE)
                try:
                    found = look(conn) if app_id == APPLICATION_ID else empty
                except sqlite3.Error as exc:
                    raise LedgerError(f"cannot read ledger {path!r}: {exc}") from exc
            finally:
                conn.close()
            if had_wal or not os.path.exists(path + "-wal"):
                return found
            # A process opened the file while it was read as immutable: read it again, through its WAL.


# ---- inspection statements (on a read-only connection) --------------------------------------


def summary_of(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """Counts per task and status (see Ledger.summary): claims of owners that are gone count as interrupted."""
    counts: dict[str, dict[str, int]] = {}
    rows = conn.execute("SELECT task, status, count(*) FROM runs WHERE status != 'running' GROUP BY task, status").fetchall()
    running = conn.execute(f"SELECT r.task, {_OWNER_COLUMNS} FROM {_RUNS_WITH_OWNERS} WHERE r.status = 'running'").fetchall()
    for task, status, n in rows:
        counts.setdefault(task, {})[status] = n
    now = time.time()
    for row in running:
        task, status = row[0], "running" if holder_alive(row[1:], now) else "interrupted"
        per_task = counts.setdefault(task, {})
        per_task[status] = per_task.get(status, 0) + 1
    return {task: {s: per[s] for s in STATUSES if s in per} for task, per in sorted(counts.items())}


def record_rows(conn: sqlite3.Connection, task: str | None, status: str | None) -> list[tuple[Any, ...]]:
    """The rows of ``task``'s calls with ``status`` (None: any; "interrupted" asks for "running"), oldest first.

    Each row: the fields of a RunRecord in order, then the owner's machine, pid, pid_start and lease.
    """
    where, params = _filters(task, status, "r.")
    sql = f"SELECT {_RECORD_COLUMNS} FROM {_RUNS_WITH_OWNERS}" + (" WHERE " + " AND ".join(where) if where else "")
    return conn.execute(sql + " ORDER BY r.rowid", params).fetchall()


def failure_rows(conn: sqlite3.Connection, limit: int) -> list[tuple[Any, ...]]:
    """The rows (as record_rows) of the ``limit`` most recently failed calls, newest first."""
    sql = f"SELECT {_RECORD_COLUMNS} FROM {_RUNS_WITH_OWNERS} WHERE r.status = 'failed' ORDER BY r.finished_at DESC LIMIT ?"
    return conn.execute(sql, (limit,)).fetchall()


def call_rows(conn: sqlite3.Connection, key: str, task: str | None) -> list[tuple[str, str, bytes | None]]:
    """(task, status, result) of the calls with ``key`` (of ``task``, if given)."""
    sql = "SELECT task, status, result FROM runs WHERE key = ?" + (" AND task = ?" if task is not None else "")
    return conn.execute(sql, (key, task) if task is not None else (key,)).fetchall()


def _filters(task: str | None, status: str | None, prefix: str) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    if task is not None:
        where.append(f"{prefix}task = ?")
        params.append(task)
    if status is not None:
        where.append(f"{prefix}status = ?")
        params.append("running" if status == "interrupted" else status)
    return where, params


def open_read_only(path: str, timeout: float) -> sqlite3.Connection:
    """Open an existing SQLite file to read it without writing a byte or creating a file (a ``mode=ro`` URI).

    While its -wal and -shm files exist (a process has it open, or one left them), the
    connection reads through them and sees the latest commits. Without them, ``mode=ro``
    alone would create both (and leave them behind), so the file is read as ``immutable``:
    without them there is nothing newer to read (callers check that none appeared meanwhile).
    """
    uri = _file_uri(path)
    if os.path.exists(path + "-wal") and os.path.exists(path + "-shm"):
        try:
            return sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=timeout, check_same_thread=False)
        except sqlite3.OperationalError:
            pass  # its -shm cannot be opened here (a directory we cannot write): read the file as it is
    return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, timeout=timeout, check_same_thread=False)


def _check_file(path: str, timeout: float) -> None:
    """Refuse, without writing anything, a file that is not a ledger this taskrun can use.

    Only SQLite opens the file while it may be a database: POSIX locks belong to the
    process, so closing a descriptor of the file opened any other way would drop every
    SQLite lock this process holds on it, and another process could then take the live
    WAL for abandoned and delete it. ``immutable`` reads leave no -wal or -shm behind.
    """
    if not os.access(path, os.R_OK):
        raise LedgerError(f"cannot read ledger {path!r}: permission denied; check the file's permissions")
    try:
        if os.path.getsize(path) == 0:
            return  # empty: becomes a ledger
        conn = sqlite3.connect(f"{_file_uri(path)}?mode=ro&immutable=1", uri=True, timeout=timeout)
    except (OSError, sqlite3.Error) as exc:
        raise LedgerError(f"cannot read ledger {path!r}: {exc}") from exc
    try:
        app_id, version, tables = _identity(conn)
    except sqlite3.DatabaseError as exc:
        raise _unreadable(path, exc, NEW_FILE_ADVICE) from exc
    finally:
        conn.close()
    _check_identity(path, app_id, version, tables, NEW_FILE_ADVICE)


def _unreadable(path: str, exc: sqlite3.DatabaseError, advice: str) -> LedgerError:
    if "not a database" in str(exc):
        return LedgerError(
            f"{path!r} is not a taskrun ledger: it is not an SQLite database (it starts with {_head(path)!r}); {advice}"
        )
    return LedgerError(f"{path!r} is not a usable taskrun ledger: SQLite cannot read it ({exc})")


def _identity(conn: sqlite3.Connection) -> tuple[int, int, list[str]]:
    """Application id, schema version and table names, read in one statement: one snapshot of a file
    another process may be creating right now."""
    app_id, version, names = conn.execute(
        "SELECT (SELECT application_id FROM pragma_application_id()), (SELECT user_version FROM pragma_user_version()),"
        " (SELECT json_group_array(name) FROM (SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name))"
    ).fetchone()
    return app_id, version, json.loads(names)


def _check_identity(path: str, app_id: int, version: int, tables: list[str], advice: str) -> None:
    if app_id == APPLICATION_ID:
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"ledger {path!r} was written by a newer taskrun (schema version {version}; this taskrun reads up to "
                f"{SCHEMA_VERSION}); upgrade taskrun to use it"
            )
        return
    if app_id == 0 and not tables:
        return  # an empty SQLite database: becomes a ledger
    what = f"its tables are {', '.join(tables)}" if tables else f"its application id is {app_id:#x}"
    raise LedgerError(f"{path!r} is an SQLite database but not a taskrun ledger ({what}); it was left untouched: {advice}")


def _configure(conn: sqlite3.Connection, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            break
        except sqlite3.OperationalError as exc:
            # Another process creating the file holds a lock; SQLite reports this at once,
            # without waiting as it does for other statements.
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)
    conn.execute("PRAGMA synchronous = NORMAL")


def _head(path: str) -> bytes:
    """The first bytes of a file SQLite refused as not a database (so this process holds no lock on it)."""
    try:
        with open(path, "rb") as f:
            return f.read(16)
    except OSError:
        return b""


def _file_uri(path: str) -> str:
    return "file:" + quote(os.path.abspath(path))


def _is_busy(exc: sqlite3.Error) -> bool:
    """True for SQLite's "database is locked" / "busy": another connection holds the lock."""
    text = str(exc)
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def write_problem(exc: BaseException) -> str:
    """What went wrong with a write, for people: the error, and what a known cause means."""
    if isinstance(exc, LedgerError):
        return str(exc)
    text = f"{type(exc).__name__}: {exc}"
    if "readonly" in str(exc):
        text += " (the file or its directory is read-only now: make them writable)"
    elif "full" in str(exc):
        text += " (the disk, or the file's size limit, is full: free some space)"
    return text
