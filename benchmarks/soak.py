"""Soak: many calls through the process and thread runners with random faults mixed in.

Every call's argument is its plan: return a small value, sleep, raise an exception that is
retried or one that is not, outlive its timeout, return something that cannot be pickled,
return several MB, exit its worker or be SIGKILLed in it, block until the driver stops it.
The driver also stops calls at random moments (at once, after a random delay, while they
run), stops whole ``map`` groups, ends groups with a ``stop_when`` quota and shuts taskrun
down under running calls. Since each call's final state follows from its plan, the soak
checks every run: it ends in one final state, the one its cause gives (status, exception
type, attempts, value), its done callback runs once and saw that state, ``done()``/``wait()``
agree, and a late ``stop()`` changes nothing. Ledger rounds run keyed calls on one ledger file
from this process and a second one at once, and check that each key that succeeded ran once
and reads back. At the end no file descriptor, thread, child process or handle is left over
and the process's RSS stayed flat after the warm-up.

    python benchmarks/soak.py --calls 200000 [--seed N] [--runners process,thread,spawn]

A ledger round starts its second process with ``subprocess.Popen`` only while no call is in
flight: a fork pool's thread that forks a worker while Popen makes its pipes gives the worker
their write ends, and Popen (or ``communicate()``) then waits for as long as that worker lives.

It needs psutil (``pip install -e '.[test]'``). ``tests/test_soak.py`` runs a short soak.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import json
import os
import queue
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import psutil

import taskrun
from taskrun import (
    BaseTaskRun,
    Ledger,
    MultiprocessTaskRun,
    SerializationError,
    Status,
    TaskStopped,
    TaskTimeout,
    ThreadTaskRun,
    WorkerDied,
    task,
)

#: The longest a hanging call waits to be ended (a timeout, a stop, a SIGKILL) before it gives up and fails.
HANG_CAP = 120.0
#: Seconds without any call finishing after which the soak reports a hang, naming the calls in flight.
STALL = 90.0
#: Timeout of the "timed" tasks: generous, so that a quick call never times out on a busy machine.
TIMEOUT = 0.5


class Flaky(Exception):
    """A failure the soak's tasks retry."""


class Fatal(Exception):
    """A failure they do not retry."""


class SoakError(AssertionError):
    """The soak found a hang or a broken invariant."""


# ---- what a call does: the task bodies (module level, so every start method can run them) --------


def value_of(call_id: int) -> int:
    return call_id * 7 + 3


