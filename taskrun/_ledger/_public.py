"""The public face: :class:`Ledger` (open a file; inspect and change what it holds) and :class:`RunRecord`.

Inspection reads through read-only connections of its own, so it never writes and never waits
behind the ledger thread. A Ledger opened with :meth:`Ledger.open_read_only` only reads: its
file is never written or created (``python -m taskrun status`` uses it).
"""

from __future__ import annotations

import os
import pickle
import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from .._status import Status
from ..errors import LedgerError, SerializationError
from ._owners import holder_alive
from ._storage import BUSY_TIMEOUT, STATUSES, ReadOnlyFile, Storage, call_rows, failure_rows, record_rows, summary_of
from ._store import Store, open_store

if TYPE_CHECKING:
    from .._task import Task


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
        #: The ledger file's path.
        self.path: str = os.fspath(path)
        self._store: Store | None = open_store(self.path, busy_timeout)
        self._reader: Storage | ReadOnlyFile = self._store.storage

    @classmethod
    def open_read_only(cls, path: str | os.PathLike[str], *, busy_timeout: float | None = None) -> Ledger:
        """Open an existing ledger only to read it: no byte of the file changes and no file is created.

        ``summary()``, ``runs()``, ``last_errors()`` and ``result()`` work (each sees the
        latest commits, also of a ledger in use); ``forget()``/``reset()`` and tasks using it
        raise LedgerError. An empty file or an empty SQLite database holds no calls. Raises
        LedgerError for a missing file or one that is not a ledger this taskrun can read.
        """
        ledger = cls.__new__(cls)
        ledger.path = os.fspath(path)
        ledger._store = None
        timeout = BUSY_TIMEOUT if busy_timeout is None else _check_busy_timeout(busy_timeout)
        ledger._reader = ReadOnlyFile(ledger.path, timeout)
        return ledger

    @property
    def read_only(self) -> bool:
        """True for a ledger opened with :meth:`open_read_only`."""
        return self._store is None

    @property
    def busy_timeout(self) -> float:
        """Seconds a write waits for another connection's write lock before its calls get LedgerError."""
        return self._reader.busy_timeout

    def __repr__(self) -> str:
        if self._store is None:
            return f"Ledger.open_read_only({self.path!r})"
        return f"Ledger({self.path!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # A ledger travels (to a worker process, with a task) as its file, opened again there.
        return (_reopen, (os.path.abspath(self.path), self._reader.busy_timeout, self._store is None))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ledger):
            return False
        if self._store is None or other._store is None:
            return self is other
        return other._store is self._store

    def __hash__(self) -> int:
        return hash(self._store) if self._store is not None else id(self)

    # ---- inspection (read-only) --------------------------------------------------------

    def summary(self) -> dict[str, dict[str, int]]:
        """Counts per task and status: ``{"fetch": {"succeeded": 950, "failed": 3, "interrupted": 47}}``.

        Statuses with no calls are left out. ``"interrupted"`` counts calls claimed by a
        process that is gone; ``"running"`` those a live process is running.
        """
        return self._reader.read(summary_of, {})

    def runs(self, task: str | Task[..., Any] | None = None, status: Status | str | None = None) -> list[RunRecord]:
        """The recorded calls, oldest first, optionally of one task (a name or the task) and one status."""
        name, wanted = _task_name(task), _status_name(status)
        records = _records(self._reader.read(lambda conn: record_rows(conn, name, wanted), []))
        if wanted in ("running", "interrupted"):
            records = [r for r in records if r.status == wanted]
        return records

    def last_errors(self, limit: int = 5) -> list[RunRecord]:
        """The ``limit`` most recently failed calls, newest first."""
        return _records(self._reader.read(lambda conn: failure_rows(conn, limit), []))

    def result(self, key: str, *, task: str | Task[..., Any] | None = None) -> Any:
        """The stored result of the succeeded call ``key``; KeyError if there is none.

        Keys are per task: pass ``task=`` when tasks share a key. The result is unpickled,
        which runs whatever code the pickle names: read results only from ledgers you trust.
        """
        task_name, status, blob = self._one(key, task)
        if status != "succeeded" or blob is None:
            raise KeyError(f"call {key!r} of {task_name} has no result in {self.path}: its status is {status}")
        try:
            return pickle.loads(blob)
        except Exception as exc:
            raise SerializationError(f"the stored result of call {key!r} of {task_name} cannot be unpickled: {exc}") from exc

    # ---- changes -----------------------------------------------------------------------

    def forget(self, key: str, *, task: str | Task[..., Any] | None = None) -> bool:
        """Delete the record of call ``key`` so it runs again; False if there was none."""
        store = self._writable("forget")
        try:
            task_name, _status, _blob = self._one(key, task)
        except KeyError:
            return False
        store.storage.delete_call(task_name, key)
        store.forget_cached(task_name, key)
        return True

    def reset(self, status: Status | str | None = None, *, task: str | Task[..., Any] | None = None) -> int:
        """Delete the records with ``status`` (all when None), of one task or all; returns how many.

        ``reset("failed")`` forgets the failures (their errors); ``reset()`` starts over. Use
        it while no process is running calls on this ledger.
        """
        store = self._writable("reset")
        name, wanted = _task_name(task), _status_name(status)
        if wanted in ("running", "interrupted"):
            # Which claims are interrupted only this process can tell (their owners' liveness).
            doomed = [(r.task, r.key) for r in self.runs(name, wanted)]
            count = store.storage.delete_claims(doomed)
        else:
            count = store.storage.delete_calls(name, wanted)
        if wanted in (None, "succeeded"):
            store.drop_cache(name)
        return count

    def _writable(self, what: str) -> Store:
        if self._store is None:
            raise LedgerError(f"{self!r} was opened read-only: it cannot {what}; open it with Ledger({self.path!r})")
        return self._store

    def _one(self, key: str, task: Any) -> tuple[str, str, bytes | None]:
        name = _task_name(task)
        rows: list[tuple[str, str, bytes | None]] = self._reader.read(lambda conn: call_rows(conn, key, name), [])
        if not rows:
            of = f" of task {name}" if name is not None else ""
            raise KeyError(f"no call with key {key!r}{of} in ledger {self.path}")
        if len(rows) > 1:
            names = ", ".join(sorted(r[0] for r in rows))
            raise ValueError(f"key {key!r} names calls of several tasks ({names}) in {self.path}; pass task=")
        return rows[0]

