"""taskrun in one minute: start calls, poll them, let one retry, stop one, read the results.

Run: python examples/quickstart.py
"""

import os
import tempfile
import time

from taskrun import task


@task
def square(x):
    """Runs in a worker process; the call returns a handle at once."""
    time.sleep(0.2)
    return x * x


@task(retries=3, retry_sleep_time=0.1)
def flaky(counter_path):
    """Fails twice, then succeeds: the retries do the rest."""
    with open(counter_path, "a+") as f:
        f.write("x")
        f.seek(0)
        tries = len(f.read())
    if tries < 3:
        raise ConnectionError(f"try {tries}: the server is busy")
    return f"ok on try {tries}"


@task
def forever():
    """Never ends on its own: we stop it."""
    while True:
        time.sleep(0.1)


if __name__ == "__main__":
    runs = [square(i) for i in range(6)]
    print(f"started {len(runs)} calls; finished yet: {runs[0].done()}")  # each takes 0.2 s

    while not all(run.done() for run in runs):  # poll, as you would in a notebook
        time.sleep(0.05)
    print("squares:", [run.get_result() for run in runs])

    with tempfile.TemporaryDirectory() as tmp:
        run = flaky(os.path.join(tmp, "tries"))
        print("flaky:", run.get_result(timeout=30), f"after {run.attempts} attempts")

    run = forever()
    time.sleep(0.3)
    print("stop() ->", run.stop(), "| status:", run.status)
    print("done:", run.done(), "| the error it holds:", repr(run.exception()))
