"""What the process runner adds to :class:`~taskrun.runners.base.PickledFunction`: the objects of ``__main__``.

A call's function is pickled as it is when the call is made (``PickledFunction``, shared with
the other runners that send functions to other processes). A forked worker's ``__main__``
holds the classes and functions that existed when it was forked: a pickle that names others
(made later, or of a notebook or ``python -c`` under spawn) must carry them by value instead.
"""

from __future__ import annotations

import io
import pickle
import sys
import types
from typing import Any

from ..base import PickledFunction

PROTOCOL = pickle.HIGHEST_PROTOCOL
#: The key of a task's PickledFunction in ``task.runner_cache``.
CACHE_KEY = "taskrun.process.function"
#: A version of a function as sent: ``(fn_id, (bytes, sources))``.
Payload = tuple[int, tuple[bytes, dict[str, list[str]]]]
_MISSING = object()

__all__ = ["PROTOCOL", "CACHE_KEY", "Payload", "PickledFunction", "main_objects", "main_references_known"]


def main_objects() -> dict[str, Any]:
    """The classes and functions of ``__main__`` by name (what a pickle by reference can name there)."""
    main = sys.modules.get("__main__")
    if main is None:
        return {}
    return {name: value for name, value in vars(main).items() if isinstance(value, (type, types.FunctionType))}


class _MainFinder(pickle.Pickler):
    """Pickles to nowhere, noting the objects of ``__main__`` that the pickle names by reference."""

    def __init__(self) -> None:
        super().__init__(io.BytesIO(), PROTOCOL)
        self.found: list[Any] = []

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (type, types.FunctionType)) and getattr(obj, "__module__", None) == "__main__":
            self.found.append(obj)
        return NotImplemented


def main_references_known(obj: Any, known: dict[str, Any]) -> bool:
    """True if every object of ``__main__`` that a pickle of ``obj`` names is in ``known`` under its name."""
    finder = _MainFinder()
    try:
        finder.dump(obj)
    except Exception:
        return False
    for found in finder.found:
        top = found.__qualname__.split(".", 1)[0]
        if known.get(top, _MISSING) is not vars(sys.modules["__main__"]).get(top, None):
            return False
    return True
