"""``Runner.configure(**settings)``: runner settings as class attributes of a cached subclass."""

from __future__ import annotations

import os
import threading
from typing import Any

_cache: dict[tuple[type, tuple[tuple[str, Any], ...]], type] = {}
_lock = threading.Lock()


def _reset_lock_after_fork() -> None:
    """A lock another thread held at the fork stays held in the child: make a new one there."""
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_after_fork)


def configure(cls: type, settings: dict[str, Any]) -> Any:
    if not settings:
        return cls  # nothing to set: the same runner, and the same pool
    known = cls.settings  # type: ignore[attr-defined]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        valid = ", ".join(sorted(known)) or "none"
        raise TypeError(f"{cls.__name__}.configure() got unknown setting(s) {', '.join(unknown)}; valid settings: {valid}")
    validate = getattr(cls, "validate_setting", None)
    for name, value in settings.items():
        if validate is not None:
            validate(name, value)
    try:
        cache_key = (cls, tuple(sorted(settings.items())))
        hash(cache_key)
    except TypeError:
        cache_key = None  # unhashable setting values: no sharing, a class of its own
    with _lock:
        if cache_key is not None and cache_key in _cache:
            return _cache[cache_key]
        shown = ", ".join(f"{k}={v!r}" for k, v in sorted(settings.items()))
        sub = type(f"{cls.__name__}[{shown}]", (cls,), {"__module__": cls.__module__, **settings})
        sub._configured_from = (cls, dict(settings))
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


def runner_spec(runner: type) -> Any:
    """A picklable stand-in for a runner class: configured subclasses are rebuilt, not pickled."""
    spec = runner.__dict__.get("_configured_from")
    if spec is None:
        return runner
    base, settings = spec
    return (runner_spec(base), settings)


def runner_from_spec(spec: Any) -> type:
    if isinstance(spec, tuple):
        base, settings = spec
        return configure(runner_from_spec(base), settings)  # type: ignore[no-any-return]
    return spec  # type: ignore[no-any-return]
