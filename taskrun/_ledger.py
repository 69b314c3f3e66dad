"""The ledger: one SQLite file recording every call of the tasks that use it, so a batch can resume.

Each call has a key (see :func:`make_key`). A call whose key SUCCEEDED returns the stored
result without running; one whose key another live process or thread is running waits for
that outcome; anything else claims the key (a RUNNING row naming its owner) and runs.

How it is built, per ledger file and process (a :class:`_Store`, shared by every
:class:`Ledger` object of that file):

* Claims and finished runs go through one queue to the ledger thread
  (``taskrun-ledger-<file>-N``), which writes everything queued in a few statements, then
  starts the claimed runs and publishes the finished ones: a run is committed before its
  handle reports it finished, and a burst of tiny runs shares its commits. Inline runners
  (``SequentialTaskRun``) claim and record in the caller instead. A process claims about
  as many keys as its runners will start soon, so processes sharing a ledger share a batch.
* A task's succeeded keys (and small results) are read into memory on its first call, so a
  cached call costs a dict lookup and an unpickle, no SQL.
* Two calls of one key in one process: the second waits on the first in memory. Against
  another process: the ledger thread polls the key's row until it is no longer claimed by a
  live owner. An owner is dead when its process is gone (same machine: pid and its start
  time) or, from another machine, when its lease (renewed by the ledger thread) has expired.
* Done callbacks of ledger runs run on the ledger thread: keep them short, and do not wait
  in one for another run of a ledger task.
* The file uses WAL journaling with ``synchronous=NORMAL``: a commit survives the process
  being killed at any moment; a power loss may lose the last commits, which then run again.
* A write waits at most ``busy_timeout`` seconds for another connection's write lock. Then the
  claims of that batch fail with LedgerError and its outcomes reach their callers unrecorded
  (so those calls run again next time); what was committed before stays.
* Inspection (``summary``, ``runs``, ``last_errors``, ``result``) reads through a read-only
  connection of its own, so it never writes and never waits behind the ledger thread.
* Results are pickles: loading one runs whatever code it names. Open only ledgers you trust;
  ``python -m taskrun status`` never loads a result.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import logging
import os
import pickle
import reprlib
import secrets
import socket
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from . import _lifecycle
from ._run import Status
from .errors import LedgerError, RemoteTraceback, SerializationError, TaskStopped, format_traceback

if TYPE_CHECKING:
    from ._run import BaseTaskRun
    from ._task import Task

logger = logging.getLogger("taskrun")

#: PRAGMA application_id of a taskrun ledger ("TRUN").
APPLICATION_ID = 0x5452554E
#: PRAGMA user_version: the schema this taskrun writes. A newer file is refused.
SCHEMA_VERSION = 1
#: Pickle protocol of the argument bytes hashed into default keys. Fixed: changing it changes every key.
KEY_PROTOCOL = 4
RESULT_PROTOCOL = 5
#: Seconds a write waits in all for the file's write lock while another connection holds it; the
#: calls it was for then get LedgerError. ``Ledger(path, busy_timeout=...)`` sets it per file.
BUSY_TIMEOUT = 30.0
#: Seconds a claim stays valid without renewal, for owners on another machine.
LEASE = 30.0
#: Seconds between checks of keys that another process is running.
POLL_INTERVAL = 0.1
#: Results up to this many bytes are kept in memory with their key; larger ones are read per call.
CACHE_LIMIT = 4096
#: Most queued claims and records committed in one transaction.
MAX_BATCH = 4096
#: Seconds of work, at the rate calls have been finishing, that a process claims ahead.
AHEAD = 0.1

#: What a refused file's error advises Ledger() users (``python -m taskrun status`` says less).
NEW_FILE_ADVICE = "pass the path of a ledger or of a file that does not exist yet"

_MISSING: Any = object()
_CLAIM = "claim"
_RECORD = "record"
_STATUSES = ("succeeded", "failed", "stopped", "running", "interrupted")
_STATUS_NAMES = {status: status.value for status in Status}
_SUCCEEDED = Status.SUCCEEDED
_PENDING = Status.PENDING

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

# A finished run. Success always lands (even over a claim another process took over); any other
# outcome only replaces its own claim or a row that is neither claimed nor succeeded.
_UPSERT_RECORD = """
INSERT INTO runs (task, key, status, attempts, result, error_type, error_message, traceback, call,
                  started_at, finished_at, duration, pid, host, owner, claim)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (task, key) DO UPDATE SET
    status = excluded.status, attempts = excluded.attempts, result = excluded.result,
    error_type = excluded.error_type, error_message = excluded.error_message,
    traceback = excluded.traceback, call = excluded.call, started_at = excluded.started_at,
    finished_at = excluded.finished_at, duration = excluded.duration, pid = excluded.pid,
    host = excluded.host, owner = excluded.owner, claim = excluded.claim
WHERE excluded.status = 'succeeded' OR (runs.owner = excluded.owner AND runs.claim = excluded.claim)
   OR runs.status NOT IN ('running', 'succeeded')
"""

# Claims and succeeded records go in batches, one statement each (keys as a JSON array): SQLite
# then runs the whole batch without taking the GIL back per row, as executemany would.
_CLAIM_SET = """
    status = 'running', attempts = 0, result = NULL, error_type = NULL, error_message = NULL,
    traceback = NULL, call = NULL, started_at = {started}, finished_at = NULL, duration = NULL,
    pid = {pid}, host = {host}, owner = {owner}, claim = {claim}
"""

# Claims every key of the batch that is new, failed, stopped, or claimed earlier by this owner.
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

# Claim one row if it is still as it was seen (a dead owner's claim, or a result to redo).
_TAKE_OVER = "UPDATE runs SET" + _CLAIM_SET.format(
    started="?1", pid="?2", host="?3", owner="?4", claim="?5"
) + "WHERE task = ?6 AND key = ?7 AND status = ?8 AND owner IS ?9 AND claim IS ?10"

# Per row of a batch of successes: attempts, offset and size of its result in the batch's blob,
# start and end (microseconds after the batch's base time; -1: unknown) and the claim number
# (-1: none), as fixed-width ASCII in one BLOB. json_extract would parse a row once per field;
# substr on a BLOB is a constant-time slice.
_SUCCESS_FIELDS = b"%06d%012d%012d%014d%014d%010d"
_SUCCEED_MANY = """
INSERT INTO runs (task, key, status, attempts, result, started_at, finished_at, duration, pid, host, owner, claim)
SELECT ?1, k, 'succeeded', a, substr(?2, o, l), ?6 + s / 1e6, ?6 + f / 1e6, (f - s) / 1e6, ?3, ?4, ?5, c
FROM (SELECT value AS k,
             CAST(substr(?7, key * 68 + 1, 6) AS INTEGER) AS a,
             CAST(substr(?7, key * 68 + 7, 12) AS INTEGER) AS o,
             CAST(substr(?7, key * 68 + 19, 12) AS INTEGER) AS l,
             NULLIF(CAST(substr(?7, key * 68 + 31, 14) AS INTEGER), -1) AS s,
             CAST(substr(?7, key * 68 + 45, 14) AS INTEGER) AS f,
             NULLIF(CAST(substr(?7, key * 68 + 59, 10) AS INTEGER), -1) AS c
      FROM json_each(?8))
WHERE true
ON CONFLICT (task, key) DO UPDATE SET
    status = 'succeeded', attempts = excluded.attempts, result = excluded.result, error_type = NULL,
    error_message = NULL, traceback = NULL, call = NULL, started_at = excluded.started_at,
    finished_at = excluded.finished_at, duration = excluded.duration, pid = excluded.pid,
    host = excluded.host, owner = excluded.owner, claim = excluded.claim
