"""Why the trainer runs channels_last on the CPU too: a training step per model, NCHW vs channels_last.

A step is forward + cross-entropy + backward + SGD on a --batch-size x --img-size batch of random images, the
model in train mode (every re-parameterized branch live). Both layouts run on twin models, interleaved (one
step each, in turn), so load from other processes hits both alike; figures are medians over --runs after
two warm-up steps. `max_abs_loss_diff` is the first step's loss difference (the layouts sum in different
orders: equal to float rounding, not bit for bit).

    python benchmarks/bench_memory_format.py [--threads 1] [--batch-size 32] [--img-size 64] [--runs 10]

Prints one JSON object: per model {"nchw_s", "channels_last_s", "speedup", "max_abs_loss_diff"}.
No threshold: a figure to read, not a test.
"""

import argparse
import copy
import json
import statistics
import time

import timm
import torch

import pipeline.models  # noqa: F401 - registers the rep students
from bench_compile import make_step  # forward + cross-entropy + backward + SGD; returns the loss

MODELS = {  # the demo's students and teacher ("plain": the stock GhostNetV2 form, trained as such)
    "rep_ghostnetv3_050": {"num_branches": 3, "scale_branch": True},
    "rep_ghostnetv3_050 plain": {"num_branches": 1, "scale_branch": False, "identity_branch": False},
    "rep_shufflenetv2_100": {"num_branches": 3, "scale_branch": True},
    "rep_mobilenetv2_100": {"num_branches": 3, "scale_branch": True},
    "resnet10t": {},
}


def timed(step, x, y) -> float:
    start = time.perf_counter()
    step(x, y)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument("--img-size", type=int, default=64, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=10, help="timed steps per layout (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = {}
    for name, kwargs in MODELS.items():
        torch.manual_seed(0)
        model = timm.create_model(name.split()[0], num_classes=10, drop_rate=0.0, **kwargs)
        _, nchw = make_step(copy.deepcopy(model).train())
        _, last = make_step(model.to(memory_format=torch.channels_last).train())
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
        x_last = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (args.batch_size,))
        loss_diff = abs(nchw(x, y) - last(x_last, y))
        last(x_last, y), nchw(x, y)  # warm-up
        times = {"nchw": [], "channels_last": []}
        for _ in range(args.runs):
            times["nchw"].append(timed(nchw, x, y))
            times["channels_last"].append(timed(last, x_last, y))
        a, b = statistics.median(times["nchw"]), statistics.median(times["channels_last"])
        results[name] = {"nchw_s": round(a, 4), "channels_last_s": round(b, 4), "speedup": round(a / b, 2),
                         "max_abs_loss_diff": loss_diff}
    print(json.dumps({"threads": args.threads, "batch_size": args.batch_size, "img_size": args.img_size,
                      "runs": args.runs, "torch": torch.__version__, "models": results}))


if __name__ == "__main__":
    main()
