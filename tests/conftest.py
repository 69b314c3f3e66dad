import sys
import threading

import pytest

import taskrun


@pytest.fixture(autouse=True)
def _no_leaked_threads():
    """Every test ends with taskrun's pools shut down and none of its threads left behind."""
    yield
    taskrun.shutdown(wait=False)
    leftover = [t for t in threading.enumerate() if t.name.startswith("taskrun-") and t.is_alive()]
    for t in leftover:
        t.join(5)
    alive = [t.name for t in leftover if t.is_alive()]
    assert not alive, f"taskrun threads still alive after shutdown: {alive}"


def _measuring_coverage():
    coverage = sys.modules.get("coverage")
    return coverage is not None and coverage.Coverage.current() is not None


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_teardown(item, nextitem):
    """Under coverage (.ci/run), let idle worker processes exit on their own before the fixtures end them.

    The fixtures' ``shutdown(wait=False)`` ends workers by signal, which leaves coverage no chance
    to save what a worker ran. A pool that holds no call loses nothing by
    closing with ``wait=True`` instead: its workers read end of file and exit, saving their data.
    Outside coverage the teardown is exactly the fixtures'.
    """
    if _measuring_coverage():
        _close_idle_process_pools()
    yield


def _close_idle_process_pools():
    from taskrun import _lifecycle
    from taskrun.runners.process._pool import ProcessPool

    for pool in list(_lifecycle.pools.values()):
        if not isinstance(pool, ProcessPool):
            continue
        with pool.lock:
            idle = pool.closing is None and not pool.pending and not pool.submitted and not any(
                w.in_flight or w.ending for w in pool.workers
            )
        if idle:
            _lifecycle.forget_pool(pool)
            pool.shutdown(wait=True)
