"""Teacher store: bytes per stored view, fidelity (KL) per encoding, and teach overhead vs bare forward.

Prints one JSON object. About a minute on 2 CPU cores with the defaults.

Size and KL use 1000-class logits with a realistic shape and the WORST case for the index columns:
Gaussian logits (std --logit-std) plus a boost (--boost) on one random class per view, drawn
independently for every view, so no two views share their top-k (a real teacher's views of one
image mostly do, and compress better). The view parameters are the real ones (default ViewPlan).
The stores are written by the same writer `pipeline teach` uses; bytes are everything on disk
(zarr metadata included). KL is KL(teacher full softmax || top-k + one rest bucket spread evenly over
the other classes), in nats, averaged over views.

Throughput: the same random-weight timm model (--model, 1000 classes), batch, threads and resolution
(224) run (a) bare: forward on ready uint8 tensors, and (b) `pipeline teach` over JPEG shards of
256-px images (decode, crop, RandAugment, erasing, forward, top-k, zarr writes).
"""

import argparse
import io
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.codec import encode_rest, encode_topk
from pipeline.data.views import ViewPlan, view_params
from pipeline.defaults import DEFAULT_TEMPERATURES, DEFAULT_VALUES
from pipeline.store import bytes_on_disk, create_or_open

ENCODINGS = ("f16", "logp-s256", "logp-s181", "logp-s128", "logp-s64")


def synthetic_logits(n, num_classes, std, boost, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, num_classes, generator=g) * std
    z[torch.arange(n), torch.randint(0, num_classes, (n,), generator=g)] += boost
    return z


def kl_rebuilt(logits, logp_q, idx):
    """KL(softmax(logits) || q): q = stored top-k probabilities + the rest mass spread evenly."""
    logp = torch.log_softmax(logits, 1)
    c, k = logits.shape[1], idx.shape[1]
    q = torch.from_numpy(logp_q.astype(np.float32))
    rest = (1 - q.exp().sum(1, keepdim=True)).clamp_min(1e-12)
    logq = (rest / (c - k)).log().expand(-1, c).clone()
    logq.scatter_(1, torch.from_numpy(idx).long(), q)
    return float((logp.exp() * (logp - logq)).sum(1).mean())


def store_bytes(tmp, logits, params, labels, k, encoding, num_views):
    n = len(labels)
    logp, idx, lse = encode_topk(logits, k, encoding)
    rest = encode_rest(logits, k, DEFAULT_TEMPERATURES)
    path = Path(tmp) / f"k{k}-{encoding}.zarr"
    writer = create_or_open(path, {"key": path.name, "plan": {}}, num_samples=n, num_views=num_views, k=k,
                            params_dim=params.shape[-1], num_classes=logits.shape[1], shard_rows=1024, values=encoding,
                            temperatures=DEFAULT_TEMPERATURES)
    for shard in range(writer.num_shards):
        r = writer.shard_rows_range(shard)
        s = slice(r.start * num_views, r.stop * num_views)
        writer.write_shard(shard, logp[s].reshape(-1, num_views, k), idx[s].reshape(-1, num_views, k),
                           lse[s].reshape(-1, num_views), params[r.start:r.stop], labels[r.start:r.stop],
                           rest=rest[s].reshape(-1, num_views, len(DEFAULT_TEMPERATURES)))
    per_array = {a.name: round(bytes_on_disk(a) / (n * num_views), 2) for a in path.iterdir() if a.is_dir()}
    return bytes_on_disk(path) / (n * num_views), kl_rebuilt(logits, logp, idx), per_array


