"""No import circles in the package: the graph of imports between siglip_dense's modules is acyclic.

Edges come from the source (``ast``), not from importing: every ``import`` / ``from ... import``
executed at module level (including under ``if`` / ``try``, e.g. ``TYPE_CHECKING`` blocks); a second
check adds the imports inside functions (a local import that hides a circle is still a circle).
``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import siglip_dense

PACKAGE_DIR = Path(siglip_dense.__file__).parent
PACKAGE = "siglip_dense"
# being removed on another branch at the same time (models/arch.py); the only circle tolerated here
KNOWN = {frozenset({"siglip_dense.models.backbone", "siglip_dense.models.weights"})}


def module_names() -> dict[str, Path]:
    out = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def module_level_imports(tree: ast.Module, deferred: bool = False) -> list[ast.Import | ast.ImportFrom]:
    """Import statements run when the module is imported (not in function or class bodies);
    ``deferred``: every import statement, those in functions too."""
    if deferred:
        return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    found: list[ast.Import | ast.ImportFrom] = []
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []) or []:
                    todo.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])
    return found


def import_graph(deferred: bool = False) -> dict[str, set[str]]:
    modules = module_names()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in module_level_imports(ast.parse(path.read_text(), str(path)), deferred):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm: the components with more than one module (each holds a circle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_known_edges() -> None:
    """The parser finds real edges (else an empty graph would pass trivially)."""
    graph = import_graph()
    assert "siglip_dense.tasks.module" in graph["siglip_dense.tasks.segmentation"]
    assert "siglip_dense.checkpoints" in graph["siglip_dense.tasks.module"]
    assert "siglip_dense.models.backbone" in graph["siglip_dense.tasks.component"]
    # a circle made up for the check is found
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_circles() -> None:
    """Module-level imports: a circle here breaks (or order-couples) importing the package."""
    assert not strongly_connected(import_graph()), "import circles"


def test_no_import_circles_even_through_deferred_imports() -> None:
    """Imports inside functions too: a circle hidden by a local import is still a design circle
    (issue 17 counts checkpoints <-> tasks.base and models.backbone <-> models.weights)."""
    circles = strongly_connected(import_graph(deferred=True))
    if circles and {frozenset(c) for c in circles} <= KNOWN:
        pytest.xfail(f"only the known circle {circles} remains (removed on the layout branch)")
    assert not circles, f"import circles: {circles}"


def test_tasks_and_checkpoints_do_not_import_each_other_circularly() -> None:
    graph = import_graph()
    assert not any(m.startswith("siglip_dense.tasks") for m in graph["siglip_dense.checkpoints"])
