"""Imports inside promptclip run one way: no module imports, directly or through others, a module that imports it.

Import statements at module level and inside functions both count (a function-level import that closes a cycle is a
cycle that only waits for the call). ``importlib.import_module`` with a computed name (the method registry) is not
seen.
"""

import ast
from pathlib import Path

import promptclip

PACKAGE_DIR = Path(promptclip.__file__).parent


def module_names() -> dict[str, tuple[Path, bool]]:
    """``promptclip.x.y`` -> (file, is a package ``__init__``)."""
    names = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = ["promptclip", *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        names[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return names


def import_graph() -> dict[str, set[str]]:
    modules = module_names()

    def owner(name: str) -> str | None:  # the module a dotted name lives in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                submodules = {f"{base}.{a.name}" for a in node.names} & modules.keys()
                # `from . import x` (x a module) depends on x only; `from .m import f` depends on m
                targets.update(submodules if len(submodules) == len(node.names) else {base, *submodules})
        graph[name] = {o for t in targets if t.startswith("promptclip") and (o := owner(t)) and o != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}  # "open" while on the DFS path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_imports_of_all_kinds():
    graph = import_graph()
    assert "promptclip.report.tables" in graph["promptclip.report.write"]  # from .tables import f
    assert "promptclip.errors" in graph["promptclip.data.datasets"]  # from ..errors import DataError
    assert "promptclip.methods.builtin" in graph["promptclip.methods.registry"]  # from . import builtin, in a function
    assert "promptclip.methods" not in graph["promptclip.methods.registry"]


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_promptclip():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
