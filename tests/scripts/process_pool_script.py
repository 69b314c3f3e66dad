"""Driven by tests/test_process_lifecycle.py: a program that uses a MultiprocessTaskRun pool.

    python process_pool_script.py MODE START_METHOD DIR [MAX_TASKS_PER_WORKER]

MODE ``block``: start two 60 s calls (each writes ``DIR/pid-<i>`` with its worker's pid),
write ``DIR/ready`` once both run, then block in ``get_result``; the test kills or interrupts
this process. MODE ``fire``: start three calls without waiting for them (each writes
``DIR/done-<i>`` with its pid after 0.3 s) and return from main: the exit must wait for them.
"""

import os
import sys
import time
from pathlib import Path

from taskrun import MultiprocessTaskRun, task


def write_atomic(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def long_call(path):
    write_atomic(path, str(os.getpid()))
    time.sleep(60)


def side_effect(path):
    time.sleep(0.3)
    write_atomic(path, str(os.getpid()))


def main():
    mode, method, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    max_tasks = int(sys.argv[4]) if len(sys.argv) > 4 else None
    runner = MultiprocessTaskRun.configure(start_method=method, max_workers=2, max_tasks_per_worker=max_tasks)
    if mode == "block":
        long = task(runner=runner)(long_call)
        runs = [long(out / f"pid-{i}") for i in range(2)]
        deadline = time.monotonic() + 30
        while not all((out / f"pid-{i}").exists() for i in range(2)):
            if time.monotonic() > deadline:
                sys.exit("the calls never started")
            time.sleep(0.01)
        write_atomic(out / "ready", "1")
        runs[0].get_result()
    elif mode == "fire":
        fire = task(runner=runner)(side_effect)
        for i in range(3):
            fire(out / f"done-{i}")
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
