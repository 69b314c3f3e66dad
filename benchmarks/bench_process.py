"""Process runners side by side, one run: taskrun against the pooled peers and woflo.

burst:  start N calls, then collect all results.
serial: call, wait for the result, repeat.
fresh:  a fresh process for every call (taskrun max_tasks_per_worker=1 vs woflo); the last
        line prints what a bare fork of this process costs, the most forks per second it allows.

Every contender runs once per round, rounds interleave, and the best round counts, so
load from elsewhere on the machine hits every contender alike. Pools are started before
timing. Run: python benchmarks/bench_process.py [--burst 5000] [--serial 2000] [--fresh 300]
Peers come from the ``bench`` extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import gc
import logging
import multiprocessing
import os
import resource
import time
from collections.abc import Callable
from typing import Any

import taskrun
from taskrun import MultiprocessTaskRun, task

WORKERS = 2


def inc(x: int) -> int:
    return x + 1


def burst(submit: Callable[[int], Any], result: Callable[[Any], Any]) -> Callable[[int], None]:
    def run(n: int) -> None:
        handles = [submit(i) for i in range(n)]
        for handle in handles:
            result(handle)

    return run


def serial(submit: Callable[[int], Any], result: Callable[[Any], Any]) -> Callable[[int], None]:
    def run(n: int) -> None:
        for i in range(n):
            result(submit(i))

    return run


def fork_ceiling(n: int = 200) -> tuple[float, float]:
    """CPU seconds of a bare ``os.fork()`` + ``os._exit(0)`` of this process: (parent side, child side).

    A runner that forks this process for each call (woflo) pays at least this per call, whatever
    runs in it: with C cores it starts at most C / total processes per second. taskrun forks a
    smaller process instead (its pool's worker, forked when the pool started).
    """
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    parent_before = time.process_time()
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    parent = (time.process_time() - parent_before) / n
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = (
        children_after.ru_utime + children_after.ru_stime - children_before.ru_utime - children_before.ru_stime
    ) / n
    return parent, child


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--burst", type=int, default=5000)
    parser.add_argument("--serial", type=int, default=2000)
    parser.add_argument("--fresh", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    sizes = {"burst": opts.burst, "serial": opts.serial, "fresh": opts.fresh}
    contenders: dict[str, dict[str, Callable[[int], None]]] = {"burst": {}, "serial": {}, "fresh": {}}
    closers: list[Callable[[], Any]] = []

    def pooled(name: str, submit: Callable[[int], Any], result: Callable[[Any], Any]) -> None:
        contenders["burst"][name] = burst(submit, result)
        contenders["serial"][name] = serial(submit, result)

    tinc = task(runner=MultiprocessTaskRun.configure(max_workers=WORKERS))(inc)
    tinc(0).get_result(60)
    get = lambda run: run.get_result()  # noqa: E731
    pooled("taskrun", tinc, get)
    fresh = task(runner=MultiprocessTaskRun.configure(max_workers=WORKERS, max_tasks_per_worker=1))(inc)
    fresh(0).get_result(60)
    contenders["fresh"]["taskrun"] = burst(fresh, get)
    closers.append(taskrun.shutdown)

    fork = multiprocessing.get_context("fork")
    ppe = cf.ProcessPoolExecutor(WORKERS, mp_context=fork)
    ppe.submit(inc, 0).result()
    pooled("ProcessPoolExecutor", lambda i: ppe.submit(inc, i), lambda f: f.result())
    closers.append(ppe.shutdown)

    mp_pool = fork.Pool(WORKERS)
    mp_pool.apply(inc, (0,))
    pooled("multiprocessing.Pool", lambda i: mp_pool.apply_async(inc, (i,)), lambda r: r.get())
    closers.append(mp_pool.terminate)

    try:
        import pebble
    except ImportError:
        print("pebble not installed: skipped")
    else:
        pebble_pool = pebble.ProcessPool(max_workers=WORKERS)
        pebble_pool.schedule(inc, (0,)).result()
        pooled("pebble", lambda i: pebble_pool.schedule(inc, (i,)), lambda f: f.result())
        closers.append(pebble_pool.stop)

    try:
        import loky
    except ImportError:
        print("loky not installed: skipped")
    else:
        loky_ex = loky.get_reusable_executor(max_workers=WORKERS)
        loky_ex.submit(inc, 0).result()
        pooled("loky", lambda i: loky_ex.submit(inc, i), lambda f: f.result())
        closers.append(loky_ex.shutdown)

    try:
        import woflo
    except ImportError:
        print("woflo not installed: skipped")
    else:
        logging.getLogger("woflo").setLevel(logging.WARNING)
        winc = woflo.task(inc)

        def woflo_result(run: Any) -> Any:
            run.wait()
            return run.get_result()

        contenders["fresh"]["woflo"] = burst(winc, woflo_result)

    best: dict[str, dict[str, float]] = {scenario: {} for scenario in contenders}
    for _ in range(opts.rounds):
        for scenario, runners in contenders.items():
            n = sizes[scenario]
            for name, run in runners.items():
                gc.collect()
                start = time.perf_counter()
                run(n)
                rate = n / (time.perf_counter() - start)
                best[scenario][name] = max(rate, best[scenario].get(name, 0.0))

    for close in closers:
        close()
    fork_parent, fork_child = fork_ceiling()

    print(f"{WORKERS} workers, best of {opts.rounds} interleaved rounds")
    print(f"{'scenario':<8} {'runner':<22} {'tasks/s':>10} {'taskrun / it':>13}")
    for scenario, rates in best.items():
        ours = rates["taskrun"]
        for name, value in rates.items():
            ratio = "" if name == "taskrun" else f"{ours / value:12.2f}x"
            print(f"{scenario:<8} {name:<22} {value:>10.0f} {ratio:>13}")
    cores = os.cpu_count() or 1
    ceiling = cores / (fork_parent + fork_child)
    print(
        f"fresh ceiling: a bare fork + _exit of this process costs {fork_parent * 1e6:.0f} us (parent) + "
        f"{fork_child * 1e6:.0f} us (child) of CPU: {cores} cores fork it at most {ceiling:.0f} times/s "
        "(fresh rates as a share of that: "
        + ", ".join(f"{name} {rate / ceiling:.0%}" for name, rate in best["fresh"].items())
        + ")"
    )


if __name__ == "__main__":
    main()
