"""What DaskTaskRun adds to plain ``dask.distributed``, on one local cluster, in one run.

Both sides use the same ``LocalCluster`` (2 worker processes, 1 thread each, no dashboard)
and ``pure=False``:

* sequential: N calls one after another, ``noop(i).get_result()`` against
  ``client.submit(noop, i, pure=False).result()``; target: at most 0.3 ms added per call;
* in flight: M calls at once, ``noop.map(range(M))`` (waiting for every result) against
  ``client.map(noop, range(M), pure=False)`` and ``wait``; target: taskrun's throughput at
  least 80% of ``client.map``'s.

Each figure is the best of ``--repeat`` rounds; the two sides alternate within a round so
that machine noise hits them alike. taskrun reads outcomes straight from the workers of a
local cluster, where ``result()`` goes through the scheduler unless the client was made with
``direct_to_workers=True``: ``--direct`` makes it so, for both sides. Needs the extra:
``pip install "taskrun[dask]"``.

    python benchmarks/bench_dask.py [--sequential 500] [--in-flight 5000] [--repeat 3] [--direct]
"""

from __future__ import annotations

import argparse
import time

from distributed import Client, LocalCluster, wait

import taskrun
from taskrun import DaskTaskRun, task


def noop(x: int) -> int:
    return x


def seq_taskrun(fn, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        assert fn(i).get_result() == i
    return time.perf_counter() - start


def seq_dask(client: Client, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        assert client.submit(noop, i, pure=False).result() == i
    return time.perf_counter() - start


def map_taskrun(fn, n: int) -> float:
    start = time.perf_counter()
    group = fn.map(range(n))
    group.wait()
    elapsed = time.perf_counter() - start
    assert group.summary()["succeeded"] == n
    return elapsed


def map_dask(client: Client, n: int) -> float:
    start = time.perf_counter()
    futures = client.map(noop, range(n), pure=False)
    with client.as_current():
        wait(futures)
    elapsed = time.perf_counter() - start
    assert all(f.status == "finished" for f in futures)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=500, help="sequential calls per round (default 500)")
    parser.add_argument("--in-flight", type=int, default=5000, help="calls in flight per round (default 5000)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the best counts (default 3)")
    parser.add_argument("--direct", action="store_true", help="a client with direct_to_workers=True, for both sides")
    args = parser.parse_args()

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      memory_limit="2GiB") as cluster, Client(cluster, set_as_default=False,
                                                             direct_to_workers=args.direct or None) as client:
        fn = task(runner=DaskTaskRun.configure(client=client), name="noop")(noop)
        for i in range(20):  # warm up both sides: connections, the function on every worker
            fn(i).get_result()
            client.submit(noop, i, pure=False).result()
        best = {"seq taskrun": float("inf"), "seq dask": float("inf"), "map taskrun": float("inf"),
                "map dask": float("inf")}
        for _ in range(args.repeat):
            best["seq dask"] = min(best["seq dask"], seq_dask(client, args.sequential))
            best["seq taskrun"] = min(best["seq taskrun"], seq_taskrun(fn, args.sequential))
            best["map dask"] = min(best["map dask"], map_dask(client, args.in_flight))
            best["map taskrun"] = min(best["map taskrun"], map_taskrun(fn, args.in_flight))
        taskrun.shutdown()

    per_call = {name: best[name] / args.sequential * 1e3 for name in ("seq taskrun", "seq dask")}
    added = per_call["seq taskrun"] - per_call["seq dask"]
    print(f"{args.sequential} sequential calls, best of {args.repeat}{', direct_to_workers=True' if args.direct else ''}")
    print(f"  DaskTaskRun  noop(i).get_result()                 {per_call['seq taskrun']:8.3f} ms/call")
    print(f"  Dask         client.submit(noop, i).result()      {per_call['seq dask']:8.3f} ms/call")
    print(f"  added by taskrun: {added:+.3f} ms/call (target <= 0.3 ms: {'met' if added <= 0.3 else 'NOT met'})")
    rates = {name: args.in_flight / best[name] for name in ("map taskrun", "map dask")}
    ratio = rates["map taskrun"] / rates["map dask"]
    print(f"{args.in_flight} calls in flight, best of {args.repeat}")
    print(f"  DaskTaskRun  noop.map(range(n)), wait            {rates['map taskrun']:8,.0f} calls/s")
    print(f"  Dask         client.map(noop, range(n)), wait    {rates['map dask']:8,.0f} calls/s")
    print(f"  ratio taskrun/dask: {ratio:.2f} (target >= 0.8: {'met' if ratio >= 0.8 else 'NOT met'})")


if __name__ == "__main__":
    main()