def store_for(ledger: Ledger) -> Store:
    """The store of ``ledger``'s file in this process: what runs of its tasks talk to (see :mod:`._store`)."""
    store = ledger._store  # pyright: ignore[reportPrivateUsage]  # the run side's one way in
    if store is None:
        raise LedgerError(
            f"{ledger!r} was opened read-only: tasks cannot record calls in it; pass Ledger({ledger.path!r}) to @task"
        )
    return store


def _reopen(path: str, busy_timeout: float, read_only: bool = False) -> Ledger:
    if read_only:
        return Ledger.open_read_only(path, busy_timeout=busy_timeout)
    return Ledger(path, busy_timeout=busy_timeout)


def _check_busy_timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Ledger option busy_timeout must be a number of seconds, got {value!r}")
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"Ledger option busy_timeout must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def _records(rows: list[tuple[Any, ...]]) -> list[RunRecord]:
    now = time.time()
    records: list[RunRecord] = []
    for row in rows:
        record = RunRecord(*row[:13])
        if record.status == "running" and not holder_alive(row[13:], now):
            record = replace(record, status="interrupted")
        records.append(record)
    return records


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
    if name not in STATUSES:
        raise ValueError(f"unknown ledger status {status!r}; use one of {', '.join(STATUSES)}")
    return name