def big_value(call_id: int, size: int) -> bytes:
    unit = call_id.to_bytes(8, "little")
    return (unit * (size // 8 + 1))[:size]


def ledger_value(key: str) -> str:
    return f"value of {key}"


def _count_attempt(ctl: str, name: str) -> int:
    """Count one more attempt of ``name`` (across threads and processes); returns the count so far."""
    path = os.path.join(ctl, "attempts", name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, b".")
    finally:
        os.close(fd)
    return os.stat(path).st_size


def _announce(ctl: str, call_id: int, action: str) -> None:
    """Tell the driver (through its FIFO) that call ``call_id`` is running here and wants ``action``."""
    fd = os.open(os.path.join(ctl, "fifo"), os.O_WRONLY)
    try:
        os.write(fd, f"{call_id} {action} {os.getpid()} {time.time()}\n".encode())
    finally:
        os.close(fd)


def _log_execution(ctl: str, key: str, event: str) -> None:
    fd = os.open(os.path.join(ctl, "executions.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{key} {os.getpid()} {event}\n".encode())
    finally:
        os.close(fd)


def _hang() -> None:
    """Block until the run is stopped or timed out (a thread task polls for it; a process task is killed)."""
    deadline = time.monotonic() + HANG_CAP
    while not taskrun.stop_requested():
        if time.monotonic() > deadline:
            raise RuntimeError("soak: a hanging call was never ended")
        time.sleep(0.002)


class _Unpicklable(Fatal):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def soak_call(call_id: int, kind: str, param: int, ctl: str) -> Any:
    """One call of the soak: does what ``kind`` says (see ``expected``)."""
    if kind == "ok":
        return value_of(call_id)
    if kind == "sleep_ok":
        time.sleep(param / 1000)
        return value_of(call_id)
    if kind == "raise_fatal":
        raise Fatal(f"call {call_id} fails")
    if kind == "raise_flaky":
        raise Flaky(f"call {call_id} fails every time")
    if kind == "flaky_then_ok":
        if _count_attempt(ctl, str(call_id)) <= param:
            raise Flaky(f"call {call_id} fails this time")
        return value_of(call_id)
    if kind == "hang":
        _hang()
        return value_of(call_id)
    if kind == "hang_then_ok":
        if _count_attempt(ctl, str(call_id)) == 1:
            _hang()
        return value_of(call_id)
    if kind == "unpicklable_result":
        return threading.Lock()
    if kind == "unpicklable_exc":
        raise _Unpicklable(f"call {call_id} raises what cannot be pickled")
    if kind == "big":
        return big_value(call_id, param)
    if kind == "exit":
        os._exit(param)
    if kind == "victim":
        _announce(ctl, call_id, "kill")
        _hang()
        return value_of(call_id)
    if kind == "victim_then_ok":
        if _count_attempt(ctl, str(call_id)) == 1:
            _announce(ctl, call_id, "kill")
            _hang()
        return value_of(call_id)
    if kind == "stop_running":
        _announce(ctl, call_id, "stop")
        _hang()
        return value_of(call_id)
    raise ValueError(f"unknown soak kind {kind!r}")


def ledger_call(key: str, kind: str, call_id: int, ctl: str, role: str) -> Any:
    """One keyed call of a ledger round; every execution is logged to ``executions.log``."""
    if kind == "sleep_ok":
        time.sleep(0.002 + (call_id % 5) / 1000)
    elif kind == "fatal":
        _log_execution(ctl, key, "fail")
        raise Fatal(f"{key} fails")
    elif kind == "flaky_then_ok":
        if _count_attempt(ctl, "L" + key) == 1:
            _log_execution(ctl, key, "fail")
            raise Flaky(f"{key} fails this time")
    elif kind == "stop_running" and role == "parent":  # only the parent stops it; elsewhere it just runs
        _announce(ctl, call_id, "stop")
        _hang()
        _log_execution(ctl, key, "abandoned")
        return None
    _log_execution(ctl, key, "ok")
    return ledger_value(key)


def _ledger_key(key: str, *rest: Any) -> str:
    return key


def make_ledger_task(runner_name: str, db: str) -> Any:
    runner = RUNNERS[runner_name]
    return task(name="soak_ledger", runner=runner, ledger=db, key=_ledger_key, retries=1, retry_on=Flaky)(ledger_call)


# ---- runners, tasks and plans ------------------------------------------------------------------

RUNNERS: dict[str, Any] = {
    "process": MultiprocessTaskRun.configure(start_method="fork", max_workers=3),
    "fresh": MultiprocessTaskRun.configure(start_method="fork", max_workers=2, max_tasks_per_worker=3),
    "spawn": MultiprocessTaskRun.configure(start_method="spawn", max_workers=2),
    "thread": ThreadTaskRun.configure(max_workers=8),
}
#: Share of the calls for each runner family the soak is asked for; "process" includes "fresh".
FAMILY_WEIGHTS = {"process": 50, "thread": 40, "spawn": 4}
PROCESS_RUNNERS = ("process", "fresh", "spawn")

#: Kinds of call and their weights; the first ones are plain work, the rest faults.
KINDS = {
    "ok": 60, "sleep_ok": 8, "raise_fatal": 4, "raise_flaky": 2, "flaky_then_ok": 4, "unpicklable_result": 2,
    "unpicklable_exc": 1, "big": 1.2, "exit": 1, "victim": 0.6, "victim_then_ok": 1, "stop_running": 1.2,
}
TIMED_KINDS = {"hang": 10, "hang_then_ok": 10}  # added for calls of the timed task
PROCESS_ONLY = {"exit", "victim", "victim_then_ok"}  # they end a worker process: never in a thread
ANNOUNCED = {"victim", "victim_then_ok", "stop_running"}  # the driver acts on them: single calls only...
GROUPABLE_ANNOUNCED = {"victim", "victim_then_ok"}  # ...except kills, which need no handle
FAULTS = (set(KINDS) | set(TIMED_KINDS)) - {"ok", "sleep_ok"}
#: What the driver does to calls besides their own plan (the SIGKILLs and stops that kinds ask for are their kinds').
DRIVER_FAULTS = ("stop_now", "stop_later", "group_stop", "quota_groups", "shutdown")


@dataclass
class Call:
    """One call as the driver plans and follows it."""

    id: int
    runner: str
    timed: bool
    kind: str
    param: int
    stop: str = "none"  # "now" or "later": the driver calls stop() at once or after a random delay
    group: Group | None = None
    index: int = 0  # in its group
    run: Any = None
    stop_result: bool | None = None
    stop_done: threading.Event | None = None  # made just before the driver calls stop(), set once it returned
    callbacks: int = 0
    callback_status: Status | None = None
    exposed: bool = False  # unfinished when taskrun was shut down (wait=False): it may end STOPPED


def stop_call(call: Call, run: Any) -> None:
    """``run.stop()``, its answer kept in ``call`` (a check waits for it: the run may finish before stop() returns)."""
    done = call.stop_done = threading.Event()
    try:
        call.stop_result = run.stop()
    finally:
        done.set()


@dataclass
class Group:
    """One ``starmap`` of the soak and its calls, in input order."""

    group: Any
    calls: list[Call]
    stopped: bool = False  # group.stop() was called
    quota: int | None = None  # stop_when let this many runs start
    attached: bool = False  # done callbacks added to its runs


@dataclass
class Figures:
    """What a soak did and found."""

    seed: int = 0
    calls: int = 0
    seconds: float = 0.0
    kinds: Counter[str] = field(default_factory=Counter)
    runners: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    actions: Counter[str] = field(default_factory=Counter)
    ledger: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0
    leaks: dict[str, Any] = field(default_factory=dict)
    rss: list[tuple[int, int]] = field(default_factory=list)  # (calls checked, RSS bytes)
    rss_warm: int = 0
    rss_end: int = 0
    live_handles: int = 0

    @property
    def faults(self) -> int:
        """Calls planned to fail, die, hang or be stopped, and the driver's own stops and shutdowns."""
        return sum(n for kind, n in self.kinds.items() if kind in FAULTS) + sum(self.actions[a] for a in DRIVER_FAULTS)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "calls": self.calls, "seconds": self.seconds, "faults": self.faults,
            "kinds": dict(self.kinds), "runners": dict(self.runners), "actions": dict(self.actions),
            "outcomes": {f"{kind} {state}": n for (kind, state), n in self.outcomes.items()},
            "ledger": dict(self.ledger), "problems": self.problems, "problem_count": self.problem_count,
            "leaks": self.leaks, "rss": self.rss, "rss_warm": self.rss_warm, "rss_end": self.rss_end,
            "live_handles": self.live_handles,
        }

    def text(self) -> str:
        lines = [
            f"seed {self.seed}: {self.calls} calls in {self.seconds:.1f} s ({self.calls / max(self.seconds, 1e-9):.0f}/s), "
            f"{self.faults} faults injected, {self.problem_count} problems",
            "calls per runner: " + ", ".join(f"{k} {n}" for k, n in sorted(self.runners.items())),
            "calls per kind: " + ", ".join(f"{k} {n}" for k, n in self.kinds.most_common()),
            "driver actions: " + ", ".join(f"{k} {n}" for k, n in sorted(self.actions.items())),
            "final states per kind:",
        ]
        by_kind: dict[str, list[str]] = {}
        for (kind, state), n in sorted(self.outcomes.items()):
            by_kind.setdefault(kind, []).append(f"{state} {n}")
        lines += [f"  {kind:20} " + ", ".join(states) for kind, states in by_kind.items()]
        if self.ledger:
            lines.append("ledger: " + ", ".join(f"{k} {n}" for k, n in sorted(self.ledger.items())))
        lines.append("leaks: " + ", ".join(f"{k} {v}" for k, v in self.leaks.items()))
        mb = 1 << 20
        samples = " ".join(f"{n}:{rss / mb:.0f}" for n, rss in self.rss)
        lines.append(f"RSS (the least of 3 samples at rest) after warm-up {self.rss_warm / mb:.1f} MB, "
                     f"at the end {self.rss_end / mb:.1f} MB "
                     f"({(self.rss_end - self.rss_warm) / mb:+.1f} MB); samples calls:MB {samples}")
        lines.append(f"handles alive after the soak: {self.live_handles}")
        lines += [f"PROBLEM: {p}" for p in self.problems]
        return "\n".join(lines)


def expected(call: Call, retries: int) -> tuple[Status, type[BaseException] | None, int]:
    """The final state a call's plan gives when nothing stops it: status, exception type, attempts."""
    kind, tries = call.kind, retries + 1
    in_process = call.runner in PROCESS_RUNNERS
    if kind in ("ok", "sleep_ok", "big"):
        return Status.SUCCEEDED, None, 1
    if kind == "raise_fatal":
        return Status.FAILED, Fatal, 1
    if kind == "raise_flaky":
        return Status.FAILED, Flaky, tries
    if kind == "flaky_then_ok":
        return Status.SUCCEEDED, None, call.param + 1
    if kind == "hang":
        return Status.FAILED, TaskTimeout, tries
    if kind in ("hang_then_ok", "victim_then_ok"):
        return Status.SUCCEEDED, None, 2
    if kind == "unpicklable_result":
        return (Status.FAILED, SerializationError, 1) if in_process else (Status.SUCCEEDED, None, 1)
    if kind == "unpicklable_exc":
        return Status.FAILED, SerializationError if in_process else _Unpicklable, 1
    if kind in ("exit", "victim"):
        return Status.FAILED, WorkerDied, tries
    if kind == "stop_running":
        return Status.STOPPED, TaskStopped, 1
    raise ValueError(kind)


# ---- the driver's helpers: the FIFO watcher and the stop scheduler ---------------------------------


class Watcher:
    """Reads the announcements of running calls from a FIFO: SIGKILLs victims, stops the calls that ask for it."""

    def __init__(self, ctl: str, figures: Figures) -> None:
        self.path = os.path.join(ctl, "fifo")
        os.mkfifo(self.path, 0o600)
        self.fd = os.open(self.path, os.O_RDWR)  # read and write: opening it never blocks, reading never sees EOF
        self.figures = figures
        self.calls: dict[int, Call] = {}  # the calls that may announce a stop, by id
        self.cond = threading.Condition()
        self.seen: deque[tuple[float, int, str, int]] = deque(maxlen=20)  # the last announcements, for a hang's report
        self.thread = threading.Thread(target=self._loop, name="soak-watcher", daemon=True)
        self.thread.start()

    def register(self, call: Call) -> None:
        with self.cond:
            self.calls[call.id] = call
            self.cond.notify_all()

    def forget(self, call: Call) -> None:
        with self.cond:
            self.calls.pop(call.id, None)

    def _loop(self) -> None:
        buffer = b""
        while True:
            chunk = os.read(self.fd, 4096)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line == b"quit":
                    return
                call_id, action, pid, when = line.decode().split()
                try:
                    self._act(int(call_id), action, int(pid), float(when))
                except Exception as exc:  # reported, never the end of the watcher
                    self.figures.problems.append(f"watcher: {action} of call {call_id} raised {exc!r}")
                    self.figures.problem_count += 1

    def _act(self, call_id: int, action: str, pid: int, when: float) -> None:
        self.seen.append((time.time(), call_id, action, pid))
        if action == "kill":
            if pid == os.getpid():
                raise SoakError(f"call {call_id} asked to SIGKILL the driver itself")
            try:
                process = psutil.Process(pid)
                # The announcer, unless it is gone (its run stopped) and its pid was handed out again.
                mine = process.create_time() <= when and any(p.pid == os.getpid() for p in process.parents())
            except psutil.NoSuchProcess:
                self.seen.append((time.time(), call_id, "gone", pid))
                return  # gone already (stopped, or its pool shut down)
            if not mine:
                self.seen.append((time.time(), call_id, "not ours", pid))
            if mine:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended meanwhile (its run was stopped, or timed out)
                    self.seen.append((time.time(), call_id, "gone", pid))
                    return
                self.figures.actions["sigkill"] += 1
            return
        with self.cond:  # the call may announce itself before the driver has registered it
            if not self.cond.wait_for(lambda: call_id in self.calls, timeout=30):
                raise SoakError(f"call {call_id} announced itself but was never registered")
            call = self.calls[call_id]
        stop_call(call, call.run)
        self.figures.actions["stop_running"] += 1

    def close(self) -> None:
        os.write(self.fd, b"quit\n")
        self.thread.join(30)
        os.close(self.fd)


class Scheduler:
    """Calls functions after a delay on one thread of its own (the driver's random stops)."""

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, Any]] = []
        self.cond = threading.Condition()
        self.count = 0
        self.running = False
        self.closing = False
        self.thread = threading.Thread(target=self._loop, name="soak-scheduler", daemon=True)
        self.thread.start()

    def at(self, delay: float, fn: Any) -> None:
        with self.cond:
            self.count += 1
            heapq.heappush(self.heap, (time.monotonic() + delay, self.count, fn))
            self.cond.notify()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while True:
                    if self.closing and not self.heap:
                        return
                    now = time.monotonic()
                    if self.heap and self.heap[0][0] <= now:
                        fn = heapq.heappop(self.heap)[2]
                        self.running = True
                        break
                    self.cond.notify_all()  # for wait_idle
                    self.cond.wait(self.heap[0][0] - now if self.heap else None)
            try:
                fn()
            finally:
                del fn  # what it holds (a run, its result) goes now
                with self.cond:
                    self.running = False

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is scheduled or running."""
        with self.cond:
            return self.cond.wait_for(lambda: not self.heap and not self.running, timeout)

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.thread.join(30)


# ---- resources --------------------------------------------------------------------------------------


def _shared_helpers() -> tuple[set[int], set[int]]:
    """The pids and fds of multiprocess's long-lived helpers (forkserver, resource tracker): not taskrun's."""
    import multiprocess.forkserver
    import multiprocess.resource_tracker

    tracker, server = multiprocess.resource_tracker._resource_tracker, multiprocess.forkserver._forkserver
    pids = {tracker._pid, server._forkserver_pid}
    fds = {tracker._fd, server._forkserver_alive_fd}
    return {p for p in pids if p is not None}, {f for f in fds if f is not None}


def resources() -> dict[str, Any]:
    """This process's open fds, threads (taskrun's by name), child processes and RSS."""
    me = psutil.Process()
    pids, fds = _shared_helpers()
    return {
        "fds": len([fd for fd in os.listdir("/proc/self/fd") if int(fd) not in fds]),
        "threads": threading.active_count(),
        "taskrun_threads": sorted(t.name for t in threading.enumerate() if t.name.startswith("taskrun-")),
        "children": sorted(p.pid for p in me.children(recursive=True) if p.pid not in pids),
        "rss": me.memory_info().rss,
    }


def steady_malloc() -> None:
    """Fix glibc's mmap threshold at 1 MB, so that a multi-MB result goes back to the system once freed.

    By default glibc raises the threshold to the size of the largest block freed (up to 32 MB)
    and then keeps up to twice that much free memory per arena: after a few multi-MB results
    RSS reads tens of MB higher for good, which would hide (or fake) a leak.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: RSS is noisier


