"""Throughput of ``map`` over tiny calls: taskrun's runners against the standard library pools.

Run: ``python benchmarks/bench_map.py [--n 20000] [--repeat 3]``. Every contender uses 2
workers, pools are warmed up first, and each figure is the best of ``--repeat`` rounds
(contenders alternate within a round, so machine noise hits them alike). Targets: the
thread runner's map >= 0.5x ``ThreadPoolExecutor.map``; the process runner's map >= 2x
``Pool.imap`` and >= 5x ``ProcessPoolExecutor.map``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import taskrun
from taskrun import ThreadTaskRun, task

WORKERS = 2


def tiny(x: int) -> int:
    """The work: next to nothing, so what is measured is the per-call overhead."""
    return x + 1


def best_rates(contenders: dict[str, Callable[[int], list[int]]], n: int, repeat: int) -> dict[str, float]:
    """Calls per second of each contender (best of ``repeat`` alternating rounds), checking every result."""
    expected = [tiny(i) for i in range(n)]
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(repeat):
        for name, fn in contenders.items():
            start = time.perf_counter()
            result = fn(n)
            elapsed = time.perf_counter() - start
            if result != expected:
                raise AssertionError(f"{name} returned wrong results")
            best[name] = min(best[name], elapsed)
    return {name: n / elapsed for name, elapsed in best.items()}


def report(title: str, rates: dict[str, float], ours: str, targets: dict[str, float | None]) -> None:
    print(f"\n{title}")
    for name, rate in rates.items():
        print(f"  {name:<34} {rate:>10,.0f} calls/s")
    for other, target in targets.items():
        ratio = rates[ours] / rates[other]
        if target is None:
            print(f"  {ours} / {other}: {ratio:.2f}x (for reference: chunked, no per-call handle)")
        else:
            verdict = "ok" if ratio >= target else "BELOW TARGET"
            print(f"  {ours} / {other}: {ratio:.2f}x (target >= {target:g}x) {verdict}")


def bench_threads(n: int, repeat: int) -> None:
    tiny_thread = task(runner=ThreadTaskRun.configure(max_workers=WORKERS), name="tiny")(tiny)
    with ThreadPoolExecutor(WORKERS) as executor:
        contenders = {
            "taskrun ThreadTaskRun map": lambda n: tiny_thread.map(range(n)).results(),
            "ThreadPoolExecutor.map": lambda n: list(executor.map(tiny, range(n))),
        }
        best_rates(contenders, 1000, 1)  # warm up: threads started
        rates = best_rates(contenders, n, repeat)
    report(f"threads: {n:,} tiny calls, {WORKERS} workers", rates, "taskrun ThreadTaskRun map", {"ThreadPoolExecutor.map": 0.5})


def bench_processes(n: int, repeat: int) -> None:
    try:
        from taskrun import MultiprocessTaskRun  # type: ignore[attr-defined]
    except ImportError:
        print(f"\nprocesses: {n:,} tiny calls: skipped (taskrun.MultiprocessTaskRun is not available)")
        return
    tiny_process = task(runner=MultiprocessTaskRun.configure(max_workers=WORKERS), name="tiny")(tiny)
    with multiprocessing.Pool(WORKERS) as pool, ProcessPoolExecutor(WORKERS) as executor:
        contenders = {
            "taskrun MultiprocessTaskRun map": lambda n: tiny_process.map(range(n)).results(),
            "multiprocessing.Pool.imap": lambda n: list(pool.imap(tiny, range(n))),
            "multiprocessing.Pool.map": lambda n: pool.map(tiny, range(n)),
            "ProcessPoolExecutor.map": lambda n: list(executor.map(tiny, range(n))),
        }
        best_rates(contenders, 200, 1)  # warm up: workers started
        rates = best_rates(contenders, n, repeat)
    report(
        f"processes: {n:,} tiny calls, {WORKERS} workers",
        rates,
        "taskrun MultiprocessTaskRun map",
        {"multiprocessing.Pool.imap": 2, "ProcessPoolExecutor.map": 5, "multiprocessing.Pool.map": None},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="calls per contender (default 20000)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the best is reported (default 3)")
    parser.add_argument("--only", choices=("threads", "processes"), help="run one part only")
    options = parser.parse_args()
    try:
        if options.only != "processes":
            bench_threads(options.n, options.repeat)
        if options.only != "threads":
            bench_processes(options.n, options.repeat)
    finally:
        taskrun.shutdown()


if __name__ == "__main__":
    main()
