# distributed ships py.typed but leaves most of what taskrun calls unannotated (untyped calls to mypy --strict,
# unknown types to pyright's strict mode). Only what taskrun uses is declared, as a synchronous client
# (taskrun's) sees it, in the types distributed's own annotations and documentation give; the worker and the
# scheduler's rpc stay Any.
import threading
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from concurrent.futures import CancelledError as CancelledError
from typing import Any, Generic, Literal, Protocol, TypeVar, overload

from dask.typing import Key

from .diagnostics.plugin import WorkerPlugin

_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)

class _EventLoop(Protocol):
    # The client's tornado IOLoop, as far as taskrun uses it.
    def add_callback(self, callback: Callable[..., object], *args: Any, **kwargs: Any) -> None: ...

class KilledWorker(Exception):
    @property
    def task(self) -> Key: ...
    @property
    def last_worker(self) -> Any: ...  # the scheduler's WorkerState

class Future(Generic[_T_co]):  # of a task's result
    key: Key
    @property
    def client(self) -> Client | None: ...
    @property
    def status(self) -> Literal["pending", "cancelled", "finished", "lost", "error"] | None: ...
    def exception(self, timeout: float | None = None) -> BaseException | None: ...  # None unless it erred

class Client:
    id: str
    status: str
    direct_to_workers: bool | None
    scheduler: Any  # an rpc: its attributes call the scheduler's handlers
    def __init__(self, address: str | LocalCluster | None = None, *, set_as_default: bool = True, **kwargs: Any) -> None: ...
    @property
    def loop(self) -> _EventLoop | None: ...  # as distributed types it (it raises when the loop is not running)
    def subscribe_topic(self, topic: str, handler: Callable[[tuple[float, Any]], object]) -> None: ...
    def unsubscribe_topic(self, topic: str) -> None: ...
    def register_plugin(self, plugin: WorkerPlugin, name: str | None = None) -> Any: ...
    def unregister_worker_plugin(self, name: str, nanny: bool | None = None) -> Any: ...
    def submit(
        self,
        func: Callable[..., _T],
        *args: Any,
        key: Key | None = None,
        workers: str | Iterable[str] | None = None,
        resources: dict[str, Any] | None = None,
        retries: int | None = None,
        priority: int = 0,
        fifo_timeout: str = "100 ms",
        allow_other_workers: bool = False,
        actor: bool = False,
        actors: bool = False,
        pure: bool = True,
        **kwargs: Any,
    ) -> Future[_T]: ...
    def map(
        self,
        func: Callable[..., _T],
        *iterables: Collection[Any],
        key: str | list[Key] | None = None,
        workers: str | Iterable[str] | None = None,
        retries: int | None = None,
        resources: dict[str, Any] | None = None,
        priority: int = 0,
        allow_other_workers: bool = False,
        fifo_timeout: str = "100 ms",
        actor: bool = False,
        actors: bool = False,
        pure: bool = True,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> list[Future[_T]]: ...
    @overload
    def gather(self, futures: Future[_T], errors: str = "raise", direct: bool | None = None) -> _T: ...
    @overload
    def gather(self, futures: Sequence[Future[_T]], errors: str = "raise", direct: bool | None = None) -> Sequence[_T]: ...  # a list for a list, a tuple for a tuple
    def cancel(
        self, futures: Future[Any] | Iterable[Future[Any]], *, force: bool = False, reason: str | None = None,
        msg: str | None = None,
    ) -> None: ...
    def close(self, timeout: float | None = ...) -> None: ...

class LocalCluster:
    def __init__(
        self,
        *,
        n_workers: int | None = None,
        threads_per_worker: int | None = None,
        processes: bool | None = None,
        dashboard_address: str | None = ":8787",
        memory_limit: str | float | None = "auto",
        **kwargs: Any,
    ) -> None: ...
    def close(self, timeout: float | None = None) -> Awaitable[None] | None: ...

class Event:
    def __init__(self, name: str | None = None, client: Client | None = None) -> None: ...
    def is_set(self) -> bool: ...
    def clear(self) -> None: ...

class as_completed:
    thread_condition: threading.Condition  # notified as futures finish
    def __init__(
        self,
        futures: Iterable[Future[Any]] | None = None,
        loop: _EventLoop | None = None,
        with_results: bool = False,
        raise_errors: bool = True,
        *,
        timeout: float | None = None,
    ) -> None: ...
    def add(self, future: Future[Any]) -> None: ...
    def update(self, futures: Iterable[Future[Any]]) -> None: ...
    def has_ready(self) -> bool: ...
    def next_batch(self, block: bool = True) -> list[Any]: ...  # futures, or (future, result) with with_results
    def clear(self) -> None: ...

def get_client(address: str | None = None, timeout: float | str | None = None, resolve_address: bool = True) -> Client: ...
def get_worker() -> Any: ...  # the Worker running the current task
