"""No import cycles in kwserver/, bench/ and tests/support/, type-only ones included.

Static, from the source: every import statement counts wherever it is (module level, inside a function,
under `if TYPE_CHECKING:`). Importing `a.b.c` depends on the module `a.b.c` and also on the packages
`a.b` and `a` whose `__init__` runs first, except those the importing module is itself inside (their
`__init__` is already running). A type both sides of a cycle need belongs in a module both import.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support.paths import REPO

ROOTS = ("kwserver", "bench", "tests/support")


def module_names() -> dict[str, Path]:
    found = {}
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The known modules that importing `name` runs, by its import statements."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in known else base)
    inside = set(_ancestors(name)) | ({name} if path.name == "__init__.py" else set())
    resolved = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target:
            resolved.add(target)
            resolved.update(a for a in _ancestors(target) if a in known and a not in inside)
    resolved.discard(name)
    return resolved


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def import_graph() -> dict[str, set[str]]:
    known = module_names()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_no_import_cycles():
    graph = import_graph()
    assert "kwserver.server.daemon" in graph and "bench.harness" in graph  # the walk found the tree
    cycles = find_cycles(graph)
    described = ["; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(group)))}" for m in group) for group in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(described)


def test_the_checker_sees_type_only_and_function_level_imports(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kwserver.config import X\n"
                      "def f():\n    import kwserver.server.daemon\n")
    known = module_names()
    assert imports_of("kwserver.metadata", source, known) >= {"kwserver.config", "kwserver.server.daemon",
                                                                "kwserver.server"}


MODEL = {"kwserver", "kwserver.config", "kwserver.metadata", "kwserver.expressions", "kwserver.admission",
         "kwserver.logs", "kwserver.truncation", "kwserver.host_capabilities"}


def test_the_policy_model_imports_no_layer():
    """The top of kwserver/: its modules are the model every layer imports; they import only each other."""
    graph = import_graph()
    assert {name: sorted(graph[name] - MODEL) for name in MODEL if graph[name] - MODEL} == {}
