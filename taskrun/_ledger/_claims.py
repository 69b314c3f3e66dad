"""Claims: which run of this process holds each key, what it holds in the file, and keys held elsewhere.

Three levels keep one key from running twice at a time:

* in this process, the first run of a key is *active* (:meth:`Claims.enter`); a later run of
  it waits for that one (the handle does the waiting) and then looks again;
* in the file, the active run *claims* the key: its row turns ``running`` under this
  process's owner id and a claim number (one per batch), and the record of its outcome
  settles that claim (it only overwrites its own claim);
* a key another live process has claimed is *watched*: the ledger thread looks at its row
  every ``POLL_INTERVAL`` seconds and claims it again once that process no longer holds it
  (it finished, or died: then its claim is taken over, see :mod:`._owners`).

It also paces claiming: a process claims about as many keys as its runners will start
soon (:meth:`Claims.wanted`), so processes sharing a ledger share a batch.
"""

from __future__ import annotations

import collections
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._owners import holder_alive
from ._storage import Ident, Storage, Unclaimed

if TYPE_CHECKING:
    from .._run import BaseTaskRun

    Run = BaseTaskRun[Any]
else:
    Run = Any

#: Seconds between looks at keys that another process is running.
POLL_INTERVAL = 0.1
#: Seconds of work, at the rate calls have been finishing, that a process claims ahead.
AHEAD = 0.1

#: How a run's admission is answered: ``reply(verdict, value)`` (see Store.admit).
Answer = Callable[[str, Any], None]
#: A run asking to be admitted, and how to answer it.
Admission = tuple[Run, Answer]


@dataclass
class Decision:
    """What one claim transaction found for the runs of one task."""

    claimed: list[Admission] = field(default_factory=lambda: [])
    #: Admissions whose key succeeded meanwhile, with the stored result if it is small (else None).
    succeeded: list[tuple[Admission, bytes | None]] = field(default_factory=lambda: [])
    #: Admissions whose key a live owner holds: to watch.
    held_elsewhere: list[Admission] = field(default_factory=lambda: [])
    #: Keys whose dead owner's claim was taken over (to say so once committed).
    interrupted: list[str] = field(default_factory=lambda: [])
    #: Admissions not decided because a write failed (with ``error``): their runs do not start.
    failed: list[Admission] = field(default_factory=lambda: [])
    error: BaseException | None = None


