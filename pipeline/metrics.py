"""The figures every student is measured by, computed the same way everywhere: predictions over a loader,
top-k accuracy (the one accuracy loop of training and fine-tuning: `accuracy`), agreement between two models,
and CPU speed (eager torch and onnxruntime). Training, fine-tuning, teaching, fusing and evaluation all count
with these, so their numbers compare.
"""

import statistics
import time

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.progress import progress
from pipeline.runtime import autocast


@torch.inference_mode()
def predict(model, loader, normalize, quiet: bool = False, desc: str = "eval"):
    """Logits and labels over a loader of {"index", "image", "label"} batches (uint8 images, made the
    model's input by `normalize`, a runtime.Normalize), in sample order."""
    model.eval()
    logits, labels, order = [], [], []
    for batch in progress(loader, desc=desc, unit="batch", disable=quiet, leave=False):
        logits.append(model(normalize(batch["image"])).float())
        labels.append(batch["label"])
        order.append(batch["index"])
    order = torch.cat(order).argsort()
    return torch.cat(logits)[order], torch.cat(labels)[order]


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the k highest logits (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Percent of samples whose label is among the k highest logits (k capped at the class count)."""
    return {k: 100.0 * n / max(len(labels), 1) for k, n in topk_hits(logits, labels, ks).items()}


@torch.no_grad()
def accuracy(model, loader, normalize, device="cpu", channels_last: bool = False, amp: torch.dtype | None = None,
             ks=(1, 5)) -> dict[int, float]:
    """Top-k accuracy (%) of `model` over a loader, counted batch by batch (no logits kept), in eval mode
    (the model's mode is restored); `normalize` (a runtime.Normalize on `device`) makes the loader's uint8
    images the model's input (channels_last on request), under `amp` autocast."""
    was_training = model.training
    model.eval()
    hits, total = dict.fromkeys(ks, 0), 0
    for batch in loader:
        x = normalize(batch["image"])
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        with autocast(torch.device(device), amp):
            logits = model(x)
        for k, n in topk_hits(logits.float().cpu(), batch["label"], ks).items():
            hits[k] += n
        total += len(batch["label"])
    model.train(was_training)
    return {k: 100.0 * n / max(total, 1) for k, n in hits.items()}


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Percent of samples on which two models' top-1 predictions agree."""
    return 100.0 * (a.argmax(1) == b.argmax(1)).float().mean().item()


def latency_ms(fn, x, runs: int = 100, warmup: int = 10) -> float:
    """Median wall time of `fn(x)` in milliseconds over `runs` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def interleaved_latency(runners: dict, x, runs: int = 100, warmup: int = 10) -> dict:
    """Wall times (ms) of every runner on `x`, interleaved: call i of each runner back to back, so a change of
    load on a shared machine hits all runners alike. {name: (median, p10, p90)}."""
    for _ in range(warmup):
        for fn in runners.values():
            fn(x)
    times = {name: [] for name in runners}
    for _ in range(runs):
        for name, fn in runners.items():
            start = time.perf_counter()
            fn(x)
            times[name].append(1e3 * (time.perf_counter() - start))
    out = {}
    for name, values in times.items():
        deciles = statistics.quantiles(values, n=10) if len(values) > 1 else values * 9
        out[name] = (statistics.median(values), deciles[0], deciles[-1])
    return out


def throughput(fn, x, runs: int = 10, warmup: int = 2) -> float:
    """Images per second for repeated calls on the batch `x` (median call time)."""
    return x.shape[0] / (latency_ms(fn, x, runs=runs, warmup=warmup) / 1e3)


def torch_runner(model):
    model.eval()

    @torch.inference_mode()
    def run(x):
        return model(x)

    return run


def onnx_runner(path, threads: int | None = None):
    """A callable running an ONNX file on the CPU with onnxruntime, taking and returning torch tensors."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime's Fail/InvalidProtobuf/...: a bad user file
        first = (str(err).strip().splitlines() or [""])[0][:120]
        raise UserError(f"ONNX file {path} cannot be loaded ({first}); re-run `pipeline fuse`") from None
    name = session.get_inputs()[0].name

    def run(x):
        return torch.from_numpy(session.run(None, {name: np.ascontiguousarray(x.numpy())})[0])

    return run


def speed(runners: dict, size: int, runs: int = 100, batch: int = 32) -> dict:
    """Batch-1 latency (median and p10-p90 of `runs` interleaved calls) and batch-`batch` throughput per runner."""
    one = torch.randn(1, 3, size, size)
    many = torch.randn(batch, 3, size, size)
    latency = interleaved_latency(runners, one, runs=runs)
    return {
        "latency_ms": {name: t[0] for name, t in latency.items()},
        "latency_p10_p90_ms": {name: [t[1], t[2]] for name, t in latency.items()},
        "throughput": {name: throughput(fn, many) for name, fn in runners.items()},  # images/s
        "throughput_batch": batch,
    }
