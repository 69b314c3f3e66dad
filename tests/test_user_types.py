"""The types users see: a user's script, type-checked against the installed taskrun by mypy and pyright.

The script lives in a temporary directory (as a user's project would), so the checkers find
taskrun the way they find any installed package: if the install hid it from them, every
revealed type would be ``Any`` and these tests fail. Each checker runs in strict mode and must
report no error; the revealed types are compared with what the README promises.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import subprocess
import sys
import textwrap
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(240)

SCRIPT = textwrap.dedent(
    '''
    from __future__ import annotations

    from taskrun import Ledger, MultiprocessTaskRun, ThreadTaskRun, task


    @task
    def inc(x: int) -> int:
        return x + 1


    @task(retries=2, runner=ThreadTaskRun, ledger=Ledger("runs.db"))
    def add(x: int, y: int = 0) -> int:
        return x + y


    @task
    async def fetch(url: str) -> bytes:
        return url.encode()


    @task(timeout=5)
    async def size(url: str) -> int:
        return len(url)


    Pool = MultiprocessTaskRun.configure(max_workers=2)


    @task(runner=Pool)
    def halve(x: float) -> float:
        return x / 2


    reveal_type(inc(1))  # handle
    reveal_type(inc(1).get_result())  # value
    reveal_type(inc(inc(1)).get_result())  # dependency
    reveal_type(add(inc(1), y=inc(2)).get_result())  # keyword dependency
    reveal_type(inc(1).get_result(raise_exceptions=False))  # value or exception
    reveal_type(Pool)  # runner
    reveal_type(inc.map(range(3)))  # group
    reveal_type(inc.map(range(3)).results())  # results
    reveal_type(inc.map(range(3)).results(raise_exceptions=False))  # results or exceptions
    reveal_type(fetch("u"))  # async handle
    reveal_type(size("u").get_result())  # async value
    reveal_type(halve(1.0).exception())  # exception


    async def main() -> None:
        value = await inc(1)
        reveal_type(value)  # awaited
        length: int = await size.fn("u")  # the coroutine function itself
        total: int = inc.fn(1) + length  # the plain function
        print(total)
        values = await inc.map(range(3))
        reveal_type(values)  # group awaited
    '''
)

#: The revealed type on each commented line, per checker.
EXPECTED = {
    "mypy": {
        "handle": "taskrun._run.BaseTaskRun[int]",
        "value": "int",
        "dependency": "int",
        "keyword dependency": "int",
        "value or exception": "int | BaseException",
        "runner": "type[taskrun.runners.process.MultiprocessTaskRun[Any]]",
        "group": "taskrun._group.RunGroup[int]",
        "results": "list[int]",
        "results or exceptions": "list[int | BaseException]",
        "async handle": "taskrun._run.BaseTaskRun[bytes]",
        "async value": "int",
        "exception": "BaseException | None",
        "awaited": "int",
        "group awaited": "list[int]",
    },
    "pyright": {
        "handle": "BaseTaskRun[int]",
        "value": "int",
        "dependency": "int",
        "keyword dependency": "int",
        "value or exception": "int | BaseException",
        "runner": "type[MultiprocessTaskRun[Any]]",
        "group": "RunGroup[int]",
        "results": "list[int]",
        "results or exceptions": "list[int | BaseException]",
        "async handle": "BaseTaskRun[bytes]",
        "async value": "int",
        "exception": "BaseException | None",
        "awaited": "int",
        "group awaited": "list[int]",
    },
}

#: Mistakes a checker must catch: each line is an error for both.
MISTAKES = textwrap.dedent(
    '''
    from __future__ import annotations

    from taskrun import task


    @task
    def inc(x: int) -> int:
        return x + 1


    text: str = inc(1).get_result()  # MISTAKE: a handle's value has the function's type
    inc.map(range(3)).results()[0].upper()  # MISTAKE: so do a group's results
    inc(1).get_result(raise_exceptions=False) + 1  # MISTAKE: it may be the exception
    task(retries="3")  # MISTAKE: an option of the wrong type
    task(runner=int)  # MISTAKE: a runner is a BaseTaskRun subclass
    '''
)


def _labels(source: str) -> dict[int, str]:
    """Line number -> the label in the comment of each reveal_type line."""
    return {
        number: line.split("#", 1)[1].strip()
        for number, line in enumerate(source.splitlines(), 1)
        if "reveal_type(" in line
    }


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed; it comes with the test extra: pip install -e '.[test]'")


def _run(args: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=200, check=False)


def _mypy(tmp_path: pathlib.Path, source: str) -> subprocess.CompletedProcess[str]:
    _require("mypy")
    (tmp_path / "user.py").write_text(source)
    (tmp_path / "mypy.ini").write_text("[mypy]\n")  # this one, not a config of a folder above
    return _run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--strict", "--no-incremental",
         "--cache-dir", str(tmp_path / ".mypy_cache"), "--python-executable", sys.executable, "user.py"],
        tmp_path,
    )


def _pyright(tmp_path: pathlib.Path, source: str) -> list[dict[str, Any]]:
    _require("pyright")
    (tmp_path / "user.py").write_text(source)
    (tmp_path / "pyrightconfig.json").write_text(json.dumps({"typeCheckingMode": "strict"}))
    done = _run(
        [sys.executable, "-m", "pyright", "-p", "pyrightconfig.json", "--outputjson", "--pythonpath", sys.executable, "user.py"],
        tmp_path,
    )
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"pyright did not report (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    diagnostics: list[dict[str, Any]] = report["generalDiagnostics"]
    return diagnostics


def test_mypy_sees_the_types_a_user_script_uses(tmp_path: pathlib.Path) -> None:
    done = _mypy(tmp_path, SCRIPT)
    revealed: dict[int, str] = {}
    problems = []
    for line in done.stdout.splitlines():
        found = re.match(r'user\.py:(\d+): note: Revealed type is "(.*)"$', line)
        if found:
            revealed[int(found.group(1))] = found.group(2)
        elif ": error:" in line:
            problems.append(line)
    assert not problems, "mypy --strict found errors in the user script:\n" + "\n".join(problems)
    labels = _labels(SCRIPT)
    assert {labels[n]: t for n, t in revealed.items()} == EXPECTED["mypy"], done.stdout


def test_pyright_sees_the_types_a_user_script_uses(tmp_path: pathlib.Path) -> None:
    diagnostics = _pyright(tmp_path, SCRIPT)
    problems = [d for d in diagnostics if d["severity"] != "information"]
    assert not problems, f"pyright (strict) found problems in the user script: {json.dumps(problems, indent=1)}"
    labels = _labels(SCRIPT)
    revealed = {}
    for d in diagnostics:
        found = re.match(r'Type of ".*" is "(.*)"$', str(d["message"]), re.DOTALL)
        assert found, d
        line = d["range"]["start"]["line"] + 1
        revealed[labels[line]] = found.group(1)
    assert revealed == EXPECTED["pyright"]


def _mistake_lines() -> set[int]:
    return {n for n, line in enumerate(MISTAKES.splitlines(), 1) if "# MISTAKE" in line}


def test_mypy_catches_mistakes_in_a_user_script(tmp_path: pathlib.Path) -> None:
    done = _mypy(tmp_path, MISTAKES)
    flagged = {int(m.group(1)) for m in re.finditer(r"^user\.py:(\d+): error:", done.stdout, re.MULTILINE)}
    assert flagged == _mistake_lines(), done.stdout


def test_pyright_catches_mistakes_in_a_user_script(tmp_path: pathlib.Path) -> None:
    diagnostics = _pyright(tmp_path, MISTAKES)
    flagged = {d["range"]["start"]["line"] + 1 for d in diagnostics if d["severity"] == "error"}
    assert flagged == _mistake_lines(), json.dumps(diagnostics, indent=1)
