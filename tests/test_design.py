"""The design, checked: no import cycles, no private access across modules, runners on public hooks only.

* No module of taskrun imports another that (directly or not) imports it back, counting
  imports inside functions (they run too) but not those under ``TYPE_CHECKING``.
* No module reads or writes another module's private names (``obj._name`` where another
  module of taskrun defines ``_name`` and this one does not; ``from x import _name``).
* The runners (``taskrun/runners/``) import from taskrun only its public runner interface
  (``taskrun.runners.base``), its errors, and the modules of their own runner package.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "taskrun"


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
    )


def _imports(name: str) -> list[tuple[str, list[str], int]]:
    """``(module imported, names imported from it, line)`` for every runtime import in module ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if _is_package(name) else name.rpartition(".")[0]
    found: list[tuple[str, list[str], int]] = []

    def visit(node: ast.AST) -> None:
        if _type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, [alias.name for alias in node.names], node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _edges(name: str) -> set[str]:
    """The taskrun modules that module ``name`` imports (``from . import x`` counts as importing x)."""
    edges = set()
    for target, names, _line in _imports(name):
        if not target.startswith("taskrun"):
            continue
        for imported in names:
            if f"{target}.{imported}" in MODULES:
                edges.add(f"{target}.{imported}")
        if target in MODULES and not (names and all(f"{target}.{n}" in MODULES for n in names)):
            edges.add(target)
    edges.discard(name)
    return edges


def test_no_import_cycles() -> None:
    graph = {name: _edges(name) for name in MODULES}
    # A package's __init__ imports its submodules; a submodule importing a sibling loads the package
    # first, which is already loading: only edges between modules count, packages excluded as targets.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if _is_package(nxt) and node.startswith(nxt + "."):
                continue  # a submodule importing from its own package's __init__ is checked below
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _defined_private_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name.startswith("_"):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr.startswith("_"):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id.startswith("_"):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id.startswith("_"):
            names.add(node.target.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("_"):
            names.add(node.value)  # __slots__ entries
    return names


#: Names with a leading underscore that are public API of the standard library.
STDLIB_PUBLIC = {"_exit", "_asdict", "_replace", "_fields", "_make"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__")) and name not in STDLIB_PUBLIC


#: Every private name some module of taskrun defines (the rule is about taskrun's own privates).
TASKRUN_PRIVATE = set().union(*(_defined_private_names(ast.parse(path.read_text())) for path in MODULES.values()))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_access_across_modules(name: str) -> None:
    tree = ast.parse(MODULES[name].read_text())
    own = _defined_private_names(tree)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own and node.attr in TASKRUN_PRIVATE:
            problems.append(f"line {node.lineno}: .{node.attr}")
    for target, names, line in _imports(name):
        if target.startswith("taskrun"):
            problems += [
                f"line {line}: imports {n} from {target}" for n in names if _private(n) and f"{target}.{n}" not in MODULES
            ]
    assert not problems, f"{name} uses private names of other modules: " + ", ".join(problems)


RUNNER_API = {"taskrun.runners.base", "taskrun.errors"}


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("taskrun.runners.") and n != "taskrun.runners.base"))
def test_runners_use_only_the_public_runner_interface(name: str) -> None:
    own_package = name if _is_package(name) else name.rpartition(".")[0]
    problems = []
    for target, names, line in _imports(name):
        if not target.startswith("taskrun"):
            continue
        modules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES] or [target]
        for module in modules:
            inside = own_package != "taskrun.runners" and (module == own_package or module.startswith(own_package + "."))
            if module not in RUNNER_API and not inside:
                problems.append(f"line {line}: {module}")
    assert not problems, f"{name} imports taskrun internals: " + ", ".join(problems)
