"""The operator's import boundaries (STYLE 1, DESIGN 5.4): it never loads torch, and of the
serving plane it loads only `elasticmoe_worker.contract` (msgspec + stdlib); the pure cores
load no kopf and no HTTP client.

Each module is imported in a fresh interpreter, so what another test imported cannot hide a
violation; a source scan also catches imports inside functions, which importing does not run.
"""

from __future__ import annotations

import ast
import json
import pathlib
import pkgutil
import subprocess
import sys

import pytest

import elasticmoe_operator

PACKAGE_DIR = pathlib.Path(elasticmoe_operator.__file__).parent
MODULES = sorted(f"elasticmoe_operator.{m.name}" for m in pkgutil.iter_modules([str(PACKAGE_DIR)]))
PURE = ["elasticmoe_operator.alerts", "elasticmoe_operator.api", "elasticmoe_operator.children",
        "elasticmoe_operator.crd", "elasticmoe_operator.policy", "elasticmoe_operator.reconcile"]
ALLOWED_WORKER = "elasticmoe_worker.contract"


def _allowed_worker_module(name: str) -> bool:
    return name in ("elasticmoe_worker", ALLOWED_WORKER) or name.startswith(ALLOWED_WORKER + ".")


def _loaded_after_import(module: str) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.splitlines()[-1]))


def test_every_module_is_checked():
    assert set(PURE) | {"elasticmoe_operator.handlers", "elasticmoe_operator.kube", "elasticmoe_operator.cli",
                        "elasticmoe_operator.autoscaler", "elasticmoe_operator.signals",
                        "elasticmoe_operator.httpserver", "elasticmoe_operator.metrics"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_module_loads_no_torch_and_only_the_workers_contract(module):
    loaded = _loaded_after_import(module)
    assert "torch" not in loaded
    worker = sorted(m for m in loaded if m == "elasticmoe_worker" or m.startswith("elasticmoe_worker."))
    assert [m for m in worker if not _allowed_worker_module(m)] == [], worker


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_load_no_kopf_and_no_http_client(module):
    loaded = _loaded_after_import(module)
    assert sorted(loaded & {"kopf", "aiohttp", "httpx", "kubernetes_asyncio"}) == []


def _imported_names(path: pathlib.Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


@pytest.mark.parametrize("path", sorted(PACKAGE_DIR.glob("*.py")), ids=lambda p: p.name)
def test_source_imports_nothing_of_the_worker_but_the_contract(path):
    """Also imports inside functions (`cli.run` imports lazily), which importing does not execute."""
    bad = [n for n in _imported_names(path) if n.split(".")[0] == "torch"
           or (n.split(".")[0] == "elasticmoe_worker" and not _allowed_worker_module(n))]
    assert bad == []


def test_the_source_scan_would_catch_a_worker_import(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("def f():\n    from elasticmoe_worker.instance import coordinator\n"
                    "    from elasticmoe_worker.contract import admin\n")
    assert "elasticmoe_worker.instance.coordinator" in _imported_names(path)
    assert not _allowed_worker_module("elasticmoe_worker.instance")
    assert _allowed_worker_module("elasticmoe_worker.contract.admin")
