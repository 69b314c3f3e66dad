"""What ``import taskrun`` costs on top of a bare interpreter (the target is at most 30 ms).

Each measurement is a fresh ``python -X importtime -c "import taskrun"``; the figure is the
median of ``--repeat`` runs of the cumulative time Python reports for ``taskrun``. It is
given twice: with the bytecode cache in place (the usual case after the first import), and
compiled from source (``PYTHONDONTWRITEBYTECODE`` with no cache, as in some CI sandboxes).
What ``import taskrun`` must not import (multiprocess, asyncio, sqlite3, cloudpickle) is
checked by ``tests/test_import_cost.py``.

    python benchmarks/bench_import.py [--repeat 21]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import taskrun

PACKAGE = os.path.dirname(taskrun.__file__)


def import_ms(env: dict[str, str]) -> float:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import taskrun"], capture_output=True, text=True, env=env, check=True
    ).stderr
    line = [row for row in out.splitlines() if row.rstrip().endswith("| taskrun")][-1]
    return int(line.split("|")[1]) / 1000


def median_ms(env: dict[str, str], repeat: int) -> float:
    return statistics.median(import_ms(env) for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    cached = dict(os.environ)
    cached.pop("PYTHONDONTWRITEBYTECODE", None)
    with tempfile.TemporaryDirectory() as prefix:
        cached["PYTHONPYCACHEPREFIX"] = prefix  # our own cache, written by the first run
        import_ms(cached)
        warm = median_ms(cached, args.repeat)
    source = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    source.pop("PYTHONPYCACHEPREFIX", None)
    with tempfile.TemporaryDirectory() as empty:
        source["PYTHONPYCACHEPREFIX"] = empty  # no cache to read: every module is compiled
        cold = median_ms(source, args.repeat)
        shutil.rmtree(empty, ignore_errors=True)
    print(f"import taskrun, bytecode cached:     {warm:6.1f} ms  (target <= 30 ms)")
    print(f"import taskrun, compiled from source: {cold:6.1f} ms")


if __name__ == "__main__":
    main()