"""

_OWNER_COLUMNS = "o.machine, o.pid, o.pid_start, o.lease_until"
_RECORD_COLUMNS = (
    "r.task, r.key, r.status, r.attempts, r.error_type, r.error_message, r.traceback, r.call, "
    "r.started_at, r.finished_at, r.duration, r.pid, r.host, " + _OWNER_COLUMNS
)
_RUNS_WITH_OWNERS = "runs AS r LEFT JOIN owners AS o ON o.owner = r.owner"


# ---- keys ---------------------------------------------------------------------------------


def make_key(task: Task[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The call's identity in the ledger: ``task.key(*args, **kwargs)``, or a digest of the pickled call.

    The digest (blake2b of the task name and the arguments pickled with protocol 4, keyword
    arguments sorted) is stable across processes and runs for the usual arguments: numbers,
    strings, bytes, tuples, lists, dicts, dataclasses. It is not for sets or frozensets of
    strings (their order follows per-process hash randomization), objects whose pickle holds
    ids or memory addresses, or dicts built in a different order. Keys compare pickles, not
    equality: ``f(1)``, ``f(1.0)`` and ``f(x=1)`` are three calls. Pass ``key=`` to decide.
    """
    key_fn = task.key
    if key_fn is not None:
        key = key_fn(*args, **kwargs)
        if type(key) is not str:
            if isinstance(key, str):
                return str(key)
            raise TypeError(
                f"the key function {key_fn!r} of task {task.name} returned {key!r} ({type(key).__name__}); it must return a str"
            )
        return key
    try:
        data = pickle.dumps((args, sorted(kwargs.items())) if kwargs else args, KEY_PROTOCOL)
    except Exception as exc:
        raise SerializationError(
            f"cannot make a ledger key for a call of {task.name}: its arguments cannot be pickled "
            f"({type(exc).__name__}: {exc}); pass key=lambda *args, **kwargs: ... to @task to name calls with a str"
        ) from exc
    return hashlib.blake2b(task.name.encode() + b"\x00" + data, digest_size=16).hexdigest()


# ---- owners: who holds a claim, and are they still alive? --------------------------------


def _process_start(pid: int) -> str:
    """The start time of ``pid`` in clock ticks since boot ('' where /proc is unavailable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


def _machine() -> str:
    """This machine, as far as pids go: host name plus the pid namespace (containers have their own)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}:{namespace}"


_HOST = socket.gethostname()
_MACHINE = _machine()

_own_start: tuple[int, str] | None = None


def _own_process_start() -> str:
    """This process's start time, read once per process (not in every forked child: few need it)."""
    global _own_start
    pid = os.getpid()
    if _own_start is None or _own_start[0] != pid:
        _own_start = (pid, _process_start(pid))
    return _own_start[1]


def _owner_alive(machine: str | None, pid: int | None, pid_start: str | None, lease_until: float | None, now: float) -> bool:
    """Whether the owner of a claim (its row in ``owners``; None if gone) may still be running it.

    On this machine its process decides: gone, a zombie, or another process now using its
    pid (a different start time) is dead. From elsewhere only the lease it renews can tell.
    """
    if machine is None or pid is None:
        return False
    if machine != _MACHINE:
        return lease_until is not None and lease_until > now
    if pid == os.getpid():
        return pid_start == _own_process_start()
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except FileNotFoundError:
        return False
    except OSError:
        fields = []
    if fields:
        if fields[0] in (b"Z", b"X"):  # a zombie has finished running anything
            return False
        return not pid_start or fields[19].decode() == pid_start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


# ---- what the ledger stores ---------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """One call as the ledger knows it.

    ``status`` is ``"succeeded"``, ``"failed"``, ``"stopped"``, ``"running"`` or
    ``"interrupted"`` (claimed by a process that is gone: it runs again on the next call).
    ``call`` shows the arguments of failed and stopped calls. The result is read with
    :meth:`Ledger.result`.
    """

    task: str
    key: str
    status: str
    attempts: int
    error_type: str | None
    error_message: str | None
    traceback: str | None
    call: str | None
    started_at: float | None
    finished_at: float | None
    duration: float | None
    pid: int | None
    host: str | None

    @property
    def error(self) -> str | None:
        """``"ValueError: bad url"``, or None if the call did not fail."""
        if self.error_type is None:
            return None
        return f"{self.error_type.rpartition('.')[2]}: {self.error_message}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _record_from_row(row: tuple[Any, ...], now: float) -> RunRecord:
    task, key, status, attempts, etype, emsg, tb, call, started, finished, duration, pid, host, *owner = row
    if status == "running" and not _owner_alive(*owner, now):
        status = "interrupted"
    return RunRecord(task, key, status, attempts, etype, emsg, tb, call, started, finished, duration, pid, host)


_call_repr = reprlib.Repr()
_call_repr.maxstring = 80
_call_repr.maxother = 80
_call_repr.maxlevel = 3


def _describe_call(run: BaseTaskRun[Any]) -> str:
    parts = [_call_repr.repr(a) for a in run.args]
    parts += [f"{k}={_call_repr.repr(v)}" for k, v in run.kwargs.items()]
    text = f"{run.name}({', '.join(parts)})"
    return text if len(text) <= 500 else text[:497] + "..."


def _dumps_result(value: Any) -> bytes:
    try:
        return pickle.dumps(value, RESULT_PROTOCOL)
    except Exception:
        import cloudpickle  # functions and classes defined in __main__ or a notebook

        return cloudpickle.dumps(value, RESULT_PROTOCOL)  # type: ignore[no-any-return]


def _traceback_text(exc: BaseException) -> str:
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        return cause.tb_text
    return format_traceback(exc)


def _type_name(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _filters(task: str | None, status: str | None, prefix: str) -> tuple[list[str], list[Any]]:
    where, params = [], []
    if task is not None:
        where.append(f"{prefix}task = ?")
        params.append(task)
    if status is not None:
        where.append(f"{prefix}status = ?")
        params.append("running" if status == "interrupted" else status)
    return where, params


def _task_name(task: Any) -> str | None:
    if task is None or isinstance(task, str):
        return task
    name = getattr(task, "name", None)
    if not isinstance(name, str):
        raise TypeError(f"task= must be a task or a task's name (a str), got {task!r}")
    return name


def _status_name(status: Any) -> str | None:
    if status is None:
        return None
    name = status.value if isinstance(status, Status) else str(status).lower()
    if name == Status.SKIPPED.value:
        raise ValueError("the ledger records no skipped calls (a call answered from the ledger is a succeeded one)")
    if name not in _STATUSES:
        raise ValueError(f"unknown ledger status {status!r}; use one of {', '.join(_STATUSES)}")
    return name


def _check_busy_timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Ledger option busy_timeout must be a number of seconds, got {value!r}")
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"Ledger option busy_timeout must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def _reopen(path: str, busy_timeout: float) -> Ledger:
    return Ledger(path, busy_timeout=busy_timeout)


def _summary(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    rows = conn.execute("SELECT task, status, count(*) FROM runs WHERE status != 'running' GROUP BY task, status").fetchall()
    running = conn.execute(f"SELECT r.task, {_OWNER_COLUMNS} FROM {_RUNS_WITH_OWNERS} WHERE r.status = 'running'").fetchall()
    for task, status, n in rows:
        counts.setdefault(task, {})[status] = n
    now = time.time()
    for task, *owner in running:
        status = "running" if _owner_alive(*owner, now) else "interrupted"
        per_task = counts.setdefault(task, {})
        per_task[status] = per_task.get(status, 0) + 1
    return {task: {s: per[s] for s in _STATUSES if s in per} for task, per in sorted(counts.items())}


def _last_errors(conn: sqlite3.Connection, limit: int) -> list[RunRecord]:
    rows = conn.execute(
        f"SELECT {_RECORD_COLUMNS} FROM {_RUNS_WITH_OWNERS} WHERE r.status = 'failed' ORDER BY r.finished_at DESC LIMIT ?",
        (limit,),
    ).fetchall()
    now = time.time()
    return [_record_from_row(row, now) for row in rows]


def _transaction(conn: sqlite3.Connection, body: Callable[[], Any]) -> None:
    """Run ``body`` in one write transaction (BEGIN IMMEDIATE: it waits for the write lock at the start)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        body()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _write_problem(exc: BaseException) -> str:
    """What went wrong with a write, for people: the error, and what a known cause means."""
    if isinstance(exc, LedgerError):
        return str(exc)
    text = f"{type(exc).__name__}: {exc}"
    if "readonly" in str(exc):
        text += " (the file or its directory is read-only now: make them writable)"
    elif "full" in str(exc):
        text += " (the disk, or the file's size limit, is full: free some space)"
    return text


