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


def metrics(student, top1, latency, **extra):
    """A metrics file's keys, as `pipeline evaluate` writes them."""
    return {"student": student, "model": "rep_ghostnetv2_050", "stock_model": "ghostnetv2_050",
            "deploy": 'timm GhostNet(width=0.5, version="v2", cfgs from fuse.json)', "dataset": "digits",
            "val_samples": 360, "input_size": 64, "top1": top1, "top5": 99.5, "params": 1_500_000, "macs": 4_900_000,
            "training_form": {"params": 2_100_000, "macs": 10_400_000}, "fused_check": {"max_abs_diff": 3.7e-7},
            "onnx_check": None, "latency_ms": {"torch": latency * 10, "onnx": latency}, "latency_p10_p90_ms": {},
            "throughput": {"torch": 900.0, "onnx": 4000.0}, "throughput_batch": 32, "latency_runs": 100,
            "torch_threads": 1, "teachers": ["demo-resnet10t"], "teacher_agreement": {"demo-resnet10t": 97.25},
            "teacher_top1": {},
            "recipe_summary": "demo: KD a=0.5 tau=1, N=3+1x1, 6 ep lamb", "val_curve": [], **extra}
