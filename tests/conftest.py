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