def _is_busy(exc: sqlite3.Error) -> bool:
    """True for SQLite's "database is locked" / "busy": another connection holds the lock."""
    text = str(exc)
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def _open_read_only(path: str, timeout: float) -> sqlite3.Connection:
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


def inspect(path: str, last_errors: int, timeout: float = BUSY_TIMEOUT) -> tuple[dict[str, dict[str, int]], list[RunRecord]]:
    """What ``python -m taskrun status`` shows: :meth:`Ledger.summary` and :meth:`Ledger.last_errors` of ``path``.

    Read-only from start to end: the file is opened with ``mode=ro`` (see :func:`_open_read_only`),
    no byte of it changes and no file is created, whatever the file is. No result is unpickled.
    Raises LedgerError for a file that is not a ledger this taskrun can read; an empty SQLite
    database (or an empty file) holds no calls.
    """
    if os.path.getsize(path) == 0:
        return {}, []
    while True:
        had_wal = os.path.exists(path + "-wal")
        try:
            conn = _open_read_only(path, timeout)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot read ledger {path!r}: {exc}") from exc
        try:
            try:
                app_id, version, tables = _identity(conn)
            except sqlite3.DatabaseError as exc:
                if "not a database" in str(exc):
                    raise LedgerError(
                        f"{path!r} is not a taskrun ledger: it is not an SQLite database (it starts with {_head(path)!r})"
                    ) from exc
                raise LedgerError(f"{path!r} is not a usable taskrun ledger: SQLite cannot read it ({exc})") from exc
            _check_identity(path, app_id, version, tables)
            if app_id != APPLICATION_ID:
                return {}, []  # an empty SQLite database: no calls
            try:
                found = _summary(conn), (_last_errors(conn, last_errors) if last_errors > 0 else [])
            except sqlite3.Error as exc:
                raise LedgerError(f"cannot read ledger {path!r}: {exc}") from exc
        finally:
            conn.close()
        if had_wal or not os.path.exists(path + "-wal"):
            return found
        # A process opened the file while it was read as immutable: read it again, through its WAL.


# ---- the public face ----------------------------------------------------------------------


class Ledger:
    """A record of calls in one SQLite file: calls that succeeded are not run again.

    ``Ledger(path)`` opens the file, creating it if missing, and checks it: a file that is
    not a taskrun ledger, a read-only file, a directory that cannot be written, or a ledger
    written by a newer taskrun raise :class:`~taskrun.LedgerError` here, and the file is left
    untouched. Pass it (or just the path) to ``@task(ledger=...)``. Ledger objects of one file
    share their connection, thread and caches within a process.

    ``busy_timeout`` is how many seconds a write waits for the file while another connection
    holds its write lock (default :data:`BUSY_TIMEOUT`); the calls it was for then get a
    ``LedgerError``. It is a setting of the file within this process: None keeps the one set
    before (by an earlier ``Ledger(path, busy_timeout=...)``, else the default).

    Stored results are pickles, and loading a pickle can run any code: open only ledgers you
    trust (``python -m taskrun status`` never loads a result).
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float | None = None) -> None:
        if busy_timeout is not None:
            busy_timeout = _check_busy_timeout(busy_timeout)
        self.path = os.fspath(path)
        self._store = _store_for(self.path, busy_timeout)

    @property
    def busy_timeout(self) -> float:
        """Seconds a write waits for another connection's write lock before its calls get LedgerError."""
        return self._store.busy_timeout

    def __repr__(self) -> str:
        return f"Ledger({self.path!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # A ledger travels (to a worker process, with a task) as its file, opened again there.
        return (_reopen, (os.path.abspath(self.path), self._store.busy_timeout))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ledger) and other._store is self._store

    def __hash__(self) -> int:
        return hash(self._store)

    # ---- inspection (read-only: see _Store._reading) ---------------------------------

    def summary(self) -> dict[str, dict[str, int]]:
        """Counts per task and status: ``{"fetch": {"succeeded": 950, "failed": 3, "interrupted": 47}}``.

        Statuses with no calls are left out. ``"interrupted"`` counts calls claimed by a
        process that is gone; ``"running"`` those a live process is running.
        """
        with self._store._reading() as conn:
            return _summary(conn)

    def runs(self, task: str | Task[..., Any] | None = None, status: Status | str | None = None) -> list[RunRecord]:
        """The recorded calls, oldest first, optionally of one task (a name or the task) and one status."""
        name, wanted = _task_name(task), _status_name(status)
        where, params = _filters(name, wanted, "r.")
        sql = f"SELECT {_RECORD_COLUMNS} FROM {_RUNS_WITH_OWNERS}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY r.rowid"
        with self._store._reading() as conn:
            rows = conn.execute(sql, params).fetchall()
        now = time.time()
        records = [_record_from_row(row, now) for row in rows]
        if wanted in ("running", "interrupted"):
            records = [r for r in records if r.status == wanted]
        return records

    def last_errors(self, limit: int = 5) -> list[RunRecord]:
        """The ``limit`` most recently failed calls, newest first."""
        with self._store._reading() as conn:
            return _last_errors(conn, limit)

    def result(self, key: str, *, task: str | Task[..., Any] | None = None) -> Any:
        """The stored result of the succeeded call ``key``; KeyError if there is none.

        Keys are per task: pass ``task=`` when tasks share a key. The result is unpickled,
        which runs whatever code the pickle names: read results only from ledgers you trust.
        """
        task_name, _status, blob = self._one(key, task, "status, result")
        if _status != "succeeded":
            raise KeyError(f"call {key!r} of {task_name} has no result in {self.path}: its status is {_status}")
        try:
            return pickle.loads(blob)
        except Exception as exc:
            raise SerializationError(f"the stored result of call {key!r} of {task_name} cannot be unpickled: {exc}") from exc

    # ---- changes -----------------------------------------------------------------------

    def forget(self, key: str, *, task: str | Task[..., Any] | None = None) -> bool:
        """Delete the record of call ``key`` so it runs again; False if there was none."""
        try:
            task_name, *_ = self._one(key, task, "status")
        except KeyError:
            return False
        store = self._store
        store._write(lambda conn: conn.execute("DELETE FROM runs WHERE task = ? AND key = ?", (task_name, key)))
        store._forget_cached(task_name, key)
        return True

    def reset(self, status: Status | str | None = None, *, task: str | Task[..., Any] | None = None) -> int:
        """Delete the records with ``status`` (all when None), of one task or all; returns how many.

        ``reset("failed")`` forgets the failures (their errors); ``reset()`` starts over. Use
        it while no process is running calls on this ledger.
        """
        name, wanted = _task_name(task), _status_name(status)
        store = self._store
        if wanted in ("running", "interrupted"):
            where, params = _filters(name, wanted, "r.")
            with store._reading() as conn:
                rows = conn.execute(
                    f"SELECT r.task, r.key, {_OWNER_COLUMNS} FROM {_RUNS_WITH_OWNERS} WHERE " + " AND ".join(where), params
                ).fetchall()
            now = time.time()
            doomed = [(t, k) for t, k, *owner in rows if _owner_alive(*owner, now) == (wanted == "running")]

            def delete(conn: sqlite3.Connection) -> int:
                _transaction(
                    conn, lambda: conn.executemany("DELETE FROM runs WHERE task = ? AND key = ? AND status = 'running'", doomed)
                )
                return len(doomed)

            count = store._write(delete)
        else:
            where, params = _filters(name, wanted, "")
            sql = "DELETE FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
            count = store._write(lambda conn: conn.execute(sql, params).rowcount)
        if wanted in (None, "succeeded"):
            store._drop_cache(name)
        return count

    def _one(self, key: str, task: Any, columns: str) -> tuple[Any, ...]:
        name = _task_name(task)
        sql = f"SELECT task, {columns} FROM runs WHERE key = ?" + (" AND task = ?" if name is not None else "")
        params = (key, name) if name is not None else (key,)
        with self._store._reading() as conn:
            rows = conn.execute(sql, params).fetchall()
        if not rows:
            of = f" of task {name}" if name is not None else ""
            raise KeyError(f"no call with key {key!r}{of} in ledger {self.path}")
        if len(rows) > 1:
            names = ", ".join(sorted(r[0] for r in rows))
            raise ValueError(f"key {key!r} names calls of several tasks ({names}) in {self.path}; pass task=")
        return rows[0]  # type: ignore[no-any-return]

    # ---- the run's side (called from BaseTaskRun) --------------------------------------

    def _launch(self, run: BaseTaskRun[Any]) -> None:
        """Start ``run`` through the ledger: finish it from the stored result, or claim its key and run it."""
        store = self._store
        key = run.key = make_key(run.task, run.args, run.kwargs)
        done = store._done.get(run.name)
        if done is None:
            done = store._load(run.name)
        blob = done.get(key, _MISSING)
        if blob is not _MISSING and store._finish_cached(run, blob):
            return
        run.prepare()
        store._admit(run)

    def _record(self, run: BaseTaskRun[Any], status: Status, value: Any, exc: BaseException | None) -> None:
        """Commit the outcome of ``run``, then publish it (a stopped run is published at once)."""
        self._store._record(run, status, value, exc)


