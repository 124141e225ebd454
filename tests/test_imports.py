"""The import graph of the library: no cycles among module-level imports, and the library
never imports the job entrypoints in pipelines/ (read from the source, not by importing)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

LIBRARY = REPO / "illada"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, *, top_level_only: bool) -> set[str]:
    """The modules `path` imports; `top_level_only`: only statements run at import time
    (not inside functions, classes' methods, or `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def library_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in LIBRARY.rglob("*.py") if "configs" not in p.parts}
    graph = {}
    for name, path in modules.items():
        targets = {t for t in imports(path, top_level_only=True) if t in modules and t != name}
        # importing a.b.c runs a/__init__ and a/b/__init__ first
        graph[name] = targets | {".".join(t.split(".")[:i]) for t in targets for i in range(1, t.count(".") + 1)} - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_module_level_imports_have_no_cycles():
    graph = library_graph()
    assert "illada.model.config" in graph and "illada.config" in graph["illada.storage"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_library_never_imports_pipelines():
    offenders = [str(p.relative_to(REPO)) for p in LIBRARY.rglob("*.py") if any(t == "pipelines" or t.startswith("pipelines.") for t in imports(p, top_level_only=False))]
    assert offenders == []
