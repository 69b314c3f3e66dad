"""A resumable batch: many I/O-like calls, a quota that stops the batch, a progress bar.

Each call "downloads" a page (a short sleep standing in for the network; a few fail
with ConnectionError and are retried). A quota allows only so many downloads per run:
``stop_when`` turns true once it is used up, the calls under way finish, and the rest of
the batch ends STOPPED without running. With a ledger, what succeeded is remembered, so
running the script again skips those calls (they come back ``cached``) and does the rest.

Run it: ``python examples/batch.py`` (twice, to see it resume; ``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import tempfile
import time

import taskrun
from taskrun import Status, ThreadTaskRun, task

PAGES = [f"https://example.org/page/{n}" for n in range(300)]
QUOTA = 200  # downloads allowed per run
LEDGER_PATH = os.path.join(tempfile.gettempdir(), "taskrun-example-batch.db")

downloads = itertools.count(1)  # counts the calls that really started, in this process
used = 0


def fetch(url: str) -> int:
    """Download one page and return its size (simulated: a 10-50 ms wait; 3% of tries fail)."""
    global used
    used = next(downloads)
    time.sleep(random.uniform(0.01, 0.05))
    if random.random() < 0.03:
        raise ConnectionError(f"connection reset while reading {url}")
    return 1000 + len(url) * 10


def quota_used_up() -> bool:
    """The stop condition: checked before each download starts."""
    return used >= QUOTA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="forget what earlier runs did")
    options = parser.parse_args()

    ledger = None
    if hasattr(taskrun, "Ledger"):
        if options.fresh and os.path.exists(LEDGER_PATH):
            os.remove(LEDGER_PATH)
        ledger = taskrun.Ledger(LEDGER_PATH)
    fetch_task = task(
        runner=ThreadTaskRun.configure(max_workers=16),
        retries=2,
        retry_sleep_time=0.01,
        retry_on=ConnectionError,
        ledger=ledger,
        name="fetch",
    )(fetch)

    start = time.monotonic()
    group = fetch_task.map(PAGES, stop_when=quota_used_up, progress=True)
    group.wait()
    summary = group.summary()
    sizes = [run.get_result() for run in group if run.status is Status.SUCCEEDED]  # cached runs too
    print(f"{len(group)} pages in {time.monotonic() - start:.2f} s: "
          f"{summary['succeeded'] - summary['cached']} downloaded, {summary['cached']} already done (cached), "
          f"{summary['failed']} failed, {summary['stopped']} left for later by the quota")
    print(f"{sum(sizes):,} bytes in the {len(sizes)} pages done")
    left = summary["failed"] + summary["stopped"]
    if ledger is None:
        print("(taskrun.Ledger is not available: nothing is remembered between runs)")
    elif left:
        print(f"run it again to do the {left} pages left (ledger: {LEDGER_PATH})")
    else:
        print(f"all done; --fresh starts over (ledger: {LEDGER_PATH})")
    taskrun.shutdown()


if __name__ == "__main__":
    main()
