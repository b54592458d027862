"""A team shares one teacher pass through a DVC remote: `dvc push` after teach, `dvc pull` in a fresh
clone, and that clone's `dvc repro` runs no teacher (the store came back byte for byte)."""

import filecmp
import json
import os
from pathlib import Path

import pytest
import yaml

from tests._dvc_helpers import dvc, dvc_project, git, ran
from tests._teach_helpers import tiny_teacher

PARAMS = {
    "launch": {"teach": "pipeline", "student": "pipeline"},
    "shard": {"source": "synthetic", "num-classes": 4, "per-class": 4, "image-size": 64, "val-fraction": 0.25},
    "finetune": {},
    "teachers": {"tiny": {"spec": "teachers/tiny.yaml"}},
    "teach": {"num-views": 2, "k": 3, "batch-size": 8, "quiet": True,
              "plan": {"size": 64, "auto_augment": None, "re_prob": 0.0}},
    "students": {},
}


def _same_tree(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


@pytest.mark.slow
def test_store_is_pushed_and_pulled_through_a_dvc_remote(tmp_path):
    root = dvc_project(tmp_path / "repo")
    (root / "teachers").mkdir()
    spec = tiny_teacher(root / "teachers")
    spec.write_text(yaml.safe_dump({**yaml.safe_load(spec.read_text()), "weights": "tiny.safetensors"}))
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    assert ran(dvc(root, "repro", "teach@tiny")) == {"shard", "teach@tiny"}
    dvc(root, "remote", "add", "-d", "team", str(tmp_path / "remote"))
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "one teacher pass")
    dvc(root, "push")

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(root), str(clone))
    dvc(clone, "pull", "--with-deps", "teach@tiny")
    store = json.loads((root / "outputs/teach/tiny.json").read_text())["store"]
    _same_tree(root / "outputs/stores/tiny", clone / "outputs/stores/tiny")
    assert Path(store).name in os.listdir(clone / "outputs/stores/tiny")
    assert ran(dvc(clone, "repro", "teach@tiny")) == set(), "the pulled store must not be recomputed"
