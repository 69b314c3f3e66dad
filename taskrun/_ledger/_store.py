"""The store: one ledger file's machinery in this process, and the interface the run handle uses.

The handle asks; the store answers with decisions and the handle applies them (only the
handle changes a run's state). The questions, in a run's order:

* :meth:`Store.lookup` -- a stored result? Answered from memory: a task's succeeded keys
  (and small results) are read on its first call.
* :meth:`Store.admit` -- may the run execute? Answered later through ``reply(verdict, value)``:
  ``"claimed"`` (run it), ``"cached"`` (its key succeeded meanwhile: the value), ``"wait"``
  (for that run of this process, which holds the key), ``"failed"`` (a LedgerError) or
  ``"stopped"`` (a TaskStopped: taskrun is shutting down). :meth:`Store.admit_here` decides
  in the caller instead, for inline runners, and polls there while another process holds the key.
* :meth:`Store.record` -- commit the outcome; ``reply(status, value, exc, problem)`` once it is
  durable (``problem`` None) or known not to be (``problem`` says why). :meth:`Store.record_here`
  commits in the caller.

Claims and records go through the writer's queue (:mod:`._writer`); a batch commits its
records in one transaction, then its claims in one transaction per task (:mod:`._claims`),
then answers. Claimed runs are started while the batch holds the writer's ``batch_lock``
(``taskrun.shutdown()`` relies on it: once it holds that lock, every claim taken has been
started in its pool); every other answer -- the ones that publish a run -- is called after
the lock is released, on the ledger thread.
"""

from __future__ import annotations

import logging
import os
import pickle
import reprlib
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._lifecycle import get_pool, register_feeder, unregister_feeder
from .._status import Status
from ..errors import LedgerError, RemoteTraceback, SerializationError, TaskStopped, format_traceback
from . import _owners
from ._claims import POLL_INTERVAL, Admission, Answer, Claims, Decision
from ._keys import make_key
from ._storage import BUSY_TIMEOUT, CACHE_LIMIT, Outcome, Storage, Success, write_problem
from ._writer import Call, Writer, call_all, is_claim

if TYPE_CHECKING:
    from .._run import BaseTaskRun

    Run = BaseTaskRun[Any]
else:
    Run = Any

logger = logging.getLogger("taskrun")

RESULT_PROTOCOL = 5

#: How a record is answered: ``reply(status, value, exc, problem)`` (see Store.record).
Recorded = Callable[[Status, Any, "BaseException | None", "BaseException | None"], None]

_MISSING: Any = object()
_SUCCEEDED = Status.SUCCEEDED
_FAILED = Status.FAILED
_STOPPED = Status.STOPPED
_STATUS_NAMES = {status: status.value for status in Status}


