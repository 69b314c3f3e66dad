"""The fingerprint that tells when a task's pickled function is stale, and the pickle it guards."""

import functools
import linecache
import pickle
import threading
import types

import cloudpickle
import pytest

from taskrun._fingerprint import Fingerprint, PickledFunction, by_value_rule, home_namespace
from taskrun.runners.base import dumps_function

# ---- a small world of globals for the functions below --------------------------------------------

RATE = 1
RATES = [1, 2]
TABLE = {"a": 1}
TAGS = {"x"}
LOCK = threading.Lock()


def helper():
    return RATE


def uses_helper():
    return helper() * 10


def uses_rates():
    return sum(RATES) + TABLE["a"] + len(TAGS)


def nested_use():
    return [RATE for _ in range(1)]  # the name is in a nested code object (3.11: the comprehension's)


def uses_lock():
    with LOCK:
        return RATE


class Shape:
    """A class of an importable module: pickled by reference, so isinstance holds."""


def make_shape():
    return Shape()


def fingerprint(fn):
    return Fingerprint(fn, by_value_rule(home_namespace(fn)))


@pytest.fixture
def world(monkeypatch):
    """Every test may rebind the globals above; monkeypatch puts them back."""
    g = globals()
    for name in ("RATE", "RATES", "TABLE", "TAGS", "helper"):
        monkeypatch.setitem(g, name, g[name])
    return g


def test_nothing_changed_means_unchanged(world):
    for fn in (helper, uses_helper, uses_rates, nested_use, make_shape):
        assert fingerprint(fn).unchanged()


def test_rebinding_a_global_the_function_uses(world):
    fp = fingerprint(helper)
    world["RATE"] = 2
    assert not fp.unchanged()
    world["RATE"] = 1  # the same object again: unchanged (ints this small are shared)
    assert fp.unchanged()


def test_a_global_the_code_names_only_in_a_nested_code_object(world):
    fp = fingerprint(nested_use)
    world["RATE"] = 3
    assert not fp.unchanged()


def test_redefining_a_helper_and_rebinding_the_helpers_own_globals(world):
    fp = fingerprint(uses_helper)
    world["RATE"] = 5  # a global of the helper, not of uses_helper itself
    assert not fp.unchanged()
    world["RATE"] = 1
    assert fp.unchanged()
    world["helper"] = lambda: 7
    assert not fp.unchanged()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda g: g["RATES"].append(3),
        lambda g: g["RATES"].__setitem__(0, 100),
        lambda g: g["TABLE"].__setitem__("a", 2),
        lambda g: g["TABLE"].__setitem__("b", 1),
        lambda g: g["TAGS"].add("y"),
    ],
    ids=["list.append", "list[i]=", "dict[k]= (value)", "dict[k]= (new key)", "set.add"],
)
def test_builtin_containers_are_compared_item_by_item(world, mutate):
    world["RATES"], world["TABLE"], world["TAGS"] = [1, 2], {"a": 1}, {"x"}
    fp = fingerprint(uses_rates)
    assert fp.unchanged()
    mutate(world)
    assert not fp.unchanged()


def test_in_place_mutation_of_other_objects_is_not_seen(world):
    """Documented limit: only identity for everything but list/dict/set (and those one level deep)."""

    class Box:
        value = 1

    box = Box()
    nested = [[1]]

    def reads():
        return box.value + nested[0][0]

    fp = fingerprint(reads)
    box.value = 2
    nested[0].append(2)
    assert fp.unchanged()


def test_defaults_kwdefaults_code_and_attributes(world):
    def f(a=1, *, b=2):
        return a + b

    fp = fingerprint(f)
    f.__defaults__ = (5,)
    assert not fp.unchanged()
    fp = fingerprint(f)
    f.__kwdefaults__ = {"b": 3}
    assert not fp.unchanged()
    fp = fingerprint(f)
    f.__code__ = (lambda a=1, *, b=2: a * b).__code__
    assert not fp.unchanged()
    fp = fingerprint(f)
    f.marker = "set"
    assert not fp.unchanged()
    fp = fingerprint(f)
    f.marker = "changed"
    assert not fp.unchanged()


