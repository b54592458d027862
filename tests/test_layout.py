"""The library's layout: `pipeline/` modules import each other without a cycle (a cycle means two modules
that are really one, or a helper living on the wrong side), and never import `stages/` (the thin click
commands sit above the library); teacher sources and model families are branched on only inside their registries
(pipeline.teachers.SOURCES, the family modules of pipeline.models); no constant is spelled on both sides;
a store array's dtype is spelled by pipeline.codec alone."""

import ast
from pathlib import Path

import numpy as np

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


def _modules(*folders) -> dict[str, ast.Module]:
    """{path: syntax tree} of every module under `folders`."""
    paths = [p for folder in folders for p in (REPO / folder).rglob("*.py")]
    return {str(p.relative_to(REPO)): ast.parse(p.read_text()) for p in paths}


def _names_and_strings(node: ast.AST) -> set[str]:
    """The names and string constants inside an expression."""
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def test_no_module_compares_a_teacher_source_by_name():
    """A teacher source is one class in pipeline.teachers.SOURCES: code asks the source (`source_of(spec)`), it
    never tests `spec["source"] == "timm"`, so adding a source edits no other module."""
    from pipeline.teachers import SOURCES

    names = set(SOURCES)
    offenders = []
    for path, tree in _modules("pipeline", "stages").items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
                sides = [node.left, *node.comparators]
                by_key = any(isinstance(s, ast.Subscript) and isinstance(s.slice, ast.Constant)
                             and s.slice.value == "source" for s in sides)
                by_get = any(isinstance(s, ast.Call) and isinstance(s.func, ast.Attribute) and s.func.attr == "get"
                             and s.args and isinstance(s.args[0], ast.Constant) and s.args[0].value == "source"
                             for s in sides)
                by_name = any(isinstance(s, ast.Constant) and s.value in names for s in sides)
                if by_key or by_get or by_name:
                    offenders.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, "teacher sources compared by name outside their registry:\n" + "\n".join(offenders)


def test_no_branch_over_model_families_outside_their_modules():
    """What a family (a module that registers rep_* students in timm) knows about its stock and deploy forms lives
    in its module; no other code branches on a family, a student name or a stock name."""
    from pipeline.models import STOCK_NAMES

    families = {str(p.relative_to(REPO)) for p in (REPO / "pipeline" / "models").glob("*.py")
                if "@register_model" in p.read_text()}
    words = {Path(f).stem for f in families} | set(STOCK_NAMES) | set(STOCK_NAMES.values())
    offenders = []
    for path, tree in _modules("pipeline", "stages").items():
        if path in families:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.If, ast.IfExp)) and _names_and_strings(node.test) & words:
                offenders.append(f"{path}:{node.lineno}: if {ast.unparse(node.test)}")
    assert not offenders, "branches over model families outside their modules:\n" + "\n".join(offenders)


def _constants(folder: str) -> dict[str, str]:
    """{UPPER_CASE name: module} of the module-level constants under `folder`."""
    return {target.id: path for path, tree in _modules(folder).items() for node in tree.body
            if isinstance(node, ast.Assign) for target in node.targets
            if isinstance(target, ast.Name) and target.id.isupper()}


def test_stages_spell_no_library_constant():
    """A value both a command's --help and the library need is spelled once, in the torch-free pipeline.defaults,
    never once per side (two spellings drift apart)."""
    library, commands = _constants("pipeline"), _constants("stages")
    twice = {name: (library[name], commands[name]) for name in library.keys() & commands.keys()}
    assert not twice, f"constants spelled in both pipeline/ and stages/: {twice}"


# What handles store arrays: the modules importing one of these.
STORE_MODULES = {"pipeline.codec", "pipeline.store", "pipeline.inspection"}


def test_no_module_but_the_codec_spells_a_store_dtype():
    """Each store array's dtype is spelled once, in pipeline.codec (array_dtypes): the zarr arrays are created
    from it and teach's buffers filled from it. A module handling store arrays that writes np.uint16 or "<i2"
    holds a second copy, which a change of encoding would leave behind."""
    from pipeline.codec import STORE_DTYPES

    dtypes = [np.dtype(name) for name in STORE_DTYPES]
    spellings = {d.name for d in dtypes} | {d.str for d in dtypes}
    offenders = []
    for path, tree in _modules("pipeline", "stages").items():
        if path == "pipeline/codec.py" or not _imported(REPO / path) & STORE_MODULES:
            continue
        for node in ast.walk(tree):
            spelt = node.attr if isinstance(node, ast.Attribute) else node.value if isinstance(node, ast.Constant) else None
            if spelt in spellings:
                offenders.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, "store dtypes spelled outside pipeline.codec:\n" + "\n".join(offenders)
