"""The package's modules import each other without cycles (function-level imports included)."""

import ast
from pathlib import Path

import unetkit

PACKAGE = Path(unetkit.__file__).resolve().parent


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module name -> the package modules it imports anywhere in its source (read with `ast`)."""
    modules: dict[str, tuple[Path, bool]] = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    graph = {}
    for name, (path, is_package) in modules.items():
        base = name.split(".") if is_package else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                parent = base[: len(base) - node.level + 1] if node.level else []
                module = ".".join(parent + ([node.module] if node.module else []))
                # `from . import x` imports the module x when x is one, else the name x of `module`
                edges.update(f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "unetkit.segment" in graph["unetkit.cli.predict"] and "unetkit.inference" in graph["unetkit.segment"]
    assert "unetkit.predict" in graph["unetkit.inference"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_predict_is_the_array_engine():
    graph = import_graph()
    assert not graph["unetkit.predict"] & {"unetkit.io", "unetkit.checkpoint", "unetkit.segment", "unetkit.train"}


def test_every_path_segments_through_the_one_core():
    graph = import_graph()
    for path in ("unetkit.segment", "unetkit.bigsegment", "unetkit.napari._segment", "unetkit.demo", "unetkit.cli.predict"):
        assert "unetkit.inference" in graph[path], path
        assert "unetkit.predict" not in graph[path], f"{path} calls predict itself instead of the core"
