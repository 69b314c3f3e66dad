"""The soak, short: a few thousand calls through the process and thread runners with random faults.

It runs ``benchmarks/soak.py`` in a process of its own, so that its counts of fds, threads,
child processes and memory start from a clean process, and checks the figures it reports:
every call ended in the state its plan and the faults it met give, each ledger key that
succeeded ran once and reads back, and nothing leaked (see the module docstring of
``benchmarks/soak.py``). The plan is seeded (``TASKRUN_SOAK_SEED``, printed); which faults
happen is random, what each must lead to is not. ``python benchmarks/soak.py --calls 200000``
is the long run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"
SEED = int(os.environ.get("TASKRUN_SOAK_SEED", "1329"))
CALLS = int(os.environ.get("TASKRUN_SOAK_CALLS", "2500"))
#: RSS the soak process may gain between the end of its warm-up and its end, both sampled at
#: rest. It does not grow at all when nothing leaks; one leaked handle per call would be ~5 MB.
RSS_LIMIT_MB = 4

#: Every kind of call and every fault the driver injects happens at least once with this seed.
KINDS = {
    "ok", "sleep_ok", "raise_fatal", "raise_flaky", "flaky_then_ok", "unpicklable_result", "unpicklable_exc", "big",
    "exit", "victim", "victim_then_ok", "stop_running", "hang", "hang_then_ok",
}
ACTIONS = {"stop_now", "stop_later", "stop_running", "group_stop", "quota_groups", "shutdown", "sigkill"}


@pytest.mark.timeout(240)
def test_soak():
    args = [
        sys.executable, str(SOAK), "--calls", str(CALLS), "--seed", str(SEED), "--json", "--shutdown-every", "1000",
        "--ledger-every", "0", "--ledger-keys", "100", "--stall", "60", "--rss-limit-mb", str(RSS_LIMIT_MB),
    ]
    print(f"soak seed {SEED} (TASKRUN_SOAK_SEED={SEED} reruns this plan)")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=220)
    print(proc.stdout)
    print(proc.stderr[-5000:])
    lines = proc.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("{"), f"the soak did not finish (exit code {proc.returncode})"
    figures = json.loads(lines[-1])

    assert figures["problems"] == []
    assert figures["problem_count"] == 0 and proc.returncode == 0
    assert figures["calls"] >= CALLS
    assert set(figures["kinds"]) == KINDS
    assert ACTIONS <= set(figures["actions"])
    assert figures["faults"] > CALLS // 5
    assert figures["leaks"] == {"fds": 0, "threads": 0, "taskrun threads": 0, "child processes": 0}
    assert figures["live_handles"] == 0
    assert figures["rss_end"] - figures["rss_warm"] <= RSS_LIMIT_MB << 20
    ledger = figures["ledger"]
    assert ledger["rounds"] == 1 and ledger["succeeded once"] > 50 and ledger["failed twice"] > 0
    assert ledger["stopped here, ran in the peer"] > 0
