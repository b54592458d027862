"""Run the chain's GPU paths end to end on a machine with a CUDA GPU; elsewhere say so in one line, exit 0.

On generated ImageNet-like images (bench_scale's: JPEG q 90 around 500x375, 1000 classes, a fifth more as
val) with random-weight models (--teacher-model, default vit_base_patch16_224: the paper's teacher class;
--student, default ghostnetv3-100), it prints one JSON object:

  teach     `pipeline teach --device cuda --amp bf16 --channels-last` over --images x --num-views views:
            teach_views_per_s beside bare_views_per_s, a bare bf16 channels_last forward of the same teacher
            on ready uint8 batches (teach_over_bare: target >= 0.9, the loader keeps the GPU fed; the teach
            figure includes the loader's start);
  student   `pipeline student` for two epochs under torchrun on every visible GPU (DDP over NCCL with two or
            more; one GPU is one process without a process group: NCCL takes one GPU per rank; bf16 autocast
            and channels_last as on any GPU): images/s of epoch 1 (not validated; it includes the start of
            the loader and of the GPU) beside the loader alone (student_loader over rank 0's pairs of the same
            epoch, params from the store, no model), both per rank;
  fuse      `pipeline fuse` of that student; evaluate: `pipeline evaluate` of the fused student (CPU stages);
  peak_gpu_mb  the most device memory in use (cudaMemGetInfo: every process) during teach and during student,
            above what was in use when each began.

cpu_equal, each stage's outputs against a CPU run, within its tolerance:
  teach     sampled stored views re-rendered from the store and re-run on the CPU (pipeline.audit, at the
            store's autocast): the audit's verdict (KL, lse, re-derived params within its tolerances);
  student   on --check-images of their own (a smaller set), two epochs on the GPUs and on the CPU (no GPU
            visible), same seed: the epochs' train losses within --loss-rtol (bf16 against fp32; with two or
            more GPUs BatchNorm statistics are per rank as well);
  fuse      fused against training form, on the CPU: fuse's own check (max |diff| <= its atol, no clear
            top-1 flip; the stage fails otherwise);
  evaluate  the fused student's top-1 on the CPU within --top1-points of its last validation on the GPU.

    python benchmarks/gpu_check.py [--images 8192] [--num-views 2] [--check-images 512] [--workers N]
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = str(Path(sys.executable).parent / "pipeline")  # the console script
BATCH = 256  # teacher views a forward; student images a global batch
SEED = 0  # the demo recipe's


def make_set(out: Path, images: int) -> Path:
    """`images` train images and a fifth as many val images of 1000 classes, as shards."""
    from bench_scale import POOL, _pool

    from pipeline.data.shards import Sample, write_shards

    pool = _pool(min(POOL, images))
    labels = np.random.default_rng(1).integers(0, 1000, images + images // 5)
    samples = [Sample(f"n{label:04d}/img{i:07d}", int(label), "jpg", f"generated:{i}",
                      partial(bytes, pool[i % len(pool)])) for i, label in enumerate(labels)]
    write_shards({"train": samples[:images], "val": samples[images:]}, out, "imagenet-like",
                 [f"c{c:04d}" for c in range(1000)], "generated", maxcount=1000, quiet=True)
    return out


def random_teacher(tmp: Path, model_name: str):
    """(spec, model): a random-weight timm teacher of 1000 classes, its weights in a file as a spec names them."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(SEED)
    model = timm.create_model(model_name, num_classes=1000).eval()
    weights = tmp / "teacher.safetensors"
    save_file(model.state_dict(), str(weights))
    return {"name": "teacher", "model": model_name, "weights": str(weights), "num_classes": 1000}, model


@contextmanager
def peak_gpu_mb(into: dict, key: str, every_s: float = 0.05):
    """The most memory in use on a visible GPU while the block runs (every process's, cudaMemGetInfo) above
    what was in use when it began, in MiB."""
    import torch

    def used():
        return max(total - free for free, total in map(torch.cuda.mem_get_info, range(torch.cuda.device_count())))

    start = used()
    peak, done = [start], threading.Event()

    def poll():
        while not done.wait(every_s):
            peak[0] = max(peak[0], used())

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        into[key] = round((max(peak[0], used()) - start) / 2**20)


