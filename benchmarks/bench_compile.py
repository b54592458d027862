"""torch.compile (inductor, CPU) of a rep student's training step against eager, and dynamo's graph breaks.

Prints one JSON object: {"graphs", "graph_breaks", "break_reasons", "compile_s", "eager_ms", "compiled_ms",
"speedup", "max_abs_loss_diff", ...}. A training step is forward + cross-entropy + backward + SGD step on a
--batch-size x --img-size batch, the model in train mode (BatchNorm batch statistics, every branch live)
without dropout, whose masks inductor draws its own way: max_abs_loss_diff compares the first step's losses.
`graphs` / `graph_breaks` come from torch._dynamo.explain on the loss (one graph, no break: the whole step
compiles, backward through AOTAutograd); compile_s is the first compiled step, compilation included. Eager
and compiled steps then run interleaved (one each, in turn) on twin models, so load from other processes hits
both alike; the figures are medians over --runs. No threshold: a figure to read, not a test.
"""

import argparse
import copy
import json
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import pipeline.models  # noqa: F401 - registers the rep students


def make_step(model: torch.nn.Module, lr: float = 0.01):
    """(loss function, training step) of `model`; the step returns the loss before the update."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def loss_fn(x, y):
        return F.cross_entropy(model(x), y)

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(x, y)
        loss.backward()
        optimizer.step()
        return loss.item()

    return loss_fn, step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="rep_ghostnetv3_050", help="rep student (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="(default: %(default)s)")
    parser.add_argument("--img-size", type=int, default=128, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=10, help="timed steps per mode (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    eager = timm.create_model(args.model, num_classes=10, drop_rate=0.0).train()
    compiled = copy.deepcopy(eager)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch_size,))

    explain = torch._dynamo.explain(make_step(copy.deepcopy(eager))[0])(x, y)
    _, eager_step = make_step(eager)
    _, compiled_step = make_step(compiled)
    compiled.compile(backend="inductor")

    start = time.perf_counter()
    first_compiled = compiled_step(x, y)
    compile_s = time.perf_counter() - start
    first_eager = eager_step(x, y)
    times = {"eager": [], "compiled": []}
    for _ in range(args.runs):
        for mode, step in (("eager", eager_step), ("compiled", compiled_step)):
            start = time.perf_counter()
            step(x, y)
            times[mode].append((time.perf_counter() - start) * 1e3)
    eager_ms, compiled_ms = (round(statistics.median(times[m]), 1) for m in ("eager", "compiled"))
    print(json.dumps({
        "model": args.model, "batch_size": args.batch_size, "img_size": args.img_size, "runs": args.runs,
        "threads": args.threads, "graphs": explain.graph_count, "graph_breaks": explain.graph_break_count,
        "break_reasons": [str(reason.reason) for reason in explain.break_reasons],
        "compile_s": round(compile_s, 1), "eager_ms": eager_ms, "compiled_ms": compiled_ms,
        "speedup": round(eager_ms / compiled_ms, 2), "max_abs_loss_diff": abs(first_compiled - first_eager),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
