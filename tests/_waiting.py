"""Small waiting helpers shared by the tests."""

import time

import psutil


def wait_for(predicate, timeout, what):
    """Poll ``predicate`` until it returns something true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def is_alive(pid):
    """True while ``pid`` runs; a zombie (dead, waiting to be reaped by whoever adopted it) is not alive."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def shared_helper_pids():
    """Long-lived helper processes that are not taskrun's: multiprocess's forkserver and resource
    tracker, and the standard library's resource tracker (Dask's worker processes start it)."""
    import multiprocessing.resource_tracker

    import multiprocess.forkserver
    import multiprocess.resource_tracker

    pids = {
        multiprocess.forkserver._forkserver._forkserver_pid,
        multiprocess.resource_tracker._resource_tracker._pid,
        multiprocessing.resource_tracker._resource_tracker._pid,
    }
    return pids - {None}
