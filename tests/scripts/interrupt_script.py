"""A script a user could write: start a long call and a fire-and-forget one, wait for the long one.

Run by tests/test_interrupt.py as ``interrupt_script.py MODE OUT``, MODE one of ``process``,
``thread``, ``group``. The test sends SIGINT (Ctrl-C) once the waited call has started and the
main thread is waiting. The script catches the KeyboardInterrupt, writes what it saw to
``OUT/interrupted.json``, and exits normally: at exit taskrun finishes the fire-and-forget call,
which the test lets end by creating ``OUT/release``.
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

import taskrun
from taskrun import MultiprocessTaskRun, ThreadTaskRun, task

MODE, OUT = sys.argv[1], Path(sys.argv[2])
WAIT = 60


def write(name, text=""):
    tmp = OUT / f"{name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, OUT / name)


def long_call(name):
    """Runs until stopped; a thread task sees stop_requested(), a process task is ended."""
    write(f"started-{name}", str(os.getpid()))
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if taskrun.stop_requested():
            write(f"saw-stop-{name}")
            return "stopped"
        time.sleep(0.01)
    return "ran out of time"


def fire_and_forget(name):
    write(f"started-{name}", str(os.getpid()))
    deadline = time.monotonic() + WAIT
    while not (OUT / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    write(f"done-{name}", str(os.getpid()))
    return 42


def say_when_waiting(is_waiting):
    """Write OUT/waiting once the main thread blocks in the wait (SIGINT must come after that)."""

    def watch():
        deadline = time.monotonic() + WAIT
        while not is_waiting() and time.monotonic() < deadline:
            time.sleep(0.005)
        write("waiting")

    threading.Thread(target=watch, daemon=True).start()


if __name__ == "__main__":
    runner = ThreadTaskRun if MODE == "thread" else MultiprocessTaskRun.configure(max_workers=3, start_method="fork")
    ff = task(runner=runner)(fire_and_forget)("ff")
    record = {}
    try:
        if MODE == "group":
            group = task(runner=runner)(long_call).map([f"g{i}" for i in range(6)], max_concurrency=2)
            say_when_waiting(lambda: group._waiting > group._feeder_waits)  # the feeder waits for room too
            group.results()
        else:
            run = task(runner=runner)(long_call)("w")
            say_when_waiting(lambda: run._waiters)
            run.get_result()
    except KeyboardInterrupt:
        record["interrupted"] = True
    if MODE == "group":
        record["len"] = len(group)
        record["statuses"] = [r.status.value for r in group]
        record["attempts"] = [r.attempts for r in group]
        record["summary"] = group.summary()
    else:
        record["status"] = run.status.value
    record["ff_status"] = ff.status.value
    write("interrupted.json", json.dumps(record))
    # Exit normally: taskrun waits for the fire-and-forget call at exit.
