"""Views rendered per second on one core at 224 px: our replayable views vs timm's train transform.

Both read the same JPEG shards and decode the same bytes; ours draws the view parameters and renders
them (uint8), timm runs create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5",
re_prob=0.25). The headline pair does the same work: timm's defaults there are bilinear resampling
and constant erasing, so our plan uses the same; a second pair compares both at our ViewPlan defaults
(bicubic, per-pixel noise erasing). Rounds alternate between pipelines so a busy machine slows all alike. Images are
CIFAR-10 upscaled to 256 px when ../shared/data/cifar10/train.tar is present, else synthetic JPEGs.
Prints one JSON object.

    python benchmarks/bench_views.py [--images 256] [--seconds 60]
"""

import argparse
import io
import json
import tarfile
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from timm.data import create_transform

from pipeline.data import shards, sources
from pipeline.data.shards import ShardReader
from pipeline.data.views import ViewPlan, render, view_params

CIFAR_TAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "train.tar"
SIZE = 224


def _cifar_upscaled(count: int, side: int = 256):
    """The first `count` CIFAR-10 images, upscaled to `side` px and re-encoded as JPEG."""
    samples = []
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            if len(samples) == count:
                break
            if member.isfile() and member.name.endswith(".jpg"):
                img = Image.open(tar.extractfile(member)).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                key = member.name.rpartition(".")[0]
                samples.append(shards.Sample(key, 0, "jpg", member.name, partial(bytes, buf.getvalue())))
    return "cifar10-256", ["0"], {"train": samples}


def _time(fn, reader, start: int, count: int) -> float:
    t0 = time.perf_counter()
    for j in range(start, start + count):
        fn(reader, j % len(reader))
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="distinct source images (default 256)")
    parser.add_argument("--seconds", type=float, default=60, help="rough total run time (default 60)")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds per pipeline (default 6)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    if CIFAR_TAR.is_file():
        name, classes, splits = _cifar_upscaled(args.images)
    else:
        name, classes, splits = sources.synthetic(1, args.images, 256, "jpg", 0.0, seed=0)
        splits = {"train": splits["train"]}
    timm_like = ViewPlan(size=SIZE, interpolation="bilinear", re_mode="const")
    plan = ViewPlan(size=SIZE)
    timm_tf = create_transform(SIZE, is_training=True, auto_augment="rand-m9-mstd0.5", re_prob=0.25)
    timm_plan = create_transform(SIZE, is_training=True, auto_augment="rand-m9-mstd0.5", re_prob=0.25,
                                 interpolation=plan.interpolation, re_mode=plan.re_mode)
    pipelines = {
        "ours": lambda r, i: render(r.image(i), view_params(timm_like, r.key(i), i), timm_like),
        "timm": lambda r, i: timm_tf(r.image(i)),
        "ours_plan_default": lambda r, i: render(r.image(i), view_params(plan, r.key(i), i), plan),
        "timm_plan_default": lambda r, i: timm_plan(r.image(i)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        shards.write_shards(splits, Path(tmp) / "shards", name, classes, name, maxcount=128, quiet=True)
        reader = ShardReader(Path(tmp) / "shards", "train")
        per_image = {k: _time(fn, reader, 0, 8) / 8 for k, fn in pipelines.items()}  # warm-up + calibration
        budget = args.seconds / (args.rounds * len(pipelines))
        counts = {k: max(8, int(budget / t)) for k, t in per_image.items()}
        elapsed, done = dict.fromkeys(pipelines, 0.0), dict.fromkeys(pipelines, 0)
        for r in range(args.rounds):
            for k, fn in pipelines.items():
                elapsed[k] += _time(fn, reader, r * counts[k], counts[k])
                done[k] += counts[k]
    rate = {k: done[k] / elapsed[k] for k in pipelines}
    print(json.dumps({
        "ours_views_per_s": round(rate["ours"], 1),
        "timm_views_per_s": round(rate["timm"], 1),
        "ratio": round(rate["ours"] / rate["timm"], 3),
        "ours_bicubic_pixel_views_per_s": round(rate["ours_plan_default"], 1),
        "timm_bicubic_pixel_views_per_s": round(rate["timm_plan_default"], 1),
        "ratio_bicubic_pixel": round(rate["ours_plan_default"] / rate["timm_plan_default"], 3),
        "ours_bicubic_vs_timm_default": round(rate["ours_plan_default"] / rate["timm"], 3),
        "images": f"{name} x{len(reader)} (256 px JPEG)",
        "size": SIZE,
        "threads": 1,
    }))


if __name__ == "__main__":
    main()
