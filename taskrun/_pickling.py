"""A function pickled for another process, so that its tracebacks and warnings there name the caller's code.

cloudpickle writes ``<dynamic-code>`` as the file name of the code it carries by value
(functions of ``__main__``, lambdas, closures, notebook cells). Here code objects travel
by ``marshal``, which keeps their real file name and line numbers, and the source lines
the other process cannot read for itself travel along, for its ``linecache``. The runners
reach this through :mod:`taskrun.runners.base` (``dumps_function``, ``register_sources``).
"""

from __future__ import annotations

import io
import linecache
import marshal
import os
import pickle
import types
from typing import Any

import cloudpickle

PROTOCOL = pickle.HIGHEST_PROTOCOL


class _FunctionPickler(cloudpickle.Pickler):
    """cloudpickle, plus: the plain functions of ``home`` by value; code with its real file name."""

    def __init__(self, file: io.BytesIO, home: dict[str, Any] | None) -> None:
        super().__init__(file, protocol=PROTOCOL)
        self.home = home
        self.filenames: set[str] = set()

    def _function_reduce(self, obj: types.FunctionType) -> Any:
        if obj.__globals__ is self.home:
            return self._dynamic_function_reduce(obj)
        return super()._function_reduce(obj)

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.CodeType:
            self.filenames.add(obj.co_filename)
            # marshal keeps co_filename (cloudpickle writes <dynamic-code>); marshal.loads, a builtin, unpickles it
            # without importing taskrun, so a process that runs only the function need not import it.
            return marshal.loads, (marshal.dumps(obj),)
        return super().reducer_override(obj)


_CAN_CUSTOMISE = hasattr(cloudpickle.Pickler, "_dynamic_function_reduce") and hasattr(
    cloudpickle.Pickler, "_function_reduce"
)


def _sources(filenames: set[str], every_file: bool) -> dict[str, list[str]]:
    """The lines of the code in ``filenames``, from this process's linecache: of code without a file to read
    (notebook cells), or, with ``every_file``, of every file (another machine cannot read this one's files)."""
    sources: dict[str, list[str]] = {}
    for name in filenames:
        if name.startswith("<") and name.endswith(">") or not every_file and os.path.isfile(name):
            continue  # no source at all (`python -c`), or a file the other process reads itself
        lines = linecache.getlines(name)
        if lines:
            sources[name] = lines
    return sources


def dumps_function(fn: Any, home: dict[str, Any] | None = None, every_file: bool = False) -> tuple[bytes, dict[str, list[str]]]:
    """See :func:`taskrun.runners.base.dumps_function`."""
    if _CAN_CUSTOMISE:
        buffer = io.BytesIO()
        pickler = _FunctionPickler(buffer, home)
        try:
            pickler.dump(fn)
            return buffer.getvalue(), _sources(pickler.filenames, every_file)
        except Exception:
            if home is None:
                raise
    return cloudpickle.dumps(fn, PROTOCOL), {}


def register_sources(sources: dict[str, list[str]]) -> None:
    """See :func:`taskrun.runners.base.register_sources`."""
    for name, lines in sources.items():
        linecache.cache[name] = (sum(map(len, lines)), None, lines, name)
