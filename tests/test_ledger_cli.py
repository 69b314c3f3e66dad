"""``python -m taskrun status``: the table, ``--json``, and clear errors (exit code 2) for bad paths."""

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest

import taskrun
from taskrun import SequentialTaskRun, task


def status(*args, unprivileged=False):
    command = [sys.executable, "-m", "taskrun", "status", *map(str, args)]
    return subprocess.run(as_user(command) if unprivileged else command, capture_output=True, text=True, timeout=30)


def as_user(command):
    """``command`` with file permissions enforced (root drops the capabilities that bypass them)."""
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: file permissions cannot be enforced")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", *command]


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
    assert "does not exist yet" not in result.stderr  # status never makes a ledger: no such advice
    assert (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns) == before


def test_status_of_an_empty_file_reports_no_calls_and_leaves_it_empty(tmp_path):
    path = tmp_path / "empty.db"
    path.touch()
    for args in ([path], [path, "--json"]):
        result = status(*args)
        assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["total"] == 0
    assert path.stat().st_size == 0 and os.listdir(tmp_path) == ["empty.db"]  # not made a ledger


def test_usage_errors_exit_2():
    result = subprocess.run([sys.executable, "-m", "taskrun"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_a_ledger_in_a_directory_that_cannot_be_written_is_readable_by_status_and_refused_by_ledger(tmp_path):
    directory = str(tmp_path / "readonly")
    os.mkdir(directory)
    ledger_path = os.path.join(directory, "runs.db")
    make = (
        "import sys, taskrun\n"
        "@taskrun.task(runner=taskrun.ThreadTaskRun, ledger=sys.argv[1])\ndef one(x): return x\none(1).wait(30)"
    )
    subprocess.run([sys.executable, "-c", make, ledger_path], check=True, timeout=30)  # its process ends: no -wal left
    os.chmod(directory, 0o555)
    try:
        result = status(ledger_path, unprivileged=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[3].split() == ["one", "1", "0", "0", "0", "0", "1"]
        code = "import sys, taskrun\ntry:\n    taskrun.Ledger(sys.argv[1])\nexcept taskrun.LedgerError as e:\n    print(e)"
        opened = subprocess.run(as_user([sys.executable, "-c", code, ledger_path]), capture_output=True, text=True, timeout=30)
        assert f"its directory {directory!r} is not writable" in opened.stdout, opened.stderr
        assert sorted(os.listdir(directory)) == ["runs.db"]
    finally:
        os.chmod(directory, 0o755)


def test_errors_of_several_lines_stay_indented(tmp_path):
    path = str(tmp_path / "runs.db")

    @task(runner=SequentialTaskRun, ledger=path, name="parse")
    def parse(text):
        raise ValueError("bad input\nat line 3")

    parse("x")
    taskrun.shutdown()
    lines = status(path).stdout.splitlines()
    first = lines.index("    ValueError: bad input")
    assert lines[first + 1] == "    at line 3"


def test_a_negative_error_count_is_a_usage_error(ledger_path):
    result = status(ledger_path, "--errors", "-1")
    assert result.returncode == 2
    assert "--errors" in result.stderr and "0 or more" in result.stderr


def test_status_piped_into_a_reader_that_stops_early_exits_quietly(tmp_path):
    """``python -m taskrun status runs.db --json | head -1``: no BrokenPipeError traceback."""
    import subprocess
    import sys

    from taskrun import ThreadTaskRun, task

    path = tmp_path / "runs.db"
    echo = task(runner=ThreadTaskRun, ledger=str(path), name="echo")(lambda x: x)
    assert echo.map(range(20)).wait(30)
    import taskrun

    taskrun.shutdown()
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte is written
    try:
        out = subprocess.run(
            [sys.executable, "-m", "taskrun", "status", str(path), "--json"], stdout=write, stderr=subprocess.PIPE,
            timeout=30,
        )
    finally:
        os.close(write)
    assert b"Traceback" not in out.stderr, out.stderr.decode()
    assert out.returncode == 0
