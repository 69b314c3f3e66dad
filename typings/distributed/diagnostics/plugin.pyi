from collections.abc import Awaitable
from typing import Any

class WorkerPlugin:
    idempotent: bool  # registering one again under its name is a no-op
    def setup(self, worker: Any) -> None | Awaitable[None]: ...
    def teardown(self, worker: Any) -> None | Awaitable[None]: ...
