"""``python -m taskrun status``: the table, ``--json``, and clear errors (exit code 2) for bad paths."""

import hashlib
import json
import os
import sqlite3
import subprocess
import sys

import pytest

import taskrun
from taskrun import SequentialTaskRun, task


def status(*args):
    command = [sys.executable, "-m", "taskrun", "status", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


@pytest.fixture
def ledger_path(tmp_path):
    """A real ledger: 7 successes and 3 failures of `check`, 2 successes of `other`."""
    path = str(tmp_path / "runs.db")

    @task(runner=SequentialTaskRun, ledger=path, key=str, name="check")
    def check(x):
        if x % 3 == 0:
            raise ValueError(f"{x} is divisible by 3")
        return x

    @task(runner=SequentialTaskRun, ledger=path, name="other")
    def other(x):
        return x

    for x in range(1, 11):
        check(x)
    other(1)
    other(2)
    taskrun.shutdown()
    return path


def test_status_prints_counts_per_task_and_the_last_errors(ledger_path):
    result = status(ledger_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{ledger_path}: 12 calls of 2 tasks"
    assert lines[2].split() == ["task", "succeeded", "failed", "stopped", "running", "interrupted", "total"]
    assert lines[3].split() == ["check", "7", "3", "0", "0", "0", "10"]
    assert lines[4].split() == ["other", "2", "0", "0", "0", "0", "2"]
    assert "Last errors:" in result.stdout
    assert "ValueError: 9 is divisible by 3" in result.stdout
    assert "call: check(9)" in result.stdout


def test_status_json_is_for_scripts(ledger_path):
    result = status(ledger_path, "--json", "--errors", "2")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ledger"] == os.path.abspath(ledger_path)
    assert data["total"] == 12
    assert data["tasks"]["check"] == {"succeeded": 7, "failed": 3, "stopped": 0, "running": 0, "interrupted": 0, "total": 10}
    assert [e["key"] for e in data["last_errors"]] == ["9", "6"]
    assert data["last_errors"][0]["error_type"] == "ValueError"
    assert "raise ValueError" in data["last_errors"][0]["traceback"]


def test_status_of_an_empty_ledger(tmp_path):
    path = tmp_path / "new.db"
    taskrun.Ledger(path)
    result = status(path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"{path}: no calls recorded yet"


def test_status_of_a_missing_file_is_an_error_and_creates_nothing(tmp_path):
    result = status(tmp_path / "missing.db")
    assert result.returncode == 2
    assert "no ledger at" in result.stderr and "missing.db" in result.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind", ["random", "foreign"])
def test_status_of_a_file_that_is_not_a_ledger_is_an_error_and_leaves_it_alone(tmp_path, kind):
    path = tmp_path / "data.db"
    if kind == "random":
        path.write_bytes(b"\x00\x01not sqlite at all" * 100)
    else:
        conn = sqlite3.connect(path)
        with conn:
            conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
        conn.close()
    before = hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns
    result = status(path)
    assert result.returncode == 2
    assert "data.db" in result.stderr and "not a taskrun ledger" in result.stderr
    assert (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns) == before


def test_usage_errors_exit_2():
    result = subprocess.run([sys.executable, "-m", "taskrun"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "usage:" in result.stderr
