"""A spawn or forkserver worker that cannot start says why: its own error, and the fix.

Both classic causes run as real scripts in a child interpreter: a script that calls a task
at import time without ``if __name__ == "__main__":`` (each new worker runs the script again,
and that starts a process during bootstrap), and a script read from stdin (the worker has no
file to run again).
"""

import json
import subprocess
import sys

import pytest
from test_process_runner import _no_child_processes  # noqa: F401

METHODS = ["spawn", "forkserver"]

NO_GUARD = r'''
import json, sys
from taskrun import MultiprocessTaskRun, task

R = MultiprocessTaskRun.configure(start_method=sys.argv[1], max_workers=1)

def double(x):
    return 2 * x

try:
    value = task(runner=R)(double)(21).get_result(timeout=60)
except Exception as exc:
    if __name__ != "__main__":
        raise  # in the worker, re-running this script: the classic uncaught error
    print(json.dumps({"type": type(exc).__name__, "message": str(exc), "exitcode": getattr(exc, "exitcode", None),
                      "cause": getattr(exc.__cause__, "tb_text", None)}))
else:
    print(json.dumps({"value": value}))
'''

FROM_STDIN = r'''
import json, sys
from taskrun import MultiprocessTaskRun, task

R = MultiprocessTaskRun.configure(start_method=sys.argv[1], max_workers=1)

def double(x):
    return 2 * x

if __name__ == "__main__":
    runs = [task(runner=R)(double)(i) for i in range(3)]
    errors = [run.exception(timeout=60) for run in runs]
    print(json.dumps([{"type": type(e).__name__, "message": str(e), "cause": getattr(e.__cause__, "tb_text", None)}
                      for e in errors]))
'''


def last_json_line(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", METHODS)
def test_a_script_without_the_main_guard_gets_the_workers_error_and_the_fix(method, tmp_path):
    script = tmp_path / "no_guard.py"
    script.write_text(NO_GUARD)
    result = subprocess.run([sys.executable, str(script), method], capture_output=True, text=True, timeout=120)
    seen = last_json_line(result)
    assert seen["type"] == "WorkerDied", seen
    message = seen["message"]
    assert "could not start (exit code 1)" in message
    assert "RuntimeError: An attempt has been made to start a new process before the current process has finished " \
           "its bootstrapping phase" in message
    assert 'if __name__ == "__main__":' in message and f'start_method="{method}"' in message
    assert seen["exitcode"] == 1
    assert "RuntimeError" in seen["cause"] and "no_guard.py" in seen["cause"]  # the worker's own traceback


@pytest.mark.parametrize("method", METHODS)
def test_a_script_read_from_stdin_gets_the_workers_error_and_the_fix(method, tmp_path):
    result = subprocess.run([sys.executable, "-", method], input=FROM_STDIN, capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    errors = last_json_line(result)
    assert len(errors) == 3
    for seen in errors:  # every call waiting for a worker ends with the same error, no worker after worker
        assert seen["type"] == "WorkerDied", seen
        assert "could not start (exit code 1): FileNotFoundError" in seen["message"]
        assert "<stdin>" in seen["message"]
        assert "standard input" in seen["message"] and "save the script to a file" in seen["message"]
        assert "FileNotFoundError" in seen["cause"]
