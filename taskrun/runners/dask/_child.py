"""The child process of an isolated ``DaskTaskRun`` attempt (``isolate="process"``).

Run as a script (its folder is then the first entry of ``sys.path``, and ``_outcome`` a
module of its own), so that it imports neither taskrun nor dask unless the task does.
Started by the worker with the number of a pipe's write end as its one argument; reads the
pickled ``(worker's sys.path, function, its source lines, call, logger levels)`` from stdin,
runs the call, and writes frames (``_outcome.frame``) to the pipe: each log record as it is
made (so that the worker has them even if it ends this process), then ``(kind, payload)``
(see ``_outcome.Outcome``). Its own process group, made by the worker, is what a stop ends.
"""

from __future__ import annotations

import linecache
import logging
import os
import pickle
import sys
import threading
from typing import TYPE_CHECKING, Any

import cloudpickle

if TYPE_CHECKING:
    from . import _outcome  # the same file, as type checkers find it
else:
    import _outcome  # beside this script (see above)


class _Pipe:
    """The write end of the pipe to the worker; whole frames, from any thread of the task."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()

    def send(self, item: Any) -> None:
        view = memoryview(_outcome.frame(item))
        with self.lock:
            while view:
                view = view[os.write(self.fd, view):]

    def send_record(self, record: logging.LogRecord) -> None:
        self.send((_outcome.RECORD, _outcome.record_fields(record)))


def main() -> None:
    pipe = _Pipe(int(sys.argv[1]))
    kind: int
    payload: Any
    try:
        path, fn_bytes, sources, call, levels = pickle.loads(sys.stdin.buffer.read())
        sys.path[:] = path
        for name, lines in sources.items():  # as taskrun.runners.base.register_sources does, without importing taskrun
            linecache.cache[name] = (sum(map(len, lines)), None, lines, name)
        _outcome.send_records_to(lambda: pipe.send_record)
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
            while type(value) is _outcome.CoroutineType:  # an async def (that may return a coroutine): run it here
                import asyncio

                value = asyncio.run(value)
        except BaseException as exc:  # noqa: B036 - the task's SystemExit is its outcome
            kind, payload = _outcome.exception_payload(exc)
        else:
            kind, payload = _outcome.value_payload(value)
    pipe.send((_outcome.END, (kind, payload)))
    os.close(pipe.fd)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # threads the task left running must not keep the attempt going


if __name__ == "__main__":
    main()
