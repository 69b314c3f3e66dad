"""The caller's side of ``DaskTaskRun``: one connection to a cluster, its attempts, and their outcomes.

A :class:`DaskPool` per configured runner class holds a ``distributed.Client`` (the user's, or a
:class:`Connection` shared by every runner class with the same target: a scheduler's address, or
one ``LocalCluster`` per set of cluster settings) and a delivery thread. The thread connects (or
starts the cluster) first, so that no call waits for it: calls made meanwhile are queued, PENDING,
and if the connection fails they all fail with one error. An attempt is one Dask task
(``_remote.run_attempt``) with a unique key. Dask tells the pool four things, on its own threads,
and the pool only queues them for the delivery thread:

* a task finished (a ``distributed.as_completed`` the pool feeds, whose condition is also the
  thread's wake-up call; done callbacks would not do, as their executor is gone while the
  interpreter exits): the thread gathers the outcomes that have arrived, in one request, and
  reports them on their attempts;
* a task began on a worker: the worker logs an event on the client's topic, so the attempt turns
  RUNNING and its timeout counts from the worker's start, not from when it was queued;
* a worker left the cluster (the scheduler's "all" topic): attempts that had begun there end with
  :class:`WorkerDied` (Dask would otherwise quietly run them again elsewhere);
* the log records of an attempt that was stopped while it ran (its outcome is never read).

Futures are let go as soon as their outcome is read, except that a run whose dependents were
made before it finished keeps its future until they finish (see ``hold``), so they receive
it and its result stays on the workers.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import secrets
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import cloudpickle
import dask.config
from distributed import CancelledError, Client, Event, Future, KilledWorker, LocalCluster, as_completed

from ...errors import SerializationError, TaskrunError, WorkerDied, attach_traceback, describe_exit
from ..base import PLAIN_TYPES, Attempt, BaseTaskRun, PickledFunction, forget_pool
from . import _outcome, _remote
from ._outcome import type_of

if TYPE_CHECKING:
    from dask.typing import Key

_T = TypeVar("_T")
logger = logging.getLogger("taskrun")

#: Tells this process's Dask keys from those of other processes using the same cluster.
SESSION = secrets.token_hex(4)
_pool_numbers = itertools.count(1)
_fn_numbers = itertools.count(1)
#: Seconds the check that a scheduler's address takes connections may wait (see _refused).
REFUSAL_CHECK_SECONDS = 2.0
#: The key of a task's PickledFunction in ``task.runner_cache``.
CACHE_KEY = "taskrun.dask.function"
#: Times an attempt is sent again because the worker it was queued on (not yet begun) died.
MAX_RESENDS = 3
#: Seconds the pool waits for its own cluster to close, and for a user's client to confirm cleanups.
CLOSE_TIMEOUT = 10


class Call:
    """An attempt's Dask task, as the pool tracks it (the attempt's ``runner_state``)."""

    __slots__ = ("key", "fn_id", "mode", "payload", "timed", "future", "worker", "pid", "resent", "queued_on_dead")

    def __init__(self, key: str, fn_id: str, mode: int, payload: Any, timed: bool, resent: int = 0) -> None:
        self.key = key
        self.fn_id = fn_id
        self.mode = mode
        self.payload = payload
        self.timed = timed  # its task has a timeout: its start is announced at once
        self.future: Future[_remote.Outcome] | None = None
        self.worker: str | None = None  # where it began (from the start event); None while queued
        self.pid: int | None = None
        self.resent = resent  # times sent again because the worker it was queued on died
        # Its worker died before it was announced while another attempt was seen running there: it was queued.
        self.queued_on_dead = False


def log_levels() -> dict[str, int]:
    """The caller's logger levels, so that workers make the records the caller would handle."""
    levels = {"": logging.getLogger().getEffectiveLevel()}
    for name, item in logging.Logger.manager.loggerDict.items():
        if isinstance(item, logging.Logger) and item.level:
            levels[name] = item.level
    return levels


def replay_logs(records: Iterable[dict[str, Any]]) -> None:
    """Hand log records made on a worker to this process's handlers."""
    for fields in records:
        try:
            record = logging.makeLogRecord(fields)
            target = logging.getLogger(record.name)
            if target.isEnabledFor(record.levelno):
                target.handle(record)
        except Exception:
            logger.exception("taskrun could not pass on a log record from a Dask worker")


# ---- one subscription per client, shared by the pools that use it -------------------------


