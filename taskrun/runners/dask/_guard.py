"""A script that would start taskrun's local Dask cluster from its top level, outside ``if __name__ == "__main__":``.

Dask starts a local cluster's worker processes with ``spawn``: each first runs the main
script again, and a script that calls tasks as it runs would start a cluster in every
worker, which fails deep in Dask (hundreds of lines of "Nanny failed to start"). Before
starting one, taskrun looks at what the main thread runs: the statement of the main
script it is in, and whether that statement is an ``if`` on ``__name__``.
"""

from __future__ import annotations

import ast
import sys
import threading
from types import FrameType

import dask.config

from ...errors import TaskrunError


def _module_frame(frame: FrameType | None, main_globals: dict[str, object]) -> FrameType | None:
    """The frame of the main script's own top-level code, among ``frame`` and its callers."""
    found = None
    while frame is not None:
        if frame.f_globals is main_globals and frame.f_code.co_name == "<module>":
            found = frame
        frame = frame.f_back
    return found


def _is_name_guard(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and any(
        isinstance(name, ast.Name) and name.id == "__name__" for name in ast.walk(node.test)
    )


def unguarded_line(path: str, line: int) -> bool:
    """True if line ``line`` of the script ``path`` is in a top-level statement that is not an ``if`` on ``__name__``."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, ValueError):
        return False  # nothing to go by: let Dask try
    for node in tree.body:
        end = node.end_lineno if node.end_lineno is not None else node.lineno
        if node.lineno <= line <= end:
            return not _is_name_guard(node)
    return False


def check_main_guard(runner_name: str) -> None:
    """Raise TaskrunError if the main thread is running top-level code of the main script outside
    ``if __name__ == "__main__":`` and Dask would start its worker processes by running that script again."""
    method = dask.config.get("distributed.worker.multiprocessing-method", "spawn")  # pyright: ignore[reportUnknownMemberType]
    if method == "fork":
        return
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not isinstance(path, str):
        return  # python -c, a notebook, the interactive prompt: the workers have no script to run
    frame = sys._current_frames().get(threading.main_thread().ident or 0)  # pyright: ignore[reportPrivateUsage]
    top = _module_frame(frame, vars(main))
    del frame
    if top is None:
        return  # the script has finished its top-level code (at exit), or calls from elsewhere
    line = top.f_lineno
    del top
    if line is None or not unguarded_line(path, line):
        return
    raise TaskrunError(
        f'{runner_name} did not start its local Dask cluster: Dask starts each worker process with "spawn", which '
        f"first runs your main script ({path}) again, and the script calls tasks as it runs (line {line}, outside "
        '`if __name__ == "__main__":`), so every worker would start a cluster of its own. Put the code that '
        'starts tasks under `if __name__ == "__main__":` (as Dask requires), or give address= or client=.'
    )
