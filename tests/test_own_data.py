"""The own-data path end to end on a CIFAR-10 subset: 32-px JPEGs rendered at 64 px, a user's TorchScript
teacher fine-tuned on the teach views, a pretrained-init student from a locally saved stock checkpoint,
teach, student, fuse, evaluate. Small on purpose (160 images, 1 epoch each); the larger run is in the README."""

import io
import json
import tarfile
from pathlib import Path

import pytest
import timm
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from pipeline.data.shards import ShardManifest
from pipeline.io import sha256_file
from pipeline.models import create_stock_model
from stages.cli import main
from tests.conftest import EMPTY_PARAMS

HERE = Path(__file__).resolve()
CIFAR = next((p / "data" / "cifar10" / "train.tar" for p in (HERE.parents[2] / "shared", HERE.parents[3] / "shared")
              if (p / "data" / "cifar10" / "train.tar").is_file()), None)
PER_CLASS = 16
PLAN = {"seed": 0, "size": 64, "scale": [0.35, 1.0], "hflip": 0.5, "auto_augment": "rand-m9-mstd0.5",
        "re_prob": 0.25}


def _subset(dest: Path) -> Path:
    """The first PER_CLASS images of each class, as an ImageFolder tar like the original."""
    counts = {}
    dest.parent.mkdir(parents=True)
    with tarfile.open(CIFAR) as src, tarfile.open(dest, "w") as out:
        for member in src:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 2 or counts.get(parts[-2], 0) >= PER_CLASS:
                continue
            counts[parts[-2]] = counts.get(parts[-2], 0) + 1
            out.addfile(member, io.BytesIO(src.extractfile(member).read()))
            if len(counts) == 10 and all(n >= PER_CLASS for n in counts.values()):
                break
    return dest


def _cli(*args, params=None):
    result = CliRunner().invoke(main, ["--params", str(params or EMPTY_PARAMS), *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
@pytest.mark.skipif(CIFAR is None, reason="the CIFAR-10 tar of ../shared is not here")
def test_own_data_path_on_a_cifar10_subset(tmp_path):
    torch.manual_seed(0)
    tar = _subset(tmp_path / "cifar10" / "train.tar")
    shards = tmp_path / "shards"
    _cli("shard", "--source", f"imagefolder:{tar}", "--out", shards, "--image-size", "64", "--val-fraction", "0.25",
         "--quiet")
    manifest = ShardManifest.read(shards)
    assert manifest.dataset == "cifar10" and manifest.num_classes == 10 and manifest.crop_pct == 1.0

    # the user's own TorchScript teacher (random weights here), its spec without crop_pct
    torch.jit.save(torch.jit.script(timm.create_model("resnet10t", num_classes=10).eval()), str(tmp_path / "own.pt"))
    spec = tmp_path / "own.yaml"
    spec.write_text(yaml.safe_dump({"name": "own", "model": str(tmp_path / "own.pt"), "source": "torchscript", "trust_code": True,
                                    "input_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3, "num_classes": 10}))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"teach": {"num-views": 2, "plan": PLAN}}))
    out = _cli("finetune-teacher", "--teacher", spec, "--shards", shards, "--out", tmp_path / "own-ft",
               "--epochs", "1", "--batch-size", "32", "--threads", "1", "--quiet", params=params)
    assert "on views" in out
    tuned = json.loads((tmp_path / "own-ft" / "metrics.json").read_text())
    assert tuned["plan"]["auto_augment"] == PLAN["auto_augment"] and tuned["before"] != tuned["after"]

    _cli("teach", "--teacher", tmp_path / "own-ft" / "teacher.yaml", "--shards", shards, "--num-views", "2", "--k", "5",
         "--batch-size", "64", "--device", "cpu", "--store-root", tmp_path / "stores", "--out", tmp_path / "teach",
         "--quiet", params=params)

    stock = create_stock_model("rep_ghostnetv3_050")  # a locally saved stock checkpoint (GhostNetV2 0.5x)
    save_file(stock.state_dict(), str(tmp_path / "stock.safetensors"))
    _cli("student", "--student", "ghostnetv3-050", "--teachers", "own-ft", "--teach-dir", tmp_path / "teach",
         "--shards", shards, "--out", tmp_path / "student", "--recipe", "demo", "--epochs", "1", "--batch-size", "20",
         "--init", tmp_path / "stock.safetensors", "--threads", "1", "--val-samples", "20", "--quiet")
    info = json.loads((tmp_path / "student" / "student.json").read_text())
    assert info["init"]["sha256"] == sha256_file(tmp_path / "stock.safetensors") and info["threads"] == 1

    _cli("fuse", "--student-dir", tmp_path / "student", "--shards", shards, "--out", tmp_path / "fused",
         "--check-images", "8")
    _cli("evaluate", "--fused-dir", tmp_path / "fused", "--shards", shards, "--teach-dir", tmp_path / "teach",
         "--finetune-dir", tmp_path, "--out", tmp_path / "eval" / "s.json", "--latency-runs", "3", "--latency-batch", "2",
         "--threads", "1", "--quiet")
    metrics = json.loads((tmp_path / "eval" / "s.json").read_text())
    assert metrics["val_samples"] == 40 and 0 <= metrics["top1"] <= 100
    assert "init stock.safetensors" in metrics["recipe_summary"]
    assert set(metrics["latency_p10_p90_ms"]) == {"torch", "onnx"}