class _Hub:
    """The client's event subscriptions, dispatched to every pool using that client."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.pools: list[DaskPool] = []
        client.subscribe_topic(client.id, self.on_worker_event)
        client.subscribe_topic("all", self.on_cluster_event)

    def on_worker_event(self, event: tuple[float, Any]) -> None:
        msg = event[1]
        if type(msg) not in (tuple, list):
            return  # one of the scheduler's own events about this client
        if len(msg) == 4:
            for pool in self.pools:
                pool.on_started(msg)
        elif len(msg) == 3 and msg[0] == _remote.LOGS:
            for pool in self.pools:  # any of them replays them, on its own thread
                if pool.on_logs(msg[2]):
                    return
            replay_logs(msg[2])

    def on_cluster_event(self, event: tuple[float, Any]) -> None:
        if type(event[1]) is not dict:
            return
        msg = cast("dict[str, Any]", event[1])  # the scheduler's event: its fields by name
        if msg.get("action") == "remove-worker":
            processing = set(msg.get("processing-tasks") or ())
            for pool in self.pools:
                pool.on_worker_removed(msg.get("worker"), bool(msg.get("expected")), processing)

    def close(self) -> None:
        for topic in (self.client.id, "all"):
            try:
                self.client.unsubscribe_topic(topic)
            except Exception:
                pass


_hubs: dict[int, _Hub] = {}
_hubs_lock = threading.Lock()


def _join_hub(pool: DaskPool, client: Client) -> None:
    with _hubs_lock:
        hub = _hubs.get(id(client))
        if hub is None:
            hub = _hubs[id(client)] = _Hub(client)
        hub.pools.append(pool)


def _leave_hub(pool: DaskPool, client: Client) -> None:
    with _hubs_lock:
        hub = _hubs.get(id(client))
        if hub is None or pool not in hub.pools:
            return
        hub.pools.remove(pool)
        if hub.pools:
            return
        del _hubs[id(client)]
    hub.close()


# ---- connections this process made, shared by the pools with the same target ----------------

_STREAM_HANDLER: type[logging.Handler] = logging.StreamHandler  # what Dask installs (type() of it, exactly)
_quiet_lock = threading.Lock()
_quiet_users = 0
_quieted: list[tuple[logging.Handler, int]] = []


def _quiet_dask_logs(on: bool) -> None:
    """Keep Dask's own stderr handler at WARNING while any local cluster of taskrun's lives.

    A ``LocalCluster`` raises that handler (which Dask installs on its "distributed" logger)
    to WARNING for its life and puts it back when it has closed; with two clusters, the first
    to close would put it back while the other still runs, and that one's INFO lines about
    closing would print. Nothing changes for a handler the user set a level on, or added.
    """
    global _quiet_users
    with _quiet_lock:
        if on:
            _quiet_users += 1
            if _quiet_users == 1:
                for handler in logging.getLogger("distributed").handlers:
                    if type(handler) is _STREAM_HANDLER and handler.level < logging.WARNING:
                        _quieted.append((handler, handler.level))
                        handler.setLevel(logging.WARNING)
            return
        _quiet_users -= 1
        if _quiet_users == 0:
            for handler, level in _quieted:
                if handler.level == logging.WARNING:
                    handler.setLevel(level)
            _quieted.clear()


#: Dask's loggers whose records while taskrun closes its own local cluster are not shown.
_CLOSING_NOISE = ("distributed.nanny", "distributed.scheduler", "distributed.core", "distributed.worker")


def _exiting(exc: BaseException) -> bool:
    """True if ``exc`` (or what caused it) says the interpreter is shutting down."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            break
        if "interpreter shutdown" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return sys.is_finalizing()


def _refused(address: str) -> OSError | None:
    """The error of a TCP scheduler address that refuses a connection (nothing listens there), else None."""
    scheme, sep, location = address.rpartition("://")
    if sep and scheme != "tcp":
        return None  # tls://, ucx://, inproc://: Dask's own connect says
    host, _, port = location.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=REFUSAL_CHECK_SECONDS):
            return None
    except ConnectionRefusedError as exc:
        return exc
    except (OSError, ValueError):  # slow, unresolvable or malformed: Dask's connect tries, and says why
        return None


