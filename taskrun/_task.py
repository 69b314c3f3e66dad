"""``@task``: the decorator, and the task object it makes out of a function."""

from __future__ import annotations

import functools
import importlib
import keyword
import math
import os
import pickle
import sys
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeGuard, TypeVar, cast, overload

from ._config import runner_from_spec, runner_spec
from ._group import RunGroup, start_map
from ._lifecycle import register_runner
from ._retry import RetryPolicy
from ._run import BaseTaskRun

if TYPE_CHECKING:
    from ._ledger import Ledger

P = ParamSpec("P")
R = TypeVar("R")


def default_runner(is_async: bool = False) -> type[BaseTaskRun[Any]]:
    """The runner of a task given none: ``AsyncTaskRun`` for an ``async def``, else ``MultiprocessTaskRun``."""
    if is_async:
        from .runners.aio import AsyncTaskRun

        return AsyncTaskRun
    from .runners.process import MultiprocessTaskRun

    return MultiprocessTaskRun


class Task(Generic[P, R]):
    """A function turned into a task: calling it starts a run and returns its handle at once.

    Arguments that do not fit the function's signature raise ``TypeError`` at the call, before
    anything starts. The task keeps the function's name, docstring, module and attributes, but
    its options (``runner``, ``retries``...) are its own: a function attribute never overrides them.
    """

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str | None = None,
        retries: int = 0,
        retry_sleep_time: float = 0,
        backoff: float = 1.0,
        jitter: float = 0,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        timeout: float | None = None,
        runner: type[BaseTaskRun[Any]] | None = None,
        ledger: Ledger | str | os.PathLike[str] | None = None,
        key: Callable[..., str] | None = None,
    ) -> None:
        given: object = fn  # checked as what it may really be
        if not callable(given) or isinstance(given, type) and issubclass(given, BaseTaskRun):
            raise TypeError(f"task() needs a function to wrap, got {fn!r} ({type(fn).__name__})")
        if isinstance(given, Task):
            fn = cast("Task[P, R]", given).fn
        import inspect  # here, not at import: it is slow to import, and only decorating needs it

        if inspect.isasyncgenfunction(fn):
            raise TypeError(
                f"task() got {getattr(fn, '__qualname__', fn)!r}, an async generator function: a call has one result, "
                "not a stream; make it an async def that collects the items and returns them (a list)"
            )
        if name is None:
            name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
        if not isinstance(name, str) or not name:
            raise TypeError(f"task option name must be a non-empty str, got {name!r}")
        _check_int("retries", retries)
        _check_number("retry_sleep_time", retry_sleep_time, minimum=0)
        _check_number("backoff", backoff, minimum=1)
        _check_number("jitter", jitter, minimum=0)
        retry_on = _check_retry_on(retry_on)
        if timeout is not None:
            _check_number("timeout", timeout, minimum=0, inclusive=False)
        runner = default_runner(inspect.iscoroutinefunction(fn)) if runner is None else _check_runner(runner)
        if _overrides_shutdown(runner):
            register_runner(runner)  # its shutdown(wait) hook runs with taskrun.shutdown() and at exit
        if key is not None and not callable(cast(object, key)):
            raise TypeError(f"task option key must be a callable(*args, **kwargs) -> str, got {key!r}")

        #: The function as written: for an ``async def``, its coroutine function (``await task.fn(x)``). Typed as
        #: returning Any: a task's type holds the value a call gives, which is not what an async def returns.
        self.fn: Callable[P, Any] = fn
        self.name: str = name
        self.retries: int = retries
        self.retry_sleep_time: float = retry_sleep_time
        self.backoff: float = backoff
        self.jitter: float = jitter
        self.retry_on: tuple[type[BaseException], ...] = retry_on
        self.timeout: float | None = timeout
        self.runner: type[BaseTaskRun[Any]] = runner
        self.ledger: Ledger | None = None if ledger is None else _check_ledger(ledger)
        self.key: Callable[..., str] | None = key
        self.policy: RetryPolicy = RetryPolicy(retries, retry_sleep_time, backoff, jitter, retry_on)
        #: Free for runners to keep per-task data in (a pickled function, a remote reference), under keys
        #: of their own; the task's pickle leaves it behind.
        self.runner_cache: dict[Any, Any] = {}
        # The function's name, doc, module, qualname and __wrapped__, as functools.wraps gives them.
        functools.update_wrapper(self, fn, updated=())
        # Its own attributes come along too, except any that would shadow the task's options,
        # methods or private state (a function with `.runner = ...` must not undo the checks above).
        for attr, value in getattr(fn, "__dict__", {}).items():
            if attr in self.__dict__ or hasattr(Task, attr) or attr.startswith("_") and not attr.startswith("__"):
                continue
            setattr(self, attr, value)

    # The function's own signature first, for checkers and editors; then any arguments, because an
    # argument may be a handle standing for a value (``inc(inc(1))``), which no ParamSpec can say.
    @overload
    def __call__(self, /, *args: P.args, **kwargs: P.kwargs) -> BaseTaskRun[R]: ...

    @overload
    def __call__(self, /, *args: Any, **kwargs: Any) -> BaseTaskRun[R]: ...

    def __call__(self, /, *args: Any, **kwargs: Any) -> BaseTaskRun[R]:
        run: BaseTaskRun[R] = self.runner(self, args, kwargs)
        run.start()  # arguments that do not fit the signature raise TypeError here (see check_call)
        return run

    #: Positional argument counts that fit when no keywords are given, for check_call's fast path
    #: (a frozenset: its `in` is the cheapest test). Empty until the first call reads the signature.
    _arity: frozenset[int] = frozenset()
    _checker: Callable[..., None] | None = None

    def check_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raise TypeError if ``fn(*args, **kwargs)`` could not bind to the function's signature.

        Every call is checked when it starts, so arguments that cannot fit fail at the call
        itself: nothing is sent, nothing is retried.
        """
        # Positional calls of a fitting count need no other check; anything else is bound to the
        # function's signature (a compiled stand-in with the same parameters, made on first use).
        if kwargs or len(args) not in self._arity:
            self._check_slowly(args, kwargs)

    def _check_slowly(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        checker = self._checker
        if checker is None:
            checker, arity = _signature_checker(self.fn, self.name)
            self._checker = checker
            self._arity = arity  # after the checker: a thread that sees the arity finds the checker
        try:
            checker(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(str(exc)) from None  # the caller's traceback, without the checker's frame

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None, /) -> Task[P, R]: ...

    @overload
    def __get__(self, instance: object, owner: type[Any] | None = None, /) -> Callable[..., BaseTaskRun[R]]: ...

    def __get__(self, instance: object, owner: type[Any] | None = None, /) -> Task[P, R] | Callable[..., BaseTaskRun[R]]:
        """Used as a method, a task is called with the instance as its first argument."""
        if instance is None:
            return self
        return functools.partial(self, instance)

    def map(
        self,
        items: Iterable[Any],
        *,
        max_concurrency: int | None = None,
        stop_when: Callable[[], object] | None = None,
        progress: bool = False,
    ) -> RunGroup[R]:
        """Start one call per item (the item is the one argument: tuples are not unpacked); returns at once.

        Items are read lazily, keeping at most ``max_concurrency`` calls unfinished (None: a
        few thousand, so big inputs are not read up front). ``stop_when()`` is checked
        before each new run starts; once it is true nothing new starts and the remaining
        items end STOPPED without running. ``progress=True`` shows a tqdm bar. A function
        that cannot take one argument raises ``TypeError`` here.
        """
        return start_map(self, items, star=False, max_concurrency=max_concurrency, stop_when=stop_when, progress=progress)

    def starmap(
        self,
        items: Iterable[Iterable[Any]],
        *,
        max_concurrency: int | None = None,
        stop_when: Callable[[], object] | None = None,
        progress: bool = False,
    ) -> RunGroup[R]:
        """Like :meth:`map`, but each item is a tuple of positional arguments: ``fn(*item)``.

        An item that does not fit the function's signature ends FAILED with that ``TypeError``,
        without running or being retried; the other items go on.
        """
        return start_map(self, items, star=True, max_concurrency=max_concurrency, stop_when=stop_when, progress=progress)

    def __reduce__(self) -> tuple[Any, ...]:
        # A task its module holds under its own name travels by reference, as functions do (its
        # function cannot: the module's name for it is the task). Others are rebuilt from the
        # function and options: caches, pools and open ledger connections stay behind, and
        # configured runner classes are configured again there.
        module, qualname = getattr(self, "__module__", None), getattr(self, "__qualname__", None)
        if module and module != "__main__" and qualname and "<locals>" not in qualname:
            if _attribute_path(sys.modules.get(module), qualname) is self:
                return (_import_task, (module, qualname))
        options = {
            "name": self.name, "retries": self.retries, "retry_sleep_time": self.retry_sleep_time,
            "backoff": self.backoff, "jitter": self.jitter, "retry_on": self.retry_on, "timeout": self.timeout,
            "runner": runner_spec(self.runner), "ledger": self.ledger, "key": self.key,
        }
        return (_rebuild_task, (self.fn, options))

    def __repr__(self) -> str:
        return f"<Task {self.name} runner={self.runner.__name__}>"


#: Positional counts a function with ``*args`` is known to fit without a look at its checker (more go to it).
_VARARGS_SPAN = 32
_ANY_COUNT = frozenset(range(_VARARGS_SPAN))


def _accept_any(*args: Any, **kwargs: Any) -> None:
    """The check of a function whose signature cannot be read (some builtins): any call may be right."""


def _signature_checker(fn: Callable[..., Any], name: str) -> tuple[Callable[..., None], frozenset[int]]:
    """A checker that raises the TypeError a call of ``fn`` would for arguments that do not fit its
    signature, and the positional argument counts that fit when no keywords are given.

    The checker is a compiled function with ``fn``'s parameters (no defaults' values, no
    annotations) and an empty body: Python binds the arguments, at a small fraction of the cost
    of ``Signature.bind``, and says what is wrong in its own words. A decorated function is
    checked against the wrapper's own signature (``(*args, **kwargs)`` accepts anything):
    what the wrapper accepts is what the call can pass.
    """
    try:
        import inspect

        signature = inspect.signature(fn, follow_wrapped=False)
    except (TypeError, ValueError):
        return _accept_any, _ANY_COUNT
    params = list(signature.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(p.default is p.empty for p in positional)
    most = len(positional) + (_VARARGS_SPAN if any(p.kind is p.VAR_POSITIONAL for p in params) else 1)
    if any(p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in params):
        arity: frozenset[int] = frozenset()  # a keyword is required: every call is checked
    else:
        arity = frozenset(range(required, most))
    if all(p.name.isidentifier() and not keyword.iskeyword(p.name) for p in params):
        bare = signature.replace(
            parameters=[p.replace(annotation=p.empty, default=p.empty if p.default is p.empty else None) for p in params],
            return_annotation=signature.empty,
        )
        namespace: dict[str, Any] = {}
        exec(f"def check{bare}: pass", namespace)  # noqa: S102 - parameter names checked above
        checker = namespace["check"]
        code = checker.__code__.replace(co_name=name)
        if hasattr(code, "co_qualname"):  # Python 3.11+: error messages name co_qualname
            code = code.replace(co_qualname=name)
        checker.__code__ = code
        checker.__name__ = checker.__qualname__ = name
        return checker, arity

    def bind(*args: Any, **kwargs: Any) -> None:  # parameter names no def could have (a custom __signature__)
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{name}(): {exc}") from None

    return bind, arity


def _attribute_path(found: Any, qualname: str) -> Any:
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found


def _import_task(module: str, qualname: str) -> Task[..., Any]:
    found: object = _attribute_path(importlib.import_module(module), qualname)
    if not _is_task(found):
        raise pickle.UnpicklingError(f"{module}.{qualname} is no longer a task here")
    return found


def _is_task(value: object) -> TypeGuard[Task[..., Any]]:
    return isinstance(value, Task)


def _rebuild_task(fn: Callable[..., Any], options: dict[str, Any]) -> Task[..., Any]:
    options["runner"] = runner_from_spec(options["runner"])
    return Task(fn, **options)


def _check_int(option: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"task option {option} must be an int >= 0, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"task option {option} must be an int >= 0, got {value!r}")


def _check_number(option: str, value: Any, minimum: float, inclusive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"task option {option} must be a number, got {value!r} ({type(value).__name__})")
    bad = value < minimum if inclusive else value <= minimum
    if bad or not math.isfinite(value):
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        none = " (or None for no limit)" if option == "timeout" else ""
        raise ValueError(f"task option {option} must be a finite number {bound}{none}, got {value!r}")


def _is_runner(value: object) -> TypeGuard[type[BaseTaskRun[Any]]]:
    return isinstance(value, type) and issubclass(value, BaseTaskRun)


def _check_runner(runner: object) -> type[BaseTaskRun[Any]]:
    if not _is_runner(runner):
        raise TypeError(f"task option runner must be a BaseTaskRun subclass such as ThreadTaskRun, got {runner!r}")
    if runner.start_attempt is BaseTaskRun.__dict__["start_attempt"]:
        raise TypeError(
            f"task option runner {runner.__name__} does not implement start_attempt(attempt); pass a runner "
            "such as ThreadTaskRun, or a subclass of BaseTaskRun that implements it"
        )
    return runner


def _overrides_shutdown(runner: type[BaseTaskRun[Any]]) -> bool:
    """True if ``runner`` has a shutdown(wait) hook of its own (a classmethod: compared by its function)."""
    own: object = getattr(runner.shutdown, "__func__", runner.shutdown)
    base: object = getattr(BaseTaskRun.shutdown, "__func__", None)
    return own is not base


def _check_retry_on(value: Any) -> tuple[type[BaseException], ...]:
    classes = cast("tuple[object, ...]", value) if isinstance(value, tuple) else (value,)
    if not _exception_classes(classes):
        raise TypeError(f"task option retry_on must be an exception class or a tuple of them, got {value!r}")
    return classes


def _exception_classes(classes: tuple[object, ...]) -> TypeGuard[tuple[type[BaseException], ...]]:
    return bool(classes) and all(isinstance(c, type) and issubclass(c, BaseException) for c in classes)


def _check_ledger(value: object) -> Ledger:
    from ._ledger import Ledger

    if isinstance(value, Ledger):
        return value
    if isinstance(value, (str, os.PathLike)):
        return Ledger(cast("str | os.PathLike[str]", value))
    raise TypeError(f"task option ledger must be a Ledger or a path to its SQLite file, got {value!r}")


class TaskDecorator(Protocol):
    """What ``@task(...)`` with options returns: it turns a function into a :class:`Task`.

    A coroutine function's task gives handles of what its coroutine returns (``async def f() -> int``:
    ``Task[[], int]``), as the runners await it.
    """

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, R], /) -> Task[P, R]: ...


@overload
def task(fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...


@overload
def task(fn: Callable[P, R], /) -> Task[P, R]: ...


@overload
def task(
    *,
    name: str | None = None,
    retries: int = 0,
    retry_sleep_time: float = 0,
    backoff: float = 1.0,
    jitter: float = 0,
    retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
    timeout: float | None = None,
    runner: type[BaseTaskRun[Any]] | None = None,
    ledger: Ledger | str | os.PathLike[str] | None = None,
    key: Callable[..., str] | None = None,
) -> TaskDecorator: ...


def task(fn: Any = None, /, **options: Any) -> Any:
    """Turn a function into a task, bare (``@task``) or with options (``@task(retries=3)``).

    Options are checked here, so a bad one fails at decoration time, naming itself. The task
    of an ``async def`` gives handles of the coroutine's value.
    """
    if fn is None:
        _check_options(options)

        def decorate(f: Callable[..., Any]) -> Task[..., Any]:
            return Task(f, **options)

        return decorate
    if options:
        raise TypeError("use @task(option=...) without a function, or @task bare")
    return Task(fn)


_OPTIONS = frozenset(
    {"name", "retries", "retry_sleep_time", "backoff", "jitter", "retry_on", "timeout", "runner", "ledger", "key"}
)


def _check_options(options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise TypeError(f"task() got unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(_OPTIONS))}")
    # Validate now, not when the decorator is applied, by wrapping a stand-in function.
    Task(_placeholder, **options)


def _placeholder() -> None:
    """Stand-in used to validate options before the real function arrives."""
