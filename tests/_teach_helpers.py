"""Tiny local teachers and shards for the teacher/store tests (no hub, 64 px, a few samples)."""

from pathlib import Path

import timm
import torch
import yaml
from safetensors.torch import save_file

from tests._data_helpers import synthetic_shards

NUM_CLASSES = 4


def tiny_teacher(tmp: Path, name="tiny", seed=0, num_classes=NUM_CLASSES) -> Path:
    """A random-weight timm test_resnet saved as safetensors + its spec YAML; returns the spec path."""
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=num_classes)
    save_file(model.state_dict(), str(tmp / f"{name}.safetensors"))
    spec = {"name": name, "model": "test_resnet", "source": "timm", "weights": str(tmp / f"{name}.safetensors"),
            "input_size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "num_classes": num_classes}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def tiny_shards(tmp: Path) -> Path:
    out = tmp / "shards"
    synthetic_shards(out, num_classes=NUM_CLASSES, per_class=3, size=48, shard_size=5)
    return out


def teach_args(spec, shards, root, *extra):
    """CLI arguments of a small, fast teach run (V=2, K=3, shards of 2 rows)."""
    return ["teach", "--teacher", str(spec), "--shards", str(shards), "--num-views", "2", "--k", "3", "--batch-size", "2",
            "--shard-rows", "2", "--device", "cpu", "--store-root", str(root), "--out", str(root / "out"),
            "--values", "f16", "--quiet", *extra]
