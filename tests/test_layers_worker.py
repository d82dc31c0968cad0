"""The serving plane's import boundaries (STYLE 2 and 4; the operator's are checked in
tests/operator/test_layers.py): the pure cores (the contract, the planner, the reconfiguration
state machine) load no torch, no zmq and no threads; no module touches a private name of
another subpackage; module-level imports between `elasticmoe_worker` modules form no cycle.

An `ast` walk rather than import-linter: that tool sees neither attribute access nor imports
inside functions, and this needs no dependency. Each pure core is also imported in a fresh
interpreter, so what another test loaded cannot hide a violation. The checkers run on
synthetic sources too, so each is shown to fail where it should.
"""

from __future__ import annotations

import ast
import pathlib
import pkgutil
import subprocess
import sys
from typing import Iterator

import pytest

import elasticmoe_worker
import elasticmoe_worker.contract

ROOT = "elasticmoe_worker"
PACKAGE_DIR = pathlib.Path(elasticmoe_worker.__file__).parent
CONTRACT = ["elasticmoe_worker.contract"] + [
    f"elasticmoe_worker.contract.{m.name}" for m in pkgutil.iter_modules(elasticmoe_worker.contract.__path__)]
PURE = CONTRACT + ["elasticmoe_worker.planner", "elasticmoe_worker.flow", "elasticmoe_worker.hotcopies",
                   "elasticmoe_worker.instance.reconfig",
                   "elasticmoe_worker.instance.reconfig_events", "elasticmoe_worker.instance.reconfig_state",
                   "elasticmoe_worker.instance.reconfig_loss", "elasticmoe_worker.instance.reconfig_rejoin",
                   "elasticmoe_worker.instance.reconfig_kv"]
FORBIDDEN = {"torch", "zmq", "threading"}


def _sources() -> tuple[dict[str, ast.Module], set[str]]:
    """Every module of the package, parsed (dotted name -> tree), and which of them are packages."""
    trees, packages = {}, set()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
            packages.add(".".join(parts))
        trees[".".join(parts)] = ast.parse(path.read_text(), str(path))
    return trees, packages


TREES, PACKAGES = _sources()


def _targets(node: ast.Import | ast.ImportFrom, module: str, packages: set[str], known: set[str]) -> list[str]:
    """The modules an import statement names: `from a import b` is `a.b` when that is a module."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        here = module.split(".") if module in packages else module.split(".")[:-1]
        base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def _import_time_nodes(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not in functions nor under TYPE_CHECKING."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                yield from _import_time_nodes(node.body)
            yield from _import_time_nodes(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _import_time_nodes(block)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from _import_time_nodes(node.body)


def _graph(trees: dict[str, ast.Module], packages: set[str], import_time_only: bool) -> dict[str, set[str]]:
    """module -> the package's modules it imports (at import time only, or anywhere)."""
    graph = {}
    for module, tree in trees.items():
        nodes = _import_time_nodes(tree.body) if import_time_only else (
            n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
        graph[module] = {t for n in nodes for t in _targets(n, module, packages, set(trees))
                         if t in trees and t != module}
    return graph


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _forbidden_imports(start: str, trees: dict[str, ast.Module], packages: set[str]) -> list[str]:
    """'module: name' for each forbidden import (anywhere in the source) of `start` or of what
    it loads from the package, its parent packages included."""
    graph = _graph(trees, packages, import_time_only=False)
    seen, todo = set(), [start, *_ancestors(start)]
    while todo:
        m = todo.pop()
        if m in seen or m not in trees:
            continue
        seen.add(m)
        todo += [t for dep in graph[m] for t in (dep, *_ancestors(dep))]
    found = []
    for m in sorted(seen):
        for node in ast.walk(trees[m]):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found += [f"{m}: {t}" for t in _targets(node, m, packages, set(trees))
                          if t.split(".")[0] in FORBIDDEN]
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                out.append(sorted(component + [v]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _unit(module: str) -> str:
    """The subpackage a module belongs to (a top-level module is a unit of its own)."""
    return ".".join(module.split(".")[:2])


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def _private(attr: str) -> bool:
    return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))


def _private_access(module: str, tree: ast.Module, packages: set[str], known: set[str]) -> list[str]:
    """`x._name` where x is (an attribute of) something imported from another subpackage; in
    the HTTP layer (`server`), `._name` on anything but self/cls."""
    bound: dict[str, str] = {}  # local name -> what it stands for in the package
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            for a, target in zip(node.names, _targets(node, module, packages, known)):
                bound[a.asname or a.name] = target if target.endswith("." + a.name) else f"{target}.{a.name}"
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _private(node.attr)):
            continue
        owner = _dotted(node.value)
        where = f"{module}:{node.lineno}: {ast.unparse(node)}"
        if owner is not None and owner.split(".")[0] in bound:
            full = ".".join([bound[owner.split(".")[0]], *owner.split(".")[1:]])
            if full.split(".")[0] == ROOT and _unit(full) != _unit(module):
                found.append(where)
                continue
        if _unit(module) == f"{ROOT}.server" and owner not in ("self", "cls"):
            found.append(where)
    return sorted(found)