class Store:
    """One ledger file in this process: its storage, claims, writer thread and caches (shared by its Ledger objects)."""

    def __init__(self, path: str, real: str, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = path
        self.storage = Storage(path, real, busy_timeout)
        self.claims = Claims()
        self.writer = Writer(os.path.basename(real), self)
        self.lock = threading.Lock()  # for changes of the caches below
        #: task -> key of a succeeded call -> its result (None: too large to keep, read per call).
        self.done: dict[str, dict[str, bytes | None]] = {}
        #: Stored results that cannot be unpickled here: the next claim takes their rows over.
        self.unloadable: set[tuple[str, str]] = set()
        # taskrun.shutdown() settles the claims before the pools stop (a feeder of the pools), and
        # commits the outcomes after they did (a pool that shuts down last).
        self.claims_phase = _Phase(self.settle_claims)
        self.records_phase = _Phase(self.shutdown)
        self._next_beat = self._next_poll = 0.0

    def __repr__(self) -> str:
        return f"<ledger store {self.path}>"

    # ---- the run side: a stored result? --------------------------------------------------

    key_for = staticmethod(make_key)

    def lookup(self, task: str, key: str) -> tuple[bool, Any]:
        """``(True, value)`` if call ``key`` of ``task`` succeeded and its result loads here, else ``(False, None)``."""
        done = self.done.get(task)
        if done is None:
            done = self._load(task)
        blob = done.get(key, _MISSING)
        if blob is _MISSING:
            return False, None
        return self._unpickle(task, key, blob)

    def _load(self, task: str) -> dict[str, bytes | None]:
        """Read the keys and small results of ``task``'s succeeded calls (once per task and process)."""
        rows = self.storage.succeeded(task)
        with self.lock:
            done = self.done.get(task)
            if done is None:
                done = self.done[task] = dict(rows)
        return done

    def _unpickle(self, task: str, key: str, blob: bytes | None) -> tuple[bool, Any]:
        if blob is None:  # large: read it now
            blob = self.storage.stored_result(task, key)
            if blob is None:  # deleted meanwhile, by another process
                self.forget_cached(task, key)
                return False, None
        try:
            return True, pickle.loads(blob)
        except Exception as exc:
            logger.warning(
                "ledger %s: the stored result of %s (key %s) cannot be unpickled here (%s: %s); running the call again",
                self.path, task, key, type(exc).__name__, exc,
            )
            self.forget_cached(task, key)
            with self.lock:
                self.unloadable.add((task, key))
            return False, None

    def forget_cached(self, task: str, key: str) -> None:
        with self.lock:
            done = self.done.get(task)
            if done is not None:
                done.pop(key, None)
            self.unloadable.discard((task, key))

    def drop_cache(self, task: str | None) -> None:
        """Forget the succeeded keys read of ``task`` (of every task: None); they are read again when needed."""
        with self.lock:
            if task is None:
                self.done.clear()
                self.unloadable.clear()
            else:
                self.done.pop(task, None)

    # ---- the run side: may it run? ---------------------------------------------------------

    def admit(self, run: Run, reply: Answer) -> None:
        """Claim ``run``'s key on the ledger thread; ``reply(verdict, value)`` says what came of it (see the module)."""
        holder: Run | None = self.claims.active.setdefault((run.name, run.key), run)  # Claims.enter's usual case, inline
        if holder is not run:
            holder = self.claims.enter(run)
            if holder is not None:
                reply("wait", holder)
                return
        if not self.writer.submit_claim((run, reply)):
            self.claims.leave(run)
            reply("stopped", TaskStopped(f"{run.id} was not started: taskrun is shutting down"))

    def _submit_claim(self, run: Run, reply: Answer) -> None:
        if not self.writer.submit_claim((run, reply)):
            self.claims.leave(run)
            reply("stopped", TaskStopped(f"{run.id} was not started: taskrun is shutting down"))

    def admit_here(self, run: Run) -> tuple[str, Any]:
        """:meth:`admit`, decided in the caller: ``(verdict, value)``; polls here while another process holds the key."""
        key = run.key
        assert key is not None, "the handle sets the key before it asks"
        found, value = self.lookup(run.name, key)  # the run it waited for may have stored it
        if found:
            return "cached", value
        holder = self.claims.enter(run)
        if holder is not None:
            return "wait", holder
        while True:
            if run.done():  # stopped meanwhile
                self.claims.leave(run)
                return "stopped", TaskStopped(f"{run.id} was stopped")
            verdict, value = self._claim_here(run)
            if verdict == "watch":
                time.sleep(POLL_INTERVAL)  # another process runs it: look again
            elif verdict != "again":
                return verdict, value

    def _claim_here(self, run: Run) -> tuple[str, Any]:
        claims = self.claims
        number = claims.next_number()
        try:
            decision = self._claim_in_file(run.name, [(run, _no_reply)], number)
            if decision.error is not None:
                raise decision.error
        except Exception as exc:
            problem = self._log_claims_failed(1, exc)
            claims.leave(run)
            return "failed", _claim_error(run, exc, problem)
        if decision.claimed:
            claims.held[run] = number
            if run.status is _STOPPED:  # stopped while claiming: its record may have missed this claim
                self.record(run, _STOPPED, None, TaskStopped(f"{run.id} was stopped"), None)
            return "claimed", None
        if decision.succeeded:
            found, value = self._unpickle(run.name, run.key or "", decision.succeeded[0][1])
            if found:
                claims.leave(run)
                return "cached", value
            return "again", None  # the result cannot be loaded here: the next claim takes its row over
        return "watch", None

    def _claim_in_file(self, task: str, admissions: list[Admission], number: int) -> Decision:
        """Enter this process in ``owners`` (the first time), then claim the keys of ``admissions`` (see Claims.claim)."""
        storage = self.storage
        if not storage.registered:
            storage.register(_owners.LEASE)
        decision = self.claims.claim(storage, task, admissions, number, self.unloadable)
        for key in decision.interrupted:
            logger.info("ledger %s: %s (key %s) was interrupted (its process is gone); running it again", self.path, task, key)
        return decision

    def _log_claims_failed(self, count: int, exc: BaseException) -> str:
        problem = write_problem(exc)
        logger.error("ledger %s: %d call(s) were not run: their claims could not be written: %s", self.path, count, problem)
        return problem

    # ---- the run side: its outcome ---------------------------------------------------------

    def record(self, run: Run, status: Status, value: Any, exc: BaseException | None, reply: Recorded | None) -> None:
        """Commit ``run``'s outcome on the ledger thread, then ``reply(status, value, exc, problem)``.

        ``reply`` None: a stopped run, published already; its key is free in this process at once.
        """
        if reply is None:
            self.claims.leave(run)
            owed = self.claims.unwatch(run)
            if owed is not None:  # it was waiting for another process: its admission is answered too
                owed("stopped", TaskStopped(f"{run.id} was stopped"))
        item = self._record_item(run, status, value, exc, reply)
        if item is None:
            self.claims.leave(run)
            if reply is not None:
                reply(status, value, exc, None)
        elif not self.writer.submit_record(item):
            replies: list[Call] = []
            self._write([item], replies)
            call_all(replies)

    def record_here(self, run: Run, status: Status, value: Any, exc: BaseException | None) -> BaseException | None:
        """:meth:`record`, committed in the caller: None once written, else the error saying why it was not."""
        item = self._record_item(run, status, value, exc, None)
        if item is None:
            self.claims.leave(run)
            return None
        return self._write([item], [])

    def _record_item(
        self, run: Run, status: Status, value: Any, exc: BaseException | None, reply: Recorded | None
    ) -> tuple[Any, ...] | None:
        """The queued record of an outcome: ``(run, stored status, attempts, result bytes, started_at,
        finished_at, (error type, message, traceback, call) or None, (status, value, exc), reply)``.

        None for a run the ledger could not be used for (its claim failed): there is nothing to record.
        """
        finished = time.time()
        blob: bytes | None
        error: tuple[str, str, str | None, str] | None
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
            if status is _FAILED and isinstance(exc, LedgerError) and run not in self.claims.held:
                return None
            error = (_type_name(type(exc)), str(exc), _traceback_text(exc), _describe_call(run))
        return (run, stored, run.attempts, blob, run.started_at, finished, error, (status, value, exc), reply)

    # ---- the writer's batches --------------------------------------------------------------

    def process(self, items: list[Any]) -> list[Call]:
        """A batch of the writer (its ``batch_lock`` held): records, then claims; the replies to call after."""
        replies: list[Call] = []
        claims = self.claims
        if items or claims.deferred:
            self._process(items, replies)
            # Claims that found stored results free their places at once, with no record to wake
            # the thread: claim on while there is room.
            while claims.deferred and claims.wanted() > 0:
                self._process([], replies)
        return replies

    def _process(self, items: list[Any], replies: list[Call], claim_all: bool = False) -> None:
        """Commit the records among ``items``, then claim what is admitted (with what waited in memory).

        Claims beyond what the runners will start soon wait in memory (see Claims.wanted),
        unless ``claim_all``.
        """
        claims = self.claims
        admissions: list[Admission] = []
        records: list[tuple[Any, ...]] = []
        for item in items:
            if len(item) == 2:  # a claim: (run, reply)
                admissions.append(item)
            else:
                records.append(item)
        if records:
            claims.finished(len(records))
            self._write(records, replies)
        deferred = claims.deferred
        if deferred:
            admissions[:0] = deferred
            deferred.clear()
        if not claim_all:
            wanted = claims.wanted()
            if len(admissions) > wanted:
                deferred.extend(admissions[wanted:])
                del admissions[wanted:]
        if admissions:
            self._claim(admissions, replies)

    def _write(self, records: list[tuple[Any, ...]], replies: list[Call]) -> BaseException | None:
        """Commit ``records``: the successes of each task in one statement, the other outcomes in one
        transaction. Then the caches, and the replies. The error of the last write that failed, if one did."""
        held = self.claims.held
        successes: dict[str, list[Success]] = {}
        succeeded: dict[str, list[tuple[Any, ...]]] = {}
        outcomes: list[Outcome] = []
        others: list[tuple[Any, ...]] = []
        for record in records:
            run, stored, attempts, blob, started, finished, error, _outcome, _reply = record
            claim = held.pop(run, None)  # the claim this record settles
            if stored == "succeeded":
                rows = successes.get(run.name)
                if rows is None:
                    rows = successes[run.name] = []
                    succeeded[run.name] = []
                rows.append((run.key, attempts, blob, started, finished, claim))
                succeeded[run.name].append(record)
            else:
                etype, emsg, tb, call = error or (None, None, None, None)
                outcomes.append((run.name, run.key, stored, attempts, etype, emsg, tb, call, started, finished, claim))
                others.append(record)
        storage, failure = self.storage, None
        for task, rows in successes.items():
            try:
                storage.write_successes(task, rows)
            except Exception as exc:
                failure = self._not_recorded(succeeded[task], exc, replies)
                continue
            done = self.done.get(task)
            if done is not None:
                for key, _attempts, blob, _started, _finished, _claim in rows:
                    done[key] = blob if len(blob) <= CACHE_LIMIT else None
            if self.unloadable:
                with self.lock:
                    for key, *_rest in rows:
                        self.unloadable.discard((task, key))
            replies.append((_reply_recorded, (succeeded[task], None)))
        if outcomes:
            try:
                storage.write_outcomes(outcomes)
            except Exception as exc:
                failure = self._not_recorded(others, exc, replies)
            else:
                replies.append((_reply_recorded, (others, None)))
        # Only now: a call of one of these keys made meanwhile in this process waited for them (and
        # finds a success in the cache), rather than claim a key whose outcome is not written yet.
        self.claims.leave_all([record[0] for record in records])
        return failure

    def _not_recorded(self, records: list[tuple[Any, ...]], exc: Exception, replies: list[Call]) -> Exception:
        """Say that ``records`` could not be written; their replies carry why."""
        problem = exc
        if not isinstance(exc, LedgerError):  # raised by no SQLite call: said as a write of this file
            problem = LedgerError(f"could not write to ledger {self.path!r}: {write_problem(exc)}")
            problem.__cause__ = exc
        names = ", ".join(f"{r[0].id} (key {r[0].key})" for r in records[:3]) + (" ..." if len(records) > 3 else "")
        logger.error(
            "ledger %s: %d outcome(s) were not recorded: %s; their callers got them, but those calls run again "
            "next time: %s", self.path, len(records), write_problem(exc), names,
        )
        replies.append((_reply_recorded, (records, problem)))
        return problem

    def _claim(self, admissions: list[Admission], replies: list[Call]) -> None:
        """Claim the keys of ``admissions``, one transaction per task; start the claimed runs now, answer the rest later."""
        claims = self.claims
        by_task: dict[str, list[Admission]] = {}
        for admission in admissions:
            run = admission[0]
            if run.done():  # stopped while its claim waited
                claims.leave(run)
                replies.append((admission[1], ("stopped", TaskStopped(f"{run.id} was stopped"))))
                continue
            group = by_task.get(run.name)
            if group is None:
                by_task[run.name] = [admission]
            else:
                group.append(admission)
        for task, group in by_task.items():
            number = claims.next_number()
            try:
                decision = self._claim_in_file(task, group, number)
            except Exception as exc:
                self._claims_failed(group, exc, replies)
                continue
            held = claims.held
            for run, _reply in decision.claimed:
                held[run] = number
            if decision.held_elsewhere:
                claims.watch(decision.held_elsewhere)
            replies.extend((self._finish_succeeded, (run, reply, blob)) for (run, reply), blob in decision.succeeded)
            if decision.error is not None:
                self._claims_failed(decision.failed, decision.error, replies)
            for run, reply in decision.claimed:  # started here, under the batch lock (see the module's docstring)
                try:
                    reply("claimed", None)
                except Exception:
                    logger.exception("ledger %s: starting %s failed", self.path, run.id)

    def _claims_failed(self, admissions: list[Admission], exc: BaseException, replies: list[Call]) -> None:
        problem = self._log_claims_failed(len(admissions), exc)
        self.claims.leave_all([run for run, _reply in admissions])
        replies.extend((reply, ("failed", _claim_error(run, exc, problem))) for run, reply in admissions)

    def _finish_succeeded(self, run: Run, reply: Answer, blob: bytes | None) -> None:
        """Its key succeeded elsewhere meanwhile: answer with the result, or claim again if it cannot be loaded here."""
        found, value = self._unpickle(run.name, run.key or "", blob)
        if found:
            self.claims.leave(run)
            reply("cached", value)
        else:
            self._submit_claim(run, reply)

    # ---- the writer's ticks: lease and watched keys ----------------------------------------

    def on_start(self) -> None:
        now = time.monotonic()
        self._next_beat = now + _owners.LEASE / 3
        self._next_poll = now + POLL_INTERVAL
        register_feeder(self.claims_phase)
        get_pool(("ledger", self), lambda: self.records_phase)

    def sleep_for(self) -> float:
        wake = min(self._next_beat, self._next_poll) if self.claims.watching else self._next_beat
        return wake - time.monotonic()

    def tick(self) -> list[Call]:
        now = time.monotonic()
        if now >= self._next_beat:
            self._next_beat = now + _owners.LEASE / 3
            self.renew()
        if self.claims.watching and now >= self._next_poll:
            self._next_poll = now + POLL_INTERVAL
            return self.poll()
        return []

    def renew(self) -> None:
        """Extend this process's lease: its claims stay valid for owners on other machines."""
        if not self.storage.registered:
            return
        try:
            self.storage.renew(_owners.LEASE)
        except LedgerError as exc:
            logger.warning("ledger %s: could not renew this process's lease: %s", self.path, exc)

    def poll(self) -> list[Call]:
        """Look at the keys other processes are running; claim again those they no longer hold."""
        replies: list[Call] = []
        for run, reply in self.claims.released(self.storage, self.storage.owner):
            if run.done():
                self.claims.leave(run)
                replies.append((reply, ("stopped", TaskStopped(f"{run.id} was stopped"))))
            else:
                self._submit_claim(run, reply)
        return replies

    # ---- shutdown and fork -----------------------------------------------------------------

    def settle_claims(self, wait: bool) -> None:
        """Before the pools stop: start the queued claims (``wait``) or stop them; stop the watched runs.

        ``taskrun.shutdown()`` calls it as a feeder of the pools (after map's feeders and the
        launcher, which may still admit runs). Once the gate is closed no claim is queued any
        more, and once ``batch_lock`` is held the ledger thread is between batches: every claim
        it granted has been started in its pool, as claimed runs are started under that lock.
        What is still queued is then claimed and started here (``wait``) or answered stopped,
        before any pool stops.
        """
        writer = self.writer
        writer.close_gate()  # from now on new claims end STOPPED
        replies: list[Call] = []
        with writer.batch_lock:  # the ledger thread is between batches: the claims it took have started
            items = writer.take()
            if not wait:
                self._refuse([item for item in items if is_claim(item)] + self._take_deferred(), replies)
                items = [item for item in items if not is_claim(item)]
            if items or self.claims.deferred:
                self._process(items, replies, claim_all=True)  # the pools run what is queued before they stop
        call_all(replies)
        self._stop_watched()

    def shutdown(self, wait: bool = True) -> None:
        """After the pools stopped: commit and publish what is queued, end the thread, close the file.

        Runs still holding a claim (their pool started too late to be shut down) are waited
        for (``wait``) or stopped; claims nobody will start end STOPPED.
        """
        writer = self.writer
        writer.close_gate()
        replies: list[Call] = []
        with writer.batch_lock:
            self._refuse(writer.take(claims_only=True) + self._take_deferred(), replies)
        call_all(replies)
        for run in list(self.claims.held):
            if not wait:
                run.stop()
            elif not run.wait(60):
                logger.warning("ledger %s: %s still runs after 60 s of shutdown; not waiting for it", self.path, run.id)
        writer.stop(60)
        self._stop_watched()
        unregister_feeder(self.claims_phase)
        writer.open_gate()
        if not writer.running:
            self.storage.close()

    def _take_deferred(self) -> list[Admission]:
        deferred = list(self.claims.deferred)
        self.claims.deferred.clear()
        return deferred

    def _refuse(self, admissions: list[Admission], replies: list[Call]) -> None:
        self.claims.leave_all([run for run, _reply in admissions])
        for run, reply in admissions:
            replies.append((reply, ("stopped", TaskStopped(f"{run.id} was not started: taskrun is shutting down"))))

    def _stop_watched(self) -> None:
        for run, reply in self.claims.take_watched():
            self.claims.leave(run)
            reason = f"{run.id} was stopped while another process ran its key: taskrun is shutting down"
            try:
                reply("stopped", TaskStopped(reason))
            except Exception:
                logger.exception("ledger %s: stopping %s failed", self.path, run.id)

    def after_fork_in_child(self) -> None:
        self.lock = threading.Lock()
        self.storage.after_fork_in_child()
        self.claims.reset()
        self.writer.reset()


class _Phase:
    """One step of the ledger's part in ``taskrun.shutdown()``, ordered around the pools' (``shutdown_order``)."""

    shutdown_order = 1

    def __init__(self, fn: Callable[[bool], None]) -> None:
        self._fn = fn

    def shutdown(self, wait: bool = True) -> None:
        self._fn(wait)


# ---- the stores of this process, one per file ---------------------------------------------

_stores: weakref.WeakValueDictionary[str, Store] = weakref.WeakValueDictionary()
_stores_lock = threading.Lock()


def open_store(path: str, busy_timeout: float | None = None) -> Store:
    """The store of the file at ``path`` in this process, opened (and the file checked) if it is not open."""
    real = os.path.realpath(path)
    with _stores_lock:
        store = _stores.get(real)
        if store is not None and store.storage.same_file():
            store.storage.recheck()  # it may have been changed since, by another program
            if busy_timeout is not None:
                store.storage.busy_timeout = busy_timeout
            return store
        store = Store(path, real, BUSY_TIMEOUT if busy_timeout is None else busy_timeout)
        store.storage.open()
        _stores[real] = store
        return store


def _after_fork_in_child() -> None:
    global _stores_lock
    _stores_lock = threading.Lock()
    for store in list(_stores.values()):
        store.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ---- what a record holds ------------------------------------------------------------------


def _reply_recorded(records: list[tuple[Any, ...]], problem: BaseException | None) -> None:
    """Answer the records of a batch: ``reply(status, value, exc, problem)`` (None: written)."""
    for record in records:
        reply = record[8]
        if reply is not None:
            try:
                reply(*record[7], problem)
            except Exception:
                logger.exception("taskrun: publishing %s failed", record[0].id)


def _no_reply(verdict: str, value: Any) -> None:
    """The reply of an admission decided in the caller (admit_here answers by returning)."""


def _claim_error(run: Run, exc: BaseException, problem: str) -> LedgerError:
    error = LedgerError(f"{run.id} was not run: its claim could not be written to the ledger: {problem}")
    error.__cause__ = exc
    return error


_call_repr = reprlib.Repr()
_call_repr.maxstring = 80
_call_repr.maxother = 80
_call_repr.maxlevel = 3


def _describe_call(run: Run) -> str:
    parts = [_call_repr.repr(a) for a in run.args]
    parts += [f"{k}={_call_repr.repr(v)}" for k, v in run.kwargs.items()]
    text = f"{run.name}({', '.join(parts)})"
    return text if len(text) <= 500 else text[:497] + "..."


def _dumps_result(value: Any) -> bytes:
    try:
        return pickle.dumps(value, RESULT_PROTOCOL)
    except Exception:
        import cloudpickle  # functions and classes defined in __main__ or a notebook

        return cloudpickle.dumps(value, RESULT_PROTOCOL)


def _traceback_text(exc: BaseException) -> str:
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        return cause.tb_text
    return format_traceback(exc)


def _type_name(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
