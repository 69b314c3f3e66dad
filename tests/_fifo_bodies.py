"""Task bodies that block on a named pipe until the test releases them: one call held in its worker exactly
as long as a test needs, with no sleeps."""

import logging
import os

from test_process_runner import write_atomic


def block_on_fifo(started, fifo):
    """Say "started" (the file ``started`` gets this worker's pid), then block until ``release(fifo)``."""
    write_atomic(started, str(os.getpid()))
    with open(fifo, "rb") as f:
        f.read(1)
    return os.getpid()


def log_then_block(started, go, fifo):
    """Say "started"; when told (``release(go)``), log (which wakes the pool's supervisor, so it sends the
    backlog ahead); then block until ``release(fifo)``."""
    write_atomic(started, str(os.getpid()))
    with open(go, "rb") as f:
        f.read(1)
    logging.getLogger("tests.fifo").warning("send the calls behind me")
    with open(fifo, "rb") as f:
        f.read(1)
    return os.getpid()


def release(fifo):
    with open(fifo, "wb") as f:
        f.write(b"x")
