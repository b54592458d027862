"""A throwaway DVC project made from this repository's pipeline (dvc.yaml, code, specs), and the git/dvc
calls the DVC tests run in it."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
           GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com", GIT_COMMITTER_NAME="test",
           GIT_COMMITTER_EMAIL="test@example.com")


def dvc_project(root: Path) -> Path:
    """`root` as a git + DVC project running this repository's dvc.yaml; code and specs are copied
    because they are stage dependencies. No params.yaml: the test writes its own."""
    root.mkdir()
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, root)
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    for name in ("pipeline", "stages", "manifests"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    git(root, "init", "-q")
    return root


def git(cwd: Path, *args) -> None:
    subprocess.run(["git", *args], cwd=cwd, env=ENV, check=True, capture_output=True)


def dvc(cwd: Path, *args) -> str:
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def ran(output: str) -> set[str]:
    """The stages a `dvc repro` / `dvc exp run` output says it ran."""
    return set(re.findall(r"Running stage '([^']+)'", output))
