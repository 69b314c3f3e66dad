"""``progress=True`` in a notebook: tqdm's widget when ipywidgets is there; without it, the text bar and
no warning. The notebook is simulated the way ``tqdm.autonotebook`` recognises one (an ipykernel
shell); tests/test_interrupt.py checks the widget in a real kernel."""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings

import pytest

from taskrun import ThreadTaskRun, task

pytest.importorskip("tqdm", reason="the progress extra (pip install taskrun[progress]) is not installed")
from tqdm.std import TqdmWarning  # noqa: E402

Threads = ThreadTaskRun.configure(max_workers=2)
WAIT = 10


class ZMQInteractiveShell:
    """Stands in for ipykernel's shell: tqdm and taskrun look at its class name."""


TQDM_CHOOSERS = ("tqdm.auto", "tqdm.autonotebook", "tqdm.notebook")  # they decide when first imported


@pytest.fixture
def fresh_tqdm(monkeypatch: pytest.MonkeyPatch):
    """tqdm's notebook modules imported anew in the test, and forgotten after it."""
    for name in TQDM_CHOOSERS:
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield
    for name in TQDM_CHOOSERS:
        sys.modules.pop(name, None)  # then monkeypatch puts back the ones there were before


@pytest.fixture
def in_a_notebook(monkeypatch: pytest.MonkeyPatch, fresh_tqdm: None) -> None:
    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", types.ModuleType("ipykernel.zmqshell"))
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = ZMQInteractiveShell  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", ipython)


@pytest.fixture
def without_ipywidgets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # `import ipywidgets` raises ImportError


def test_in_a_notebook_without_ipywidgets_the_text_bar_shows_and_nothing_warns(
    in_a_notebook: None, without_ipywidgets: None, capfd: pytest.CaptureFixture[str]
) -> None:
    @task(runner=Threads, name="fetch")
    def fetch(x: int) -> int:
        return x

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        group = fetch.map(range(3), progress=True)
        assert group.wait(timeout=WAIT)
    assert not [w for w in caught if issubclass(w.category, TqdmWarning)], [str(w.message) for w in caught]
    err = capfd.readouterr().err
    assert "fetch" in err and "3/3" in err and "succeeded=3" in err


def test_outside_a_notebook_the_text_bar_is_used() -> None:
    from tqdm.std import tqdm

    from taskrun._group import _bar_class

    assert _bar_class() is tqdm


@pytest.mark.skipif(importlib.util.find_spec("ipywidgets") is None, reason="ipywidgets (the progress extra) is not installed")
def test_in_a_notebook_with_ipywidgets_the_bar_is_the_notebook_widget(monkeypatch: pytest.MonkeyPatch, fresh_tqdm: None) -> None:
    import IPython  # the real one: ipywidgets needs it

    from taskrun._group import _bar_class

    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", types.ModuleType("ipykernel.zmqshell"))
    monkeypatch.setattr(IPython, "get_ipython", ZMQInteractiveShell)
    from tqdm.notebook import tqdm as notebook_tqdm

    assert _bar_class() is notebook_tqdm
    monkeypatch.setenv("QT_API", "pyqt5")  # jupyter-qtconsole: a console that shows no widgets
    from tqdm.std import tqdm

    assert _bar_class() is tqdm
