"""The ledger across processes: reruns in a new process, two processes on one file, a SIGKILL mid-batch.

Each scenario runs a small script with ``sys.executable``. Every execution of a task leaves a
file in ``runs/`` named after its key, its process and a tag, so the tests count executions
instead of trusting what the scripts say about themselves.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

WAIT = 20

SCRIPT = r'''
import json, os, sys, time, uuid
import taskrun
from taskrun import ThreadTaskRun, task

db, outdir, tag = sys.argv[1:4]
keys = json.loads(sys.argv[4])
fail = set(json.loads(sys.argv[5])) if len(sys.argv) > 5 else set()
hold = os.environ.get("HOLD")  # an execution waits until this file exists
go = os.environ.get("GO")  # the calls start once this file exists


def wait_for(path):
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {path}")
        time.sleep(0.005)


@task(runner=ThreadTaskRun.configure(max_workers=4), ledger=db, key=str, name="work")
def work(x):
    open(os.path.join(outdir, f"{x}.{tag}.{os.getpid()}.{uuid.uuid4().hex}"), "w").close()
    if hold:
        wait_for(hold)
    else:
        time.sleep(float(os.environ.get("WORK_SECONDS", "0.005")))
    if x in fail:
        raise ValueError(f"{x} fails")
    return x * x

if go:
    open(os.path.join(outdir, f"ready.{os.getpid()}"), "w").close()
    wait_for(go)
runs = [work(x) for x in keys]
print("returned", flush=True)
out = {}
for run in runs:
    run.wait(60)
    out[str(run.args[0])] = {"status": run.status.value, "cached": run.cached,
                             "result": run.get_result(raise_exceptions=False) if run.status.value != "failed" else None}
print(json.dumps(out), flush=True)
'''


@pytest.fixture
def env(tmp_path):
    script = tmp_path / "batch.py"
    script.write_text(SCRIPT)
    runs = tmp_path / "runs"
    runs.mkdir()
    return {"script": str(script), "db": str(tmp_path / "runs.db"), "runs": runs, "tmp": tmp_path}


def start(env, tag, keys, fail=(), **environ):
    args = [sys.executable, env["script"], env["db"], str(env["runs"]), tag, json.dumps(list(keys)), json.dumps(list(fail))]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **environ})


def finish(proc):
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out.splitlines()[-1])


def executions(env, tag=None):
    """Executions per key (as ints), optionally only those made by the scripts run with ``tag``."""
    counts = {}
    for name in os.listdir(env["runs"]):
        if name.startswith("ready."):
            continue
        key, run_tag, *_ = name.split(".")
        if tag is None or run_tag == tag:
            counts[int(key)] = counts.get(int(key), 0) + 1
    return counts


def wait_until(predicate, what):
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def stored(db, status):
    """Keys with ``status`` in the ledger, read-only (nothing yet while the file or table is missing)."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.OperationalError:
        return set()
    try:
        return {int(k) for (k,) in conn.execute("SELECT key FROM runs WHERE status = ?", (status,))}
    except sqlite3.OperationalError:  # created, tables not yet
        return set()
    finally:
        conn.close()


def test_a_rerun_in_a_new_process_returns_stored_results_without_running(env):
    first = finish(start(env, "first", range(10)))
    assert {k: v["status"] for k, v in first.items()} == {str(x): "succeeded" for x in range(10)}
    second = finish(start(env, "second", range(12)))
    assert executions(env, "first") == {x: 1 for x in range(10)}
    assert executions(env, "second") == {10: 1, 11: 1}
    assert all(second[str(x)] == {"status": "succeeded", "cached": True, "result": x * x} for x in range(10))
    assert second["11"] == {"status": "succeeded", "cached": False, "result": 121}


def test_failed_keys_run_again_in_the_next_process(env):
    first = finish(start(env, "first", range(6), fail=[1, 4]))
    assert [first[str(x)]["status"] for x in range(6)] == ["succeeded", "failed", "succeeded", "succeeded", "failed", "succeeded"]
    assert stored(env["db"], "failed") == {1, 4}
    second = finish(start(env, "second", range(6)))
    assert executions(env, "second") == {1: 1, 4: 1}
    assert [second[str(x)]["result"] for x in range(6)] == [x * x for x in range(6)]
    assert stored(env["db"], "succeeded") == set(range(6))


