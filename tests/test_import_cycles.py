"""The import graph of the project's packages: no import cycles, no package loops.

Every ``import`` and ``from … import`` of ``gpt/``, ``tasks/``, ``flows/`` and
``benchmarks/`` counts, the lazy ones inside functions included; only those under
``if TYPE_CHECKING:`` (never executed) do not. An import of ``a.b.c`` also imports the
packages ``a`` and ``a.b`` (their ``__init__`` runs, with whatever it re-exports) unless
the importer lives inside them; ``from a.b import c`` reads ``a.b`` itself (and ``a.b.c``
when that is a module), so a module that takes its siblings through its own package
depends on that package's ``__init__``. A cycle is a strongly connected component of
more than one module.

Layers: ``tasks/`` and ``benchmarks/`` import nothing from ``flows/`` (the CLI may run
benchmarks; benchmarks start what they need through the CLI in a subprocess).

Run as a script for the counts: ``python tests/test_import_cycles.py``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("gpt", "tasks", "flows", "benchmarks")
#: Packages that must not import ``flows`` (the layer above them).
BELOW_FLOWS = ("tasks", "benchmarks", "gpt")


def module_files(root: Path = REPO) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of :data:`PACKAGES`."""
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run (bodies of ``if TYPE_CHECKING:`` left out)."""
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """``{module: modules of the project it imports}`` (module docstring for the rules)."""
    files = module_files(root)
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        own = set(_ancestors(mod)) | ({mod} if is_pkg else set())
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            named: list[str] = []
            if isinstance(node, ast.Import):
                named = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the importer's package
                    pkg = mod if is_pkg else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                named = [base] + [
                    f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files
                ]
            for target in named:
                while target and target not in files:  # an attribute of a module
                    target = target.rpartition(".")[0]
                if not target:
                    continue
                graph[mod].add(target)
                graph[mod].update(a for a in _ancestors(target) if a not in own and a in files)
        graph[mod].discard(mod)  # a package reading its own names is no cycle
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def top_level_edges(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """``(package, package it imports)`` between the top-level packages."""
    top = {(a.split(".")[0], b.split(".")[0]) for a, bs in graph.items() for b in bs}
    return {(a, b) for a, b in top if a != b}


def package_loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles among the top-level packages."""
    edges = top_level_edges(graph)
    pkgs = {p for e in edges for p in e} | set(PACKAGES)
    return cycles({p: {b for a, b in edges if a == p} for p in pkgs})


def flows_importers(graph: dict[str, set[str]]) -> list[str]:
    """``module -> flows module`` for every import of ``flows`` from a layer below it."""
    return sorted(
        f"{m} -> {t}"
        for m, ts in graph.items()
        if m.split(".")[0] in BELOW_FLOWS
        for t in ts
        if t.split(".")[0] == "flows"
    )


# --------------------------------------------------------------------------- the checker


def _graph_of(files: dict[str, str], tmp_path: Path) -> dict[str, set[str]]:
    for rel, body in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(body)
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir(exist_ok=True)
        (tmp_path / pkg / "__init__.py").touch()
    return import_graph(tmp_path)


def test_checker_sees_lazy_imports_and_package_reexports(tmp_path: Path) -> None:
    g = _graph_of(
        {
            "flows/report/__init__.py": "from flows.report.sections import X\n",
            "flows/report/sections.py": "from flows.report import fmt\nX = 1\n",
            "flows/report/fmt.py": "",
            "tasks/a.py": "def f():\n    from tasks import b\n",
            "tasks/b.py": "import tasks.a\n",
            "tasks/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import tasks.d\n",
            "tasks/d.py": "import tasks.c\n",
            "tasks/store/__init__.py": "from tasks.store.keys import K\n",
            "tasks/store/keys.py": "from tasks.store.base import B\nK = 1\n",
            "tasks/store/base.py": "B = 1\n",
            "benchmarks/x.py": "def f():\n    from flows.report.fmt import y\n",
        },
        tmp_path,
    )
    assert cycles(g) == [["flows.report", "flows.report.sections"], ["tasks.a", "tasks.b"]]
    assert flows_importers(g) == [
        "benchmarks.x -> flows",
        "benchmarks.x -> flows.report",
        "benchmarks.x -> flows.report.fmt",
    ]
    assert package_loops(g) == []


def test_checker_sees_relative_imports_and_package_loops(tmp_path: Path) -> None:
    g = _graph_of(
        {
            "gpt/p/__init__.py": "from .q import Q\n",
            "gpt/p/q.py": "from . import r\nQ = 1\n",
            "gpt/p/r.py": "from .. import p\n",
            "flows/c.py": "import benchmarks.x\n",
            "benchmarks/x.py": "import flows.c\n",
        },
        tmp_path,
    )
    assert ["gpt.p", "gpt.p.q", "gpt.p.r"] in cycles(g)
    assert package_loops(g) == [["benchmarks", "flows"]]


# --------------------------------------------------------------------------- the project


def test_flows_and_benchmarks_have_no_cycles_and_no_loop() -> None:
    """Part F of issue 19: nothing in flows/ or benchmarks/ takes part in a cycle, and
    benchmarks import nothing from flows."""
    g = import_graph()
    mine = [c for c in cycles(g) if any(m.split(".")[0] in ("flows", "benchmarks") for m in c)]
    assert mine == []
    assert [e for e in flows_importers(g) if e.startswith("benchmarks")] == []
    assert not [loop for loop in package_loops(g) if "flows" in loop]


def test_no_import_cycles_and_no_package_loops() -> None:
    g = import_graph()
    assert cycles(g) == []
    assert package_loops(g) == []
    assert flows_importers(g) == []


if __name__ == "__main__":
    graph = import_graph()
    found = cycles(graph)
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports")
    print(f"import cycles: {len(found)}")
    for c in found:
        print("  " + " <-> ".join(c))
    loops = package_loops(graph)
    print(f"package loops: {len(loops)}" + "".join(f"\n  {' <-> '.join(lp)}" for lp in loops))
    below = flows_importers(graph)
    print(f"imports of flows from below it: {len(below)}" + "".join(f"\n  {e}" for e in below))
