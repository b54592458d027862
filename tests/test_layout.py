"""The library's layout: `pipeline/` modules import each other without a cycle (a cycle means two modules
that are really one, or a helper living on the wrong side), and never import `stages/` (the thin click
commands sit above the library)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> set[str]:
    """Dotted names imported anywhere in `path`, function-level imports included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def import_graph() -> dict[str, set[str]]:
    """{pipeline module: the pipeline modules it imports} (`from pipeline.a import b` names module a, or
    module a.b when b is one)."""
    modules = {_module_name(p): p for p in (REPO / "pipeline").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imported(path) if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle [a, b, ..., a], or None (depth-first search, colouring modules on the stack)."""
    on_stack, done = [], set()

    def visit(node):
        on_stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_stack:
                return on_stack[on_stack.index(nxt):] + [nxt]
            if nxt not in done:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        on_stack.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_pipeline_modules_import_without_a_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle among pipeline modules: {' -> '.join(cycle)}"


def test_library_never_imports_stages():
    offenders = {str(p.relative_to(REPO)): sorted(n for n in _imported(p) if n.split(".")[0] == "stages")
                 for p in (REPO / "pipeline").rglob("*.py")}
    offenders = {path: names for path, names in offenders.items() if names}
    assert not offenders, f"pipeline/ imports stages/: {offenders}"
