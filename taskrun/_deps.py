"""Dependencies: a handle passed as an argument makes the call wait for it and receive its result.

Handles are found in the arguments themselves and, recursively, inside plain lists, tuples,
sets and dicts (dict values). The dependent run waits without blocking anyone: a done
callback on each upstream run counts them down, and the last one to finish substitutes the
results and launches the run from its own thread. If an upstream run fails or is stopped,
the dependent run ends FAILED with :class:`UpstreamFailed` at once and its function never
runs. The ledger computes keys in ``_launch``, so it always sees the resolved values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _run
from .errors import UpstreamFailed

if TYPE_CHECKING:
    from ._run import BaseTaskRun

_CONTAINERS = (list, tuple, dict, set, frozenset)
_GROUP_TYPES: tuple[type, ...] = ()  # RunGroup, set by its module (which imports this one's importer)


def find_upstream(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[BaseTaskRun[Any]] | None:
    """The distinct handles among the arguments (in argument order), or None if there are none."""
    found = _scan((*args, *kwargs.values()) if kwargs else args, None, _run.BaseTaskRun)
    return list(found.values()) if found else None


def _scan(container: Any, found: dict[int, Any] | None, handle_type: type) -> dict[int, Any] | None:
    """Add the handles in ``container`` (and in the plain containers inside it) to ``found``."""
    for value in container.values() if type(container) is dict else container:
        if isinstance(value, handle_type):
            if found is None:
                found = {}
            found[id(value)] = value
        elif type(value) in _CONTAINERS:
            found = _scan(value, found, handle_type)
        elif isinstance(value, _GROUP_TYPES):
            raise TypeError(
                f"an argument is {value!r}, the RunGroup of a map: pass list(group) to make the call wait for "
                "each of its runs and receive their results, or group.results() to wait for them here"
            )
    return found


def _resolve(value: Any) -> Any:
    """``value`` with every handle replaced by its result; containers without handles are kept as they are."""
    if isinstance(value, _run.BaseTaskRun):
        return value.get_result()
    kind = type(value)
    if kind not in _CONTAINERS:
        return value
    if kind is dict:
        items = {k: _resolve(v) for k, v in value.items()}
        changed = any(items[k] is not v for k, v in value.items())
    else:
        items = [_resolve(v) for v in value]
        changed = any(new is not old for new, old in zip(items, value, strict=True))
        if changed and kind is not list:
            items = kind(items)
    return items if changed else value


def _upstream_error(run: BaseTaskRun[Any], upstream: BaseTaskRun[Any]) -> UpstreamFailed:
    cause = upstream.exception(timeout=0)
    if upstream.status is _run.Status.FAILED and cause is not None:
        how = f"failed with {type(cause).__name__}: {cause}"
    else:
        how = f"was {upstream.status.value}"
    exc = UpstreamFailed(f"{run.id} did not run: the run it depends on, {upstream.id}, {how}")
    exc.upstream_id = upstream.id  # type: ignore[attr-defined]
    exc.upstream_status = upstream.status  # type: ignore[attr-defined]
    exc.__cause__ = cause
    return exc


def _ok(upstream: BaseTaskRun[Any]) -> bool:
    # A run answered from the ledger is SUCCEEDED (and cached): it has a result to pass on.
    return upstream.status is _run.Status.SUCCEEDED


def launch_resolved(run: BaseTaskRun[Any]) -> None:
    """Substitute the upstream results into the arguments and launch ``run`` (unless it was stopped meanwhile)."""
    if run._finishing:
        return
    try:
        run.args = _resolve(run.args)
        run.kwargs = {k: _resolve(v) for k, v in run.kwargs.items()} if run.kwargs else run.kwargs
        run._launch()
    except Exception as exc:  # e.g. prepare() rejected the resolved arguments: nobody is there to raise to
        run._conclude(_run.Status.FAILED, exc=exc)


def start_after(run: BaseTaskRun[Any], upstream: list[BaseTaskRun[Any]]) -> None:
    """Launch ``run`` once every upstream run succeeded; end it FAILED as soon as one did not."""
    remaining = [len(upstream)]

    def on_upstream_done(up: BaseTaskRun[Any]) -> None:
        if not _ok(up):
            run._conclude(_run.Status.FAILED, exc=_upstream_error(run, up))
            return
        with run._lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            launch_resolved(run)

    for up in upstream:
        up.add_done_callback(on_upstream_done)


def wait_inline(run: BaseTaskRun[Any], upstream: list[BaseTaskRun[Any]]) -> None:
    """For inline runners: wait for the upstream runs in the caller, then launch (or fail) ``run``."""
    for up in upstream:
        up.wait()
        if not _ok(up):
            run._conclude(_run.Status.FAILED, exc=_upstream_error(run, up))
            return
    run.args = _resolve(run.args)
    run.kwargs = {k: _resolve(v) for k, v in run.kwargs.items()} if run.kwargs else run.kwargs
    run._launch()