# -- the pure cores ---------------------------------------------------------------------------------
def test_the_pure_cores_exist():
    assert set(PURE) <= set(TREES), sorted(set(PURE) - set(TREES))
    assert {"elasticmoe_worker.contract.wire", "elasticmoe_worker.contract.admin"} <= set(CONTRACT)


@pytest.mark.parametrize("module", PURE)
def test_pure_core_loads_no_torch_zmq_or_threads(module):
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = proc.stdout.split()
    assert module in loaded
    assert sorted(m for m in loaded if m.split(".")[0] in FORBIDDEN) == []


@pytest.mark.parametrize("module", PURE)
def test_pure_core_source_imports_no_torch_zmq_or_threads(module):
    """Imports inside functions too, of the module and of everything it loads from the package."""
    assert _forbidden_imports(module, TREES, PACKAGES) == []


def test_the_forbidden_import_scan_follows_the_package_and_reads_functions():
    trees = {"elasticmoe_worker": ast.parse(""), "elasticmoe_worker.pure": ast.parse(
        "from elasticmoe_worker import helper\n"),
        "elasticmoe_worker.helper": ast.parse("def f():\n    import threading\n")}
    assert _forbidden_imports("elasticmoe_worker.pure", trees, {"elasticmoe_worker"}) == [
        "elasticmoe_worker.helper: threading"]


# -- private names --------------------------------------------------------------------------------
@pytest.mark.parametrize("module", sorted(TREES))
def test_no_private_name_of_another_subpackage_is_touched(module):
    assert _private_access(module, TREES[module], PACKAGES, set(TREES)) == []


def test_the_private_access_scan_would_catch_one():
    known = {"elasticmoe_worker.instance", "elasticmoe_worker.instance.coordinator", "elasticmoe_worker.server",
             "elasticmoe_worker.server.api", "elasticmoe_worker.instance.transport"}
    packages = {"elasticmoe_worker.instance", "elasticmoe_worker.server"}
    source = ast.parse("from elasticmoe_worker.instance import coordinator\n"
                       "import elasticmoe_worker.instance.transport as tr\n"
                       "def f(inst, self):\n"
                       "    coordinator._HISTORY_LIMIT, tr.Server._decode, coordinator.__name__, self._ok\n"
                       "    return inst._state, self.s.engine._lock\n")
    assert _private_access("elasticmoe_worker.server.api", source, packages, known) == [
        "elasticmoe_worker.server.api:4: coordinator._HISTORY_LIMIT",
        "elasticmoe_worker.server.api:4: tr.Server._decode",
        "elasticmoe_worker.server.api:5: inst._state", "elasticmoe_worker.server.api:5: self.s.engine._lock"]
    # Same subpackage, or outside the HTTP layer on a local object: not this test's business.
    assert _private_access("elasticmoe_worker.instance.routing", source, packages, known) == []


# -- cycles ---------------------------------------------------------------------------------------
def test_module_level_imports_form_no_cycle():
    assert _cycles(_graph(TREES, PACKAGES, import_time_only=True)) == []


def test_the_cycle_check_would_catch_one_and_ignores_function_level_imports():
    trees = {"elasticmoe_worker.a": ast.parse("from elasticmoe_worker import b\n"),
             "elasticmoe_worker.b": ast.parse("import typing\nif typing.TYPE_CHECKING:\n"
                                              "    from elasticmoe_worker import c\n"
                                              "try:\n    import elasticmoe_worker.c\nexcept ImportError:\n    pass\n"),
             "elasticmoe_worker.c": ast.parse("import elasticmoe_worker.a\n"),
             "elasticmoe_worker.d": ast.parse("def f():\n    from elasticmoe_worker import a\n"),
             "elasticmoe_worker": ast.parse("from . import d\n")}
    graph = _graph(trees, {"elasticmoe_worker"}, import_time_only=True)
    assert graph["elasticmoe_worker"] == {"elasticmoe_worker.d"}
    assert graph["elasticmoe_worker.d"] == set()
    assert _cycles(graph) == [["elasticmoe_worker.a", "elasticmoe_worker.b", "elasticmoe_worker.c"]]
