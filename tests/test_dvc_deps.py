"""dvc.yaml knows every input: each stage depends on the library modules its command imports (however
deep, function-level imports included) and on the manifests/ kinds they load, so editing code or a spec
makes `dvc repro` re-run exactly the stages that use it."""

import ast
import re
from pathlib import Path

import yaml

from stages.cli import STAGES

REPO = Path(__file__).resolve().parent.parent


def _module_file(name: str) -> Path | None:
    path = REPO / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


# What each stage reads from manifests/ (teach reads its ${item.spec}, listed in dvc.yaml as such).
MANIFESTS = {"shard": ["datasets"], "finetune-teacher": ["teachers"], "student": ["students", "recipes"]}
# Not inputs (they change no output): docstring-only package files, and these: error messages, the version
# string, progress lines.
IGNORED = ("pipeline/errors.py", "pipeline/__init__.py", "pipeline/progress.py")


def _imports(path: Path) -> set[Path]:
    """Project module files imported anywhere in `path` (function-level imports included)."""
    files = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] in ("pipeline", "stages"):
                parts = name.split(".")
                for i in range(1, len(parts) + 1):  # a package's __init__ runs too
                    found = _module_file(".".join(parts[:i]))
                    if found:
                        files.add(found)
    return files


def _is_input(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    only_docstring = all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)
    return not only_docstring and str(path.relative_to(REPO)) not in IGNORED


def closure(module: str) -> set[Path]:
    """Every project module file that running `module` may import."""
    todo, files = [_module_file(module)], set()
    while todo:
        path = todo.pop()
        if path not in files:
            files.add(path)
            todo.extend(_imports(path) - files)
    return {path for path in files if _is_input(path)}


def _stage_command(cmd: str) -> str:
    words = re.sub(r"\$\{launch\.\w+\}", "pipeline", " ".join(cmd.split())).split()
    return words[words.index("pipeline") + 1]


def test_every_stage_depends_on_the_code_and_manifests_it_uses():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        deps = [REPO / d for d in stage.get("deps", []) if "${" not in d]
        needed = closure(STAGES[_stage_command(stage["cmd"])][0])
        needed |= {REPO / "manifests" / kind for kind in MANIFESTS.get(name, [])}
        lacking = sorted(str(p.relative_to(REPO)) for p in needed
                         if not any(p == d or d in p.parents for d in deps))
        if lacking:
            missing[name] = lacking
    assert not missing, f"dvc.yaml stages lack these deps: {missing}"