class Claims:
    """The keys of one ledger file in this process: active runs, claims held, keys watched, the pace."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Nothing active, held or watched (also in a forked child: the parent's runs are not its own)."""
        self.lock = threading.Lock()  # for the rare compare-and-set on `active`, and for `watching`
        #: The run of this process that holds each (task, key).
        self.active: dict[Ident, Run] = {}
        #: Runs holding a claim in the file -> its claim number.
        self.held: dict[Run, int] = {}
        #: Keys another process holds -> the run waiting for them, and its admission's reply.
        self.watching: dict[Ident, Admission] = {}
        #: Admissions to claim once runs finish (more than the runners would start soon).
        self.deferred: collections.deque[Admission] = collections.deque()
        self._finished_lately: collections.deque[tuple[float, int]] = collections.deque()  # (when, how many)
        self._numbers = itertools.count(1)

    # ---- in this process -------------------------------------------------------------------

    def enter(self, run: Run) -> Run | None:
        """Make ``run`` the active run of its key; None if it is, else the unfinished run that holds the key."""
        ident = (run.name, run.key)
        while True:
            holder = self.active.setdefault(ident, run)  # atomic: of two threads, one becomes the key's run
            if holder is run or not holder.done():
                return None if holder is run else holder
            # Finished, but not yet told to the ledger (a stopped run is published first): take its place.
            with self.lock:
                if self.active.get(ident) is holder:
                    self.active[ident] = run
                    return None

    def leave(self, run: Run) -> None:
        """``run`` no longer holds its key in this process."""
        ident = (run.name, run.key)
        with self.lock:
            if self.active.get(ident) is run:
                del self.active[ident]

    def leave_all(self, runs: list[Run]) -> None:
        active = self.active
        with self.lock:
            for run in runs:
                ident = (run.name, run.key)
                if active.get(ident) is run:
                    del active[ident]

    def next_number(self) -> int:
        return next(self._numbers)

    # ---- keys other processes hold ---------------------------------------------------------

    def watch(self, admissions: list[Admission]) -> None:
        with self.lock:
            for admission in admissions:
                run = admission[0]
                self.watching[(run.name, run.key)] = admission

    def unwatch(self, run: Run) -> Answer | None:
        """Stop watching ``run``'s key for it; the reply its admission still owes, if it was watched."""
        ident = (run.name, run.key)
        with self.lock:
            entry = self.watching.get(ident)
            if entry is None or entry[0] is not run:
                return None
            del self.watching[ident]
        return entry[1]

    def take_watched(self) -> list[Admission]:
        with self.lock:
            watched = list(self.watching.values())
            self.watching.clear()
        return watched

    def released(self, storage: Storage, own: str) -> list[Admission]:
        """The watched keys that no live process holds any more (or whose run finished), no longer watched.

        ``own`` is this process's owner id: a key it holds itself is free to claim again.
        """
        with self.lock:
            watching = list(self.watching.items())
        if not watching:
            return []
        rows = storage.holders([ident for ident, _entry in watching])
        now = time.time()
        ready: list[tuple[Ident, Admission]] = []
        for ident, entry in watching:
            row = rows[ident]
            if entry[0].done() or row is None or row[0] != "running" or row[1] == own or not holder_alive(row[2:], now):
                ready.append((ident, entry))
        with self.lock:
            for ident, entry in ready:
                if self.watching.get(ident) is entry:
                    del self.watching[ident]
        return [entry for _ident, entry in ready]

    # ---- the pace ----------------------------------------------------------------------------

    def finished(self, count: int) -> None:
        """``count`` runs holding claims finished now (their records are being written)."""
        self._finished_lately.append((time.monotonic(), count))

    def wanted(self) -> int:
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
        held = len(self.held)
        if finished >= held + 8:
            return finished - held  # a lower bound that needs no count of the running ones
        runs = list(self.held)
        waiting = sum(1 for run in runs if run.started_at is None)  # claimed, not started by its runner yet
        running = len(runs) - waiting
        return max(0, max(2 * running + 8, finished) - waiting)

    # ---- in the file -------------------------------------------------------------------------

    @staticmethod
    def claim(
        storage: Storage, task: str, admissions: list[Admission], number: int, unloadable: set[tuple[str, str]]
    ) -> Decision:
        """Claim the keys of the runs of ``admissions`` (of ``task``) that nobody live holds, as claim ``number``.

        One statement claims every key that is new, failed, stopped or left by this process;
        only if some were not claimed are their rows read, and a dead owner's claim (or a
        result that cannot be loaded here, in ``unloadable``) is taken over with a
        compare-and-swap on the row. Each write commits on its own: should one fail after the
        first, what was claimed stays claimed and the rest is in ``decision.failed``.
        """
        now = time.time()
        own = storage.owner
        keys = json.dumps([admission[0].key for admission in admissions])
        decision = Decision()
        if storage.claim_many(task, keys, now, number) == len(admissions):
            decision.claimed = admissions
            return decision
        try:
            others: dict[Any, Unclaimed] = storage.unclaimed(task, keys, number)
        except Exception as exc:  # claimed, but which ones is unknown: none starts (their rows run again later)
            decision.failed, decision.error = admissions, exc
            return decision
        unclaimed: list[tuple[Admission, Unclaimed]] = []
        for admission in admissions:  # first the claims made: they hold whatever happens next
            row = others.get(admission[0].key)
            if row is None:
                decision.claimed.append(admission)
            else:
                unclaimed.append((admission, row))
        for i, (admission, row) in enumerate(unclaimed):
            key: str = row[0]
            status: str = row[1]
            hex_result: str | None = row[8]
            if status == "succeeded" and (task, key) not in unloadable:
                decision.succeeded.append((admission, None if hex_result is None else bytes.fromhex(hex_result)))
                continue
            if status == "running" and row[2] != own and holder_alive(row[4:8], now):
                decision.held_elsewhere.append(admission)
                continue
            try:
                taken = storage.take_over(task, key, row, now, number)
            except Exception as exc:
                decision.failed, decision.error = [a for a, _row in unclaimed[i:]], exc
                return decision
            if taken:
                decision.claimed.append(admission)
                if status == "running":
                    decision.interrupted.append(key)
            else:
                decision.held_elsewhere.append(admission)  # the row changed meanwhile: look again shortly
        return decision
