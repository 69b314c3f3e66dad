"""How many calls a worker is given ahead of time: the batching policy, testable without processes.

When calls wait for a worker, a busy worker is topped up so that it always has about
``AHEAD_SECONDS`` of work queued, judged by how long calls have been taking (a moving
average). Tiny calls then go many to a message, slow ones one at a time; a cold pool sends
one at a time until calls have come back short. A worker's pipe never holds more than
``PIPE_BUDGET`` bytes of waiting calls, so writing to it cannot block the supervisor.
"""

from __future__ import annotations

#: Most calls sent to one worker ahead of time when there is a backlog.
MAX_BATCH = 256
#: Seconds of work a worker is given ahead of time when there is a backlog: enough to keep it
#: busy while the parent's threads take turns with the GIL, short enough to balance the end
#: of a batch of long calls (they go one at a time).
AHEAD_SECONDS = 0.01
#: A worker's own cost of one call (receive, unpickle, pickle, send), added to its run time.
CALL_OVERHEAD = 20e-6
#: Bytes of calls a busy worker may have waiting in its pipe; more could block the supervisor.
PIPE_BUDGET = 32 * 1024
#: Bytes of one call's message besides its pickled arguments, as counted against the budget.
CALL_BYTES = 64
#: Weight of the newest call's time in the moving average.
SMOOTHING = 0.2


class BatchPolicy:
    """The pool's judgement of how long a call takes, and what follows for sending calls ahead.

    ``fresh``: workers serve each call from a fresh process (``max_tasks_per_worker``), so a
    call queued ahead would wait in a process about to be replaced: one at a time.
    """

    __slots__ = ("fresh", "call_seconds")

    def __init__(self, fresh: bool = False) -> None:
        self.fresh = fresh
        # It starts at a value that sends calls one at a time, until calls have shown they are short.
        self.call_seconds = AHEAD_SECONDS

    def observe(self, seconds: float) -> None:
        """A call took ``seconds`` in its worker (the last of a read stands for the read)."""
        self.call_seconds += SMOOTHING * (seconds + CALL_OVERHEAD - self.call_seconds)

    def depth(self, waiting: int, workers: int) -> int:
        """How many calls each worker should hold, with ``waiting`` calls queued for ``workers`` workers."""
        if waiting <= workers or self.fresh:
            return 1
        ahead = int(AHEAD_SECONDS / self.call_seconds)
        return max(1, min(MAX_BATCH, ahead, waiting // max(1, workers)))

    @staticmethod
    def tops_up(held: int, depth: int) -> bool:
        """Whether a busy worker holding ``held`` calls gets more now: only with a backlog, and once it runs low."""
        return depth > 1 and held <= depth // 2
