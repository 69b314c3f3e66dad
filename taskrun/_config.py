"""``Runner.configure(**settings)``: runner settings as class attributes of a cached subclass."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, TypeVar, cast

if TYPE_CHECKING:
    from ._run import BaseTaskRun

RunT = TypeVar("RunT", bound="BaseTaskRun[Any]")

_cache: dict[tuple[type, tuple[tuple[str, Any], ...]], type[Any]] = {}
_lock = threading.Lock()


def _reset_lock_after_fork() -> None:
    """A lock another thread held at the fork stays held in the child: make a new one there."""
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_after_fork)


def configure(cls: type[RunT], settings: dict[str, Any]) -> type[RunT]:
    if not settings:
        return cls  # nothing to set: the same runner, and the same pool
    known = cls.settings
    unknown = sorted(set(settings) - set(known))
    if unknown:
        valid = ", ".join(sorted(known)) or "none"
        raise TypeError(f"{cls.__name__}.configure() got unknown setting(s) {', '.join(unknown)}; valid settings: {valid}")
    validate = getattr(cls, "validate_setting", None)
    for name, value in settings.items():
        if validate is not None:
            validate(name, value)
    cache_key: tuple[type, tuple[tuple[str, Any], ...]] | None
    try:
        cache_key = (cls, tuple(sorted(settings.items())))
        hash(cache_key)
    except TypeError:
        cache_key = None  # unhashable setting values: no sharing, a class of its own
    with _lock:
        if cache_key is not None and cache_key in _cache:
            return _cache[cache_key]
        shown = ", ".join(f"{k}={v!r}" for k, v in sorted(settings.items()))
        namespace = {"__module__": cls.__module__, **settings, "_configured_from": (cls, dict(settings))}
        sub = cast("type[RunT]", type(f"{cls.__name__}[{shown}]", (cls,), namespace))  # a subclass of cls
        sub.__qualname__ = sub.__name__
        if cache_key is not None:
            _cache[cache_key] = sub
        return sub


def positive_int_or_none(owner: str, name: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner} setting {name} must be an int >= 1{' or None' if allow_none else ''}, got {value!r}")
    if value < 1:
        raise ValueError(f"{owner} setting {name} must be >= 1{' or None' if allow_none else ''}, got {value!r}")


def runner_spec(runner: type[BaseTaskRun[Any]]) -> Any:
    """A picklable stand-in for a runner class: configured subclasses are rebuilt, not pickled."""
    spec: tuple[type[BaseTaskRun[Any]], dict[str, Any]] | None = runner.__dict__.get("_configured_from")
    if spec is None:
        return runner
    base, settings = spec
    return (runner_spec(base), settings)


def runner_from_spec(spec: Any) -> type[BaseTaskRun[Any]]:
    """The runner class :func:`runner_spec` stands for (a configured one is configured again here)."""
    if isinstance(spec, tuple):
        base, settings = cast("tuple[Any, dict[str, Any]]", spec)
        return configure(runner_from_spec(base), settings)
    return cast("type[BaseTaskRun[Any]]", spec)
