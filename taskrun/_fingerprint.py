"""A task's function pickled for other processes as it is when each call is made, and re-pickled only on change.

The function is pickled once and its bytes reused while a cheap :class:`Fingerprint` of
what that pickle captured still holds; when it does not, the function is pickled again
under a new id (see :class:`PickledFunction`). So a call in another process sees the
function's globals, closure and helpers as they are at call time, as a thread call does,
at the cost of a few identity comparisons per call. Runners reach this through
:mod:`taskrun.runners.base` (``PickledFunction``); the process and Dask runners use it.

What travels by value (see ``taskrun.runners.base.dumps_function``): the task's own function,
the plain functions of its module that the pickle reaches, and whatever cloudpickle sends by
value anyway (functions and classes of ``__main__``, lambdas, closures, local classes).
Classes of importable modules keep travelling by reference, so ``isinstance`` holds in the
other process and back in the caller.
"""

from __future__ import annotations

import functools
import itertools
import os
import sysconfig
import threading
import types
from collections.abc import Callable
from operator import is_
from typing import Any

import cloudpickle

from ._pickling import dumps_function

#: A version of a function as sent: ``(fn_id, (bytes, sources))``.
Payload = tuple[int, tuple[bytes, dict[str, list[str]]]]
_MISSING = object()  # a global name with no value (yet)
_EMPTY = object()  # an empty closure cell

_fn_ids = itertools.count(1)


# ---- the fingerprint ------------------------------------------------------------------------


def _same_list(obj: Any, snapshot: tuple[Any, ...]) -> bool:
    return len(obj) == len(snapshot) and all(map(is_, obj, snapshot))


def _same_dict(obj: Any, snapshot: tuple[tuple[Any, ...], tuple[Any, ...]]) -> bool:
    keys, values = snapshot
    try:
        return len(obj) == len(keys) and all(map(is_, obj, keys)) and all(map(is_, obj.values(), values))
    except RuntimeError:  # it changed size while we compared it (another thread)
        return False


def _same_set(obj: Any, snapshot: frozenset[Any]) -> bool:
    return len(obj) == len(snapshot) and obj == snapshot


def _still_empty(obj: Any, snapshot: None) -> bool:
    return not obj  # (compiled inline as "not obj")


#: ``type``, said to give ``type[Any]`` for any value (pyright makes ``type()`` of an ``Any`` unknown).
_type_of: Callable[[object], type[Any]] = type


def _container_check(obj: Any) -> tuple[Callable[[Any, Any], bool], Any] | None:
    """How to tell later that the builtin container ``obj`` still holds the same items (None: not one)."""
    kind = _type_of(obj)
    if kind is not list and kind is not dict and kind is not set:
        return None
    if not obj:
        return _still_empty, None
    if kind is list:
        return _same_list, tuple(obj)
    if kind is dict:
        return _same_dict, (tuple(obj), tuple(obj.values()))
    return _same_set, frozenset(obj)


def _code_names(code: types.CodeType) -> list[str]:
    """The names ``code`` and the code objects nested in it use (``co_names``: globals and attributes)."""
    names: dict[str, None] = {}
    stack = [code]
    while stack:
        current = stack.pop()
        names.update(dict.fromkeys(current.co_names))
        stack.extend(const for const in current.co_consts if isinstance(const, types.CodeType))
    return list(names)


