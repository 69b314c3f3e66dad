"""Dependencies: finding the handles among a call's arguments, and putting their results in.

Handles are found in the arguments themselves and, recursively, inside plain lists, tuples,
sets and dicts (dict values). The handle (``BaseTaskRun``) waits for them and launches
itself; this module only scans, substitutes and words the error of a failed upstream. It
imports nothing of taskrun's but the errors and statuses, so the handle can import it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ._status import Status
from .errors import UpstreamFailed

_CONTAINERS: tuple[type[Any], ...] = (list, tuple, dict, set, frozenset)
#: ``type``, said to give ``type[Any]`` for any value (pyright makes ``type()`` of an ``Any`` unknown).
_type_of: Callable[[object], type[Any]] = type


class Handle(Protocol):
    """What this module reads of a handle."""

    @property
    def id(self) -> str: ...

    @property
    def status(self) -> Status: ...

    def get_result(self, timeout: float | None = None) -> Any: ...

    def exception(self, timeout: float | None = None) -> BaseException | None: ...


def find_upstream(args: tuple[Any, ...], kwargs: dict[str, Any], handle_type: type[Any]) -> list[Any] | None:
    """The distinct handles among the arguments (in argument order), or None if there are none."""
    found = _scan((*args, *kwargs.values()) if kwargs else args, None, handle_type)
    return list(found.values()) if found else None


def _scan(container: Any, found: dict[int, Any] | None, handle_type: type[Any]) -> dict[int, Any] | None:
    """Add the handles in ``container`` (and in the plain containers inside it) to ``found``."""
    for value in container.values() if _type_of(container) is dict else container:
        if isinstance(value, handle_type):
            if found is None:
                found = {}
            found[id(value)] = value
        elif _type_of(value) in _CONTAINERS:
            found = _scan(value, found, handle_type)
        elif getattr(_type_of(value), "taskrun_not_an_argument", None):
            raise TypeError(
                f"an argument is {value!r}, the RunGroup of a map: pass list(group) to make the call wait for "
                "each of its runs and receive their results, or group.results() to wait for them here"
            )
    return found


def resolve(value: Any, handle_type: type[Any], value_of: Callable[[Any], Any]) -> Any:
    """``value`` with every handle replaced by ``value_of(handle)``; containers without handles are kept as they are."""
    if isinstance(value, handle_type):
        return value_of(value)
    kind = _type_of(value)
    if kind not in _CONTAINERS:
        return value
    if kind is dict:
        items = {k: resolve(v, handle_type, value_of) for k, v in value.items()}
        changed = any(items[k] is not v for k, v in value.items())
        return items if changed else value
    resolved = [resolve(v, handle_type, value_of) for v in value]
    if not any(new is not old for new, old in zip(resolved, value, strict=True)):
        return value
    return resolved if kind is list else kind(resolved)


def succeeded(upstream: Handle) -> bool:
    """A run answered from the ledger is SUCCEEDED (and cached): it has a result to pass on."""
    return upstream.status is Status.SUCCEEDED


def upstream_error(run_id: str, upstream: Handle) -> UpstreamFailed:
    """The error of a run that did not run because ``upstream`` failed or was stopped."""
    cause = upstream.exception(timeout=0)
    status = upstream.status
    if status is Status.FAILED and cause is not None:
        how = f"failed with {type(cause).__name__}: {cause}"
    else:
        how = f"was {status.value}"
    exc = UpstreamFailed(f"{run_id} did not run: the run it depends on, {upstream.id}, {how}", upstream.id, status)
    exc.__cause__ = cause
    return exc
