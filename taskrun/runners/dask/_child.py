"""The child process of an isolated ``DaskTaskRun`` attempt (``isolate="process"``).

Run as a script (its folder is then the first entry of ``sys.path``, and ``_outcome`` a
module of its own), so that it imports neither taskrun nor dask unless the task does.
Started by the worker with the number of a pipe's write end as its one argument; reads the
pickled ``(worker's sys.path, function, call, logger levels)`` from stdin, runs the call, and writes
``(kind, payload, log records)`` (see ``_outcome.Outcome``) to the pipe. Its own process
group, made by the worker, is what a stop ends.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
from typing import TYPE_CHECKING, Any

import cloudpickle

if TYPE_CHECKING:
    from . import _outcome  # the same file, as type checkers find it
else:
    import _outcome  # beside this script (see above)


class _Keep(logging.Handler):
    def __init__(self, records: list[dict[str, Any]]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append(_outcome.record_fields(record))
        except Exception:
            self.handleError(record)


def main() -> None:
    result_fd = int(sys.argv[1])
    records: list[dict[str, Any]] = []
    kind: int
    payload: Any
    try:
        path, fn_bytes, call, levels = pickle.loads(sys.stdin.buffer.read())
        sys.path[:] = path
        logging.getLogger().addHandler(_Keep(records))
        for name, level in levels.items():
            logging.getLogger(name or None).setLevel(level)
        fn = cloudpickle.loads(fn_bytes)
        args, kwargs = pickle.loads(call)
    except Exception as exc:
        kind, payload = _outcome.UNPICKLABLE, (
            f"the task's function or arguments could not be loaded in its child process: {type(exc).__name__}: {exc}", "")
    else:
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: B036 - the task's SystemExit is its outcome
            kind, payload = _outcome.exception_payload(exc)
        else:
            kind, payload = _outcome.value_payload(value)
    data = pickle.dumps((kind, payload, records or None), _outcome.PROTOCOL)
    view = memoryview(data)
    while view:
        view = view[os.write(result_fd, view):]
    os.close(result_fd)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # threads the task left running must not keep the attempt going


if __name__ == "__main__":
    main()
