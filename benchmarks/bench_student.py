"""Student step cost on CPU: plain CE vs KD from the store vs online KD with the teacher in the loop.

GhostNetV3 1.0x in training form (N=3 + 1x1 DW) at 224 px, the paper's step (LAMB + weight EMA),
data loading included (student_loader replaying RandAugment + RandomErasing views from JPEG shards).
(a) CE only; (b) KD from a teacher store (lookup + top-k/rest-bucket loss); (c) online KD: the
teacher's forward on the same batch in every step (timm resnet101 and deit_base_patch16_224, random
weights: the timing does not depend on them). Plus each teacher's bare forward on the same batch.

    python benchmarks/bench_student.py [--batch-size 8] [--steps 4] [--threads 1] [--device cpu|cuda]

Prints one JSON object. Everything runs channels_last, as the trainer does; on CUDA under bf16 autocast.
About 4-5 minutes on 2 busy CPU cores with the defaults. Whole-step times swing with the machine's
load, so modes run round-robin and report medians, and the KD overhead is also timed on its own
(`offline_over_ce_from_parts`).
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3

import pipeline.models  # noqa: F401
from pipeline.data import shards as shard_io
from pipeline.data import sources
from pipeline.data.loaders import student_loader
from pipeline.data.views import ViewPlan
from pipeline.distill import Targets, dense_target, kd_loss
from pipeline.runtime import Normalize, autocast, student_amp
from pipeline.store import open_pointer
from pipeline.teach import teach

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TEACHERS = {"resnet101": "resnet101", "deit_base": "deit_base_patch16_224"}


def make_data(root: Path, samples: int, num_classes: int, plan: ViewPlan):
    """JPEG shards of `samples` 224-px images and a K=10 store over them (a small random timm teacher)."""
    name, classes, splits = sources.synthetic(num_classes, samples // num_classes, 256, "jpg", 0.0, seed=0)
    splits = {"train": splits["train"], "val": splits["train"][:2]}
    shard_io.write_shards(splits, root / "shards", name, classes, "synthetic", quiet=True)
    weights = root / "teacher.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=num_classes).state_dict(), weights)
    spec = {"name": "bench", "model": "resnet10t", "source": "timm", "pretrained": False, "input_size": 224,
            "num_classes": num_classes}
    teach(teacher=spec, shards=root / "shards", plan=plan, num_views=1, k=10, batch_size=32, weights=weights,
          store_root=root / "stores", out=root / "teach", quiet=True, log=lambda *a: None)
    return open_pointer(root / "teach" / "bench.json")


class Stepper:
    """One training step of a mode (loader + forward + loss + backward + LAMB + EMA), timed in seconds."""

    def __init__(self, student, optimizer, ema, loader_fn, targets, device):
        self.student, self.optimizer, self.ema, self.loader_fn = student, optimizer, ema, loader_fn
        self.targets, self.device, self.iters, self.updates = targets, device, {}, 0
        self.normalize = Normalize(MEAN, STD, device)  # the loader's uint8 images, as the trainer does

    def _batch(self, mode):
        try:
            return next(self.iters[mode])
        except (KeyError, StopIteration):
            self.iters[mode] = iter(self.loader_fn())
            return next(self.iters[mode])

    def __call__(self, mode, teacher=None) -> float:
        device = self.device
        start = time.perf_counter()
        batch = self._batch(mode)
        x = self.normalize(batch["image"]).contiguous(memory_format=torch.channels_last)  # as the trainer
        y = batch["label"].to(device)
        with autocast(device, student_amp(device)):
            if mode == "ce":
                target, alpha = None, 0.0
            elif mode == "offline_kd":
                target, alpha = self.targets(batch["index"], batch["view"], device), 0.5
            else:
                with torch.no_grad():
                    target, alpha = dense_target(teacher(x)), 0.5
            logits = self.student(x)
        loss = kd_loss(logits, y, target, alpha, 1.0, 0.1)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.updates += 1
        self.ema.update(self.student, step=self.updates)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def loss_ms(mode, targets, batch, num_classes, device, reps=50) -> float:
    """ms of what KD adds outside the networks: store lookup + target + loss forward/backward."""
    logits = torch.randn(len(batch["label"]), num_classes, device=device, requires_grad=True)
    y = batch["label"].to(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        target = targets(batch["index"], batch["view"], device) if mode == "offline_kd" else None
        kd_loss(logits, y, target, 0.5 if target else 0.0, 1.0, 0.1)["loss"].backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.no_grad()
def forward_ms(model, x, device, reps):
    times = []
    for i in range(reps + 1):  # the first one is a warmup
        start = time.perf_counter()
        with autocast(device, student_amp(device)):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode (after one warmup step), round-robin over modes")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (more than the idle cores makes OpenMP spin: 10-40x slower)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    plan = ViewPlan(size=224)  # the paper's views: RandomResizedCrop + flip + rand-m9-mstd0.5 + RE 0.25
    count = max(args.batch_size * (args.steps + 1), args.classes)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = make_data(root, count, args.classes, plan)
        targets = Targets([store], args.classes, tau=1.0)
        torch.manual_seed(0)
        cl = torch.channels_last
        student = timm.create_model("rep_ghostnetv3_100", num_classes=args.classes, num_branches=3,
                                    scale_branch=True).to(device, memory_format=cl)
        teachers = {k: timm.create_model(v, num_classes=args.classes).to(device, memory_format=cl).eval()
                    for k, v in TEACHERS.items()}
        optimizer = create_optimizer_v2(student, opt="lamb", lr=5e-3, weight_decay=0.05)
        ema = ModelEmaV3(student, decay=0.9999)

        def loader():
            return student_loader(root / "shards", "train", plan, 1, 224, args.batch_size, seed=0, epoch=0)

        step = Stepper(student, optimizer, ema, loader, targets, device)
        modes = {"ce": None, "offline_kd": None, **{f"online_kd_{k}": t for k, t in teachers.items()}}
        for mode, teacher in modes.items():  # warmup
            step(mode, teacher)
        # Round-robin, median: load from other processes hits every mode alike.
        samples = {mode: [] for mode in modes}
        for _ in range(args.steps):
            for mode, teacher in modes.items():
                samples[mode].append(step(mode, teacher))
        step_ms = {mode: 1000 * statistics.median(v) for mode, v in samples.items()}
        batch = next(iter(loader()))
        fwd = {name: forward_ms(t, Normalize(MEAN, STD, device)(batch["image"]), device, args.steps) for name, t in teachers.items()}
        loss = {mode: loss_ms(mode, targets, batch, args.classes, device) for mode in ("ce", "offline_kd")}
    result = {
        "step_ms": {k: round(v, 1) for k, v in step_ms.items()},
        "teacher_fwd_ms": {k: round(v, 1) for k, v in fwd.items()},
        "offline_over_ce": round(step_ms["offline_kd"] / step_ms["ce"], 3),
        # The same ratio from its parts: what offline KD adds (lookup + target + loss) is measured alone,
        # 50 times, so it is steady under CPU load, unlike whole steps.
        "loss_ms": {k: round(v, 3) for k, v in loss.items()},
        "offline_over_ce_from_parts": round((step_ms["ce"] + loss["offline_kd"] - loss["ce"]) / step_ms["ce"], 4),
        "online_over_offline": {k: round(step_ms[f"online_kd_{k}"] / step_ms["offline_kd"], 3) for k in TEACHERS},
        "config": {"student": "rep_ghostnetv3_100 (N=3 + 1x1 DW, training form)", "size": 224, "batch": args.batch_size,
                   "timed_steps": args.steps, "threads": args.threads, "device": str(device),
                   "dtype": "bf16 autocast" if device.type == "cuda" else "fp32", "classes": args.classes,
                   "store_k": 10, "torch": torch.__version__,
                   "load_avg_1min": round(os.getloadavg()[0], 2), "timing": "median, modes round-robin"},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
