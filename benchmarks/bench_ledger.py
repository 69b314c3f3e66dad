"""Cost of the ledger on tiny calls, and the speed of calls it answers from stored results.

One run, three phases on ``ThreadTaskRun``, each timed from the first call to the last result:

1. N tiny calls without a ledger;
2. the same N calls with a fresh ledger (every call claimed, run, committed): the ratio
   to phase 1 is printed (target <= 1.5);
3. the same N calls again, now all stored: calls per second (target >= 100,000).

A fourth line times the first cached call of a new process' worth of cache (reading the
task's succeeded keys), for reference.

    python benchmarks/bench_ledger.py [--n 10000] [--workers 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import taskrun
from taskrun import Ledger, ThreadTaskRun, task
from taskrun._ledger import store_for


def inc(x: int) -> int:
    return x + 1


def timed(tiny: taskrun.Task[..., int], n: int) -> float:
    start = time.perf_counter()
    runs = [tiny(i) for i in range(n)]
    results = [run.get_result(timeout=120) for run in runs]
    elapsed = time.perf_counter() - start
    assert results[-1] == n
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="calls per phase (default 10000)")
    parser.add_argument("--workers", type=int, default=8, help="max_workers of the thread pool (default 8)")
    args = parser.parse_args()
    n = args.n
    runner = ThreadTaskRun.configure(max_workers=args.workers)

    plain = task(runner=runner, name="inc")(inc)
    plain(-1).get_result(timeout=60)  # the pool exists before the clock starts
    no_ledger = timed(plain, n)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.db")
        ledger = Ledger(path)
        recorded = task(runner=runner, name="inc", ledger=ledger)(inc)
        recorded(-1).get_result(timeout=60)  # the ledger thread and the task's cache exist too
        with_ledger = timed(recorded, n)
        cached = timed(recorded, n)
        assert ledger.summary()["inc"]["succeeded"] == n + 1

        store_for(ledger).drop_cache(None)  # as a new process finds it: the first call reads the stored keys
        start = time.perf_counter()
        first = recorded(0)
        load = time.perf_counter() - start
        assert first.cached
        taskrun.shutdown()

    print(f"{n} tiny calls, ThreadTaskRun(max_workers={args.workers})")
    print(f"  without a ledger : {no_ledger:7.3f} s  ({n / no_ledger:9,.0f} calls/s)")
    print(f"  with a ledger    : {with_ledger:7.3f} s  ({n / with_ledger:9,.0f} calls/s)"
          f"  ratio {with_ledger / no_ledger:.2f}  (target <= 1.5)")
    print(f"  all cached       : {cached:7.3f} s  ({n / cached:9,.0f} calls/s)  (target >= 100,000)")
    print(f"  first call reading {n + 1} stored keys: {load * 1000:.1f} ms")


if __name__ == "__main__":
    main()
