"""The ledger: one SQLite file recording every call of the tasks that use it, so a batch can resume.

Each call has a key (:func:`make_key`). A call whose key SUCCEEDED returns the stored result
without running; one whose key another live process or thread is running waits for that
outcome; anything else claims the key (a ``running`` row naming its owner) and runs.

How it is built, per ledger file and process (a store, shared by every :class:`Ledger` object
of that file), module by module:

* :mod:`._keys` -- ``make_key``: the call's identity.
* :mod:`._owners` -- owner liveness: pid and start time on this machine, a lease elsewhere.
* :mod:`._storage` -- SQLite over one writing connection: checking and opening the file, WAL,
  the one transaction helper (a bounded wait for the write lock), every SQL statement;
  read-only connections for inspection.
* :mod:`._claims` -- which run of this process holds each key, the claims held in the file,
  keys other processes hold (watched), and how many keys to claim ahead.
* :mod:`._writer` -- the ledger thread (``taskrun-ledger-<file>-N``): a queue of claims and
  records taken in batches.
* :mod:`._store` -- the run side's interface (:func:`store_for` gives it): ``lookup``, ``admit``
  / ``admit_here``, ``record`` / ``record_here``; the caches; what a batch does; shutdown.
* :mod:`._public` -- :class:`Ledger`, :class:`RunRecord`, inspection.

The data flow of a call: the handle computes the key and looks it up in memory (a task's
succeeded keys are read on its first call, so a cached call costs a dict lookup and an
unpickle). On a miss it asks to be admitted: the key becomes the run's in this process, and a
claim is queued; the ledger thread commits a batch -- records first, then claims -- and
answers (claimed: the run starts; succeeded meanwhile: the stored result; held by another
live process: watched, claimed once free). The outcome is queued as a record, committed, and
only then published by the handle: a run is durable before anyone sees it finished. Inline
runners (``SequentialTaskRun``) do both steps in the caller. The ledger decides; only the
handle changes a run's state, and nothing that publishes a run is called under a ledger lock.

* The file uses WAL journaling with ``synchronous=NORMAL``: a commit survives the process
  being killed at any moment; a power loss may lose the last commits, which then run again.
* A write waits at most ``busy_timeout`` seconds for another connection's write lock. Then the
  claims of that batch fail with LedgerError and its outcomes reach their callers unrecorded
  (so those calls run again next time); what was committed before stays.
* Done callbacks of ledger runs run on the ledger thread (outside its locks): keep them
  short, and do not wait in one for another run of a ledger task.
* Results are pickles: loading one runs whatever code it names. Open only ledgers you trust;
  ``python -m taskrun status`` never loads a result.
"""

from ._keys import make_key
from ._public import Ledger, RunRecord, store_for
from ._storage import BUSY_TIMEOUT, SCHEMA_VERSION, STATUSES

__all__ = ["Ledger", "RunRecord", "make_key", "store_for", "STATUSES", "BUSY_TIMEOUT", "SCHEMA_VERSION"]
