"""A process call sees the function as it is when the call is made, under fork, spawn and forkserver.

The notebook case (cell 1 defines RATE, helper() and a task; cell 2 changes RATE and redefines
helper) runs as a ``python -c`` script, so ``__main__`` is as in a notebook; module globals
rebinding runs here, on this module's own globals. Tracebacks and warnings from workers
name the user's file, line and source line.
"""

import json
import os
import subprocess
import sys
import threading
import warnings

import pytest
from test_process_runner import WAIT, _no_child_processes, runner  # noqa: F401

import taskrun
from taskrun import task

METHODS = ["fork", "spawn", "forkserver"]
HERE = os.path.abspath(__file__)

NOTEBOOK = r'''
import json, sys
import taskrun
from taskrun import MultiprocessTaskRun, task

R = MultiprocessTaskRun.configure(start_method=sys.argv[1], max_workers=1)
seen = {}

# cell 1
RATE = 1
def helper():
    return RATE
@task(runner=R)
def work(x):
    return x * helper()
seen["cell 1"] = work(2).get_result(60)

# cell 2
RATE = 100
def helper():
    return RATE + 1
seen["cell 2"] = work(2).get_result(60)

# cell 3: a closure, and a cell variable rebound
def make():
    n = 1
    def add(x):
        return x + n
    def set_n(value):
        nonlocal n
        n = value
    return add, set_n
add, set_n = make()
adder = task(runner=R)(add)
before = adder(1).get_result(60)
set_n(41)
seen["closure"] = [before, adder(1).get_result(60)]

# cell 4: after taskrun.shutdown(), the pool is new; the function still as it is now
taskrun.shutdown()
RATE = 7
seen["after shutdown"] = work(2).get_result(60)

# cell 5: a global list changed in place
WEIGHTS = [1]
@task(runner=R)
def weigh():
    return sum(WEIGHTS)
first = weigh().get_result(60)
WEIGHTS.append(10)
seen["list"] = [first, weigh().get_result(60)]

# cell 6: a class defined after the pool started, as argument and as result
class Late:
    def __init__(self, v):
        self.v = v
@task(runner=R)
def bump(p):
    return Late(p.v + 1)
result = bump(Late(1)).get_result(60)
seen["late class"] = [type(result) is Late, isinstance(result, Late), result.v]
print(json.dumps(seen))
'''


def run_script(script, *args, timeout=120):
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("method", METHODS)
def test_the_notebook_case(method):
    seen = json.loads(run_script(NOTEBOOK, method).strip().splitlines()[-1])
    assert seen == {
        "cell 1": 2,
        "cell 2": 202,
        "closure": [2, 42],
        "after shutdown": 16,
        "list": [1, 11],
        "late class": [True, True, 2],
    }


# ---- functions of an importable module (this one) --------------------------------------------

FACTOR = 1
OFFSETS = [0]


def scale(x):
    return x * FACTOR + sum(OFFSETS)


def scaled(x):
    return scale(x)  # a helper of the same module, which reads the module's globals


class Point:
    """A class of an importable module: it travels by reference, so isinstance holds both ways."""

    def __init__(self, x):
        self.x = x


def moved(p):
    assert isinstance(p, Point), f"got {type(p)}, not this module's Point"
    return Point(p.x * FACTOR)


@pytest.fixture
def module_globals(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "FACTOR", 1)
    monkeypatch.setattr(sys.modules[__name__], "OFFSETS", [0])
    return sys.modules[__name__]


@pytest.mark.parametrize("method", METHODS)
def test_module_globals_rebound_between_calls(method, module_globals):
    R = runner(method, max_workers=1)
    twice_through = task(runner=R)(scaled)
    assert twice_through(3).get_result(WAIT) == 3
    module_globals.FACTOR = 5
    assert twice_through(3).get_result(WAIT) == 15
    module_globals.OFFSETS.append(100)
    assert twice_through(3).get_result(WAIT) == 115
    taskrun.shutdown()
    module_globals.FACTOR = 2
    assert twice_through(3).get_result(WAIT) == 106


@pytest.mark.parametrize("method", METHODS)
def test_classes_of_the_module_stay_the_same_class(method, module_globals):
    module_globals.FACTOR = 3
    result = task(runner=runner(method, max_workers=1))(moved)(Point(2)).get_result(WAIT)
    assert type(result) is Point and result.x == 6


MODULE_LOCK = threading.Lock()


def under_the_module_lock(x):
    with MODULE_LOCK:
        return x + FACTOR


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_function_whose_globals_cannot_be_pickled_travels_by_reference(method, module_globals):
    assert task(runner=runner(method, max_workers=1))(under_the_module_lock)(1).get_result(WAIT) == 2


def versioned():
    """Counts, in the worker, the versions of this function it holds."""
    import gc
    import types

    return sum(
        1 for o in gc.get_objects()
        if type(o) is types.FunctionType and o.__name__ == "versioned" and o.__code__.co_filename.endswith(".py")
    )  # not the call checker named after it (compiled from a string)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_worker_holds_only_the_current_version_of_a_function(method, monkeypatch):
    R = runner(method, max_workers=1)
    count = task(runner=R)(versioned)
    for version in range(10):
        monkeypatch.setattr(versioned, "marker", version, raising=False)  # its __dict__ changed: a new version
        held = count().get_result(WAIT)
    # Under fork the worker also has this module's own `versioned` (inherited): one more.
    assert held == (2 if method == "fork" else 1)
    pool = R._pool()
    assert all(len(w.fns_sent) == 1 for w in pool.workers)


# ---- tracebacks and warnings name the user's code ----------------------------------------------


