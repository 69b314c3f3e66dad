"""A small pipeline: extract each day's orders, transform each day, load one report.

Fan-out / fan-in with handles as arguments: ``transform.map(extracted)`` starts one
transform per extract, each waiting for its own extract (not for all of them), and
``load(list(transformed))`` waits for every transform and receives their results. Nothing
blocks until the report is asked for. If a stage fails, what depends on it ends FAILED
with ``UpstreamFailed`` and does not run: try ``--break-day 3``.

Run it: ``python examples/pipeline.py``
"""

from __future__ import annotations

import argparse
import random
import time

import taskrun
from taskrun import ThreadTaskRun, UpstreamFailed, task

IO = ThreadTaskRun.configure(max_workers=8)
BROKEN_DAY: int | None = None


@task(runner=IO)
def extract(day: int) -> list[dict[str, float]]:
    """Read one day's orders (simulated: a short wait, then some rows)."""
    time.sleep(random.uniform(0.05, 0.2))
    if day == BROKEN_DAY:
        raise OSError(f"orders-day{day}.csv is truncated")
    rng = random.Random(day)
    return [{"amount": round(rng.uniform(5, 120), 2), "refund": float(rng.random() < 0.1)} for _ in range(50 + day)]


@task(runner=IO)
def transform(rows: list[dict[str, float]]) -> dict[str, float]:
    """Clean and aggregate one day: refunds do not count as sales."""
    time.sleep(0.05)
    sales = [row["amount"] for row in rows if not row["refund"]]
    return {"orders": len(sales), "revenue": round(sum(sales), 2)}


@task(runner=IO)
def load(days: list[dict[str, float]]) -> str:
    """Combine the days into one report (the "load" stage: here it is written to stdout)."""
    lines = [f"day {n}: {d['orders']:3d} orders, {d['revenue']:9.2f}" for n, d in enumerate(days, 1)]
    total = sum(d["revenue"] for d in days)
    lines.append(f"total: {sum(d['orders'] for d in days):5d} orders, {total:9.2f}")
    return "\n".join(lines)


def main() -> None:
    global BROKEN_DAY
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--break-day", type=int, help="make this day's extract fail")
    options = parser.parse_args()
    BROKEN_DAY = options.break_day

    start = time.monotonic()
    extracted = extract.map(range(1, options.days + 1))  # fan-out: one extract per day
    transformed = transform.map(extracted)  # each transform waits for its own extract
    report = load(list(transformed))  # fan-in: waits for every transform
    print(f"pipeline started in {time.monotonic() - start:.3f} s; waiting for the report...")
    try:
        print(report.get_result(timeout=30))
    except UpstreamFailed as exc:
        print(f"no report: {exc}")
        transformed.wait(timeout=30)  # the other days go on; let them finish
        counts = transformed.summary()
        print(f"transforms: {counts['succeeded']} succeeded, {counts['failed']} failed (not run)")
    elapsed = time.monotonic() - start
    serial = sum(run.duration or 0 for group in (extracted, transformed) for run in group)
    print(f"done in {elapsed:.2f} s ({serial:.2f} s of work ran side by side)")
    taskrun.shutdown()


if __name__ == "__main__":
    main()
