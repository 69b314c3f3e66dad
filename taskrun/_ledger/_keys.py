"""Keys: the identity of a call in the ledger (``make_key``), stable across processes and runs."""

from __future__ import annotations

import hashlib
import pickle
from typing import TYPE_CHECKING, Any

from ..errors import SerializationError

if TYPE_CHECKING:
    from .._task import Task

#: Pickle protocol of the argument bytes hashed into default keys. Fixed: changing it changes every key.
KEY_PROTOCOL = 4


def make_key(task: Task[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The call's identity in the ledger: ``task.key(*args, **kwargs)``, or a digest of the pickled call.

    The digest (blake2b of the task name and the arguments pickled with protocol 4, keyword
    arguments sorted) is stable across processes and runs for the usual arguments: numbers,
    strings, bytes, tuples, lists, dicts, dataclasses. It is not for sets or frozensets of
    strings (their order follows per-process hash randomization), objects whose pickle holds
    ids or memory addresses, or dicts built in a different order. Keys compare pickles, not
    equality: ``f(1)``, ``f(1.0)`` and ``f(x=1)`` are three calls. Pass ``key=`` to decide.
    """
    key_fn = task.key
    if key_fn is not None:
        key: Any = key_fn(*args, **kwargs)
        if type(key) is not str:
            if isinstance(key, str):
                return str(key)
            raise TypeError(
                f"the key function {key_fn!r} of task {task.name} returned {key!r} ({type(key).__name__}); it must return a str"
            )
        return key
    try:
        data = pickle.dumps((args, sorted(kwargs.items())) if kwargs else args, KEY_PROTOCOL)
    except Exception as exc:
        raise SerializationError(
            f"cannot make a ledger key for a call of {task.name}: its arguments cannot be pickled "
            f"({type(exc).__name__}: {exc}); pass key=lambda *args, **kwargs: ... to @task to name calls with a str"
        ) from exc
    return hashlib.blake2b(task.name.encode() + b"\x00" + data, digest_size=16).hexdigest()
