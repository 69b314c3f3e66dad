"""``import taskrun`` is cheap: what a call needs is imported when a call needs it."""

import subprocess
import sys

HEAVY = ["multiprocess", "cloudpickle", "dill", "asyncio", "sqlite3", "inspect", "dataclasses", "tqdm", "dask"]


def test_import_taskrun_leaves_the_heavy_modules_for_later() -> None:
    code = (  # only what taskrun adds: under coverage, coverage itself has imported some of these
        "import sys; before = set(sys.modules); import taskrun; "
        f"print([m for m in {HEAVY!r} if m in sys.modules and m not in before])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", f"import taskrun imported {out.stdout.strip()}"


def test_the_lazy_names_are_there_when_asked_for() -> None:
    code = (
        "import sys, taskrun\n"
        "assert 'multiprocess' not in sys.modules\n"
        "from taskrun import MultiprocessTaskRun, AsyncTaskRun, Ledger, RunRecord\n"
        "assert 'multiprocess' in sys.modules and 'sqlite3' in sys.modules\n"
        "assert MultiprocessTaskRun is taskrun.runners.MultiprocessTaskRun\n"
        "assert set(taskrun.__all__) <= set(dir(taskrun))\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
