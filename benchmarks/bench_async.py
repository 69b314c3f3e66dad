"""Async tasks: ``AsyncTaskRun`` against ``asyncio.gather`` under a ``Semaphore``, and against threads.

Run: ``python benchmarks/bench_async.py [--n 20000] [--sleeps 5000] [--repeat 1]``. Two parts:

* overhead: ``--n`` no-op coroutines through ``AsyncTaskRun.map(...).results()`` against the
  same coroutines in ``asyncio.gather`` under an ``asyncio.Semaphore`` of the runner's
  ``max_concurrency`` (1,000), timed inside a running loop. Each taskrun call keeps its own
  handle, retry loop and outcome; the target is at most 2x the time of gather.
* sleeps: ``--sleeps`` calls of ``await asyncio.sleep(0.05)`` through ``AsyncTaskRun.map``
  against ``time.sleep(0.05)`` through ``ThreadTaskRun.map`` with 64 threads; the target is
  the async batch at least 10x faster.

The loop thread and the thread pool are started before the clock starts. Each figure is the
best of ``--repeat`` rounds (one by default).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import taskrun
from taskrun import AsyncTaskRun, ThreadTaskRun, task

CONCURRENCY = 1000  # AsyncTaskRun's default max_concurrency, and the gather's semaphore
SLEEP = 0.05
THREADS = 64


async def noop(x: int) -> int:
    """The work: nothing, so what is measured is the cost of a call."""
    return x


async def nap(x: int) -> int:
    await asyncio.sleep(SLEEP)
    return x


def thread_nap(x: int) -> int:
    time.sleep(SLEEP)
    return x


def time_gather(n: int) -> tuple[float, float]:
    """Wall and CPU seconds (every thread of the process) of n no-op coroutines in gather under a Semaphore."""

    async def main() -> tuple[float, float]:
        semaphore = asyncio.Semaphore(CONCURRENCY)

        async def bounded(x: int) -> int:
            async with semaphore:
                return await noop(x)

        start, cpu = time.perf_counter(), time.process_time()
        results = await asyncio.gather(*(bounded(i) for i in range(n)))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        assert results == list(range(n))
        return elapsed, cpu

    return asyncio.run(main())


def time_map(tiny: taskrun.Task, n: int) -> tuple[float, float]:
    """Wall and CPU seconds of ``tiny.map(range(n)).results()``."""
    start, cpu = time.perf_counter(), time.process_time()
    results = tiny.map(range(n)).results(timeout=600)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert results == list(range(n)), "wrong results"
    return elapsed, cpu


def best(fn, repeat: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    return min(fn() for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="no-op coroutines (default 20000)")
    parser.add_argument("--sleeps", type=int, default=5_000, help="calls of a 0.05 s sleep (default 5000)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the best is reported (default 1)")
    options = parser.parse_args()
    n, sleeps, repeat = options.n, options.sleeps, options.repeat
    try:
        tiny = task(runner=AsyncTaskRun, name="noop")(noop)
        napping = task(runner=AsyncTaskRun, name="nap")(nap)
        thread_napping = task(runner=ThreadTaskRun.configure(max_workers=THREADS), name="thread_nap")(thread_nap)
        time_map(tiny, 100)  # warm up: the loop thread started
        time_map(thread_napping, THREADS)  # and the 64 threads

        ours, our_cpu = best(lambda: time_map(tiny, n), repeat)
        theirs, their_cpu = best(lambda: time_gather(n), repeat)
        ratio = ours / theirs
        print(f"overhead: {n:,} no-op coroutines, max_concurrency {CONCURRENCY}, best of {repeat}")
        print(f"  AsyncTaskRun map + results()      {n / ours:>10,.0f} calls/s  {ours / n * 1e6:5.1f} us/call"
              f"  ({our_cpu / n * 1e6:5.1f} us CPU/call)")
        print(f"  asyncio.gather under a Semaphore  {n / theirs:>10,.0f} calls/s  {theirs / n * 1e6:5.1f} us/call"
              f"  ({their_cpu / n * 1e6:5.1f} us CPU/call)")
        print(f"  time AsyncTaskRun / gather: {ratio:.2f}x (target <= 2x) {'ok' if ratio <= 2 else 'ABOVE TARGET'};"
              f" CPU time: {our_cpu / their_cpu:.2f}x")

        ours = best(lambda: time_map(napping, sleeps), repeat)[0]
        theirs = best(lambda: time_map(thread_napping, sleeps), repeat)[0]
        speedup = theirs / ours
        print(f"\nsleeps: {sleeps:,} calls sleeping {SLEEP} s, best of {repeat}")
        print(f"  AsyncTaskRun map (await asyncio.sleep)     {ours:6.2f} s  {sleeps / ours:>10,.0f} calls/s")
        print(f"  ThreadTaskRun map, {THREADS} threads (time.sleep) {theirs:6.2f} s  {sleeps / theirs:>10,.0f} calls/s")
        verdict = "ok" if speedup >= 10 else "BELOW TARGET"
        print(f"  speed-up AsyncTaskRun / ThreadTaskRun: {speedup:.1f}x (target >= 10x) {verdict}")
    finally:
        taskrun.shutdown()


if __name__ == "__main__":
    main()
