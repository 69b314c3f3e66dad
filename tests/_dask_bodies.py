"""Task bodies for the Dask tests that run in an isolated attempt's child process: this module imports only
the standard library, so that the child starts quickly (a test's timeout counts from the attempt's start)."""

import logging
import os
import sys
import time

WAIT = 30


def log_then_hang(logger_name, started):
    """Log a warning, say "started" (a file), then run until stopped: in a worker thread it polls
    taskrun.stop_requested(); in an isolated attempt's child (no taskrun there), the stop ends the process."""
    logging.getLogger(logger_name).warning("before the hang, pid %d", os.getpid())
    tmp = f"{started}.tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, started)
    taskrun = sys.modules.get("taskrun")
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if taskrun is not None and taskrun.stop_requested():
            return "stopped"
        time.sleep(0.01)
    return "never stopped"
