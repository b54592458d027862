"""Why eager torch batch-1 latency of the deployed GhostNet is far above onnxruntime's, and what helps.

Prints one JSON object: per --threads value, the median and p10-p90 (ms, interleaved runs via
pipeline.metrics.interleaved_latency) of stock timm ghostnetv2_100 (the deploy form of rep_ghostnetv3_100)
at batch 1 in: eager torch, eager channels_last, TorchScript frozen (torch.jit.optimize_for_inference),
and onnxruntime; plus the share of self CPU time of the top torch ops under torch.profiler, eager.
On a shared machine the thread count dominates: OpenMP threads that wait for busy cores inflate every
small kernel (avg_pool2d, batch norm, the DFC attention's tiny convs), so compare at --threads 1.
"""

import argparse
import json
import tempfile
from pathlib import Path

import timm
import torch
from torch.profiler import ProfilerActivity, profile

from pipeline.metrics import interleaved_latency, onnx_runner, torch_runner


def op_shares(model, x, top: int = 6) -> dict:
    """Percent of self CPU time per aten op over 10 eager forwards."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            model(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return {e.key: round(100 * e.self_cpu_time_total / total, 1) for e in rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="Comma-separated torch / onnxruntime thread counts.")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--img-size", type=int, default=224)
    args = parser.parse_args()
    model = timm.create_model("ghostnetv2_100").eval()
    x = torch.randn(1, 3, args.img_size, args.img_size)
    out = {"model": "ghostnetv2_100", "size": args.img_size, "runs": args.runs}
    with tempfile.TemporaryDirectory() as tmp:
        onnx = Path(tmp) / "m.onnx"
        torch.onnx.export(model, (x,), dynamo=True, verbose=False).save(str(onnx))
        with torch.inference_mode():
            frozen = torch.jit.optimize_for_inference(torch.jit.trace(model, x))
        channels_last = timm.create_model("ghostnetv2_100").eval().to(memory_format=torch.channels_last)
        channels_last.load_state_dict(model.state_dict())
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            runners = {"eager": torch_runner(model),
                       "eager_channels_last": lambda t: channels_last(t.to(memory_format=torch.channels_last)),
                       "torchscript_frozen": torch_runner(frozen), "onnxruntime": onnx_runner(onnx, threads)}
            with torch.inference_mode():
                times = interleaved_latency(runners, x, runs=args.runs, warmup=3)
            out[f"threads_{threads}"] = {
                "ms": {k: {"median": round(v[0], 2), "p10": round(v[1], 2), "p90": round(v[2], 2)} for k, v in times.items()},
                "eager_over_onnxruntime": round(times["eager"][0] / times["onnxruntime"][0], 2),
                "eager_op_share_pct": op_shares(model, x),
            }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
