"""Process runners side by side, one run: taskrun against the pooled peers and woflo.

burst:  start N calls, then collect all results.
serial: call, wait for the result, repeat.
fresh:  a fresh process for every call (taskrun max_tasks_per_worker=1 vs woflo).

Run: python benchmarks/bench_process.py [--burst 5000] [--serial 2000] [--fresh 300]
Peers come from the ``bench`` extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import time

import taskrun
from taskrun import MultiprocessTaskRun, task

WORKERS = 2


def inc(x: int) -> int:
    return x + 1


def rate(n: int, fn) -> float:
    start = time.perf_counter()
    fn(n)
    return n / (time.perf_counter() - start)


def best(n: int, fn, repeat: int) -> float:
    return max(rate(n, fn) for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--burst", type=int, default=5000)
    parser.add_argument("--serial", type=int, default=2000)
    parser.add_argument("--fresh", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    opts = parser.parse_args()
    results: dict[str, dict[str, float]] = {"burst": {}, "serial": {}, "fresh": {}}

    runner = MultiprocessTaskRun.configure(max_workers=WORKERS)
    tinc = task(runner=runner)(inc)
    tinc(0).get_result(60)  # start the workers outside the timing, as every peer gets

    def taskrun_burst(n):
        runs = [tinc(i) for i in range(n)]
        for run in runs:
            run.get_result()

    def taskrun_serial(n):
        for i in range(n):
            tinc(i).get_result()

    results["burst"]["taskrun"] = best(opts.burst, taskrun_burst, opts.repeat)
    results["serial"]["taskrun"] = best(opts.serial, taskrun_serial, opts.repeat)
    fresh = task(runner=MultiprocessTaskRun.configure(max_workers=WORKERS, max_tasks_per_worker=1))(inc)

    def taskrun_fresh(n):
        runs = [fresh(i) for i in range(n)]
        for run in runs:
            run.get_result()

    results["fresh"]["taskrun"] = best(opts.fresh, taskrun_fresh, opts.repeat)
    taskrun.shutdown()

    with cf.ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("fork")) as ex:
        ex.submit(inc, 0).result()
        results["burst"]["ProcessPoolExecutor"] = best(
            opts.burst, lambda n: [f.result() for f in [ex.submit(inc, i) for i in range(n)]], opts.repeat
        )
        results["serial"]["ProcessPoolExecutor"] = best(
            opts.serial, lambda n: [ex.submit(inc, i).result() for i in range(n)], opts.repeat
        )

    with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
        pool.apply(inc, (0,))
        results["burst"]["multiprocessing.Pool"] = best(
            opts.burst, lambda n: [r.get() for r in [pool.apply_async(inc, (i,)) for i in range(n)]], opts.repeat
        )
        results["serial"]["multiprocessing.Pool"] = best(
            opts.serial, lambda n: [pool.apply_async(inc, (i,)).get() for i in range(n)], opts.repeat
        )

    try:
        import pebble
    except ImportError:
        print("pebble not installed: skipped")
    else:
        with pebble.ProcessPool(max_workers=WORKERS) as pool:
            pool.schedule(inc, (0,)).result()
            results["burst"]["pebble"] = best(
                opts.burst, lambda n: [f.result() for f in [pool.schedule(inc, (i,)) for i in range(n)]], opts.repeat
            )
            results["serial"]["pebble"] = best(
                opts.serial, lambda n: [pool.schedule(inc, (i,)).result() for i in range(n)], opts.repeat
            )

    try:
        import loky
    except ImportError:
        print("loky not installed: skipped")
    else:
        ex = loky.get_reusable_executor(max_workers=WORKERS)
        ex.submit(inc, 0).result()
        results["burst"]["loky"] = best(
            opts.burst, lambda n: [f.result() for f in [ex.submit(inc, i) for i in range(n)]], opts.repeat
        )
        results["serial"]["loky"] = best(opts.serial, lambda n: [ex.submit(inc, i).result() for i in range(n)], opts.repeat)
        ex.shutdown(wait=True)

    try:
        import woflo
    except ImportError:
        print("woflo not installed: skipped")
    else:
        import logging

        logging.getLogger("woflo").setLevel(logging.WARNING)
        winc = woflo.task(inc)

        def woflo_fresh(n):
            runs = [winc(i) for i in range(n)]
            for run in runs:
                run.wait()
                run.get_result()

        results["fresh"]["woflo"] = best(opts.fresh, woflo_fresh, opts.repeat)

    print(f"{'scenario':<8} {'runner':<22} {'tasks/s':>10} {'taskrun / it':>13}")
    for scenario, rates in results.items():
        ours = rates["taskrun"]
        for name, value in rates.items():
            ratio = "" if name == "taskrun" else f"{ours / value:12.2f}x"
            print(f"{scenario:<8} {name:<22} {value:>10.0f} {ratio:>13}")


if __name__ == "__main__":
    main()
