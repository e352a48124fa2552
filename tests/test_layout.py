"""The package's import graph has no cycles (issue 17: "no import circles").

Every ``import`` / ``from ... import`` of a ``siglip_dense`` module is an edge, wherever it is written:
at module level, and also inside functions, since an import moved into a function body still ties the
two modules together (it only postpones the circle to call time; a cycle hidden that way is exactly
what this test exists to find). Imports under ``if TYPE_CHECKING:`` never run and are not edges.
``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg`` itself.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "siglip_dense"


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` at ``path:line``; ``deferred``: inside a function body."""

    source: str
    target: str
    line: int
    deferred: bool


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``package_dir`` (packages by ``__init__``)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST, deferred: bool = False) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement under ``node`` that runs (skipping ``if TYPE_CHECKING:`` bodies)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, deferred
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                yield from _imports(ast.Module(body=[stmt], type_ignores=[]), deferred)
        else:
            inner = deferred or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            yield from _imports(child, inner)


def _targets(stmt: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The package modules one import statement loads (the named module, else its package)."""
    if isinstance(stmt, ast.Import):
        return [alias.name for alias in stmt.names if alias.name in known]
    base = stmt.module or ""
    if stmt.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (stmt.level - 1)]
        base = ".".join(anchor + ([stmt.module] if stmt.module else []))
    found = []
    for alias in stmt.names:
        candidate = f"{base}.{alias.name}"
        if candidate in known:
            found.append(candidate)
        elif base in known:
            found.append(base)
    return found


def import_graph(package_dir: Path) -> dict[str, list[Edge]]:
    """Module -> its edges to other modules of the package (see the module docstring for the rules)."""
    modules = module_names(package_dir)
    known = set(modules)
    graph: dict[str, list[Edge]] = {name: [] for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for stmt, deferred in _imports(tree):
            for target in _targets(stmt, name, path.name == "__init__.py", known):
                if target != name:
                    graph[name].append(Edge(name, target, stmt.lineno, deferred))
    return graph


def strongly_connected(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (each one holds a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for edge in graph[v]:
            w = edge.target
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def cycle_path(graph: dict[str, list[Edge]], component: list[str]) -> list[Edge]:
    """A shortest cycle through the first module of ``component`` (breadth-first, inside the component)."""
    start, members = component[0], set(component)
    parents: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for edge in graph[v]:
                if edge.target == start:
                    path = [edge]
                    while path[0].source != start:
                        path.insert(0, parents[path[0].source])
                    return path
                if edge.target in members and edge.target not in parents:
                    parents[edge.target] = edge
                    nxt.append(edge.target)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {component}")


def describe(path: list[Edge]) -> str:
    """``a -> b (line 12, in a function) -> a``: where each import of the cycle is written."""
    steps = [path[0].source]
    for edge in path:
        where = f"line {edge.line}" + (", in a function" if edge.deferred else "")
        steps.append(f"{edge.target} ({edge.source}:{where})")
    return " -> ".join(steps)


def cycles(package_dir: Path) -> list[str]:
    graph = import_graph(package_dir)
    return [describe(cycle_path(graph, c)) for c in strongly_connected(graph)]


PACKAGE_DIR = REPO / PACKAGE


def test_no_import_cycles() -> None:
    """No cycle at all (issue 17 found checkpoints <-> tasks.base and models.backbone <-> models.weights,
    both hidden by imports inside functions)."""
    found = cycles(PACKAGE_DIR)
    assert not found, "import cycles:\n" + "\n".join(found)


def test_the_graph_sees_real_edges() -> None:
    """The parser finds edges of this package (an empty graph would pass trivially)."""
    graph = import_graph(PACKAGE_DIR)
    assert "siglip_dense.tasks.module" in {e.target for e in graph["siglip_dense.tasks.segmentation"]}


def test_graph_edges_follow_the_import_rules(tmp_path: Path) -> None:
    """The checker on a package written here: relative, deferred, TYPE_CHECKING and package imports."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from pkg import b\nfrom . import c\n",
        "b.py": "import os\n\ndef f():\n    from pkg.sub.d import x\n    return x\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\nelse:\n    import pkg.e\n",
        "e.py": "",
        "sub/__init__.py": "from .d import x\n",
        "sub/d.py": "from ..a import y\nfrom pkg.sub import d\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    edges = {(e.source, e.target, e.deferred) for edges in graph.values() for e in edges}
    assert edges == {
        ("pkg.a", "pkg.b", False),
        ("pkg.a", "pkg.c", False),
        ("pkg.b", "pkg.sub.d", True),
        ("pkg.c", "pkg.e", False),  # the else branch runs; the TYPE_CHECKING body does not
        ("pkg.sub", "pkg.sub.d", False),
        ("pkg.sub.d", "pkg.a", False),
    }
    # a -> b -> (in a function) sub.d -> a; c is reached from a but closes no loop
    assert strongly_connected(graph) == [["pkg.a", "pkg.b", "pkg.sub.d"]]
    assert cycles(pkg) == [
        "pkg.a -> pkg.b (pkg.a:line 1) -> pkg.sub.d (pkg.b:line 4, in a function) -> pkg.a (pkg.sub.d:line 1)"
    ]