def settle(before: dict[str, Any], timeout: float = 20) -> dict[str, Any]:
    """Resources once the threads and processes that are ending have ended (at most ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        now = resources()
        if (
            not now["taskrun_threads"] and not now["children"] and now["threads"] <= before["threads"]
            and now["fds"] <= before["fds"]
        ) or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def _pool_states() -> list[str]:
    """What taskrun's process pools hold, for a hang's report (their private state: diagnostics only)."""
    from taskrun import _lifecycle

    lines = []
    for key, pool in list(_lifecycle.pools.items()):
        workers = getattr(pool, "workers", None)
        if workers is None or not hasattr(pool, "pending"):
            continue  # not a process pool
        lines.append(f"pool of {getattr(key, '__name__', key)}: closing={pool.closing} pending={len(pool.pending)} "
                     f"submitted={len(pool.submitted)} has_room={pool.has_room}")
        for w in list(workers):
            flight = [(cid, a.run.id, a.run.status.value, a.started_at is not None) for cid, a in list(w.in_flight.items())]
            try:
                kids = [(c.pid, c.status()) for c in psutil.Process(w.pid).children()]
            except psutil.Error as exc:
                kids = [repr(exc)]
            lines.append(f"  worker {w.pid} ready={w.ready} ending={w.ending} kill_at={w.kill_at} in flight {flight} "
                         f"children {kids}")
    return lines


def live_handles() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, BaseTaskRun))


# ---- the soak -------------------------------------------------------------------------------------


class Soak:
    """Runs the calls of one seeded plan through the runners and checks each of them (see the module docstring)."""

    def __init__(self, seed: int, runners: list[str], ctl: str, *, window: int = 96, log: Any = None,
                 shutdown_every: int = 1500, ledger_every: int = 0, ledger_keys: int = 120, stall: float = STALL) -> None:
        unknown = set(runners) - set(FAMILY_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown runners {sorted(unknown)}; use some of {', '.join(FAMILY_WEIGHTS)}")
        self.rng = random.Random(seed)
        self.families = runners
        self.ctl = ctl
        self.window = window
        self.log = log or (lambda text: None)
        self.shutdown_every = shutdown_every
        self.ledger_every = ledger_every
        self.ledger_keys = ledger_keys
        self.stall = stall
        self.figures = Figures(seed=seed)
        self.done: queue.SimpleQueue[Call] = queue.SimpleQueue()
        self.unchecked: dict[int, Call] = {}
        self.groups: list[Group] = []
        self.next_id = 1
        self.recent: deque[tuple[Any, Status]] = deque(maxlen=512)  # checked runs, checked again later
        self.ledger_round = 0
        os.makedirs(os.path.join(ctl, "attempts"), exist_ok=True)
        self.tasks = {}
        for name in ("process", "fresh", "spawn", "thread"):
            runner = RUNNERS[name]
            self.tasks[name, False] = task(name=f"soak_{name}", runner=runner, retries=2,
                                           retry_on=(Flaky, WorkerDied))(soak_call)
            self.tasks[name, True] = task(name=f"soak_{name}_timed", runner=runner, retries=1, timeout=TIMEOUT,
                                          retry_on=(Flaky, TaskTimeout, WorkerDied))(soak_call)

    # ---- planning

    def _runner(self) -> str:
        names = self.families
        family = self.rng.choices(names, [FAMILY_WEIGHTS[n] for n in names])[0]
        if family == "process" and self.rng.random() < 0.25:
            return "fresh"
        return family

    def _plan(self, runner: str, timed: bool, grouped: bool) -> Call:
        rng = self.rng
        kinds = dict(KINDS)
        if timed:
            kinds.update(TIMED_KINDS)
        if runner not in PROCESS_RUNNERS:
            kinds = {k: w for k, w in kinds.items() if k not in PROCESS_ONLY}
        if grouped:
            kinds = {k: w for k, w in kinds.items() if k not in ANNOUNCED or k in GROUPABLE_ANNOUNCED}
        if timed:
            kinds.pop("stop_running", None)  # a timeout could win the race against the driver's stop
            # A timeout counts until the outcome is in: several MB through a pipe on a busy machine
            # can take longer than TIMEOUT.
            kinds.pop("big", None)
        kind = rng.choices(list(kinds), list(kinds.values()))[0]
        retries = 1 if timed else 2
        param = 0
        if kind == "sleep_ok":
            param = rng.randint(1, 25)
        elif kind == "flaky_then_ok":
            param = rng.randint(1, retries)
        elif kind == "big":
            param = rng.randint(1 << 20, 6 << 20)
        elif kind == "exit":
            param = rng.choice([0, 1, 3, 77])
        call = Call(self.next_id, runner, timed, kind, param)
        self.next_id += 1
        if not grouped and kind not in ANNOUNCED:
            roll = rng.random()
            call.stop = "now" if roll < 0.04 else "later" if roll < 0.12 else "none"
        return call

    # ---- issuing

    def _issue(self) -> int:
        rng = self.rng
        runner = self._runner()
        timed = rng.random() < 0.06
        if rng.random() < 0.93:  # about half the calls, as groups average 16 calls
            self._issue_single(self._plan(runner, timed, grouped=False))
            return 1
        return self._issue_group(runner, timed, rng.randint(2, 30))

    def _issue_single(self, call: Call) -> None:
        self.figures.kinds[call.kind] += 1
        self.figures.runners[call.runner] += 1
        self.unchecked[call.id] = call
        run = call.run = self.tasks[call.runner, call.timed](call.id, call.kind, call.param, self.ctl)
        if call.kind == "stop_running":
            self.watcher.register(call)
        run.add_done_callback(lambda r, c=call: self._on_done(c, r))
        if call.stop == "now":
            stop_call(call, run)
            self.figures.actions["stop_now"] += 1
        elif call.stop == "later":
            self.scheduler.at(self.rng.random() * 0.03, lambda c=call, r=run: self._stop_later(c, r))

    def _stop_later(self, call: Call, run: Any) -> None:
        stop_call(call, run)
        self.figures.actions["stop_later"] += 1

    def _issue_group(self, runner: str, timed: bool, size: int) -> int:
        rng = self.rng
        calls = [self._plan(runner, timed, grouped=True) for _ in range(size)]
        for index, call in enumerate(calls):
            call.index = index
            self.figures.kinds[call.kind] += 1
            self.figures.runners[call.runner] += 1
            self.unchecked[call.id] = call
        roll = rng.random()
        quota = rng.randint(0, size) if roll < 0.1 else None
        concurrency = rng.randint(1, 4) if 0.1 <= roll < 0.25 else None
        items = [(c.id, c.kind, c.param, self.ctl) for c in calls]
        t = self.tasks[runner, timed]
        if quota is not None:
            asked = [0]

            def stop_when(asked: list[int] = asked, quota: int = quota) -> bool:
                asked[0] += 1
                return asked[0] > quota

            group = Group(t.starmap(items, stop_when=stop_when), calls, quota=quota)
            self.figures.actions["quota_groups"] += 1
        else:
            group = Group(t.starmap(items, max_concurrency=concurrency), calls)
        for call in calls:
            call.group = group
        if quota is None and rng.random() < 0.15:
            self.scheduler.at(rng.random() * 0.05, lambda g=group: self._stop_group(g))
        elif quota is None and concurrency is None:
            self._attach(group)  # callbacks added while the runs are under way
        self.groups.append(group)
        return size

    def _stop_group(self, group: Group) -> None:
        group.stopped = True  # before: a run it stops may be checked as soon as stop() has stopped it
        group.group.stop()
        self.figures.actions["group_stop"] += 1

    def _attach(self, group: Group) -> None:
        group.attached = True
        runs = list(group.group)
        if len(runs) != len(group.calls):
            self._problem(f"a group of {len(group.calls)} items has {len(runs)} runs")
        for call, run in zip(group.calls, runs, strict=False):  # a length mismatch is reported above
            call.run = run
            if run.args[0] != call.id:
                self._problem(f"group item {call.index} is the run of call {run.args[0]}, not {call.id}")
            run.add_done_callback(lambda r, c=call: self._on_done(c, r))

    def _on_done(self, call: Call, run: Any) -> None:
        call.callbacks += 1
        if call.callbacks == 1:
            call.callback_status = run.status
            self.done.put(call)
        else:
            self.figures.actions["extra_callbacks"] += 1

    def _shutdown_fault(self) -> None:
        for call in self.unchecked.values():
            call.exposed = True
        taskrun.shutdown(wait=False)
        self.figures.actions["shutdown"] += 1

    # ---- checking

    def _problem(self, text: str) -> None:
        self.figures.problem_count += 1
        if len(self.figures.problems) < 50:
            self.figures.problems.append(text)
            self.log(f"PROBLEM: {text}")

    def _check(self, call: Call) -> None:
        """The invariants of one finished call (see the module docstring)."""
        run = call.run
        status = run.status
        if call.stop_done is not None and not call.stop_done.wait(30):
            self._problem(f"call {call.id}: the driver's stop() did not return in 30 s")
        what = f"call {call.id} ({call.kind}, {call.runner}{' timed' if call.timed else ''}, stop {call.stop}" \
               f"{' in a group' if call.group else ''}): {run!r}"
        if not (run.done() and not run.is_running() and run.wait(0)):
            self._problem(f"{what}: done()/is_running()/wait(0) disagree")
        if call.callbacks != 1 or call.callback_status is not status:
            self._problem(f"{what}: done callback ran {call.callbacks} times and saw {call.callback_status}")
        if run.stop():
            self._problem(f"{what}: stop() of a finished run returned True")
        if run.status is not status:
            self._problem(f"{what}: status changed from {status} after stop()")
        group = call.group
        quota_stopped = group is not None and group.quota is not None and call.index >= group.quota
        must_stop = call.stop_result is True or quota_stopped or (call.kind == "stop_running" and not call.exposed)
        may_stop = must_stop or call.exposed or (group is not None and group.stopped)
        t = self.tasks[call.runner, call.timed]
        want_status, want_exc, want_attempts = expected(call, t.retries)
        exc = run.exception(0)
        attempts = run.attempts
        if status is Status.STOPPED:
            label = "stopped"
            if not may_stop:
                self._problem(f"{what}: STOPPED, but nothing stopped it")
            if not isinstance(exc, TaskStopped):
                self._problem(f"{what}: STOPPED with {exc!r}")
            limit = 0 if quota_stopped else want_attempts
            if attempts > limit:
                self._problem(f"{what}: STOPPED after {attempts} attempts, expected at most {limit}")
            if call.kind == "stop_running" and call.stop_result is not True and not call.exposed:
                self._problem(f"{what}: the driver's stop() returned {call.stop_result}")
        else:
            label = status.value
            if must_stop:
                self._problem(f"{what}: ended {status.value}, though stop() returned {call.stop_result} "
                              f"(quota stopped: {quota_stopped})")
            elif status is not want_status:
                self._problem(f"{what}: ended {status.value}, expected {want_status.value}")
            elif (exc is None) != (want_exc is None) or (want_exc is not None and type(exc) is not want_exc):
                self._problem(f"{what}: exception {exc!r}, expected {want_exc}")
            elif attempts != want_attempts:
                self._problem(f"{what}: {attempts} attempts, expected {want_attempts}")
            elif status is Status.SUCCEEDED:
                self._check_value(call, what, run.get_result(timeout=0))
            elif call.kind == "exit" and exc.exitcode != call.param:
                self._problem(f"{what}: WorkerDied with exit code {exc.exitcode}, expected {call.param}")
            elif call.kind == "victim" and exc.exitcode != -signal.SIGKILL:
                self._problem(f"{what}: WorkerDied with exit code {exc.exitcode}, expected -9")
            if status is Status.FAILED:
                try:
                    run.get_result(timeout=0)
                    self._problem(f"{what}: get_result() of a failed run returned")
                except BaseException as raised:
                    if raised is not exc:
                        self._problem(f"{what}: get_result() raised {raised!r}, not its exception {exc!r}")
        self.figures.outcomes[call.kind, label] += 1
        self.recent.append((run, status))
        if call.kind == "stop_running":
            self.watcher.forget(call)
        del self.unchecked[call.id]
        call.run = None  # the run may go now

    def _check_value(self, call: Call, what: str, value: Any) -> None:
        if call.kind == "big":
            if value != big_value(call.id, call.param):
                self._problem(f"{what}: a big result of {len(value)} bytes is not the one sent")
        elif call.kind == "unpicklable_result":
            if type(value) is not type(threading.Lock()):
                self._problem(f"{what}: result {value!r}, expected the lock")
        elif value != value_of(call.id):
            self._problem(f"{what}: result {value!r}, expected {value_of(call.id)}")

    def _recheck(self) -> None:
        for run, status in self.recent:
            if run.status is not status:
                self._problem(f"{run!r} changed from {status.value} to {run.status.value} after it was final")
        self.recent.clear()

    # ---- the main loop

    def run(self, calls: int, warmup: int) -> Figures:
        figures = self.figures
        self.watcher = Watcher(self.ctl, figures)
        self.scheduler = Scheduler()
        started = time.monotonic()
        issued = checked = 0
        next_shutdown = self._next(self.shutdown_every)
        next_ledger = self.ledger_every or None
        next_sample = warmup
        last_progress = time.monotonic()
        try:
            # A sample and a ledger round wait until no call is in flight: RSS is sampled at rest, and
            # the ledger's second process is started (subprocess.Popen) while no pool forks a worker,
            # which would take along the pipes Popen is making (see the module docstring).
            sample_due = ledger_due = False
            while checked < max(calls, issued):  # a group may take the count past ``calls``: all are checked
                if (sample_due or ledger_due) and issued == checked:
                    if ledger_due:
                        self.ledger(self.ledger_keys)
                        ledger_due = False
                        last_progress = time.monotonic()
                    if sample_due:
                        self.scheduler.wait_idle(30)  # its pending stops hold runs, and their results
                        self._recheck()  # and let go of the runs it kept
                        self._sample(checked)
                        next_sample += max(warmup, calls // 20)
                        sample_due = False
                while not (sample_due or ledger_due) and issued < calls and issued - checked < self.window:
                    issued += self._issue()
                    if next_shutdown is not None and issued >= next_shutdown:
                        self._shutdown_fault()
                        next_shutdown = issued + self._next(self.shutdown_every)
                    if next_ledger is not None and issued >= next_ledger:
                        ledger_due = True
                        next_ledger = issued + self.ledger_every
                for group in self.groups:
                    if not group.attached and group.group.done():
                        self._attach(group)
                self.groups = [g for g in self.groups if not g.attached]
                try:
                    call = self.done.get(timeout=0.05)
                except queue.Empty:
                    if time.monotonic() - last_progress > self.stall:
                        self._stalled()
                    continue
                while True:
                    self._check(call)
                    checked += 1
                    try:
                        call = self.done.get_nowait()
                    except queue.Empty:
                        break
                if checked >= next_sample:
                    sample_due = True
                last_progress = time.monotonic()
                if len(self.recent) == self.recent.maxlen:
                    self._recheck()
            self.scheduler.wait_idle(30)
            self._recheck()
            self._sample(checked)
            # The floor of RSS: a sample may catch memory the allocator has yet to give back (a few
            # MB for a while), while a leak raises every sample after it.
            samples = [rss for _, rss in figures.rss]
            figures.rss_warm, figures.rss_end = min(samples[:3]), min(samples[-3:])
            if self.ledger_every == 0 and self.ledger_keys:
                self.ledger(self.ledger_keys)
            figures.calls = checked
            if figures.actions["extra_callbacks"]:
                self._problem(f"{figures.actions['extra_callbacks']} done callbacks ran more than once")
        finally:
            self.scheduler.close()
            self.watcher.close()
        figures.seconds = time.monotonic() - started
        return figures

    def _next(self, every: int) -> int | None:
        return self.rng.randint(every // 2, every * 3 // 2) if every else None

    def _sample(self, checked: int) -> None:
        gc.collect()
        rss = psutil.Process().memory_info().rss
        self.figures.rss.append((checked, rss))
        self.log(f"{checked} calls checked, RSS {rss / (1 << 20):.1f} MB, {self.figures.problem_count} problems")

    def _stalled(self) -> None:
        lines = [f"no call finished for {self.stall:.0f} s; {len(self.unchecked)} in flight:"]
        calls = sorted(self.unchecked.values(), key=lambda c: c.run is None or c.run.status is not Status.RUNNING)
        for call in calls[:40]:
            lines.append(f"  call {call.id} {call.kind} {call.runner} timed={call.timed} stop={call.stop} "
                         f"stop_result={call.stop_result} group={call.group is not None}: {call.run!r}")
        lines.append(f"the last announcements (time, call, action, pid): {list(self.watcher.seen)}")
        try:
            lines += _pool_states()
        except Exception as exc:  # a report of the hang, even without this part
            lines.append(f"(the pools' state could not be read: {exc!r})")
        for child in psutil.Process().children(recursive=True):
            try:
                lines.append(f"  child {child.pid} (parent {child.ppid()}) {child.status()}: {' '.join(child.cmdline())[:150]}")
            except psutil.Error:
                pass
        raise SoakError("\n".join(lines))

    # ---- ledger rounds: this process and a second one on one ledger file

    def ledger(self, nkeys: int) -> None:
        """Run ``nkeys`` keyed calls here and in a second process at once, then again here; check the ledger."""
        rng, ctl, figures = self.rng, self.ctl, self.figures
        self.ledger_round += 1
        r = self.ledger_round
        db = os.path.join(ctl, "ledger.db")
        mine, theirs = ("thread", "process") if r % 2 else ("process", "thread")
        weights = {"ok": 70, "sleep_ok": 15, "fatal": 5, "flaky_then_ok": 5, "stop_running": 5}
        plan = {f"r{r}k{i}": rng.choices(list(weights), list(weights.values()))[0] for i in range(nkeys)}
        for kind in plan.values():
            figures.ledger[f"keys {kind}"] += 1
        peer_order = list(plan.items())
        rng.shuffle(peer_order)
        config = {"db": db, "ctl": ctl, "runner": theirs, "keys": peer_order}
        peer = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--ledger-peer", json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            ready, _, _ = select.select([peer.stdout], [], [], 60)
            line = peer.stdout.readline() if ready else ""
            if line.strip() != "ready":
                why = peer.stderr.read() if peer.poll() is not None else ""
                raise SoakError(f"the ledger peer did not start: {line!r} {why}")
            t = make_ledger_task(mine, db)
            order = list(plan.items())
            rng.shuffle(order)
            peer.stdin.write("go\n")
            peer.stdin.flush()
            runs: dict[str, Any] = {}
            stoppers: dict[str, Call] = {}
            for key, kind in order:
                call = Call(self.next_id, mine, False, kind, 0)
                self.next_id += 1
                if kind == "stop_running":
                    self.watcher.register(call)
                call.run = runs[key] = t(key, kind, call.id, ctl, "parent")
                stoppers[key] = call
            for run in runs.values():
                if not run.wait(120):
                    raise SoakError(f"ledger round {r}: {run!r} did not finish in 120 s")
            out, err = peer.communicate(timeout=180)
        finally:
            if peer.poll() is None:
                peer.kill()
                peer.communicate()
        if peer.returncode != 0:
            raise SoakError(f"the ledger peer failed ({peer.returncode}): {err[-3000:]}")
        theirs_out = json.loads(out.strip().splitlines()[-1])
        executions = self._executions()
        ledger = Ledger(db)
        records = {rec.key: rec for rec in ledger.runs(task="soak_ledger") if rec.key in plan}
        for key, kind in plan.items():
            what = f"ledger round {r} key {key} ({kind}; here {mine}, peer {theirs})"
            run, peer_state = runs[key], theirs_out.get(key) or ["missing", False, None, False]
            here = [run.status.value, run.cached, type(run.exception(0)).__name__ if run.exception(0) else None,
                    run.status is Status.SUCCEEDED and run.get_result(0) == ledger_value(key)]
            record = records.get(key)
            ok_runs = executions[key]["ok"]
            if kind == "fatal":
                if here[:3] != ["failed", False, "Fatal"] or peer_state[:3] != ["failed", False, "Fatal"]:
                    self._problem(f"{what}: ended {here} here and {peer_state} in the peer, expected failed both")
                if executions[key]["fail"] != 2:
                    self._problem(f"{what}: ran {executions[key]['fail']} times, expected once in each process")
                if record is None or record.status != "failed":
                    self._problem(f"{what}: ledger record {record}")
                figures.ledger["failed twice"] += 1
                continue
            if record is None or record.status != "succeeded":
                self._problem(f"{what}: ledger record {record}")
                continue
            try:
                stored = ledger.result(key)
            except Exception as exc:
                stored = exc
            if stored != ledger_value(key):
                self._problem(f"{what}: ledger.result() gave {stored!r}")
            if ok_runs != 1:
                self._problem(f"{what}: succeeded, but its function completed {ok_runs} times: {executions[key]}")
            states = [here, peer_state]
            ran = [s for s in states if s[0] == "succeeded" and not s[1]]
            if len(ran) != 1 or any(s[0] == "succeeded" and not s[3] for s in states):
                self._problem(f"{what}: here {here}, peer {peer_state}: expected one run that ran and one cached, "
                              "both with the value")
            if kind == "stop_running" and here[0] == "stopped":
                done = stoppers[key].stop_done
                stopped_by = stoppers[key].stop_result if done is not None and done.wait(30) else None
                if stopped_by is not True:
                    self._problem(f"{what}: stopped here, but the driver's stop() returned {stopped_by}")
                figures.ledger["stopped here, ran in the peer"] += 1
            elif any(s[0] not in ("succeeded",) for s in states):
                self._problem(f"{what}: here {here}, peer {peer_state}")
            figures.ledger["succeeded once"] += 1
            figures.ledger["cached here" if here[1] else "ran here"] += 1
        for call in stoppers.values():
            self.watcher.forget(call)
        # Again, here only: what succeeded comes from the ledger, what failed runs again.
        again = {key: t(key, kind, 0, ctl, "peer") for key, kind in plan.items()}
        for run in again.values():
            if not run.wait(120):
                raise SoakError(f"ledger round {r} (again): {run!r} did not finish in 120 s")
        executions = self._executions()
        for key, kind in plan.items():
            run = again[key]
            what = f"ledger round {r} key {key} ({kind}), run again: {run!r}"
            if kind == "fatal":
                if run.status is not Status.FAILED or executions[key]["fail"] != 3:
                    self._problem(f"{what}: expected a third failed execution, got {executions[key]}")
            elif not (run.status is Status.SUCCEEDED and run.cached and run.get_result(0) == ledger_value(key)):
                self._problem(f"{what}: expected the stored result")
            elif executions[key]["ok"] != 1:
                self._problem(f"{what}: ran again: {executions[key]}")
        figures.ledger["calls"] += 3 * nkeys
        figures.ledger["rounds"] += 1
        del runs, again, t, ledger, records, stoppers

    def _executions(self) -> defaultdict[str, Counter[str]]:
        """Per ledger key, how many executions ended how (``ok``, ``fail``, ``abandoned``), in any process."""
        counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
        with open(os.path.join(self.ctl, "executions.log")) as f:
            for line in f:
                key, _pid, event = line.split()
                counts[key][event] += 1
        return counts


def ledger_peer(config_text: str) -> int:
    """The second process of a ledger round: the same keys, in another order, on the same ledger file."""
    config = json.loads(config_text)
    t = make_ledger_task(config["runner"], config["db"])
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 2
    runs = {key: t(key, kind, 0, config["ctl"], "peer") for key, kind in config["keys"]}
    out = {}
    for key, run in runs.items():
        if not run.wait(120):
            out[key] = ["hung", False, None, False]
            continue
        exc = run.exception(0)
        out[key] = [run.status.value, run.cached, type(exc).__name__ if exc else None,
                    run.status is Status.SUCCEEDED and run.get_result(0) == ledger_value(key)]
    print(json.dumps(out), flush=True)
    taskrun.shutdown()
    return 0


# ---- one whole soak, as the test and the command line run it --------------------------------------


def soak(calls: int, seed: int, runners: list[str], *, window: int = 96, warmup: int | None = None,
         shutdown_every: int = 1500, ledger_every: int = 0, ledger_keys: int = 120, stall: float = STALL,
         log: Any = None) -> Figures:
    """Run a whole soak and return its figures; ``figures.problems`` lists what broke (empty: all held).

    Resources are counted before anything starts and again after ``taskrun.shutdown()``.
    """
    gc.collect()
    before = resources()
    ctl = tempfile.mkdtemp(prefix="taskrun-soak-")
    try:
        engine = Soak(seed, runners, ctl, window=window, log=log, shutdown_every=shutdown_every,
                      ledger_every=ledger_every, ledger_keys=ledger_keys, stall=stall)
        figures = engine.run(calls, warmup if warmup is not None else max(200, calls // 10))
        del engine
        taskrun.shutdown(wait=True)
        after = settle(before)
        figures.live_handles = live_handles()
    finally:
        shutil.rmtree(ctl, ignore_errors=True)
    leaks = figures.leaks
    leaks["fds"] = after["fds"] - before["fds"]
    leaks["threads"] = after["threads"] - before["threads"]
    leaks["taskrun threads"] = len(after["taskrun_threads"])
    leaks["child processes"] = len(after["children"])
    for name, value in list(leaks.items()):
        if value:
            figures.problem_count += 1
            figures.problems.append(
                f"leak: {name} {value:+d} (before {before}, after {after})"
            )
    if figures.live_handles:
        figures.problem_count += 1
        figures.problems.append(f"{figures.live_handles} run handles still alive after the soak")
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000, help="calls to make (default 20000)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the plan (default: random, printed)")
    parser.add_argument("--runners", default="process,thread,spawn",
                        help="runner families to use: process (fork, also max_tasks_per_worker), thread, spawn")
    parser.add_argument("--window", type=int, default=96, help="calls in flight at most (default 96)")
    parser.add_argument("--shutdown-every", type=int, default=5000,
                        help="about every this many calls, taskrun.shutdown(wait=False) under running calls (0: never)")
    parser.add_argument("--ledger-every", type=int, default=10000,
                        help="a ledger round every this many calls (0: one at the end)")
    parser.add_argument("--ledger-keys", type=int, default=300, help="keys per ledger round (default 300)")
    parser.add_argument("--rss-limit-mb", type=float, default=64, help="RSS growth after warm-up that counts as a leak")
    parser.add_argument("--stall", type=float, default=STALL, help="seconds without a finished call that count as a hang")
    parser.add_argument("--log", help="write taskrun's log (INFO: retries, deaths) to this file")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON, on the last line")
    parser.add_argument("--ledger-peer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ledger_peer:
        return ledger_peer(args.ledger_peer)
    steady_malloc()
    if args.log:
        import logging

        handler = logging.FileHandler(args.log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(threadName)s %(levelname)s %(message)s"))
        logging.getLogger("taskrun").addHandler(handler)
        logging.getLogger("taskrun").setLevel(logging.INFO)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    print(f"soak: {args.calls} calls, seed {seed}, runners {args.runners}", flush=True)
    figures = soak(args.calls, seed, args.runners.split(","), window=args.window, shutdown_every=args.shutdown_every,
                   ledger_every=args.ledger_every, ledger_keys=args.ledger_keys, stall=args.stall,
                   log=lambda text: print(text, flush=True))
    growth = figures.rss_end - figures.rss_warm
    if growth > args.rss_limit_mb * (1 << 20):
        figures.problem_count += 1
        figures.problems.append(f"RSS grew by {growth / (1 << 20):.1f} MB after the warm-up")
    print(figures.text(), flush=True)
    if args.json:
        print(json.dumps(figures.as_dict()), flush=True)
    return 1 if figures.problem_count else 0


if __name__ == "__main__":
    if __package__ is None and "soak" not in sys.modules:
        # Run as a script: use this file as the module `soak`, so that its tasks and exception
        # classes are the importable ones (spawned workers and the ledger peer find them by name).
        import soak as _soak

        sys.exit(_soak.main())
    sys.exit(main())
