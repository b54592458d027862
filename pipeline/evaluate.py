"""What a deployed student is worth: accuracy on the validation split, agreement with its teachers,
size, and CPU speed (eager torch and onnxruntime), measured the same way for every student.
"""

import statistics
import time

import numpy as np
import torch
from tqdm import tqdm


@torch.inference_mode()
def predict(model, loader, quiet: bool = False, desc: str = "eval"):
    """Logits and labels over a loader of {"index", "image", "label"} batches, in sample order."""
    model.eval()
    logits, labels, order = [], [], []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=quiet, leave=False):
        logits.append(model(batch["image"]).float())
        labels.append(batch["label"])
        order.append(batch["index"])
    order = torch.cat(order).argsort()
    return torch.cat(logits)[order], torch.cat(labels)[order]


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Percent of samples whose label is among the k highest logits (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {k: 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks}


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
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x):
        return torch.from_numpy(session.run(None, {name: np.ascontiguousarray(x.numpy())})[0])

    return run


def speed(runners: dict, size: int, runs: int = 100, batch: int = 32) -> dict:
    """Batch-1 latency (median of `runs`) and batch-`batch` throughput for each named runner."""
    one = torch.randn(1, 3, size, size)
    many = torch.randn(batch, 3, size, size)
    return {
        "latency_ms": {name: latency_ms(fn, one, runs=runs) for name, fn in runners.items()},
        f"throughput_b{batch}": {name: throughput(fn, many) for name, fn in runners.items()},
    }