def test_two_processes_on_one_ledger_run_each_key_exactly_once(env):
    go = env["tmp"] / "go"
    keys = list(range(40))
    procs = [start(env, "a", keys, GO=str(go), WORK_SECONDS="0.01"),
             start(env, "b", keys[::-1], GO=str(go), WORK_SECONDS="0.01")]
    wait_until(lambda: len([n for n in os.listdir(env["runs"]) if n.startswith("ready.")]) == 2, "both processes to be ready")
    go.touch()
    outs = [finish(p) for p in procs]
    assert executions(env) == {x: 1 for x in keys}
    for out in outs:
        assert {k: v["result"] for k, v in out.items()} == {str(x): x * x for x in keys}
    # Both did some of the work, or one waited for the other's keys: either way the other's are cached.
    ran = [sum(not v["cached"] for v in out.values()) for out in outs]
    assert sum(ran) == 40
    assert stored(env["db"], "succeeded") == set(keys)


def test_a_key_another_process_runs_is_waited_for_without_blocking_the_caller(env):
    hold = env["tmp"] / "release"
    holder = start(env, "holder", [7], HOLD=str(hold))
    wait_until(lambda: executions(env, "holder") == {7: 1}, "the first process to run key 7")
    waiter = start(env, "waiter", [7, 8])
    assert waiter.stdout.readline().strip() == "returned"  # task(...) returned while key 7 is held
    wait_until(lambda: executions(env, "waiter") == {8: 1}, "the second process to run key 8")
    hold.touch()
    held, waited = finish(holder), finish(waiter)
    assert held["7"] == {"status": "succeeded", "cached": False, "result": 49}
    assert waited["7"] == {"status": "succeeded", "cached": True, "result": 49}
    assert executions(env) == {7: 1, 8: 1}


def test_a_key_held_by_a_process_that_dies_is_taken_over_by_the_waiting_one(env):
    hold = env["tmp"] / "release"
    holder = start(env, "holder", [3], HOLD=str(hold))
    wait_until(lambda: executions(env, "holder") == {3: 1}, "the first process to run key 3")
    waiter = start(env, "waiter", [3])
    assert waiter.stdout.readline().strip() == "returned"
    holder.send_signal(signal.SIGKILL)
    holder.wait(WAIT)
    hold.touch()  # the waiter's own execution must not wait
    assert finish(waiter)["3"] == {"status": "succeeded", "cached": False, "result": 9}
    assert executions(env) == {3: 2}


def test_a_batch_killed_midway_resumes_and_reruns_no_succeeded_key(env):
    keys = list(range(40))
    victim = start(env, "killed", keys, WORK_SECONDS="0.05")
    wait_until(lambda: len(stored(env["db"], "succeeded")) >= 8, "some keys to succeed")
    victim.send_signal(signal.SIGKILL)
    victim.wait(WAIT)
    done_before = stored(env["db"], "succeeded")
    assert 8 <= len(done_before) < 40
    status = subprocess.run(
        [sys.executable, "-m", "taskrun", "status", env["db"], "--json"], capture_output=True, text=True, timeout=WAIT
    )
    counts = json.loads(status.stdout)["tasks"]["work"]
    assert counts["succeeded"] == len(done_before) and counts["running"] == 0
    assert counts["interrupted"] >= 1  # the calls it was running when killed

    resumed = finish(start(env, "resumed", keys))
    assert {k: v["result"] for k, v in resumed.items()} == {str(x): x * x for x in keys}
    rerun = executions(env, "resumed")
    assert not set(rerun) & done_before
    assert set(rerun) == set(keys) - done_before
    assert all(resumed[str(x)]["cached"] for x in done_before)
    assert stored(env["db"], "succeeded") == set(keys)


def test_a_process_task_can_call_a_ledger_task(tmp_path):
    """The function of a spawn task refers to a ledger task: the ledger goes along as its path."""
    from taskrun import Ledger, MultiprocessTaskRun, ThreadTaskRun, task

    ledger_path = tmp_path / "runs.db"

    @task(ledger=str(ledger_path), runner=ThreadTaskRun, name="square")
    def square(x):
        return x * x

    @task(runner=MultiprocessTaskRun.configure(start_method="spawn", max_workers=1))
    def outer(x):
        return square(x).get_result(30) + 1

    assert outer(3).get_result(60) == 10
    assert Ledger(ledger_path).summary()["square"]["succeeded"] == 1