class Connection:
    """A client this process made: to a scheduler's address, or on a ``LocalCluster`` it started.

    Shared by every pool (configured runner class) with the same target, so that settings that
    do not change the cluster (``isolate``) do not start a second one. It connects (or starts
    the cluster) the first time a pool's thread asks, never in a caller's thread; a failed
    connection is forgotten, so that the next call tries again. The last pool to let it go
    closes it.
    """

    def __init__(self, key: tuple[Any, ...], runner_name: str, address: str | None, cluster_options: dict[str, Any]) -> None:
        self.key = key
        self.runner_name = runner_name
        self.address = address
        self.cluster_options = cluster_options
        self.lock = threading.Lock()
        self.users = 0  # pools holding it (under _connections_lock)
        self.client: Client | None = None
        self.cluster: LocalCluster | None = None
        self.error: TaskrunError | None = None

    def open(self) -> Client:
        """The client, connecting or starting the cluster the first time (it blocks: call it on a pool's thread)."""
        with self.lock:
            if self.client is not None:
                return self.client
            if self.error is not None:
                raise self.error
            try:
                self.client = self._open()
            except Exception as exc:
                self.error = self._error(exc)
                _forget_connection(self)
                raise self.error from exc
            return self.client

    def _open(self) -> Client:
        if self.address is not None:
            refused = _refused(self.address)
            if refused is not None:
                raise refused  # at once: Dask's own connect would retry for its whole timeout (30 s) first
            return Client(self.address, set_as_default=False)
        options = dict(self.cluster_options)
        settings: dict[str, Any] = {
            # A task whose worker dies is never run again by Dask: taskrun reports WorkerDied (and retries
            # per the task's options), and sends again the attempts that were only queued there.
            "distributed.scheduler.allowed-failures": 0,
        }
        if options.get("dashboard_address") is None:
            # No dashboard: the scheduler and the workers open an HTTP server all the same (no setting turns it
            # off), on port 8787 for the scheduler. Serve nothing there, on a port of the system's choosing.
            settings["distributed.scheduler.http.routes"] = []
            settings["distributed.worker.http.routes"] = []
            options["scheduler_kwargs"] = {"dashboard_address": "127.0.0.1:0"}
        _quiet_dask_logs(True)
        try:
            with dask.config.set(settings):
                cluster = LocalCluster(**options)
        except BaseException:
            _quiet_dask_logs(False)
            raise
        try:
            client = Client(cluster, set_as_default=False)
            client.register_plugin(_remote.IgnoreInterrupts(), name="taskrun-ignore-interrupts")
        except BaseException:
            self._close_cluster(cluster)
            raise
        self.cluster = cluster
        return client

    def _error(self, exc: Exception) -> TaskrunError:
        if self.address is not None:
            return TaskrunError(
                f"{self.runner_name} could not connect to the Dask scheduler at {self.address} ({type(exc).__name__}: "
                f"{exc}): is the scheduler running (`dask scheduler`), is address= right, and is its port reachable "
                "from here? The next call tries again."
            )
        return TaskrunError(f"{self.runner_name} could not start its local Dask cluster: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            try:
                client.close(timeout=CLOSE_TIMEOUT)
            except Exception:
                logger.debug("closing the Dask client failed", exc_info=True)
        cluster, self.cluster = self.cluster, None
        if cluster is not None:
            self._close_cluster(cluster)

    def _close_cluster(self, cluster: LocalCluster) -> None:
        # Closing it on purpose: Dask's warnings about workers it kills as they close (one still running a stopped
        # attempt's function) and about the tasks on them say nothing the user needs.
        loggers = [logging.getLogger(name) for name in _CLOSING_NOISE]
        levels = [each.level for each in loggers]
        for each in loggers:
            each.setLevel(logging.CRITICAL)
        try:
            cluster.close(timeout=CLOSE_TIMEOUT)
        except Exception:
            logger.warning("%s: closing its local Dask cluster failed", self.runner_name, exc_info=True)
        finally:
            for each, level in zip(loggers, levels, strict=True):
                each.setLevel(level)
            _quiet_dask_logs(False)


_connections: dict[tuple[Any, ...], Connection] = {}
_connections_lock = threading.Lock()


def connection_for(runner: Any) -> Connection:
    """The connection for ``runner``'s target (a new one on first use), held until :func:`let_go`."""
    if runner.address is not None:
        key: tuple[Any, ...] = ("address", runner.address)
        options: dict[str, Any] = {}
    else:
        options = {
            "n_workers": runner.n_workers or os.cpu_count() or 1,
            "threads_per_worker": runner.threads_per_worker or 1,
            "dashboard_address": runner.dashboard_address,
            "processes": True,
        }
        if runner.memory_limit is not None:
            options["memory_limit"] = runner.memory_limit
        key = ("local", *sorted(options.items()))
    with _connections_lock:
        connection = _connections.get(key)
        if connection is None:
            connection = _connections[key] = Connection(key, runner.__name__, runner.address, options)
        connection.users += 1
    return connection


def let_go(connection: Connection) -> None:
    """A pool is done with ``connection``: the last one closes it (here, and it may block)."""
    with _connections_lock:
        connection.users -= 1
        if connection.users > 0:
            return
        if _connections.get(connection.key) is connection:
            del _connections[connection.key]
    connection.close()


def _forget_connection(connection: Connection) -> None:
    with _connections_lock:
        if _connections.get(connection.key) is connection:
            del _connections[connection.key]


def _forget_connections_in_child() -> None:
    """In a forked child: the parent's clients and clusters are not ours (each pool forgets its own)."""
    global _connections_lock, _quiet_lock, _quiet_users
    _connections.clear()
    _connections_lock = threading.Lock()
    _quiet_lock = threading.Lock()
    _quiet_users = 0
    _quieted.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_connections_in_child)


# ---- futures kept for dependents -------------------------------------------------------------

_holds: dict[BaseTaskRun[Any], int] = {}  # upstream run -> dependents made before it finished, not yet finished
_kept: dict[BaseTaskRun[Any], Future[_remote.Outcome]] = {}  # upstream run -> its Dask future, while held
_holds_lock = threading.Lock()


def hold(upstream: Iterable[BaseTaskRun[Any]]) -> None:
    """A dependent of these runs was made: keep their futures, when they succeed, until it finishes."""
    with _holds_lock:
        for run in upstream:
            _holds[run] = _holds.get(run, 0) + 1


def release(upstream: Iterable[BaseTaskRun[Any]]) -> None:
    """That dependent finished: a run nobody else holds lets its future go."""
    with _holds_lock:
        for run in upstream:
            left = _holds.get(run, 0) - 1
            if left > 0:
                _holds[run] = left
            else:
                _holds.pop(run, None)
                _kept.pop(run, None)


def kept_future(upstream: BaseTaskRun[Any]) -> Future[_remote.Outcome] | None:
    return _kept.get(upstream)


def _keep_if_held(run: BaseTaskRun[Any], future: Future[_remote.Outcome] | None) -> None:
    if future is not None and run in _holds:
        with _holds_lock:
            if run in _holds:
                _kept[run] = future


# ---- the pool --------------------------------------------------------------------------------


