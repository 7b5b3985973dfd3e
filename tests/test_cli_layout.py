"""The package's shape (issue 23): no import circles in offbench/ and algorithms/ (lazy imports inside
functions included: a circle is a circle whenever it closes), and offbench/cli.py only dispatches."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    modules = {}
    for path in [*(REPO / "offbench").rglob("*.py"), *(REPO / "algorithms").rglob("*.py")]:
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    return modules


def _import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    def known(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {known(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets |= {known(f"{node.module}.{alias.name}") for alias in node.names}
        graph[name] = targets - {name, ""}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert _circles(_import_graph(_modules())) == []


def test_cli_is_a_dispatcher():
    """offbench/cli.py imports no command's code at its top: each command's module is imported when
    that command runs (so `offbench --help` and a plain command do not pay for Lightning)."""
    tree = ast.parse((REPO / "offbench/cli.py").read_text())
    top = {alias.name if isinstance(node, ast.Import) else node.module
           for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    assert top <= {"__future__", "difflib", "os", "sys", "traceback", "offbench.errors"}, top
    assert len((REPO / "offbench/cli.py").read_text().splitlines()) < 120
