"""Names a package exports but imports only when first used (``module.__getattr__``), so that ``import taskrun`` stays cheap."""

from __future__ import annotations

import importlib
from typing import Any


def load(package: str, lazy: dict[str, str], name: str, namespace: dict[str, Any]) -> Any:
    """The value of ``name``, imported from the module ``lazy[name]`` (relative to ``package``) and kept in
    ``namespace``; AttributeError for a name that is not lazy."""
    module = lazy.get(name)
    if module is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, package), name)
    namespace[name] = value
    return value
