import sys
import threading

import pytest

import taskrun
from taskrun import SequentialTaskRun, ThreadTaskRun


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


@pytest.fixture(scope="module")
def dask_client():
    """A real ``LocalCluster`` for the module that asks for it: 2 worker processes, 1 thread each, no dashboard,
    and ``allowed-failures`` 0.

    Skips (saying why) only when the dask extra is not installed.
    """
    pytest.importorskip("distributed", reason='the dask extra is not installed: pip install "taskrun[dask]"')
    import dask
    from distributed import Client, LocalCluster

    # As the README advises: Dask never runs a task again because its worker died (taskrun reports it).
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, memory_limit="1GiB"
    ) as cluster, Client(cluster, set_as_default=False) as client:
        yield client


@pytest.fixture(scope="module")
def dask_runner(dask_client):
    """``DaskTaskRun`` on the module's cluster."""
    from taskrun import DaskTaskRun

    return DaskTaskRun.configure(client=dask_client)


@pytest.fixture(params=[ThreadTaskRun, SequentialTaskRun, "DaskTaskRun"], ids=lambda r: getattr(r, "__name__", r))
def any_runner(request):
    """Every runner, DaskTaskRun too (on the module's cluster): for the contract tests whose task bodies
    share nothing with the caller's memory, and so run on a remote worker as well."""
    if request.param == "DaskTaskRun":
        return request.getfixturevalue("dask_runner")
    return request.param


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
