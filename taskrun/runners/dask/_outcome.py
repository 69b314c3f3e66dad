"""What an attempt came to, in plain values: shared by the worker side and the isolated child process.

Imports only the standard library and cloudpickle, so that the child process of an isolated
attempt (``_child``, run as a script) starts quickly.
"""

from __future__ import annotations

import logging
import pickle
import traceback
from collections.abc import Callable
from typing import Any

import cloudpickle

PROTOCOL = pickle.HIGHEST_PROTOCOL
# Outcome kinds.
VALUE, PICKLED, RAISED, UNPICKLABLE, DIED, ENDED = range(6)
#: Values sent as they are (the same set as taskrun.runners.base.PLAIN_TYPES).
PLAIN = frozenset({int, float, str, bytes, bool, type(None)})
#: ``type``, as type checkers are to see it: of an Any value, pyright's strict mode infers a partly unknown type.
type_of: Callable[[object], type[Any]] = type


def dumps(obj: Any) -> bytes:
    """Pickle with the fast standard pickler; fall back to cloudpickle (lambdas, local classes)."""
    try:
        return pickle.dumps(obj, PROTOCOL)
    except Exception:
        return cloudpickle.dumps(obj, PROTOCOL)


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """A log record as plain fields (``logging.makeLogRecord`` rebuilds it in the caller)."""
    fields: dict[str, Any] = {}
    for name, value in record.__dict__.items():
        if type(value) in PLAIN:
            fields[name] = value
        elif name not in ("args", "exc_info", "msg"):
            fields[name] = repr(value)  # an `extra=` value that might not pickle
    fields["msg"] = record.getMessage()
    fields["args"] = None
    if record.exc_info:
        fields["exc_text"] = logging.Formatter().formatException(record.exc_info)
    fields["exc_info"] = None
    return fields


def value_payload(value: Any) -> tuple[int, Any]:
    """``(VALUE, value)`` for a plain value, ``(PICKLED, bytes)``, or ``(UNPICKLABLE, (reason, ""))``."""
    kind = type_of(value)
    if kind in PLAIN:
        return VALUE, value
    try:
        return PICKLED, dumps(value)
    except Exception as why:
        reason = (f"the task's result of type {kind.__qualname__} could not be pickled to send back "
                  f"({type(why).__name__}: {why})")
        return UNPICKLABLE, (reason, "")


def _rebuild_exception(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any] | None) -> BaseException:
    """An exception of ``cls`` with these args and attributes, made without calling its ``__init__``."""
    try:
        exc = cls.__new__(cls, *args)
    except TypeError:
        exc = cls.__new__(cls)
    exc.args = args
    if state:
        exc.__dict__.update(state)
    return exc


class _SameException:
    """Pickles as a rebuilt copy of an exception whose own pickle does not load (an ``__init__`` that
    does not take its ``args`` back), so that the caller still gets its type and message."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self) -> tuple[Any, ...]:
        exc = self.exc
        return (_rebuild_exception, (type(exc), exc.args, getattr(exc, "__dict__", None) or None))


def exception_payload(exc: BaseException) -> tuple[int, Any]:
    """``(RAISED, (pickled exception, traceback text))``, or ``(UNPICKLABLE, (reason, traceback text))``."""
    tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    exc.__traceback__ = None  # its frames hold the call's locals; the text says it all
    why: Exception | None = None
    for candidate in (exc, _SameException(exc)):
        try:
            data = cloudpickle.dumps(candidate, PROTOCOL)
            cloudpickle.loads(data)  # one that pickles but cannot be rebuilt fails here, not in the caller
            return RAISED, (data, tb_text)
        except Exception as error:
            why = why or error
    reason = (f"the task raised {type(exc).__qualname__}: {exc}, which could not be pickled to send back "
              f"({type(why).__name__}: {why})")
    return UNPICKLABLE, (reason, tb_text)
