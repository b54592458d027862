"""CPU latency of rep-GhostNetV3 1.0x: training form vs fused vs stock timm ghostnetv2_100.

Prints one JSON object: {"batch1_ms": {"train_form", "fused", "stock"}, "batch32_ms": {...}, ...}, each
the median over --runs forwards at 224x224. The three models run interleaved (one forward each, in turn),
so load from other processes hits all three alike. Expected: fused == stock within noise, training form
clearly slower. The defaults (50 runs, batch 1 and 32) take about 3-4 minutes on a quiet 2-core CPU, mostly
the training form at batch 32; `--runs 10` gives a rough answer in a minute. On a loaded machine use
`--threads 1` (OpenMP threads that wait for busy cores inflate every figure).
"""

import argparse
import copy
import json
import statistics
import time

import timm
import torch

from pipeline.models import reparameterize, to_stock


def median_ms(models: dict, x: torch.Tensor, runs: int, warmup: int) -> dict:
    times = {name: [] for name in models}
    with torch.inference_mode():
        for i in range(warmup + runs):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                if i >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
    return {name: round(statistics.median(t), 2) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="rep_ghostnetv3_100", help="rep student (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=50, help="timed forwards per model and batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forwards first")
    parser.add_argument("--batch-sizes", default="1,32", help="comma-separated (default: %(default)s)")
    parser.add_argument("--img-size", type=int, default=224, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_form = timm.create_model(args.model, num_branches=3, scale_branch=True).eval()
    fused = reparameterize(copy.deepcopy(train_form))
    models = {"train_form": train_form, "fused": fused, "stock": to_stock(fused)}
    result = {}
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        x = torch.randn(bs, 3, args.img_size, args.img_size)
        result[f"batch{bs}_ms"] = median_ms(models, x, args.runs, args.warmup)
    result.update(model=args.model, runs=args.runs, size=args.img_size, threads=args.threads,
                  torch=torch.__version__)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