def test_closure_cells_and_functions_reached_through_them(world):
    n = 1

    def inner():
        return RATE

    def outer():
        return n + inner()

    fp = fingerprint(outer)
    n = 2  # noqa: F841 - rebinds the cell outer reads
    assert not fp.unchanged()
    n = 1
    assert fp.unchanged()
    world["RATE"] = 9  # a global of inner, a closure of outer
    assert not fp.unchanged()


def test_an_empty_cell_that_gets_a_value():
    def outer():
        def f():
            return later

        fp = fingerprint(f)
        later = 1
        return fp

    assert not outer().unchanged()


def test_partials_and_bound_methods_are_walked_through(world):
    fp = fingerprint(functools.partial(uses_helper))
    world["RATE"] = 4
    assert not fp.unchanged()

    class Model:
        def predict(self):
            return RATE

    fp = fingerprint(Model().predict)
    world["RATE"] = 1
    assert not fp.unchanged()


def test_methods_of_classes_sent_by_value_are_walked(world):
    class Local:  # local: cloudpickle sends it by value
        def value(self):
            return RATE

    def use():
        return Local().value()

    fp = fingerprint(use)
    world["RATE"] = 11
    assert not fp.unchanged()


def test_a_builtin_callable_has_nothing_to_change():
    assert fingerprint(len).unchanged()
    assert fingerprint(pickle.dumps).unchanged()


# ---- PickledFunction -------------------------------------------------------------------------------


def test_payload_is_reused_while_unchanged_and_renewed_after(world):
    pickled = PickledFunction(uses_helper)
    first = pickled.payload()
    assert pickled.payload() is first
    world["RATE"] = 3
    second = pickled.payload()
    assert second[0] != first[0] and second[1][0] != first[1][0]
    assert cloudpickle.loads(second[1][0])() == 30
    assert pickled.payload() is second


def test_a_change_the_pickle_does_not_see_keeps_the_id(world):
    """``co_names`` holds attribute names too: a global that happens to share one changes nothing sent."""

    def reads_attribute():
        return threading.active_count  # "active_count" is in co_names as an attribute

    pickled = PickledFunction(reads_attribute)
    first = pickled.payload()
    world["active_count"] = 1
    try:
        second = pickled.payload()
    finally:
        del world["active_count"]
    assert second[0] == first[0]


def test_functions_of_the_module_travel_by_value_classes_by_reference(world):
    data, _ = dumps_function(make_shape, home_namespace(make_shape))
    world["Shape"] = type("Other", (), {})  # by value, the function would carry this...
    try:
        loaded = cloudpickle.loads(data)
    finally:
        world["Shape"] = Shape
    assert isinstance(loaded(), Shape)  # ...by reference, the class is the module's own


def test_a_global_that_cannot_be_pickled_falls_back_to_by_reference():
    data, _ = dumps_function(uses_lock, home_namespace(uses_lock))
    assert cloudpickle.loads(data) is uses_lock


def test_code_keeps_its_file_name_and_a_cells_source_travels_along():
    source = "def from_a_cell():\n    return 1 / 0\n"
    filename = "/nonexistent/notebook-cell-7.py"
    namespace = {"__name__": "__main__"}
    exec(compile(source, filename, "exec"), namespace)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    try:
        fn = namespace["from_a_cell"]
        data, sources = dumps_function(fn, home_namespace(fn))
    finally:
        del linecache.cache[filename]
    assert cloudpickle.loads(data).__code__.co_filename == filename
    assert sources == {filename: source.splitlines(True)}
    real, _ = dumps_function(helper, home_namespace(helper))
    assert cloudpickle.loads(real).__code__.co_filename == __file__


def test_installed_code_is_not_sent_by_value():
    assert home_namespace(pickle.dumps) is None  # the standard library
    assert home_namespace(cloudpickle.dumps) is None  # site-packages
    assert home_namespace(helper) is globals()
    assert home_namespace(len) is None
    assert isinstance(home_namespace(lambda: 0), dict)


def test_many_threads_asking_at_once_get_one_consistent_payload(world):
    pickled = PickledFunction(uses_helper)
    seen = []
    barrier = threading.Barrier(8)

    def ask():
        barrier.wait()
        seen.append(pickled.payload())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len({id(p) for p in seen}) == 1
    assert isinstance(seen[0][1][0], bytes) and not isinstance(seen[0][1][0], types.FunctionType)
