"""A team shares one teacher pass through a DVC remote: `dvc push` after teach, `dvc pull` in a fresh
clone, and that clone's `dvc repro` runs no teacher (the store came back byte for byte)."""

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests._teach_helpers import tiny_teacher

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
           GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com", GIT_COMMITTER_NAME="test",
           GIT_COMMITTER_EMAIL="test@example.com")
PARAMS = {
    "launch": {"teach": "pipeline", "student": "pipeline"},
    "shard": {"source": "synthetic", "num-classes": 4, "per-class": 4, "image-size": 64, "val-fraction": 0.25},
    "finetune": {},
    "teachers": {"tiny": {"spec": "teachers/tiny.yaml"}},
    "teach": {"num-views": 2, "k": 3, "batch-size": 8, "quiet": True,
              "plan": {"size": 64, "auto_augment": None, "re_prob": 0.0}},
    "students": {},
}


def _run(cwd: Path, *args) -> str:
    proc = subprocess.run(list(args), cwd=cwd, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _same_tree(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


@pytest.mark.slow
def test_store_is_pushed_and_pulled_through_a_dvc_remote(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, root)
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    for name in ("pipeline", "stages", "manifests"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "teachers").mkdir()
    spec = tiny_teacher(root / "teachers")
    spec.write_text(yaml.safe_dump({**yaml.safe_load(spec.read_text()), "weights": "tiny.safetensors"}))
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    _run(root, "git", "init", "-q")
    dvc = str(BIN / "dvc")
    assert "Running stage 'teach@tiny'" in _run(root, dvc, "repro", "teach@tiny")
    _run(root, dvc, "remote", "add", "-d", "team", str(tmp_path / "remote"))
    _run(root, "git", "add", "-A")
    _run(root, "git", "commit", "-q", "-m", "one teacher pass")
    _run(root, dvc, "push")

    clone = tmp_path / "clone"
    _run(tmp_path, "git", "clone", "-q", str(root), str(clone))
    _run(clone, dvc, "pull", "--with-deps", "teach@tiny")
    store = json.loads((root / "outputs/teach/tiny.json").read_text())["store"]
    _same_tree(root / "outputs/stores/tiny", clone / "outputs/stores/tiny")
    assert Path(store).name in os.listdir(clone / "outputs/stores/tiny")
    assert "Running stage" not in _run(clone, dvc, "repro", "teach@tiny"), "the pulled store must not be recomputed"
