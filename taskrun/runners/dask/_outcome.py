"""What an attempt came to, in plain values: shared by the worker side and the isolated child process.

Imports only the standard library and cloudpickle, so that the child process of an isolated
attempt (``_child``, run as a script) starts quickly.
"""

from __future__ import annotations

import copyreg
import logging
import pickle
import struct
import traceback
import types
from collections.abc import Callable
from typing import Any

import cloudpickle

PROTOCOL = pickle.HIGHEST_PROTOCOL
# Outcome kinds.
VALUE, PICKLED, RAISED, UNPICKLABLE, DIED, ENDED = range(6)
# What an isolated attempt's child process writes to the worker, frame by frame: a log record as it is made, then the end.
RECORD, END = range(2)
_LENGTH = struct.Struct("!Q")
#: Values sent as they are (the same set as taskrun.runners.base.PLAIN_TYPES).
PLAIN = frozenset({int, float, str, bytes, bool, type(None)})
#: Narrows a value to a coroutine of anything (``types.CoroutineType`` alone leaves its parameters unknown).
CoroutineType: type[types.CoroutineType[Any, Any, Any]] = types.CoroutineType
#: ``type``, as type checkers are to see it: of an Any value, pyright's strict mode infers a partly unknown type.
type_of: Callable[[object], type[Any]] = type


def dumps(obj: Any) -> bytes:
    """Pickle with the fast standard pickler; fall back to cloudpickle (lambdas, local classes)."""
    try:
        return pickle.dumps(obj, PROTOCOL)
    except Exception:
        return cloudpickle.dumps(obj, PROTOCOL)


def _reaches_root(logger: logging.Logger) -> bool:
    """True if a record of ``logger`` would reach the root logger's handlers (no logger on the way stops it)."""
    current = logger
    while current.propagate and current.parent is not None:
        current = current.parent
    return current.parent is None


def send_records_to(sink: Callable[[], Callable[[logging.LogRecord], None] | None]) -> None:
    """From now on, a log record made where ``sink()`` gives a function goes to that function only.

    For a record that would reach the root logger, made in a thread (of an attempt) where
    ``sink()`` is not None: the process's own handlers never see it, as the caller handles
    the copy it is sent (a script's ``logging.basicConfig``, which a worker runs again as it
    starts, would print it twice). Every other record is handled as usual, by its loggers'
    handlers. Call once per process.
    """
    call_handlers = logging.Logger.callHandlers

    def call_handlers_or_send(self: logging.Logger, record: logging.LogRecord) -> None:
        send = sink()
        if send is not None and _reaches_root(self):
            try:
                send(record)
                return
            except Exception:
                pass  # this process's handlers show it, then
        call_handlers(self, record)

    logger_class: Any = logging.Logger  # a method replaced: Any, which both type checkers let through
    logger_class.callHandlers = call_handlers_or_send


def frame(item: Any) -> bytes:
    """``item`` pickled, with its length first: what :func:`take_frames` reads back."""
    data = pickle.dumps(item, PROTOCOL)
    return _LENGTH.pack(len(data)) + data


def take_frames(buffer: bytearray) -> list[Any]:
    """The items of the whole frames at the start of ``buffer``, removed from it."""
    items: list[Any] = []
    start, end = 0, len(buffer)
    while end - start >= _LENGTH.size:
        (size,) = _LENGTH.unpack_from(buffer, start)
        if end - start - _LENGTH.size < size:
            break
        start += _LENGTH.size
        items.append(pickle.loads(buffer[start:start + size]))
        start += size
    del buffer[:start]
    return items


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


#: ``copyreg._reconstructor(cls, base, state)``: ``base.__new__(cls)`` then ``base.__init__`` (what pickle protocols
#: 0 and 1 rebuild objects with; not in typeshed).
_RECONSTRUCTOR: Any = getattr(copyreg, "_reconstructor")  # noqa: B009


class _SameException:
    """Pickles as a rebuilt copy of an exception whose own pickle does not load (an ``__init__`` that
    does not take its ``args`` back), so that the caller still gets its type and message."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt by copyreg._reconstructor (the standard library's, so the caller needs no module of this
        # process: in an isolated attempt's child, this module is a bare `_outcome`): the builtin exception
        # class beneath the task's makes the object, without the task's __init__; the state sets its args and
        # attributes.
        exc = self.exc
        cls = type(exc)
        base = next(klass for klass in cls.__mro__ if klass.__module__ == "builtins")
        attributes: dict[str, Any] = getattr(exc, "__dict__", None) or {}
        state: dict[str, Any] = {**attributes, "args": exc.args}
        if isinstance(exc, OSError):  # kept in the object, not in args or __dict__
            for name in ("errno", "strerror", "filename", "filename2"):
                if getattr(exc, name) is not None:
                    state[name] = getattr(exc, name)
        return (_RECONSTRUCTOR, (cls, base, None), state)


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
