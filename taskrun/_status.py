"""``Status``: where a run is in its life, shared by the handle, groups, dependencies and the ledger."""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    """Where a run is in its life. PENDING and RUNNING are unfinished; the rest are final.

    A run answered from the ledger is SUCCEEDED with ``cached`` True. SKIPPED is for runs a
    condition skipped (nothing produces it yet).
    """

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"
    SKIPPED = "skipped"  # skipped by a condition (reserved: nothing produces it yet); a cached run is SUCCEEDED

    def __str__(self) -> str:
        return self.value


FINISHED = frozenset({Status.SUCCEEDED, Status.FAILED, Status.STOPPED, Status.SKIPPED})
