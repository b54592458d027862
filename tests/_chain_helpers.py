"""Fixtures for the chain tests (fuse, evaluate, report): tiny shards and a fake finished student."""

from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

import pipeline.models  # noqa: F401  (registers rep students)
from pipeline.data.shards import write_shards
from pipeline.data.sources import synthetic
from pipeline.io import sha256_file
from pipeline.models.rep import rep_settings
from pipeline.preprocess import Preprocess
from pipeline.records import TrainedStudent


def tiny_shards(root: Path, num_classes: int = 4, per_class: int = 6, size: int = 64) -> Path:
    name, classes, splits = synthetic(num_classes, per_class, size, "png", 0.5, 0)
    out = root / "shards"
    write_shards(splits, out, name, classes, "synthetic", quiet=True)
    return out


def _randomise_bn(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BN statistics, so that folding them is actually tested."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


def fake_student(out: Path, model: str = "rep_ghostnetv3_050", num_classes: int = 4, size: int = 64,
                 teachers=(), seed: int = 0, **model_kwargs) -> Path:
    """A directory shaped like `pipeline student`'s output, with random (but BN-perturbed) weights."""
    torch.manual_seed(seed)
    net = timm.create_model(model, num_classes=num_classes, **model_kwargs).eval()
    _randomise_bn(net, seed)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    save_file(state, str(out / "ema.safetensors"))
    recipe = {"name": "demo", "alpha": 0.5 if teachers else 0.0, "tau": 1.0, "epochs": 1, "opt": "lamb"}
    TrainedStudent(
        model=model, model_kwargs={**model_kwargs, **rep_settings(net)}, num_classes=num_classes,
        preprocess=Preprocess(size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1.0, "bicubic"),
        teachers=tuple(teachers), teacher_weights=None, recipe=recipe, view_plan={}, num_views=1, epochs=1, init=None,
        threads=1, views_from=None, weights="ema.safetensors",
        weights_choice={"rule": "fixed by the test helper", "model_top1": 0.0, "ema_top1": 0.0},
        val_curve=[{"epoch": 1, "top1": 0.0, "ema_top1": 0.0, "val_images": 1}],
        sha256={name: sha256_file(out / name) for name in ("model.safetensors", "ema.safetensors")}).write(out)
    return out