def _cell_value(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:
        return _EMPTY


class Fingerprint:
    """What a pickle of a function depends on, held by strong reference and compared by identity.

    For the function, and for every function the pickle carries by value (reached through
    its globals, its closure cells, and the methods of classes carried by value): its
    ``__code__``, ``__defaults__``, ``__kwdefaults__`` and ``__dict__`` (items compared
    shallowly), the contents of its closure cells, and the current values of the names its
    code uses (``co_names``, through nested code objects) in its module's globals. Lists,
    dicts and sets among those values are compared item by item (by identity, one level
    deep); every other object only by identity. So rebinding a global, redefining a
    helper or a class, or ``RATES.append(x)`` is seen; mutating any other object in place
    (an attribute of an instance, a list inside a dict, a class's method) is not.

    Holding the references keeps the objects alive, so an id is never reused meanwhile.
    The comparisons are compiled into one expression, ``unchanged()``, which runs at every
    call (about 0.1 us for a function that uses no globals).
    """

    __slots__ = ("checks", "unchanged")

    def __init__(self, fn: Any, by_value: Callable[[types.FunctionType], bool]) -> None:
        #: (expression, {name: object it uses}) for each thing recorded, in the order found.
        self.checks: list[tuple[str, dict[str, Any]]] = []
        seen: set[int] = set()
        to_walk: list[types.FunctionType] = []

        def hold(value: Any) -> None:
            """A value the pickle carries: check its items if a container; walk it if carried by value."""
            if id(value) in seen:
                return
            check = _container_check(value)
            if check is not None:
                seen.add(id(value))
                if check[0] is _still_empty:
                    self._add("not {obj}", obj=value)
                else:
                    self._add("{same}({obj}, {snapshot})", same=check[0], obj=value, snapshot=check[1])
            elif isinstance(value, types.FunctionType):
                if by_value(value):
                    to_walk.append(value)
            elif isinstance(value, (types.MethodType, functools.partial)):
                hold(getattr(value, "__func__", None) or value.func)  # type: ignore[union-attr]
            elif isinstance(value, type) and _dynamic_class(value):
                seen.add(id(value))
                for member in vars(value).values():
                    hold(getattr(member, "__func__", member))  # staticmethod, classmethod

        if isinstance(fn, types.FunctionType):
            to_walk.append(fn)
        else:
            hold(fn)  # a partial, a bound method, or a callable with nothing to walk
        while to_walk:
            function = to_walk.pop()
            if id(function) in seen:
                continue
            seen.add(id(function))
            attributes = function.__dict__
            self._add(
                "{f}.__code__ is {code} and {f}.__defaults__ is {defaults} and {f}.__kwdefaults__ is {kwdefaults} "
                "and {f}.__dict__ is {attributes}",
                f=function, code=function.__code__, defaults=function.__defaults__,
                kwdefaults=function.__kwdefaults__, attributes=attributes,
            )
            hold(attributes)
            for cell in function.__closure__ or ():
                value = _cell_value(cell)
                self._add("_cell_value({cell}) is {value}", cell=cell, value=value)
                hold(value)
            namespace = function.__globals__
            for name in _code_names(function.__code__):
                value = namespace.get(name, _MISSING)
                self._add("{namespace}.get({name}, _MISSING) is {value}", namespace=namespace, name=name, value=value)
                hold(value)
        #: () -> bool: True while everything recorded is as it was.
        self.unchanged: Callable[[], bool] = self._compile()

    def _add(self, template: str, **objects: Any) -> None:
        number = len(self.checks)
        names = {key: f"{key}_{number}" for key in objects}
        self.checks.append((template.format(**names), {names[key]: value for key, value in objects.items()}))

    def _compile(self) -> Callable[[], bool]:
        namespace: dict[str, Any] = {"_MISSING": _MISSING, "_cell_value": _cell_value}
        for _expression, objects in self.checks:
            namespace.update(objects)
        source = " and ".join(f"({expression})" for expression, _ in self.checks) or "True"
        check: Callable[[], bool] = eval(f"lambda: {source}", namespace)
        return check


# ---- pickling by value ----------------------------------------------------------------------


# cloudpickle's own rule for what travels by reference (not public API: looked up once, with a fallback).
_by_reference: Callable[[Any], bool] | None = getattr(cloudpickle.cloudpickle, "_should_pickle_by_reference", None)


def _dynamic_class(cls: type) -> bool:
    """True for a class cloudpickle sends by value (of ``__main__``, local, or not importable)."""
    try:
        return not _by_reference(cls)  # type: ignore[misc]
    except Exception:
        return cls.__module__ == "__main__"


@functools.cache
def _installed_paths() -> tuple[str, ...]:
    """The directories of the standard library and of installed distributions (computed once, when first needed)."""
    paths = sysconfig.get_paths()
    found = {os.path.realpath(paths[key]) + os.sep for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    return tuple(sorted(found))


def home_namespace(fn: Any) -> dict[str, Any] | None:
    """The module globals whose plain functions travel by value with ``fn``: its own module's.

    None for code of the standard library or of installed distributions (site-packages):
    that does not change while the program runs, and by reference it stays small.
    """
    while isinstance(fn, (functools.partial, types.MethodType)):
        fn = getattr(fn, "__func__", None) or fn.func  # type: ignore[union-attr]
    if not isinstance(fn, types.FunctionType):
        return None
    namespace = fn.__globals__
    path = namespace.get("__file__")
    if isinstance(path, str) and os.path.realpath(path).startswith(_installed_paths()):
        return None
    return namespace


def by_value_rule(home: dict[str, Any] | None) -> Callable[[types.FunctionType], bool]:
    """Which functions a pickle made by :func:`dumps_function` carries by value."""

    def by_value(function: types.FunctionType) -> bool:
        if function.__globals__ is home:
            return True
        try:
            return not _by_reference(function)  # type: ignore[misc]
        except Exception:
            return function.__module__ == "__main__"

    return by_value


class PickledFunction:
    """A task's function for other processes: ``payload()`` gives ``(fn_id, (bytes, sources))``.

    Each call checks the fingerprint (a few comparisons); only when it changed is the
    function pickled again. New bytes get a new id, so a worker never runs an old version
    under a new call; the same bytes (a change the pickle does not see) keep their id.
    ``current`` is ``(fingerprint.unchanged, payload)`` for callers on a hot path, which may
    use the payload when ``current[0]()`` is true and call ``payload()`` otherwise.
    """

    __slots__ = ("fn", "home", "every_file", "_by_value", "current", "_lock")

    def __init__(self, fn: Any, every_file: bool = False) -> None:
        self.fn: Any = fn
        self.every_file: bool = every_file  # the sources of every file travel along (see dumps_function)
        self.home: dict[str, Any] | None = home_namespace(fn)
        self._by_value = by_value_rule(self.home)
        self.current: tuple[Callable[[], bool], tuple[int, tuple[bytes, dict[str, list[str]]]]] | None = None
        self._lock = threading.Lock()

    def payload(self) -> tuple[int, tuple[bytes, dict[str, list[str]]]]:
        current = self.current
        if current is not None and current[0]():
            return current[1]
        with self._lock:
            current = self.current
            if current is not None and current[0]():
                return current[1]
            # Fingerprint first: a change made while we pickle is then seen at the next call.
            fingerprint = Fingerprint(self.fn, self._by_value)
            data, sources = dumps_function(self.fn, self.home, self.every_file)
            if current is not None and current[1][1][0] == data:
                payload = (current[1][0], (data, sources))
            else:
                payload = (next(_fn_ids), (data, sources))
            self.current = (fingerprint.unchanged, payload)
            return payload