def size_and_fidelity(args, tmp):
    plan, n, v = ViewPlan(), args.samples, args.num_views
    params = np.stack([[view_params(plan, f"n{i:07d}", j) for j in range(v)] for i in range(n)])
    labels = np.random.default_rng(0).integers(0, 1000, n)
    logits = synthetic_logits(n * v, 1000, args.logit_std, args.boost)
    probs = torch.softmax(logits, 1)
    sizes, kls, arrays = {}, {}, {}
    for enc in ENCODINGS:
        for k in (5, 10, 20):
            sizes.setdefault(enc, {})[k], kls.setdefault(enc, {})[k], arrays[enc, k] = store_bytes(
                tmp, logits, params, labels, k, enc, v)
    return {"views_measured": n * v, "params_dim": plan.params_dim, "logit_std": args.logit_std, "boost": args.boost,
            "mean_top1_prob": round(float(probs.max(1).values.mean()), 3),
            "mean_topk_mass": {k: round(float(probs.topk(k).values.sum(1).mean()), 3) for k in (5, 10, 20)},
            "bytes_by_array_k10": arrays[DEFAULT_VALUES, 10],
            "bytes_by_encoding": {e: {k: round(b, 2) for k, b in d.items()} for e, d in sizes.items()},
            "kl_nats": {e: {k: float(f"{x:.6g}") for k, x in d.items()} for e, d in kls.items()},
            "kl_minus_f16": {e: {k: float(f"{kls[e][k] - kls['f16'][k]:.3g}") for k in d} for e, d in kls.items()}}


def jpeg_shards(out, count, size=256):
    """A 1000-class dataset of `count` smooth random JPEG images (so the 1000-class teacher fits)."""
    from pipeline.data.shards import Sample, write_shards

    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        samples.append(Sample(f"img{i:05d}", int(rng.integers(0, 1000)), "jpg", f"bench[{i}]",
                              partial(bytes, buf.getvalue())))
    write_shards({"train": samples}, out, "bench", [f"c{c}" for c in range(1000)], "bench", quiet=True)


def throughput(args, tmp):
    import timm
    from safetensors.torch import save_file

    from pipeline.teach import teach
    from pipeline.teachers import Forward

    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=1000).eval()
    save_file(model.state_dict(), str(Path(tmp) / "w.safetensors"))
    spec = {"name": "bench", "model": args.model, "weights": str(Path(tmp) / "w.safetensors"), "input_size": 224,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "num_classes": 1000}
    forward = Forward(model, spec, torch.device("cpu"))
    batches = [torch.randint(0, 256, (args.batch_size, 3, 224, 224), dtype=torch.uint8) for _ in range(2)]
    forward(batches[0])  # warm-up (kernel selection), excluded from both measurements
    n_batches = args.teach_samples * args.num_views // args.batch_size

    def bare():
        start = time.perf_counter()
        for b in range(n_batches):
            encode_topk(forward(batches[b % 2]), 10)
        return n_batches * args.batch_size / (time.perf_counter() - start)

    jpeg_shards(Path(tmp) / "shards", args.teach_samples)
    bare_runs, result = [bare()], {}
    for workers in args.workers:  # bare runs between teach runs: a shared machine's load drifts
        summary = teach(teacher=spec, shards=Path(tmp) / "shards", plan=ViewPlan(), num_views=args.num_views, k=10,
                        batch_size=args.batch_size, device="cpu", workers=workers,
                        store_root=Path(tmp) / f"stores{workers}", shard_rows=64, quiet=True)
        result[workers] = summary["views_per_s"]
        bare_runs.append(bare())
    bare_mean = float(np.mean(bare_runs))
    best = max(result, key=result.get)
    return {"model": args.model, "resolution": 224, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
            "views_timed": n_batches * args.batch_size, "bare_views_per_s_runs": [round(b, 2) for b in bare_runs],
            "bare_views_per_s": round(bare_mean, 2), "teach_views_per_s_by_workers": result, "teach_workers": best,
            "teach_views_per_s": result[best], "overhead_ratio": round(result[best] / bare_mean, 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096, help="samples of the size/KL stores")
    parser.add_argument("--num-views", type=int, default=4)
    parser.add_argument("--logit-std", type=float, default=1.5)
    parser.add_argument("--boost", type=float, default=8.0)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--teach-samples", type=int, default=12, help="samples of the throughput run (x views)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        size = size_and_fidelity(args, tmp)
        out = {"bytes_per_view": size["bytes_by_encoding"][DEFAULT_VALUES], "default_encoding": DEFAULT_VALUES,
               "kl_nats": size["kl_nats"], **size}
        if not args.skip_throughput:
            out.update(throughput(args, tmp))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