# ---- the per-process, per-file machinery --------------------------------------------------

_stores: weakref.WeakValueDictionary[str, _Store] = weakref.WeakValueDictionary()
_stores_lock = threading.Lock()
_orphans: list[sqlite3.Connection] = []  # connections inherited over fork: never used, never closed
_thread_numbers = itertools.count(1)


def _store_for(path: str, busy_timeout: float | None = None) -> _Store:
    real = os.path.realpath(path)
    with _stores_lock:
        store = _stores.get(real)
        if store is not None and store._same_file():
            store._recheck()  # it may have been changed since, by another program
            if busy_timeout is not None:
                store.busy_timeout = busy_timeout
            return store
        store = _Store(path, real, BUSY_TIMEOUT if busy_timeout is None else busy_timeout)
        store._open()
        _stores[real] = store
        return store


class _Phase:
    """One step of the ledger's part in ``taskrun.shutdown()``, ordered around the pools'."""

    def __init__(self, fn: Callable[[bool], None], order: int) -> None:
        self.shutdown_order = order
        self._fn = fn

    def shutdown(self, wait: bool = True) -> None:
        self._fn(wait)


class _Store:
    """A ledger file's connection, caches, claims and thread within this process."""

    def __init__(self, path: str, real: str, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = path
        self.real = real
        self.busy_timeout = busy_timeout  # seconds a write waits for the write lock (see _retrying)
        self._conn_timeout = busy_timeout  # what the open connection's busy handler waits
        self._file_id: tuple[int, int] | None = None
        self._conn: sqlite3.Connection | None = None
        self._name = os.path.basename(real)
        self._reset_state()
        self._done: dict[str, dict[str, bytes | None]] = {}  # task -> succeeded key -> result (None: large)
        self._unloadable: set[tuple[str, str]] = set()  # stored results that cannot be unpickled here
        # taskrun.shutdown() settles the claims before the pools stop (a feeder of the pools), and
        # commits the outcomes after they did (a pool that shuts down last).
        self._claims_phase = _Phase(self._settle_claims, 1)
        self._records_phase = _Phase(self.shutdown, 1)

    def _reset_state(self) -> None:
        self._db_lock = threading.RLock()
        self._batch_lock = threading.RLock()  # one batch is processed at a time
        self._state = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[tuple[Any, ...]] = collections.deque()
        self._thread: threading.Thread | None = None
        self._idle = False  # the thread waits on _cond: notify it
        self._closing = False  # the thread ends once its queue is empty
        self._gate_closed = False  # shutting down: new claims end STOPPED
        self._active: dict[tuple[str, str], BaseTaskRun[Any]] = {}  # the run in this process for each key
        self._claims: dict[BaseTaskRun[Any], int] = {}  # run -> batch number of the claim it holds
        self._deferred: collections.deque[BaseTaskRun[Any]] = collections.deque()  # to claim once runs finish
        self._finished_lately: collections.deque[tuple[float, int]] = collections.deque()  # (when, how many)
        self._watching: dict[tuple[str, str], BaseTaskRun[Any]] = {}  # keys another process is running
        self._owner = secrets.token_hex(8)  # this process, in the file's owners table
        self._registered = False
        self._batches = itertools.count(1)

    def __repr__(self) -> str:
        return f"<ledger store {self.path}>"

    # ---- the file ------------------------------------------------------------------------

    def _open(self) -> None:
        """Check the file and open it, creating the ledger if the file is missing or empty."""
        path = self.path
        if os.path.isdir(path):
            raise LedgerError(f"ledger path {path!r} is a directory; pass a file path such as {os.path.join(path, 'runs.db')!r}")
        exists = os.path.exists(path)
        if exists:
            self._check_file(path)
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
        except sqlite3.Error as exc:
            if _is_busy(exc):
                error = self._busy_error(conn, exc)
                conn.close()
                raise error from exc
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

    def _check_file(self, path: str) -> None:
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
            conn = sqlite3.connect(f"{_file_uri(path)}?mode=ro&immutable=1", uri=True, timeout=self.busy_timeout)
        except (OSError, sqlite3.Error) as exc:
            raise LedgerError(f"cannot read ledger {path!r}: {exc}") from exc
        try:
            app_id, version, tables = _identity(conn)
        except sqlite3.DatabaseError as exc:
            if "not a database" in str(exc):
                raise LedgerError(
                    f"{path!r} is not a taskrun ledger: it is not an SQLite database (it starts with {_head(path)!r}); "
                    + NEW_FILE_ADVICE
                ) from exc
            raise LedgerError(f"{path!r} is not a usable taskrun ledger: SQLite cannot read it ({exc})") from exc
        finally:
            conn.close()
        _check_identity(path, app_id, version, tables)

    def _recheck(self) -> None:
        """Check the file again through the open connection (see :meth:`_check_file` for why)."""
        with self._db_lock:
            if self._conn is None:
                self._check_file(self.path)
                return
            try:
                app_id, version, tables = _identity(self._conn)
            except sqlite3.Error as exc:
                raise LedgerError(f"{self.path!r} is no longer a usable taskrun ledger: SQLite cannot read it ({exc})") from exc
        _check_identity(self.path, app_id, version, tables)

    def _connect(self) -> sqlite3.Connection:
        timeout = self._conn_timeout = self.busy_timeout
        conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        try:
            _configure(conn, timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    def _initialize(self, conn: sqlite3.Connection) -> None:
        """Check what the file is before writing to it, then make it a ledger if it is empty."""
        app_id, version, tables = _identity(conn)
        _check_identity(self.path, app_id, version, tables)
        _configure(conn, self.busy_timeout)
        if app_id == APPLICATION_ID and version == SCHEMA_VERSION:
            return

        def create() -> None:  # in one transaction: another process may be creating it too
            app_id, version, tables = _identity(conn)
            _check_identity(self.path, app_id, version, tables)
            if app_id != APPLICATION_ID or version < SCHEMA_VERSION:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)

        _transaction(conn, create)

    def _stat_id(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.real)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _same_file(self) -> bool:
        """False once the file was deleted or replaced: a new Ledger then opens the new one."""
        return self._file_id is not None and self._stat_id() == self._file_id

    def _connection(self) -> sqlite3.Connection:
        """The connection (opened again after a fork or a shutdown); hold ``_db_lock``."""
        conn = self._conn
        if conn is None:
            try:
                conn = self._conn = self._connect()
            except sqlite3.Error as exc:
                raise LedgerError(f"cannot open ledger {self.path!r}: {exc}") from exc
        return conn

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A read-only connection (``mode=ro``) for one look inside, closed after it.

        It cannot write, and it does not take ``_db_lock``, so inspection never waits behind
        the ledger thread (which may be waiting for another connection's write lock). The
        writing connection is opened first, so the file's -wal and -shm exist and this one
        creates neither; closed before it, it lets the writer remove them as usual.
        """
        if self._conn is None:
            with self._db_lock:
                self._connection()
        try:
            conn = _open_read_only(self.real, self.busy_timeout)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot read ledger {self.path!r}: {exc}") from exc
        try:
            yield conn
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot read ledger {self.path!r}: {exc}") from exc
        finally:
            conn.close()

    def _write(self, change: Callable[[sqlite3.Connection], Any]) -> Any:
        """``change(conn)`` on the writing connection, waiting at most busy_timeout for the write lock."""
        with self._db_lock:
            conn = self._connection()
            self._restore_timeout(conn)
            try:
                return self._retrying(conn, lambda: change(conn))
            except sqlite3.Error as exc:
                raise LedgerError(f"could not write to ledger {self.path!r}: {_write_problem(exc)}") from exc

    def _restore_timeout(self, conn: sqlite3.Connection) -> None:
        """Give the connection's busy handler the current busy_timeout (after a change or a shortened retry)."""
        if self._conn_timeout != self.busy_timeout:
            self._conn_timeout = self.busy_timeout
            conn.execute(f"PRAGMA busy_timeout = {round(self.busy_timeout * 1000)}")

    def _retrying(self, conn: sqlite3.Connection, step: Callable[[], Any]) -> Any:
        """``step()``, tried again while another connection holds the write lock, for busy_timeout in all.

        SQLite's busy handler does the waiting (it is set to busy_timeout); should it give up
        early, the step is tried again for what is left. Then LedgerError, naming the file
        and who may hold it. Steps are single statements or transactions: a failed one
        changed nothing.
        """
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                return step()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                remaining = deadline - time.monotonic()
                if remaining < 0.001:
                    raise self._busy_error(conn, exc) from exc
            time.sleep(min(0.005, remaining))  # SQLite may report "busy" without waiting (e.g. WAL recovery)
            self._conn_timeout = remaining
            conn.execute(f"PRAGMA busy_timeout = {max(1, round(remaining * 1000))}")

    def _busy_error(self, conn: sqlite3.Connection, exc: sqlite3.Error) -> LedgerError:
        """The error for a file whose write lock another connection held past busy_timeout, naming who may hold it."""
        holders = None
        try:
            conn.execute("PRAGMA busy_timeout = 0")  # reading the owners must not wait again
            self._conn_timeout = 0.0
            now = time.time()
            holders = [
                f"pid {pid} on {host}"
                for owner, host, machine, pid, pid_start, lease_until in conn.execute(
                    "SELECT owner, host, machine, pid, pid_start, lease_until FROM owners"
                )
                if owner != self._owner and _owner_alive(machine, pid, pid_start, lease_until, now)
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

    # ---- the in-memory cache of succeeded calls ------------------------------------------

    def _load(self, task: str) -> dict[str, bytes | None]:
        """Read the keys and small results of ``task``'s succeeded calls (once per task and process)."""
        with self._db_lock:
            rows = self._connection().execute(
                "SELECT key, CASE WHEN length(result) <= ? THEN result END FROM runs WHERE task = ? AND status = 'succeeded'",
                (CACHE_LIMIT, task),
            ).fetchall()
        with self._state:
            done = self._done.get(task)
            if done is None:
                done = self._done[task] = dict(rows)
        return done

    def _fetch_result(self, task: str, key: str) -> bytes | None:
        with self._db_lock:
            row = self._connection().execute(
                "SELECT result FROM runs WHERE task = ? AND key = ? AND status = 'succeeded'", (task, key)
            ).fetchone()
        return None if row is None else row[0]

    def _forget_cached(self, task: str, key: str) -> None:
        with self._state:
            done = self._done.get(task)
            if done is not None:
                done.pop(key, None)
            self._unloadable.discard((task, key))

    def _drop_cache(self, task: str | None) -> None:
        with self._state:
            if task is None:
                self._done.clear()
                self._unloadable.clear()
            else:
                self._done.pop(task, None)

    def _finish_cached(self, run: BaseTaskRun[Any], blob: bytes | None) -> bool:
        """Finish ``run`` SUCCEEDED and ``cached`` with the stored result; False if that cannot be loaded (then it runs)."""
        ident = (run.name, run.key)
        if blob is None:
            blob = self._fetch_result(*ident)  # type: ignore[arg-type]
            if blob is None:
                self._forget_cached(*ident)  # type: ignore[arg-type]
                return False
        try:
            value = pickle.loads(blob)
        except Exception as exc:
            logger.warning(
                "ledger %s: the stored result of %s (key %s) cannot be unpickled here (%s: %s); running the call again",
                self.path, run.name, run.key, type(exc).__name__, exc,
            )
            self._forget_cached(*ident)  # type: ignore[arg-type]
            with self._state:
                self._unloadable.add(ident)  # type: ignore[arg-type]
            return False
        with run._lock:
            if run._finishing:
                return True
            run._finishing = True
        self._unactivate(run)
        run.cached = True
        run._publish(_SUCCEEDED, value)
        return True

    def _try_cached(self, run: BaseTaskRun[Any]) -> bool:
        done = self._done.get(run.name)
        blob = _MISSING if done is None else done.get(run.key, _MISSING)  # type: ignore[arg-type]
        return blob is not _MISSING and self._finish_cached(run, blob)

    # ---- claims --------------------------------------------------------------------------

    def _admit(self, run: BaseTaskRun[Any]) -> None:
        """Claim ``run``'s key, or wait for the run of this process that holds it."""
        ident: tuple[str, str] = (run.name, run.key)  # type: ignore[assignment]
        while True:
            if run._finishing:
                return
            # Atomic: of two threads calling the same key, one becomes its run here.
            owner = self._active.setdefault(ident, run)
            if owner is run:
                break
            if not run.inline:
                owner.add_done_callback(lambda _owner: self._after_owner(run))
                return
            owner.wait()
            if self._try_cached(run):
                return
        if run.inline:
            self._claim_inline(run)
        else:
            self._submit((_CLAIM, run))

    def _after_owner(self, run: BaseTaskRun[Any]) -> None:
        """The run of this process that held ``run``'s key finished: take its result, or the key."""
        try:
            if not self._try_cached(run):
                self._admit(run)
        except Exception as exc:
            run._conclude(Status.FAILED, exc=exc)

    def _claim_inline(self, run: BaseTaskRun[Any]) -> None:
        """For inline runners: claim in the caller, waiting while another process runs the key."""
        while not self._process([(_CLAIM, run)], inline=True):
            if run._finishing:
                return
            time.sleep(POLL_INTERVAL)  # another process runs it: look again

    def _unactivate(self, run: BaseTaskRun[Any]) -> None:
        """``run`` no longer holds its key in this process (each run gets here once)."""
        ident = (run.name, run.key)
        if self._active.get(ident) is run:  # type: ignore[arg-type]
            del self._active[ident]  # type: ignore[arg-type]

    # ---- finished runs -------------------------------------------------------------------

    def _record(self, run: BaseTaskRun[Any], status: Status, value: Any, exc: BaseException | None) -> None:
        finished = time.time()
        stored, blob, error = _STATUS_NAMES[status], None, None
        if status is _SUCCEEDED:
            try:
                blob = pickle.dumps(value, RESULT_PROTOCOL)
            except Exception:
                blob = None
            try:
                if blob is None:
                    blob = _dumps_result(value)
            except Exception as why:
                stored = "failed"
                message = (
                    f"the result of {run.id} ({type(value).__name__}) could not be pickled for the ledger: "
                    f"{type(why).__name__}: {why}; the caller got it, but the call runs again next time"
                )
                error = (_type_name(SerializationError), message, None, _describe_call(run))
                logger.warning("ledger %s: %s", self.path, message)
        elif exc is not None:
            error = (_type_name(type(exc)), str(exc), _traceback_text(exc), _describe_call(run))
        if status is Status.STOPPED:
            # Published at once: nothing is lost if this record is, a stopped call runs again anyway.
            self._unactivate(run)
            self._unwatch(run)
            run._publish(status, value, exc)
            self._submit((_RECORD, run, stored, blob, run.started_at, finished, error, None))
        else:
            item = (_RECORD, run, stored, blob, run.started_at, finished, error, (status, value, exc))
            if run.inline:
                self._process([item], inline=True)
            else:
                self._submit(item)

    def _unwatch(self, run: BaseTaskRun[Any]) -> None:
        ident = (run.name, run.key)
        with self._state:
            if self._watching.get(ident) is run:  # type: ignore[arg-type]
                del self._watching[ident]  # type: ignore[arg-type]

    # ---- the queue and the ledger thread -------------------------------------------------

    def _submit(self, item: tuple[Any, ...]) -> None:
        """Queue a claim or a record for the ledger thread (claims start it); without it, do it here."""
        if self._thread is not None and not self._gate_closed:
            self._queue.append(item)
            if self._idle:
                with self._cond:
                    self._cond.notify()
            if self._thread is None:  # it ended meanwhile: nobody else will take the item
                self._drain()
            return
        is_claim = item[0] is _CLAIM
        with self._cond:
            if is_claim and self._gate_closed:
                stopped = item[1]
            elif self._thread is not None or (is_claim and self._start_thread()):
                self._queue.append(item)
                self._cond.notify()
                return
            else:
                stopped = None
        if stopped is not None:
            stopped._conclude(Status.STOPPED, exc=TaskStopped(f"{stopped.id} was not started: taskrun is shutting down"))
        else:
            self._process([item], inline=True)

    def _drain(self) -> None:
        """Process what is queued, here (used once the ledger thread has ended)."""
        while self._queue:
            self._take_batch()

    def _take_batch(self) -> None:
        """Take up to MAX_BATCH queued items and process them (with the claims waiting in memory).

        Taken under the batch lock, so that once shutdown holds it no claim is between the
        queue and its pool.
        """
        queue = self._queue
        with self._batch_lock:
            take = queue.popleft  # every taker holds the batch lock: the queue only grows meanwhile
            items = [take() for _ in range(min(len(queue), MAX_BATCH))]
            if items or self._deferred:
                self._process(items)
            # Claims that found stored results free their places at once, with no record to
            # wake this thread: claim on while there is room.
            while self._deferred and self._claims_wanted() > 0:
                self._process([])

    def _start_thread(self) -> bool:
        self._closing = False
        self._thread = threading.Thread(
            target=self._loop, name=f"taskrun-ledger-{self._name}-{next(_thread_numbers)}", daemon=True
        )
        self._thread.taskrun_delivers = True  # type: ignore[attr-defined]  # see BaseTaskRun.wait
        self._thread.start()
        _lifecycle.register_feeder(self._claims_phase)
        _lifecycle.get_pool(("ledger", self), lambda: self._records_phase)  # type: ignore[arg-type]
        return True

    def _loop(self) -> None:
        cond, queue = self._cond, self._queue
        now = time.monotonic()
        next_beat = now + LEASE / 3
        next_poll = now + POLL_INTERVAL
        while True:
            if not queue:
                with cond:
                    # Producers append without the lock, then notify if _idle: set it before looking.
                    self._idle = True
                    if not queue:
                        if self._closing:
                            self._thread = None
                            self._idle = False
                            break
                        now = time.monotonic()
                        wake = min(next_beat, next_poll) if self._watching else next_beat
                        if wake > now:
                            cond.wait(wake - now)
                    self._idle = False
            try:
                self._take_batch()
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + LEASE / 3
                    self._renew()
                if self._watching and now >= next_poll:
                    next_poll = now + POLL_INTERVAL
                    self._poll()
            except Exception:
                logger.exception("ledger %s: the ledger thread failed; it goes on", self.path)
        self._drain()  # whatever came in while it was ending

    def _process(self, items: list[tuple[Any, ...]], inline: bool = False, claim_all: bool = False) -> bool:
        """Commit a batch of records and claims, then act on it.

        Records become durable, then their runs are published; granted claims start their
        runs; keys found succeeded finish theirs from the stored result. Claims beyond what
        the runners will start soon wait in memory (see :meth:`_claims_wanted`), unless
        ``inline`` or ``claim_all``. Returns False for a lone inline claim that must wait
        for another process.
        """
        with self._batch_lock:
            claims: list[BaseTaskRun[Any]] = []
            records: list[tuple[Any, ...]] = []
            held = self._claims
            for item in items:
                if item[0] is _CLAIM:
                    claims.append(item[1])
                else:
                    records.append(item + (held.pop(item[1], None),))  # with the claim the record settles
            if records:
                self._finished_lately.append((time.monotonic(), len(records)))
            if not inline:
                deferred = self._deferred
                if deferred:
                    claims[:0] = deferred
                    deferred.clear()
                if not claim_all:
                    wanted = self._claims_wanted()
                    if len(claims) > wanted:
                        deferred.extend(claims[wanted:])
                        del claims[wanted:]
            claims = [run for run in claims if not run._finishing]
            grants: dict[BaseTaskRun[Any], int] = {}
            cached: list[tuple[BaseTaskRun[Any], bytes | None]] = []
            watch: list[BaseTaskRun[Any]] = []
            written: list[tuple[Any, ...]] = []
            try:
                if claims or records:
                    self._commit(claims, records, grants, cached, watch, written)
            except Exception as exc:
                # What was committed goes on as usual below; the rest is published unrecorded or fails.
                done_ids = {id(record) for record in written}
                seen = set(grants).union([run for run, _blob in cached], watch)
                self._commit_failed(
                    exc, [run for run in claims if run not in seen], [r for r in records if id(r) not in done_ids]
                )
                records = [r for r in records if id(r) in done_ids]
            held.update(grants)
            if watch and not inline:
                with self._state:
                    for run in watch:
                        self._watching[(run.name, run.key)] = run  # type: ignore[index]
            done_by_task, active = self._done, self._active
            for record in records:
                run = record[1]
                ident = (run.name, run.key)
                if record[2] == "succeeded":
                    done = done_by_task.get(run.name)
                    if done is not None:
                        blob = record[3]
                        done[run.key] = blob if len(blob) <= CACHE_LIMIT else None  # type: ignore[index]
                if active.get(ident) is run:  # type: ignore[arg-type]
                    del active[ident]  # type: ignore[arg-type]
                publish = record[7]
                if publish is not None:
                    run._publish(*publish)
            for run in grants:
                run._begin_attempt()
            for run, blob in cached:
                if not self._finish_cached(run, blob):
                    self._admit(run)  # the stored result cannot be loaded here: run it
            return not (inline and watch)

    def _claims_wanted(self) -> int:
        """How many more keys to claim now: about what the runners will start soon.

        Claimed runs not started yet are kept under the larger of twice the running ones
        (plus a few) and the number that finished in the last AHEAD seconds. Slow calls then
        leave the rest of a batch to other processes on the same ledger, while a burst of
        tiny calls still claims in big batches.
        """
        now = time.monotonic()
        lately = self._finished_lately
        while lately and lately[0][0] < now - AHEAD:
            lately.popleft()
        finished = sum(n for _t, n in lately)
        held = len(self._claims)
        if finished >= held + 8:
            return finished - held  # a lower bound that needs no count of the running ones
        running = waiting = 0
        for run in list(self._claims):
            if run._status is _PENDING:
                waiting += 1
            else:
                running += 1
        return max(0, max(2 * running + 8, finished) - waiting)

    def _commit(
        self,
        claims: list[BaseTaskRun[Any]],
        records: list[tuple[Any, ...]],
        grants: dict[BaseTaskRun[Any], int],
        cached: list[tuple[BaseTaskRun[Any], bytes | None]],
        watch: list[BaseTaskRun[Any]],
        written: list[tuple[Any, ...]],
    ) -> None:
        """Write the records, then claim the keys; each step commits on its own (atomically).

        What each step did is noted as it commits (``written``, ``grants``, ``cached``,
        ``watch``), so if a later step fails nothing committed before is lost.
        """
        with self._db_lock:
            conn = self._connection()
            self._restore_timeout(conn)
            if records:
                self._write_records(conn, records, written)
            if claims:
                if not self._registered:
                    self._retrying(conn, lambda: self._register(conn))
                by_task: dict[str, list[BaseTaskRun[Any]]] = {}
                for run in claims:
                    by_task.setdefault(run.name, []).append(run)
                for task, runs in by_task.items():
                    self._claim(conn, task, runs, grants, cached, watch)

    def _write_records(self, conn: sqlite3.Connection, records: list[tuple[Any, ...]], written: list[tuple[Any, ...]]) -> None:
        """Successes go in one statement per task; the rest (failures, stops) in one transaction."""
        succeeded: dict[str, list[tuple[Any, ...]]] = {}
        others, other_records = [], []
        pid, owner = os.getpid(), self._owner
        for record in records:
            if record[2] == "succeeded":
                succeeded.setdefault(record[1].name, []).append(record)
            else:
                _kind, run, status, _blob, started, finished, error, _publish, claim = record
                etype, emsg, tb, call = error or (None, None, None, None)
                others.append((
                    run.name, run.key, status, run.attempts, None, etype, emsg, tb, call, started, finished,
                    None if started is None else finished - started, pid, _HOST, owner, claim,
                ))
                other_records.append(record)
        for task, rows in succeeded.items():
            base = min(row[4] if row[4] is not None else row[5] for row in rows)
            offset, fields = 1, []
            for _kind, run, _status, blob, started, finished, _error, _publish, claim in rows:
                size = len(blob)
                fields.append(_SUCCESS_FIELDS % (
                    run.attempts, offset, size, -1 if started is None else round((started - base) * 1e6),
                    round((finished - base) * 1e6), -1 if claim is None else claim,
                ))
                offset += size
            params = (
                task, b"".join([row[3] for row in rows]), pid, _HOST, owner, base, b"".join(fields),
                json.dumps([row[1].key for row in rows]),
            )
            self._retrying(conn, lambda: conn.execute(_SUCCEED_MANY, params))  # noqa: B023
            written.extend(rows)
        if others:
            self._retrying(conn, lambda: _transaction(conn, lambda: conn.executemany(_UPSERT_RECORD, others)))
            written.extend(other_records)

    def _claim(
        self,
        conn: sqlite3.Connection,
        task: str,
        runs: list[BaseTaskRun[Any]],
        grants: dict[BaseTaskRun[Any], int],
        cached: list[tuple[BaseTaskRun[Any], bytes | None]],
        watch: list[BaseTaskRun[Any]],
    ) -> None:
        """Claim the keys of ``runs`` that nobody live holds; sort the others into cached and watched.

        One statement claims every key that is new, failed, stopped or left by this process;
        only if some were not claimed are their rows read, and a dead owner's claim (or an
        unloadable result) is taken over with a compare-and-swap on the row.
        """
        now = time.time()
        owner, pid = self._owner, os.getpid()
        batch = next(self._batches)
        keys = json.dumps([run.key for run in runs])
        claimed = self._retrying(conn, lambda: conn.execute(_CLAIM_MANY, (task, now, pid, _HOST, owner, batch, keys)).rowcount)
        others: dict[str, list[Any]] = {}
        if claimed != len(runs):
            packed = self._retrying(
                conn, lambda: conn.execute(_SELECT_UNCLAIMED, (task, keys, owner, batch, CACHE_LIMIT)).fetchone()[0]
            )
            others = {row[0]: row for row in json.loads(packed or "[]")}
        unclaimed = []
        for run in runs:  # first the claims made: they hold whatever happens next
            row = others.get(run.key)  # type: ignore[arg-type]
            if row is None:
                grants[run] = batch
            else:
                unclaimed.append((run, row))
        for run, row in unclaimed:
            _key, status, row_owner, row_claim, *row_owner_info, hex_result = row
            ident = (task, run.key)
            if status == "succeeded" and ident not in self._unloadable:
                cached.append((run, None if hex_result is None else bytes.fromhex(hex_result)))
                continue
            if status == "running" and row_owner != owner and _owner_alive(*row_owner_info, now):
                watch.append(run)
                continue
            params = (now, pid, _HOST, owner, batch, task, run.key, status, row_owner, row_claim)
            taken = self._retrying(conn, lambda: conn.execute(_TAKE_OVER, params).rowcount)  # noqa: B023
            if not taken:
                watch.append(run)  # the row changed meanwhile: look again shortly
                continue
            if status == "running":
                logger.info("ledger %s: %s (key %s) was interrupted (its process is gone); running it again",
                            self.path, task, run.key)
            grants[run] = batch

    def _commit_failed(self, exc: Exception, claims: list[BaseTaskRun[Any]], records: list[tuple[Any, ...]]) -> None:
        """A write failed: publish the outcomes anyway (not recorded, so they run again) and fail the claims.

        The failed claims' runs never started: they end FAILED with LedgerError without a
        record (writing one would fail, and be logged, again).
        """
        problem = _write_problem(exc)
        if records:
            names = ", ".join(f"{r[1].id} (key {r[1].key})" for r in records[:3]) + (" ..." if len(records) > 3 else "")
            logger.error(
                "ledger %s: %d outcome(s) were not recorded: %s; their callers got them, but those calls run again "
                "next time: %s", self.path, len(records), problem, names,
            )
        if claims:
            logger.error("ledger %s: %d call(s) were not run: their claims could not be written: %s",
                         self.path, len(claims), problem)
        for record in records:
            self._unactivate(record[1])
        for record in records:
            if record[7] is not None:
                record[1]._publish(*record[7])
        for run in claims:
            with run._lock:
                if run._finishing:
                    continue
                run._finishing = True
            self._unactivate(run)
            error = LedgerError(f"{run.id} was not run: its claim could not be written to the ledger: {problem}")
            error.__cause__ = exc
            run._publish(Status.FAILED, None, error)

    def _poll(self) -> None:
        """Look at the keys other processes are running; claim again those they no longer hold."""
        with self._state:
            watching = list(self._watching.items())
        rows: dict[tuple[str, str], tuple[Any, ...] | None] = {}
        with self._db_lock:
            conn = self._connection()
            for ident, _run in watching:
                rows[ident] = conn.execute(
                    f"SELECT r.status, r.owner, {_OWNER_COLUMNS} FROM {_RUNS_WITH_OWNERS} WHERE r.task = ? AND r.key = ?",
                    ident,
                ).fetchone()
        now = time.time()
        ready = []
        for ident, run in watching:
            row = rows[ident]
            if (
                run._finishing or row is None or row[0] != "running" or row[1] == self._owner
                or not _owner_alive(*row[2:], now)
            ):
                ready.append((ident, run))
        if not ready:
            return
        with self._state:
            for ident, run in ready:
                if self._watching.get(ident) is run:
                    del self._watching[ident]
        for _ident, run in ready:
            if not run._finishing:
                self._submit((_CLAIM, run))

    def _register(self, conn: sqlite3.Connection) -> None:
        """Enter this process in ``owners`` (before its first claim) and drop owners that are gone."""
        now = time.time()
        dead = [o for o, *info in conn.execute("SELECT owner, machine, pid, pid_start, lease_until FROM owners")
                if not _owner_alive(*info, now)]

        def register() -> None:
            conn.executemany("DELETE FROM owners WHERE owner = ?", [(o,) for o in dead])
            conn.execute(
                "INSERT OR REPLACE INTO owners (owner, host, machine, pid, pid_start, lease_until) VALUES (?, ?, ?, ?, ?, ?)",
                (self._owner, _HOST, _MACHINE, os.getpid(), _own_process_start(), now + LEASE),
            )

        _transaction(conn, register)
        self._registered = True

    def _renew(self) -> None:
        """Extend this process's lease: its claims stay valid for owners on other machines."""
        if not self._registered:
            return
        try:
            self._write(
                lambda conn: conn.execute("UPDATE owners SET lease_until = ? WHERE owner = ?", (time.time() + LEASE, self._owner))
            )
        except LedgerError as exc:
            logger.warning("ledger %s: could not renew this process's lease: %s", self.path, exc)

    # ---- shutdown and fork ---------------------------------------------------------------

    def _settle_claims(self, wait: bool) -> None:
        """Before the pools stop: start the queued claims (wait) or stop them; stop the watched runs."""
        with self._cond:
            self._gate_closed = True  # from now on new claims end STOPPED
        with self._batch_lock:  # the ledger thread is between batches: its claims have started
            queue, items = self._queue, []
            while queue:
                items.append(queue.popleft())
            if not wait:
                claimed = [item[1] for item in items if item[0] is _CLAIM] + list(self._deferred)
                self._deferred.clear()
                for run in claimed:
                    run._conclude(Status.STOPPED, exc=TaskStopped(f"{run.id} was not started: taskrun is shutting down"))
                items = [item for item in items if item[0] is not _CLAIM]
            if items or self._deferred:
                self._process(items, claim_all=True)  # the pools run what is queued before they stop
        self._stop_watched()

    def _stop_watched(self) -> None:
        with self._state:
            watched = list(self._watching.values())
        for run in watched:
            reason = f"{run.id} was stopped while another process ran its key: taskrun is shutting down"
            run._conclude(Status.STOPPED, exc=TaskStopped(reason))

    def shutdown(self, wait: bool = True) -> None:
        """After the pools stopped: commit and publish what is queued, end the thread, close the file.

        Runs still holding a claim (their pool started too late to be shut down) are waited
        for (``wait``) or stopped; claims nobody will start end STOPPED.
        """
        with self._cond:
            self._gate_closed = True
        with self._batch_lock:
            queue, leftover = self._queue, list(self._deferred)
            self._deferred.clear()
            for _ in range(len(queue)):
                item = queue.popleft()
                if item[0] is _CLAIM:
                    leftover.append(item[1])
                else:
                    queue.append(item)  # records stay for the thread
        for run in leftover:
            run._conclude(Status.STOPPED, exc=TaskStopped(f"{run.id} was not started: taskrun is shutting down"))
        for run in list(self._claims):
            if not wait:
                run.stop()
            elif not run.wait(60):
                logger.warning("ledger %s: %s still runs after 60 s of shutdown; not waiting for it", self.path, run.id)
        with self._cond:
            self._closing = True
            thread = self._thread
            self._cond.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join(60)
        self._stop_watched()
        _lifecycle.unregister_feeder(self._claims_phase)
        with self._cond:
            self._gate_closed = False
            if self._thread is None and self._conn is not None:
                with self._db_lock:
                    self._conn.close()
                    self._conn = None

    def _after_fork_in_child(self) -> None:
        if self._conn is not None:
            _orphans.append(self._conn)  # closing it could disturb the parent's use of the file
            self._conn = None
        self._reset_state()


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
    from urllib.parse import quote

    return "file:" + quote(os.path.abspath(path))


def _identity(conn: sqlite3.Connection) -> tuple[int, int, list[str]]:
    """Application id, schema version and table names, read in one statement: one snapshot of a file
    another process may be creating right now."""
    app_id, version, names = conn.execute(
        "SELECT (SELECT application_id FROM pragma_application_id()), (SELECT user_version FROM pragma_user_version()),"
        " (SELECT json_group_array(name) FROM (SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name))"
    ).fetchone()
    return app_id, version, json.loads(names)


def _check_identity(path: str, app_id: int, version: int, tables: list[str]) -> None:
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
    raise LedgerError(
        f"{path!r} is an SQLite database but not a taskrun ledger ({what}); it was left untouched: "
        + NEW_FILE_ADVICE
    )


def _after_fork_in_child() -> None:
    global _stores_lock
    _stores_lock = threading.Lock()
    if _stores:
        for store in list(_stores.values()):
            store._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