class DaskPool:
    """One runner class's connection to a cluster and the attempts it has sent there."""

    def __init__(self, runner: type[Any]) -> None:
        self.runner_name = runner.__name__
        self.address: str | None = runner.address
        self.user_client: Client | None = runner.client
        # The user's client, or a connection shared by the runner classes with the same target.
        self.connection: Connection | None = None if self.user_client is not None else connection_for(runner)
        self.isolate: str | None = runner.isolate
        self.said_runs_on = False  # _runs_on warned once already
        self.number = next(_pool_numbers)
        self.lock = threading.Lock()
        self.client: Client | None = None  # set by the thread once connected
        self.ready = False  # connected, and the thread delivering
        self.direct: bool | None = None
        self.closing: str | None = None  # "wait", "now", then "closed"
        self.configs: dict[tuple[int, bool], tuple[Any, ...]] = {}  # (mode, has a timeout) -> run_attempt's config
        self.plugins: dict[str, _remote.FunctionPlugin] = {}  # by fn_id: made in the caller, registered by the thread
        self.versions: dict[int, str] = {}  # PickledFunction version -> fn_id on this cluster
        self.registered: set[str] = set()  # fn_ids registered on the cluster
        self.functions: list[str] = []  # plugin names registered on the cluster (one per task), in order
        self.in_flight: dict[Key, Attempt] = {}  # key -> attempt, from submit until its outcome is taken
        # Finished futures arrive in this as_completed (on the client's event loop, and also while the
        # interpreter exits, unlike done callbacks); its condition wakes the delivery thread for everything.
        self.completed: as_completed | None = None
        self.cond = threading.Condition()  # until connected; then the as_completed's (see _wake)
        self.woken = False
        self.starts: deque[tuple[Any, ...]] = deque()
        self.departed: deque[tuple[str, bool, set[Any]]] = deque()
        self.logs: deque[list[dict[str, Any]]] = deque()
        self.to_cancel: deque[Future[_remote.Outcome]] = deque()
        self.outbox: deque[tuple[Attempt, Call]] = deque()  # queued for the delivery thread to send
        self.events_set: set[str] = set()  # stop Events to set (attempts stopped after they began)
        self.events_to_clear: set[str] = set()  # stop Events set, cleared when the pool ends on a cluster not ours
        thread = threading.Thread(target=self._run, name=f"taskrun-dask-{self.number}", daemon=True)
        thread.taskrun_delivers = True  # type: ignore[attr-defined]  # see BaseTaskRun.wait
        self.thread: threading.Thread | None = thread
        thread.start()

    @property
    def closed(self) -> bool:
        return self.closing in ("now", "closed")

    # ---- connecting, on the pool's own thread ------------------------------------------------

    def _run(self) -> None:
        client: Client | None = None
        try:
            try:
                client = self._connect()
            except Exception as exc:
                self._connect_failed(exc)
                return
            if client is not None:
                self._deliver_loop()
        finally:
            self._finish(client)

    def _connect(self) -> Client | None:
        """Connect (or start the local cluster); None if the pool was shut down without waiting meanwhile."""
        if self.closing == "now":
            return None
        if self.user_client is not None:
            client = self.user_client
            if client.status not in ("running", "connecting", "newly-created"):
                raise TaskrunError(f"{self.runner_name}: the Dask client given as client= is {client.status}")
        else:
            assert self.connection is not None
            client = self.connection.open()
        _join_hub(self, client)
        topic = client.id
        self.configs = {
            (mode, timed): (topic, self.isolate, mode, 0 if timed else _remote.START_ANNOUNCE_DELAY)
            for mode in (_remote.PLAIN, _remote.BYTES, _remote.VIA_DASK) for timed in (False, True)
        }
        # Outcomes are read straight from the workers when the client may (its own setting), or when they are
        # local processes: through the scheduler, each read would cost it (in this very process) a hop more.
        direct = client.direct_to_workers
        self.direct = direct if direct is not None else isinstance(getattr(client, "cluster", None), LocalCluster)
        completed = self.completed = as_completed(loop=client.loop)
        self.client = client
        with self.lock:
            self.cond = completed.thread_condition  # it notifies it as futures finish; we, for the rest
            self.woken = True  # a first round for what was queued meanwhile
            self.ready = True
        return client

    def _connect_failed(self, exc: Exception) -> None:
        """Every call waiting for the connection fails with its error; the next call makes a new pool and tries again."""
        forget_pool(self)
        with self.lock:
            self.closing = "closed"  # submit() refuses from now on
            attempts = list(self.in_flight.values())
            self.in_flight.clear()
            self.outbox.clear()
        if not isinstance(exc, TaskrunError):
            exc = TaskrunError(f"{self.runner_name} could not connect to its Dask cluster: {type(exc).__name__}: {exc}")
        if attempts and _exiting(exc):
            logger.warning(
                "%s: %d call(s) did not run: the program was exiting before its Dask cluster was reached (Python then "
                "refuses the work Dask needs threads for). Wait for calls made at the end of a script (run.wait(), "
                "group.wait()) while it still runs", self.runner_name, len(attempts),
            )
        for attempt in attempts:
            attempt.runner_state = None
            error = TaskrunError(str(exc))  # one each: a raised exception collects its traceback
            error.__cause__ = exc.__cause__
            attempt.set_exception(error)

    def function_id(self, task: Any) -> str:
        """The id, on this pool's cluster, of ``task``'s function as it is now; the thread sends it there (a worker
        plugin) before the first call that needs it.

        As with the process runner, a call sees the function's globals, closure and helpers as they are
        when it is made: the function is pickled again (a new version, a new id) when what its pickle
        captured has changed (``PickledFunction``). Pickled here, so that a function that cannot be fails
        the call.
        """
        cache = task.runner_cache
        pickled: PickledFunction | None = cache.get(CACHE_KEY)
        if pickled is None:
            # Code keeps its real file name, and its source lines travel along: tracebacks and warnings on the
            # workers show them (a worker on another machine cannot read this one's files).
            pickled = cast("PickledFunction", cache.setdefault(CACHE_KEY, PickledFunction(task.fn, every_file=True)))
        try:
            version, (fn_bytes, sources) = pickled.payload()
        except Exception as exc:
            raise SerializationError(f"the function of task {task.name} could not be pickled: {exc}") from exc
        fn_id = self.versions.get(version)
        if fn_id is not None:
            return fn_id
        with self.lock:
            fn_id = self.versions.get(version)
            if fn_id is None:
                fn_id = f"taskrun-fn-{SESSION}-{self.number}-{next(_fn_numbers)}"
                self.plugins[fn_id] = _remote.FunctionPlugin(fn_id, fn_bytes, sources, log_levels())
                self.versions[version] = fn_id
            return fn_id

    def _register(self, client: Client, fn_id: str) -> None:
        """Send the function ``fn_id`` to the cluster (on the pool's thread)."""
        plugin = self.plugins[fn_id]
        for tries_left in range(2, -1, -1):
            try:
                client.register_plugin(plugin, name=fn_id)
                break
            except OSError:
                # A worker left while the scheduler told every worker (the scheduler keeps the plugin
                # for the workers to come all the same): ask again, which is a no-op once it has it.
                if not tries_left:
                    raise
        self.functions.append(fn_id)
        self.registered.add(fn_id)

    # ---- attempts ------------------------------------------------------------------------------

    def submit(self, attempt: Attempt, key: str, fn_id: str, mode: int, payload: Any) -> bool:
        """Send ``attempt`` as the Dask task ``key``; its outcome is reported on it later. False if the pool is closed.

        Into an idle, connected pool (a call-and-wait loop) the caller submits it at once; otherwise
        it is queued and the delivery thread sends what has queued in one message (``client.map``),
        so that a ``map`` costs the scheduler one graph update per batch, not one per call.
        """
        call = Call(key, fn_id, mode, payload, attempt.run.task.timeout is not None)
        attempt.runner_state = call
        lock = self.lock
        lock.acquire()  # not `with`: on every call's path
        try:
            if self.closed:
                attempt.runner_state = None
                return False
            in_flight = self.in_flight
            in_flight[key] = attempt
            alone = self.ready and len(in_flight) == 1 and not self.outbox and fn_id in self.registered
        finally:
            lock.release()
        if not alone:
            self.outbox.append((attempt, call))
            self._wake()
            return True
        try:
            future = self.client.submit(  # type: ignore[union-attr]
                _remote.run_attempt, fn_id, self.configs[mode, call.timed], payload, key=key, pure=False
            )
        except Exception as exc:
            self.in_flight.pop(key, None)
            attempt.runner_state = None
            raise self._send_error(attempt, exc) from exc
        self._sent(call, future)
        return True

    def _sent(self, call: Call, future: Future[_remote.Outcome]) -> None:
        call.future = future
        if call.key not in self.in_flight:  # stopped meanwhile, before it had a future to cancel
            self.to_cancel.append(future)
            self._wake()
        self.completed.add(future)  # type: ignore[union-attr]

    @staticmethod
    def _send_error(attempt: Attempt, exc: Exception) -> Exception:
        if isinstance(exc, (pickle.PicklingError, TypeError, AttributeError)):
            return SerializationError(
                f"the arguments of {attempt.run.id} could not be sent to the Dask cluster: {type(exc).__name__}: {exc}"
            )
        return exc

    def _send_outbox(self, client: Client) -> None:
        """Submit the queued attempts: those with upstream futures one by one, the rest in one message.

        Functions not yet on the cluster are sent first; the calls of one that cannot be fail.
        """
        in_flight = self.in_flight
        batch = [item for item in _drain(self.outbox) if item[1].key in in_flight]
        unsent = {call.fn_id for _, call in batch if call.fn_id not in self.registered}
        if unsent:
            errors: dict[str, Exception] = {}
            for fn_id in unsent:
                try:
                    self._register(client, fn_id)
                except Exception as exc:
                    errors[fn_id] = exc
            if errors:
                for attempt, call in batch:
                    why = errors.get(call.fn_id)
                    if why is not None and in_flight.pop(call.key, None) is not None:
                        attempt.runner_state = None
                        attempt.set_exception(TaskrunError(
                            f"{self.runner_name} could not send the function of task {attempt.run.task.name} to the "
                            f"Dask workers ({type(why).__name__}: {why}); taskrun must be installed on the workers"
                        ))
                batch = [item for item in batch if item[1].fn_id not in errors]
        configs = self.configs
        plain = [item for item in batch if item[1].mode != _remote.VIA_DASK]
        one_by_one = [item for item in batch if item[1].mode == _remote.VIA_DASK] if len(plain) < len(batch) else []
        if len(plain) == 1:
            one_by_one.append(plain.pop())
        if plain:
            calls = [item[1] for item in plain]
            try:
                futures = client.map(
                    _remote.run_attempt, [c.fn_id for c in calls], [configs[c.mode, c.timed] for c in calls],
                    [c.payload for c in calls], key=[c.key for c in calls], pure=False,
                )
            except Exception:  # one call's arguments spoil the batch: send each alone, to fail only that one
                one_by_one.extend(plain)
            else:
                for call, future in zip(calls, futures, strict=True):
                    call.future = future
                    if call.key not in in_flight:
                        self.to_cancel.append(future)
                self.completed.update(futures)  # type: ignore[union-attr]
                del futures
        for attempt, call in one_by_one:
            try:
                future = client.submit(_remote.run_attempt, call.fn_id, configs[call.mode, call.timed], call.payload,
                                       key=call.key, pure=False)
            except Exception as exc:
                if in_flight.pop(call.key, None) is not None:
                    attempt.runner_state = None
                    attempt.set_exception(self._send_error(attempt, exc))
                continue
            self._sent(call, future)

    def _send_again(self, attempt: Attempt, call: Call) -> None:
        """The worker this attempt was queued on died before it began it: send it again, as a new Dask task."""
        if self.in_flight.pop(call.key, None) is None:
            return
        again = Call(f"{call.key.partition('-q')[0]}-q{call.resent + 1}", call.fn_id, call.mode, call.payload, call.timed,
                     call.resent + 1)
        logger.info("%s: attempt %d was queued on a Dask worker that died; sending it again as %s",
                    attempt.run.id, attempt.number, again.key)
        attempt.runner_state = again
        self.in_flight[again.key] = attempt
        self.outbox.append((attempt, again))
        self._wake()

    def stop_call(self, attempt: Attempt) -> None:
        """Cancel the attempt's task and, if it began, set its stop Event; returns at once."""
        call: Call | None = attempt.runner_state
        if call is None or self.in_flight.pop(call.key, None) is None:
            return
        attempt.runner_state = None
        if call.future is not None:
            self.to_cancel.append(call.future)
        if call.worker is not None:
            self.events_set.add(_remote.stop_event_name(call.key))
            if self.isolate != "process" and self.closing is None:  # (a pool shutting down stops them all)
                self._runs_on(attempt, call.worker)
        self._wake()

    def _runs_on(self, attempt: Attempt, worker: str) -> None:
        """Say (a WARNING the first time, then DEBUG) that a stopped attempt's function runs on in its worker."""
        level = logging.DEBUG if self.said_runs_on else logging.WARNING
        self.said_runs_on = True
        logger.log(
            level,
            "%s: %s was stopped (or timed out) while running on the Dask worker %s, which cannot interrupt it: its "
            "function runs on there until it returns, holding one of the worker's threads, and Dask may queue other "
            "calls behind it on that worker (a later timeout counts from their start). The function can poll "
            "taskrun.stop_requested() and return; DaskTaskRun.configure(isolate=\"process\") ends it instead",
            self.runner_name, attempt.run.id, worker,
        )

    # ---- what Dask tells us, on its threads ------------------------------------------------------

    def on_started(self, msg: tuple[Any, ...]) -> None:  # on the client's event loop
        if msg[0] in self.in_flight:
            self.starts.append(msg)
            self._wake()

    def on_logs(self, records: list[dict[str, Any]]) -> bool:  # on the client's event loop
        """Replay the records of a stopped attempt on the delivery thread; False if it no longer delivers."""
        if self.closing == "closed":
            return False
        self.logs.append(records)
        self._wake()
        return True

    def on_worker_removed(self, address: str | None, expected: bool, processing: set[Any]) -> None:  # on the event loop
        if address is not None:
            self.departed.append((address, expected, processing))
            self._wake()

    def _wake(self) -> None:
        cond = self.cond
        while True:
            with cond:
                if not self.woken:
                    self.woken = True
                    cond.notify()
            if self.cond is cond:
                return
            cond = self.cond  # the thread switched to the as_completed's condition meanwhile: tell that one too
            with cond:
                cond.notify()
            return

    # ---- the delivery thread -----------------------------------------------------------------------

    def _deliver_loop(self) -> None:
        cond, completed = self.cond, self.completed
        assert completed is not None
        while True:
            with cond:
                while not self.woken and not completed.has_ready():
                    cond.wait()
                self.woken = False
            try:
                self._deliver_once(completed)
            except Exception:
                logger.exception("%s: delivering outcomes from the Dask cluster failed", self.runner_name)
            with self.lock:
                if self.closing == "closed" or self.closing is not None and not self.in_flight:
                    idle = not (completed.has_ready() or self.to_cancel or self.starts or self.outbox or self.logs)
                    if self.closing == "closed" or idle:
                        self.closing = "closed"  # under the lock: submit() refuses from now on
                        break

    def _deliver_once(self, completed: as_completed) -> None:
        client = self.client
        assert client is not None
        if self.outbox:
            self._send_outbox(client)
        if self.to_cancel:
            futures = _drain(self.to_cancel)
            try:
                client.cancel(futures, reason="taskrun: the run was stopped")
            except Exception:
                logger.debug("cancelling %d Dask futures failed", len(futures), exc_info=True)
            del futures
        if self.events_set:
            names = list(self.events_set)
            self.events_set.difference_update(names)
            self._set_events(client, names)
        if self.starts:
            self._take_starts(_drain(self.starts))
        if self.departed:
            self._take_departures(_drain(self.departed))
        if self.logs:
            for records in _drain(self.logs):
                replay_logs(records)
        if completed.has_ready():
            self._take_done(client, completed.next_batch(block=False))

    def _set_events(self, client: Client, names: list[str]) -> None:
        self.events_to_clear.update(names)

        async def set_all() -> None:
            for name in names:
                try:
                    await client.scheduler.event_set(name=name)
                except Exception:
                    logger.debug("setting the Dask Event %s failed", name, exc_info=True)

        try:
            loop = client.loop
            if loop is not None:  # optional in its type; a client whose loop stopped raises instead
                loop.add_callback(set_all)
        except Exception:
            pass

    def _take_starts(self, starts: list[tuple[Any, ...]]) -> None:
        now = time.time()
        for key, address, pid, at in starts:
            attempt = self.in_flight.get(key)
            if attempt is None:
                continue
            call: Call | None = attempt.runner_state
            if call is None:
                continue
            if call.worker is not None:
                # Dask runs it again: the worker it began on died (or left) and the scheduler sent it elsewhere.
                self._fail(attempt, call, self._died(attempt, call, "left the cluster while running it"))
                continue
            call.worker, call.pid = address, pid
            attempt.mark_started(at=min(at, now))

    def _take_departures(self, departed: list[tuple[str, bool, set[Any]]]) -> None:
        """Attempts seen running on a worker that left end with WorkerDied.

        One that was sent there but not seen to begin (announced) was queued behind another
        if an attempt of ours was seen running there: Dask may send it again (see ``_take_other``).
        Otherwise it may have begun and killed its worker at once, so it is not sent again.
        """
        for address, expected, processing in departed:
            how = "was retired from the cluster while running it" if expected else "died while running it"
            attempts = list(self.in_flight.values())  # one C call: other threads add to it meanwhile
            running = [a for a in attempts if getattr(a.runner_state, "worker", None) == address]
            if running:
                for attempt in attempts:
                    call = attempt.runner_state
                    if call is not None and call.worker is None and call.key in processing:
                        call.queued_on_dead = True
            for attempt in running:
                call = attempt.runner_state
                if call is not None:
                    self._fail(attempt, call, self._died(attempt, call, how))

    def _died(self, attempt: Attempt, call: Call, how: str) -> WorkerDied:
        return WorkerDied(
            f"the Dask worker {call.worker} (pid {call.pid}) running attempt {attempt.number} of {attempt.run.id} {how}"
        )

    def _fail(self, attempt: Attempt, call: Call, exc: BaseException, started: float | None = None) -> None:
        if self.in_flight.pop(call.key, None) is None:
            return
        attempt.runner_state = None
        if call.future is not None and call.future.status == "pending":
            self.to_cancel.append(call.future)
            self._wake()
        attempt.set_exception(exc, started_at=started)

    def _take_done(self, client: Client, futures: list[Future[_remote.Outcome]]) -> None:
        """Read the outcomes of finished tasks (in one request) and report them."""
        in_flight = self.in_flight
        finished: list[Future[_remote.Outcome]] = []
        for future in futures:
            if future.key not in in_flight:
                continue  # stopped, or already failed
            if future.status == "finished":
                finished.append(future)
            else:
                self._take_other(future)
        if not finished:
            return
        outcomes: Sequence[_remote.Outcome | BaseException]
        try:
            outcomes = client.gather(finished, direct=self.direct)
        except Exception:
            outcomes = [self._gather_one(client, future) for future in finished]
        now = time.time()
        successes: list[tuple[Attempt, Any, float | None]] = []
        for future, outcome in zip(finished, outcomes, strict=True):
            attempt = in_flight.pop(future.key, None)
            if attempt is None:
                continue
            attempt.runner_state = None
            if isinstance(outcome, BaseException):
                attempt.set_exception(outcome)
                continue
            if outcome.logs:
                replay_logs(outcome.logs)
            started = min(outcome.started, now)
            kind = outcome.kind
            if kind == _outcome.VALUE:
                _keep_if_held(attempt.run, future)
                successes.append((attempt, outcome.payload, started))
            elif kind == _outcome.PICKLED:
                try:
                    value = pickle.loads(outcome.payload)
                except Exception as exc:
                    attempt.set_exception(SerializationError(
                        f"the result of {attempt.run.id} could not be unpickled here: {type(exc).__name__}: {exc}"
                    ), started_at=started)
                    continue
                _keep_if_held(attempt.run, future)
                successes.append((attempt, value, started))
            else:
                attempt.set_exception(self._failure(attempt, outcome), started_at=started)
        del finished, outcomes, futures
        if successes:
            Attempt.report_results(successes, now)

    def _gather_one(self, client: Client, future: Future[_remote.Outcome]) -> _remote.Outcome | BaseException:
        try:
            return client.gather(future)
        except BaseException as exc:  # noqa: B036 - reported on the attempt
            return self._dask_error(future, exc)

    def _failure(self, attempt: Attempt, outcome: _remote.Outcome) -> BaseException:
        kind = outcome.kind
        if kind == _outcome.RAISED:
            exc_bytes, tb_text = outcome.payload
            try:
                exc = cloudpickle.loads(exc_bytes)
            except Exception as why:
                exc = SerializationError(
                    f"the exception raised by {attempt.run.id} could not be unpickled here: {type(why).__name__}: {why}"
                )
            return attach_traceback(exc, tb_text)
        if kind == _outcome.UNPICKLABLE:
            reason, tb_text = outcome.payload
            error = SerializationError(reason)
            return attach_traceback(error, tb_text) if tb_text else error
        if kind == _outcome.DIED:
            return WorkerDied(
                f"the process (pid {outcome.pid}) running attempt {attempt.number} of {attempt.run.id} on Dask worker "
                f"{outcome.worker} died: {describe_exit(outcome.payload)}",
                outcome.payload,
            )
        return TaskrunError(f"attempt {attempt.number} of {attempt.run.id} ended without an outcome")

    def _take_other(self, future: Future[_remote.Outcome]) -> None:
        """A task that did not finish: cancelled by someone else, erred in Dask itself, or its result lost."""
        key = future.key
        attempt = self.in_flight.get(key)
        if attempt is None:
            return
        status = future.status
        if status == "cancelled":
            self.in_flight.pop(key, None)
            attempt.runner_state = None
            attempt.run.stop("its Dask task was cancelled outside taskrun (or the client lost the scheduler)")
            return
        if status == "pending":
            return  # reported done, then sent again (a lost result recomputed): its next end will say
        call: Call = attempt.runner_state
        if status == "lost":
            self._fail(attempt, call, WorkerDied(
                f"the result of attempt {attempt.number} of {attempt.run.id} was lost with its Dask worker "
                f"{call.worker} before it could be read"
            ))
            return
        try:
            error = future.exception(timeout=CLOSE_TIMEOUT)
        except BaseException as exc:  # noqa: B036
            error = exc
        if isinstance(error, KilledWorker) and call.queued_on_dead and call.resent < MAX_RESENDS:
            self._send_again(attempt, call)  # it never began: nothing runs twice
            return
        self._fail(attempt, call, self._dask_error(future, error, attempt, call))

    def _dask_error(self, future: Future[_remote.Outcome], error: BaseException | None, attempt: Attempt | None = None,
                    call: Call | None = None) -> BaseException:
        """The taskrun error for an error Dask reports (the task itself never raises)."""
        where = f"attempt {attempt.number} of {attempt.run.id}" if attempt is not None else f"Dask task {future.key}"
        if isinstance(error, KilledWorker):
            worker = call.worker if call is not None and call.worker else getattr(error.last_worker, "address", "?")
            died = WorkerDied(f"the Dask worker {worker} running {where} died")
            died.__cause__ = error
            return died
        if isinstance(error, CancelledError):
            return TaskrunError(f"{where}: its Dask task was cancelled")
        exc = SerializationError(
            f"Dask could not run {where}: {type(error).__name__}: {error} (can the workers unpickle the call: is "
            "taskrun installed there, and every module the call's function and arguments need?)"
        )
        exc.__cause__ = error
        return exc

    # ---- the end -----------------------------------------------------------------------------------

    def shutdown(self, wait: bool = True) -> None:
        """``wait=True``: let the attempts sent finish first. ``wait=False``: stop them now. Then the thread disconnects.

        A client given with ``client=`` stays open; a connection of taskrun's is closed by the last
        pool using it (a local cluster with it).
        """
        with self.lock:
            if self.closing == "closed" or (self.closing == "now" and not wait):
                return
            self.closing = "wait" if wait else "now"
            thread, ready = self.thread, self.ready
        if not wait:
            for attempt in list(self.in_flight.values()):
                attempt.run.stop(f"its {self.runner_name} pool shut down")
        self._wake()
        if thread is None or thread is threading.current_thread():
            return
        if not wait and not ready and self.address is not None:
            return  # still connecting to a scheduler, which may take Dask's connect timeout: it lets go when done
        thread.join()

    def _finish(self, client: Client | None) -> None:
        """The thread's last act: let go of the client (and of the connection, which the last pool closes)."""
        with self.lock:
            self.closing = "closed"
            self.ready = False
        if self.completed is not None:
            self.completed.clear()  # outcomes nobody will read: let their futures go
        if client is not None:
            self._disconnect(client)
        connection, self.connection = self.connection, None
        if connection is not None:
            let_go(connection)

    def _disconnect(self, client: Client) -> None:
        _leave_hub(self, client)
        if self.user_client is None and self.address is None:
            return  # a local cluster of taskrun's: it ends with its connection
        for name in self.functions:  # the cluster goes on: leave nothing of ours on it
            try:
                client.unregister_worker_plugin(name)
            except Exception:
                logger.debug("unregistering the worker plugin %s failed", name, exc_info=True)
        for name in self.events_to_clear:
            try:
                Event(name, client=client).clear()
            except Exception:
                logger.debug("clearing the Dask Event %s failed", name, exc_info=True)

    def after_fork_in_child(self) -> None:
        """In a forked child: the parent's client, connection and thread are not ours; forget them, untouched."""
        self.client = None
        self.connection = None
        self.thread = None
        self.ready = False
        self.closing = "closed"



def _drain(queue: deque[_T]) -> list[_T]:
    items: list[_T] = []
    try:
        while True:
            items.append(queue.popleft())
    except IndexError:
        return items


def contains_future(values: Iterable[Any]) -> bool:
    """True if a Dask future is among ``values`` or inside the plain containers among them."""
    for value in values:
        kind = type_of(value)
        if kind in PLAIN_TYPES:
            continue
        if isinstance(value, Future):
            return True
        if kind is dict:
            if contains_future(value.values()):
                return True
        elif kind in (list, tuple, set, frozenset) and contains_future(value):
            return True
    return False