def bare_views_per_s(model, spec: dict, views: int) -> float:
    """A bf16 channels_last forward of the teacher on ready uint8 batches on the GPU (teach's Forward)."""
    import torch

    from pipeline.teachers import Forward, teacher_spec

    forward = Forward(model, teacher_spec(spec), torch.device("cuda"), "bf16", channels_last=True)
    images = torch.randint(0, 256, (BATCH, 3, 224, 224), dtype=torch.uint8, device="cuda")
    forward(images)  # warm-up: kernel selection
    torch.cuda.synchronize()
    start, batches = time.perf_counter(), max(1, views // BATCH)
    for _ in range(batches):
        forward(images)
    torch.cuda.synchronize()
    return batches * BATCH / (time.perf_counter() - start)


def teach_gpu(shards: Path, spec: dict, out: Path, args) -> dict:
    from pipeline.data.views import ViewPlan
    from pipeline.teach import teach

    return teach(teacher=spec, shards=shards, plan=ViewPlan(renderer="fast"), num_views=args.num_views, k=10,
                 batch_size=BATCH, device="cuda", amp="bf16", channels_last=True, workers=args.workers,
                 store_root=out / "stores", out=out / "teach", quiet=True)


def student(shards: Path, teach_dir: Path, out: Path, args, gpus: int) -> list[dict]:
    """`pipeline student` for two epochs (the second validated): under torchrun on `gpus` GPUs, or on the CPU
    with gpus=0. Returns plots.csv's rows."""
    common = ["student", "--student", args.student, "--teachers", "teacher", "--teach-dir", str(teach_dir),
              "--recipe", "demo", "--shards", str(shards), "--out", str(out), "--epochs", "2", "--val-every", "2",
              "--batch-size", str(BATCH), "--img-size", "224", "--warmup-epochs", "0", "--quiet"]
    if gpus:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus), PIPELINE,
               *common, "--workers", str(max(1, args.workers // gpus))]
        env = dict(os.environ)
    else:
        cmd, env = [PIPELINE, *common, "--workers", str(args.workers)], {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=sys.stderr)  # stdout: the JSON only
    with open(out / "plots.csv") as f:
        return list(csv.DictReader(f))


def loader_images_per_s(shards: Path, store, gpus: int, args) -> float:
    """Rank 0's share of epoch 0 through the student's loader (params read from the store), no model."""
    from pipeline.data.loaders import student_batches, student_loader
    from pipeline.data.views import ViewPlan

    local = BATCH // gpus
    pairs = np.concatenate(student_batches(shards, "train", store.num_views, local, SEED, 0, 0, gpus, drop_last=True))
    stored = store.read_views(pairs[:, 0], pairs[:, 1], ("params",))
    loader = student_loader(shards, "train", ViewPlan.load(store.plan), store.num_views, 224, local, SEED, 0, 0, gpus,
                            max(1, args.workers // gpus), drop_last=True, stored_params=stored)
    start = time.perf_counter()
    images = sum(len(batch["index"]) for batch in loader)
    return images / (time.perf_counter() - start)


def fuse_and_evaluate(student_dir: Path, shards: Path, out: Path, top1_points: float) -> dict:
    """cpu_equal's fuse and evaluate entries of a trained student (see the module docstring)."""
    fuse = subprocess.run([PIPELINE, "fuse", "--student-dir", str(student_dir), "--shards", str(shards), "--out",
                           str(out / "fused")], cwd=ROOT, capture_output=True, text=True)
    if fuse.returncode:  # fuse refuses a fused form that differs from the training form
        return {"fuse": {"ok": False, "error": (fuse.stdout + fuse.stderr).strip().splitlines()[-1]}}
    subprocess.run([PIPELINE, "evaluate", "--fused-dir", str(out / "fused"), "--shards", str(shards), "--out",
                    str(out / "metrics.json"), "--quiet"], check=True, cwd=ROOT, stdout=sys.stderr)
    fused = json.loads((out / "fused" / "fuse.json").read_text())
    trained = json.loads((student_dir / "student.json").read_text())
    gpu_top1 = trained["weights_choice"]["ema_top1" if trained["weights"] == "ema.safetensors" else "model_top1"]
    cpu_top1 = json.loads((out / "metrics.json").read_text())["top1"]
    return {"fuse": {"ok": True, **fused["fused_check"]},
            "evaluate": {"ok": abs(cpu_top1 - gpu_top1) <= top1_points, "cpu_top1": cpu_top1, "gpu_val_top1": gpu_top1,
                         "tolerance_points": top1_points}}


def check(args, tmp: Path) -> dict:
    import torch

    from pipeline.audit import audit_store
    from pipeline.store import open_pointer

    gpus = torch.cuda.device_count()
    spec, model = random_teacher(tmp, args.teacher_model)
    shards = make_set(tmp / "shards", args.images)
    r = {"gpu": torch.cuda.get_device_name(0), "gpus": gpus, "ddp_nccl": gpus > 1, "images": args.images,
         "num_views": args.num_views, "teacher_model": args.teacher_model, "student": args.student,
         "workers": args.workers}
    peak, equal = {}, {}

    with peak_gpu_mb(peak, "teach"):
        teach = teach_gpu(shards, spec, tmp / "perf", args)
    r["teach_views_per_s"] = teach["views_per_s"]
    r["bare_views_per_s"] = round(bare_views_per_s(model, spec, args.images * args.num_views), 1)
    r["teach_over_bare"] = round(r["teach_views_per_s"] / r["bare_views_per_s"], 3)
    store = open_pointer(tmp / "perf" / "teach" / "teacher.json")
    audit = audit_store(store, shards, teacher=spec, samples=args.audit_samples, device="cpu")
    equal["teach"] = {k: audit[k] for k in ("ok", "max_kl", "max_lse_diff", "top1_agreement", "tolerance")}

    del model
    torch.cuda.empty_cache()
    with peak_gpu_mb(peak, "student"):
        rows = student(shards, tmp / "perf" / "teach", tmp / "perf" / "student", args, gpus)
    steps = args.images // BATCH
    r["student_images_per_s_per_rank"] = round(steps * BATCH / gpus / float(rows[0]["seconds"]), 1)
    r["loader_images_per_s_per_rank"] = round(loader_images_per_s(shards, store, gpus, args), 1)
    r["student_over_loader"] = round(r["student_images_per_s_per_rank"] / r["loader_images_per_s_per_rank"], 3)

    equal.update(fuse_and_evaluate(tmp / "perf" / "student", shards, tmp / "perf", args.top1_points))

    small = make_set(tmp / "check-shards", args.check_images)
    teach_gpu(small, spec, tmp / "check", args)
    on_gpu = student(small, tmp / "check" / "teach", tmp / "check" / "gpu", args, gpus)
    on_cpu = student(small, tmp / "check" / "teach", tmp / "check" / "cpu", args, 0)
    losses = [(float(g["loss"]), float(c["loss"])) for g, c in zip(on_gpu, on_cpu, strict=True)]
    equal["student"] = {"ok": all(abs(g - c) <= args.loss_rtol * abs(c) for g, c in losses),
                        "gpu_losses": [g for g, _ in losses], "cpu_losses": [c for _, c in losses], "rtol": args.loss_rtol}
    return {**r, "peak_gpu_mb": peak, "cpu_equal": equal, "all_cpu_equal": all(stage["ok"] for stage in equal.values())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8192, help="train images of the throughput set")
    parser.add_argument("--num-views", type=int, default=2, help="views per image the teacher stores")
    parser.add_argument("--check-images", type=int, default=512, help="train images of the student's CPU comparison")
    parser.add_argument("--teacher-model", default="vit_base_patch16_224", help="timm model of the random teacher")
    parser.add_argument("--student", default="ghostnetv3-100", help="student spec (manifests/students)")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="loader workers in all")
    parser.add_argument("--audit-samples", type=int, default=64, help="stored views re-run on the CPU")
    parser.add_argument("--loss-rtol", type=float, default=0.05)
    parser.add_argument("--top1-points", type=float, default=1.0)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: skipped: no CUDA GPU visible (torch.cuda.is_available() is False)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(check(args, Path(tmp))))


if __name__ == "__main__":
    main()
