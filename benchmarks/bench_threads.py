"""Throughput of tiny calls: ThreadTaskRun against concurrent.futures.ThreadPoolExecutor.

Both get the same ``max_workers`` and the same work: submit N calls of a tiny function,
then collect every result. The best of ``--repeat`` rounds counts for each, and the ratio
taskrun / ThreadPoolExecutor is printed (the target is >= 0.5).

    python benchmarks/bench_threads.py [--n 20000] [--workers 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import time

import taskrun
from taskrun import ThreadTaskRun, task


def inc(x: int) -> int:
    return x + 1


def bench_taskrun(n: int, workers: int) -> float:
    runner = ThreadTaskRun.configure(max_workers=workers)
    tiny = task(runner=runner, name="inc")(inc)
    tiny(0).get_result(timeout=60)  # the pool exists before the clock starts, as the executor's does
    start = time.perf_counter()
    runs = [tiny(i) for i in range(n)]
    results = [run.get_result(timeout=60) for run in runs]
    elapsed = time.perf_counter() - start
    runner.shutdown()
    assert results[-1] == n
    return elapsed


def bench_executor(n: int, workers: int) -> float:
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        pool.submit(inc, 0).result(timeout=60)
        start = time.perf_counter()
        futures = [pool.submit(inc, i) for i in range(n)]
        results = [f.result(timeout=60) for f in futures]
        elapsed = time.perf_counter() - start
    assert results[-1] == n
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="calls per round (default 20000)")
    parser.add_argument("--workers", type=int, default=8, help="max_workers of both pools (default 8)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the best counts (default 3)")
    args = parser.parse_args()

    best_taskrun = best_executor = float("inf")
    for _ in range(args.repeat):  # alternate so that neither gets a warmer machine
        best_taskrun = min(best_taskrun, bench_taskrun(args.n, args.workers))
        best_executor = min(best_executor, bench_executor(args.n, args.workers))
    taskrun.shutdown()

    rate_taskrun = args.n / best_taskrun
    rate_executor = args.n / best_executor
    ratio = rate_taskrun / rate_executor
    print(f"{args.n} tiny calls, max_workers={args.workers}, best of {args.repeat}")
    print(f"  ThreadTaskRun       {rate_taskrun:>10,.0f} tasks/s")
    print(f"  ThreadPoolExecutor  {rate_executor:>10,.0f} tasks/s")
    print(f"  ratio taskrun/TPE   {ratio:10.2f}  (target >= 0.5: {'met' if ratio >= 0.5 else 'NOT met'})")


if __name__ == "__main__":
    main()