@task(runner=runner("fork", max_workers=1))
def decorated_here_fails(x):
    y = x + 1
    raise ValueError(f"bad {y}")  # the line the traceback must show


FAIL_LINE = decorated_here_fails.fn.__code__.co_firstlineno + 3


def source_line(number):
    with open(HERE) as f:
        return f.read().splitlines()[number - 1].strip()


@pytest.mark.parametrize("method", METHODS)
def test_a_tasks_traceback_names_this_file_line_and_source(method):
    fails = task(runner=runner(method, max_workers=1))(decorated_here_fails.fn)
    exc = fails(1).exception(WAIT)
    assert isinstance(exc, ValueError) and str(exc) == "bad 2"
    text = exc.__cause__.tb_text
    assert f'File "{HERE}", line {FAIL_LINE}, in decorated_here_fails' in text
    assert source_line(FAIL_LINE) in text
    assert "<dynamic-code>" not in text

    def closure_fails():
        raise KeyError("inner")  # closure line

    text = task(runner=runner(method, max_workers=1))(closure_fails)().exception(WAIT).__cause__.tb_text
    line = closure_fails.__code__.co_firstlineno + 1
    assert f'File "{HERE}", line {line}, in closure_fails' in text
    assert 'raise KeyError("inner")  # closure line' in text


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_warning_from_a_worker_names_this_file_and_line(method):
    def warns_here():
        warnings.warn("watch this line", UserWarning, stacklevel=1)
        return 1

    warner = task(runner=runner(method, max_workers=1))(warns_here)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert warner().get_result(WAIT) == 1
    ours = [w for w in caught if "watch this line" in str(w.message)]
    assert ours, caught
    assert ours[0].filename == HERE
    assert ours[0].lineno == warns_here.__code__.co_firstlineno + 1


CELL_SCRIPT = r'''
import linecache, sys, warnings
from taskrun import MultiprocessTaskRun, task

# As IPython does: a cell's code is compiled under a file name that does not exist on disk, and
# its lines live only in this process's linecache.
CELL = "/tmp/ipykernel_0/cell-not-on-disk-42.py"
SOURCE = """\
def cell_task(x):
    y = x * 2
    warnings.warn("cell warning")
    raise RuntimeError(f"cell says {y}")
"""
linecache.cache[CELL] = (len(SOURCE), None, SOURCE.splitlines(True), CELL)
exec(compile(SOURCE, CELL, "exec"), globals())
R = MultiprocessTaskRun.configure(start_method=sys.argv[1], max_workers=1)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    exc = task(runner=R)(cell_task)(4).exception(60)
print(exc.__cause__.tb_text)
print("WARNING:", [(w.filename, w.lineno, str(w.message)) for w in caught])
'''


@pytest.mark.parametrize("method", METHODS)
def test_a_notebook_cells_traceback_shows_its_source_lines(method):
    out = run_script(CELL_SCRIPT, method)
    cell = "/tmp/ipykernel_0/cell-not-on-disk-42.py"
    assert f'File "{cell}", line 4, in cell_task' in out
    assert 'raise RuntimeError(f"cell says {y}")' in out
    assert "RuntimeError: cell says 8" in out
    assert f"WARNING: [('{cell}', 3, 'cell warning')]" in out


# ---- arguments naming objects of __main__, under fork -------------------------------------------


def read_x(thing):
    return [type(thing).__name__, thing.x]


def _main_class(name, monkeypatch):
    """A class that lives in __main__ under ``name``, as a script's or a notebook's classes do."""
    cls = type(name, (), {"__module__": "__main__", "__init__": lambda self, x: setattr(self, "x", x)})
    cls.__qualname__ = name
    monkeypatch.setattr(sys.modules["__main__"], name, cls, raising=False)
    return cls


def test_fork_arguments_of_main_classes_made_before_and_after_the_pool_started(monkeypatch):
    R = runner("fork", max_workers=1)
    reader = task(runner=R)(read_x)
    Early = _main_class("EarlyForFreshness", monkeypatch)
    assert reader(Early(1)).get_result(WAIT) == ["EarlyForFreshness", 1]  # the pool starts: Early is in its workers
    Late = _main_class("LateForFreshness", monkeypatch)  # made after the fork: the workers lack it
    late = reader(Late(2))
    assert b"cloudpickle" in late._payload  # so it goes by value
    assert late.get_result(WAIT) == ["LateForFreshness", 2]
    early = reader(Early(3))
    assert b"cloudpickle" not in early._payload and b"EarlyForFreshness" in early._payload  # by name: fast
    assert early.get_result(WAIT) == ["EarlyForFreshness", 3]
    Early2 = _main_class("EarlyForFreshness", monkeypatch)  # redefined after the fork: by value
    again = reader(Early2(4))
    assert b"cloudpickle" in again._payload
    assert again.get_result(WAIT) == ["EarlyForFreshness", 4]


# ---- a worker holds a bounded number of functions ------------------------------------------------


@pytest.mark.parametrize("method", ["fork"])
def test_a_worker_forgets_the_oldest_functions_beyond_its_limit(method, monkeypatch):
    from taskrun.runners.process import _pool

    monkeypatch.setattr(_pool, "MAX_WORKER_FUNCTIONS", 3)
    R = runner(method, max_workers=1)
    tasks = [task(runner=R, name=f"t{i}")(lambda x, i=i: x + i) for i in range(6)]
    assert [t(10).get_result(WAIT) for t in tasks] == [10, 11, 12, 13, 14, 15]
    (worker,) = R._pool().workers
    assert len(worker.fns_sent) == 3
    assert [t(20).get_result(WAIT) for t in tasks] == [20, 21, 22, 23, 24, 25]  # the forgotten ones sent again
    assert len(worker.fns_sent) == 3
