"""The layers, read from the import graph (AST, every import: top level,
deferred into a function, or under TYPE_CHECKING):

* ``bootsvc/wire`` (codecs) imports nothing of the project;
* ``bootsvc/policy`` (pure decisions) imports no sockets, threads, processes,
  event loops or store;
* ``lpmos`` (the core) imports no sibling package;
* ``agent`` imports only the core (it installs alone);
* no import cycle between the project's modules.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("lpmos", "bootsvc", "agent", "web", "lab", "images", "bench", "tests")
NOT_PURE = {"socket", "threading", "asyncio", "selectors", "subprocess", "multiprocessing",
            "concurrent", "grpc", "lpmos.store", "urllib.request", "http.client"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> Iterator[Path]:
    for package in PACKAGES:
        found = []
        for top, dirs, files in os.walk(REPO / package):
            # never into images/build (build output: root file systems that a
            # build running beside the tests changes under the walk)
            dirs[:] = [d for d in dirs if d != "build"]
            found += [Path(top) / f for f in files if f.endswith(".py")]
        yield from sorted(found)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, as dotted names (``from a import b``
    gives ``a`` and ``a.b``: b may be a module)."""
    tree = ast.parse(path.read_text(), str(path))
    this = _module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


GRAPH: dict[str, set[str]] = {_module_name(p): _imports(p) for p in _sources()}


def _project(names: set[str]) -> set[str]:
    """The imported names that are modules of the project."""
    return {n for n in names if n in GRAPH}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _modules(prefix: str) -> list[str]:
    return sorted(m for m in GRAPH if _under(m, prefix))


def test_the_layered_packages_exist() -> None:
    assert _modules("bootsvc.wire") and _modules("bootsvc.policy")


@pytest.mark.parametrize("module", _modules("bootsvc.wire"))
def test_wire_imports_nothing_of_the_project(module: str) -> None:
    assert sorted(n for n in GRAPH[module] if n.split(".")[0] in PACKAGES) == []


@pytest.mark.parametrize("module", _modules("bootsvc.policy"))
def test_policy_imports_no_sockets_threads_or_store(module: str) -> None:
    bad = sorted(n for n in GRAPH[module] if any(_under(n, p) for p in NOT_PURE))
    assert bad == []
    outside = sorted(n for n in _project(GRAPH[module])
                     if not _under(n, "bootsvc.policy") and not _under(n, "bootsvc.wire")
                     and not _under(n, "lpmos") and n != "bootsvc")
    assert outside == [], "policy builds on wire and the core only"


@pytest.mark.parametrize("module", _modules("lpmos"))
def test_the_core_imports_no_sibling_package(module: str) -> None:
    assert sorted(n for n in GRAPH[module] if n.split(".")[0] in PACKAGES
                  and n.split(".")[0] != "lpmos") == []


@pytest.mark.parametrize("module", _modules("agent"))
def test_the_agent_imports_only_the_core(module: str) -> None:
    assert sorted(n for n in GRAPH[module] if n.split(".")[0] in PACKAGES
                  and n.split(".")[0] not in ("lpmos", "agent")) == []


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan).  A
    package's ``__init__`` is not an edge target: importing ``a.b`` runs
    ``a/__init__`` first, which is not a dependency on its contents."""
    edges = {m: sorted(n for n in _project(GRAPH[m]) if n != m and not _under(m, n))
             for m in GRAPH}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle() -> None:
    assert _cycles() == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    GRAPH["x_a"] = {"x_b"}
    GRAPH["x_b"] = {"x_a"}
    try:
        assert ["x_a", "x_b"] in _cycles()
    finally:
        del GRAPH["x_a"], GRAPH["x_b"]
