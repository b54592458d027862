"""How the CPU side grows with N on an ImageNet-like set, and what ImageNet would cost on a 16-core node.

For each N (default 2k, 8k, 32k images): generate an ImageNet-like train split (JPEG q 90, sizes
drawn around 500x375, 1000 classes; deterministic: a pool of distinct images repeated under new keys
and labels, so bytes, decode cost and shard sizes are ImageNet's), shard it (1000 images a shard),
then in fresh subprocesses (peak RSS = the process's ru_maxrss):
  open     ShardReader from the per-shard indexes, and the tar-header scan it replaces;
  teach    teacher loader (every view of a sample decoded once) + a tiny teacher (one 16x16-stride
           conv + linear to 1000 classes, so rendering dominates) + top-k, over `--sample` images spread
           across the whole split; the bare forward alone; the store's bytes/view for those views;
  student  the KD student's loader at 224 px (views replayed from stored params, rendered, then the
           trainer's normalisation on the CPU; no model), reference renderer (today's) and fast renderer
           in one process, a batch of each in turn, over `--sample` images of an epoch's global shuffle
           each; also without the normalisation (on a GPU node it runs on the GPU).
Throughput is per CPU second of the process (per core) with 1 thread; a stage's time at N is its
open time + N x views / throughput, and growth is t(largest)/t(second largest).

Then a KD student's store side at V = 4 and 32 (`--epoch-views`) on the same N (`--epoch-n`: keys of
ImageNet's form on tiny images, a teach-layout store of a synthetic 1000-class teacher, K = 10, tau 1, 2, 4),
each in a fresh process:
  epochs         two epochs as pipeline.train runs them (world 1): EpochViews reads each epoch's pairs,
                 the next epoch's while this one is served, and every batch's targets (distill.Targets)
                 and params are served; no model, no pixels. Peak RSS, and bytes read (the process's
                 rchar: every read() call) per epoch beside the store's size;
  all_in_memory  the reference before issue 22: every view's targets and params in memory.
`--parts` picks the two halves. Prints one JSON object.

    python benchmarks/bench_scale.py [--sizes 2000,8000,32000] [--sample 512] [--num-views 2] [--threads 1]
                                     [--epoch-n 50000] [--epoch-views 4,32] [--parts scale,epochs]
"""

import argparse
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

IMAGENET = {"images": 1_281_167, "views": 50, "cores": 16}
# Assumptions the estimate rests on (not measured here: no GPU is lent to this project)
TEACHER_GPU_VIEWS_PER_S = 3000  # BEiTv2-B / ViT-B/16 inference at 224 px, bf16, one H100-class GPU
STUDENT_GPU_IMAGES_PER_S = 5000  # GhostNetV3 1.0x training at 224 px, one modern GPU
POOL = 512  # distinct images in the generated set
EPOCHS, BATCH = 2, 256  # the store-side measurement: epochs, images a batch


def _rss_mb() -> float:
    """This process's peak RSS (VmHWM; ru_maxrss would start at the parent's RSS: Linux keeps it across exec)."""
    return _status_mb("VmHWM")


def _pool(count: int, seed: int = 0) -> list[bytes]:
    """Distinct JPEGs (q 90) around 500x375 (a fifth portrait), smooth colour fields plus fine texture."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        w = int(np.clip(rng.normal(500, 60), 300, 700))
        h = int(w * rng.uniform(0.66, 0.8))
        if rng.random() < 0.2:
            w, h = h, w
        base = Image.fromarray((rng.random((h // 25 + 2, w // 25 + 2, 3)) * 255).astype(np.uint8))
        pixels = np.asarray(base.resize((w, h), Image.Resampling.BICUBIC), np.float32)
        pixels += rng.normal(0, 12, (h, w, 1)) + rng.normal(0, 6, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def stage_shard(out: Path, n: int) -> dict:
    from pipeline.data.shards import Sample, write_shards

    pool = _pool(POOL)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 1000, n)
    samples = [Sample(f"n{labels[i]:04d}/img{i:07d}", int(labels[i]), "jpg", f"generated:{i}",
                      (lambda b=pool[i % POOL]: b)) for i in range(n)]
    start = time.perf_counter()
    write_shards({"train": samples}, out, "imagenet-like", [f"c{c:04d}" for c in range(1000)], "generated",
                 maxcount=1000, quiet=True)
    return {"shard_s": time.perf_counter() - start, "bytes": sum(p.stat().st_size for p in out.glob("*.tar"))}


def stage_open(out: Path, n: int) -> dict:
    from pipeline.data.shards import ShardManifest, ShardReader, scan_shard

    start = time.perf_counter()
    reader = ShardReader(out, "train")
    open_s = time.perf_counter() - start
    assert len(reader) == n
    start = time.perf_counter()
    for shard in ShardManifest.read(out).splits["train"]["shards"]:
        scan_shard(out / shard["name"])
    return {"open_s": open_s, "scan_s": time.perf_counter() - start}


def _tiny_teacher():
    import torch

    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 16, stride=16), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 1000)).eval()


def stage_teach(out: Path, n: int, sample: int, views: int) -> dict:
    import torch

    from pipeline.data.loaders import teacher_loader
    from pipeline.data.views import ViewPlan
    from pipeline.codec import encode_rest, encode_topk
    from pipeline.store import bytes_on_disk, create_or_open
    from pipeline.teachers import Forward

    plan = ViewPlan(renderer="fast")
    forward = Forward(_tiny_teacher(), {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
                      torch.device("cpu"))
    indices = np.linspace(0, n - 1, sample + 64 // views).astype(np.int64)
    outputs = []
    for b, batch in enumerate(teacher_loader(out, "train", plan, views, indices, 224, batch_size=64)):
        if b == 1:  # the first batch (warm-up: one-off imports) is not timed
            start = time.process_time()
        logits = forward(batch["image"])
        outputs.append((batch, (*encode_topk(logits, 10), encode_rest(logits, 10, (1.0,)))))
    cpu = time.process_time() - start
    outputs = outputs[1:]
    images = torch.zeros(64, 3, 224, 224, dtype=torch.uint8)
    start = time.process_time()
    for _ in range(max(1, sample * views // 64)):
        forward(images)
    forward_cpu = time.process_time() - start
    store = _store_bytes_per_view(create_or_open, encode_topk, bytes_on_disk, out, outputs, sample, views, plan)
    return {"views_per_s_core": sample * views / cpu,
            "forward_views_per_s_core": max(1, sample * views // 64) * 64 / forward_cpu,
            "store_bytes_per_view": store}


def _store_bytes_per_view(create_or_open, encode_topk, bytes_on_disk, out, outputs, sample, views, plan) -> float:
    """Write the sampled views' top-10 into a real store (the teach stage's layout) and weigh it."""
    from pipeline.defaults import DEFAULT_VALUES

    path = out.parent / f"store-{out.name}.zarr"
    shutil.rmtree(path, ignore_errors=True)
    writer = create_or_open(path, {"key": "bench", "plan": plan.to_dict()}, num_samples=sample, num_views=views, k=10,
                            params_dim=plan.params_dim, num_classes=1000, shard_rows=sample, values=DEFAULT_VALUES)
    cols = {name: np.concatenate([o[1][j] for o in outputs]) for j, name in enumerate(("values", "indices", "lse", "rest"))}
    params = np.concatenate([o[0]["params"].numpy() for o in outputs]).astype(np.uint16)
    labels = np.concatenate([o[0]["label"].numpy() for o in outputs])[::views]
    writer.write_shard(0, cols["values"].reshape(sample, views, 10), cols["indices"].reshape(sample, views, 10),
                       cols["lse"].reshape(sample, views), params.reshape(sample, views, -1), labels,
                       cols["rest"].reshape(sample, views, -1))
    size = bytes_on_disk(path)
    shutil.rmtree(path)
    return size / (sample * views)


def stage_student(out: Path, n: int, sample: int, views: int) -> dict:
    """The KD student's loader: the views replayed from stored params (a teacher store's, here derived
    beforehand, untimed), rendered to uint8, then the trainer's normalisation on the CPU (on a GPU node it
    runs on the GPU: `render` is then the loader workers' whole share); the fast and the reference renderer
    in ONE process, a batch of each in turn: load on the machine hits both alike, so their ratio holds."""
    from pipeline.data.loaders import student_loader
    from pipeline.data.shards import ShardReader
    from pipeline.data.views import ViewPlan, view_params
    from pipeline.runtime import Normalize
    from pipeline.store import StoredViews

    keys = ShardReader(out, "train").keys
    params = np.stack([view_params(ViewPlan(), k, v) for k in keys for v in range(views)])
    stored = StoredViews(np.arange(len(params)), views, {"params": params})
    normalize = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    batches = {r: iter(student_loader(out, "train", ViewPlan(renderer=r), views, 224, batch_size=64, seed=0, epoch=0,
                                      stored_params=stored))
               for r in ("fast", "reference")}
    cpu = {r: {"render": 0.0, "normalize": 0.0, "views": 0} for r in batches}
    for r in batches:
        normalize(next(batches[r])["image"])  # warm-up: the first batch pays one-off imports
    while min(c["views"] for c in cpu.values()) < sample:
        for r, it in batches.items():
            tick = time.process_time()
            batch = next(it)
            tock = time.process_time()
            normalize(batch["image"])
            cpu[r]["render"] += tock - tick
            cpu[r]["normalize"] += time.process_time() - tock
            cpu[r]["views"] += len(batch["index"])
    return {r: {"views_per_s_core": c["views"] / (c["render"] + c["normalize"]),
                "render_views_per_s_core": c["views"] / c["render"]} for r, c in cpu.items()}


def _rchar() -> int:
    """Bytes this process has read through read() calls so far (page cache included)."""
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar:"))
               .split()[1])


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith(f"{field}:")).split()[1]) / 1024


def _tiny_shards(out: Path, n: int) -> None:
    """N samples under ImageNet-like keys, each a 16x16 JPEG: the epochs' (index, view) pairs need the keys,
    not the pixels."""
    from PIL import Image

    from pipeline.data.shards import Sample, write_shards

    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="JPEG")
    labels = np.random.default_rng(1).integers(0, 1000, n)
    samples = [Sample(f"n{labels[i]:04d}/img{i:07d}", int(labels[i]), "jpg", f"generated:{i}", (lambda: buf.getvalue()))
               for i in range(n)]
    write_shards({"train": samples}, out, "imagenet-like", [f"c{c:04d}" for c in range(1000)], "generated",
                 maxcount=10000, quiet=True)


def _write_store(path: Path, shards: Path, views: int, k: int = 10, shard_rows: int = 256) -> None:
    """A store of every train sample x `views` views, written shard by shard as teach writes it: a synthetic
    confident teacher (logits peaked on the label, so values and indices compress as a real one's) and the
    fast plan's view params of the first POOL samples, repeated."""
    import torch

    from pipeline.data.shards import ShardReader
    from pipeline.data.views import ViewPlan, view_params
    from pipeline.defaults import DEFAULT_TEMPERATURES, DEFAULT_VALUES
    from pipeline.codec import encode_rest, encode_topk
    from pipeline.store import create_or_open

    plan, reader = ViewPlan(renderer="fast"), ShardReader(shards, "train")
    n = len(reader)
    pool = np.stack([[view_params(plan, reader.keys[i], v) for v in range(views)] for i in range(min(POOL, n))])
    writer = create_or_open(path, {"key": f"bench-v{views}", "plan": plan.to_dict()}, num_samples=n, num_views=views,
                            k=k, params_dim=plan.params_dim, num_classes=1000, shard_rows=shard_rows,
                            values=DEFAULT_VALUES, temperatures=DEFAULT_TEMPERATURES)
    g = torch.Generator().manual_seed(0)
    for shard in range(writer.num_shards):
        rows = np.arange(writer.shard_rows_range(shard).start, writer.shard_rows_range(shard).stop)
        labels = torch.from_numpy(reader.labels[rows]).long().repeat_interleave(views)
        logits = torch.randn(len(labels), 1000, generator=g) * 2
        logits[torch.arange(len(labels)), labels] += 8
        values, indices, lse = encode_topk(logits, k)
        rest = encode_rest(logits, k, DEFAULT_TEMPERATURES)
        m = len(rows)
        writer.write_shard(shard, values.reshape(m, views, k), indices.reshape(m, views, k), lse.reshape(m, views),
                           pool[rows % len(pool)], reader.labels[rows], rest.reshape(m, views, -1))


def stage_epochs(out: Path, n: int, sample: int, views: int) -> dict:
    """The store side of a KD student over EPOCHS epochs, as pipeline.train runs it (see the module docstring)."""
    import torch

    from pipeline.data.loaders import student_batches
    from pipeline.distill import Targets
    from pipeline.store import TARGET_ARRAYS, open_store
    from pipeline.train import EpochViews

    store = open_store(out / f"store-v{views}.zarr")
    targets = Targets([store], store.num_classes, 1.0)
    batches = [student_batches(out / "shards", "train", views, BATCH, 0, epoch, drop_last=True) for epoch in range(EPOCHS)]
    ahead = EpochViews([(store, TARGET_ARRAYS), (store, ("params",))], lambda e: np.concatenate(batches[e]), EPOCHS)
    rss, read, cpu = _status_mb("VmRSS"), _rchar(), time.process_time()
    for epoch in range(EPOCHS):
        *kd, params = ahead(epoch)
        targets.use(kd)
        for rows in batches[epoch]:
            targets(torch.from_numpy(rows[:, 0]), torch.from_numpy(rows[:, 1]), "cpu")
            params.params(rows[:, 0], rows[:, 1])
    ahead.close()
    return {"bytes_read_per_epoch": (_rchar() - read) / EPOCHS, "cpu_s_per_epoch": (time.process_time() - cpu) / EPOCHS,
            "rss_before_reads_mb": rss, "pairs_held_per_epoch": len(params)}


def stage_all_in_memory(out: Path, n: int, sample: int, views: int) -> dict:
    """Reference: what a student held before issue 22, every view's targets and params (each array read whole),
    with a student's imports (as stage_epochs)."""
    import pipeline.train  # noqa: F401
    from pipeline.store import VIEW_ARRAYS, open_store

    store = open_store(out / f"store-v{views}.zarr")
    read = _rchar()
    held = {name: store.arrays[name][:] for name in VIEW_ARRAYS}
    return {"bytes_read": _rchar() - read, "held_mb": sum(a.nbytes for a in held.values()) / 1e6}


STAGES = {"shard": stage_shard, "open": stage_open, "teach": stage_teach, "student": stage_student,
          "epochs": stage_epochs, "all_in_memory": stage_all_in_memory}


def _run(stage: str, out: Path, n: int, args, views: int | None = None) -> dict:
    """One stage in a fresh process: its result plus its peak RSS."""
    cmd = [sys.executable, __file__, "--stage", stage, "--dir", str(out), "--n", str(n), "--sample", str(args.sample),
           "--num-views", str(views or args.num_views), "--threads", str(args.threads)]
    return json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1])


def _estimate(r: dict) -> dict:
    """ImageNet-1k (1.28M images x 50 views) on one 16-core node, from the largest N's figures."""
    n, v, cores = IMAGENET["images"], IMAGENET["views"], IMAGENET["cores"]
    last = {k: (x[-1] if isinstance(x, list) else x) for k, x in r.items() if k != "peak_rss_mb"}
    teach_loader_h = n * v / (cores * last["teach_views_per_s_core"]) / 3600
    student_loader_s = n / (cores * last["student_views_per_s_core"])
    return {
        "assumptions": f"{cores} cores, all rendering; shard is one process; teacher GPU {TEACHER_GPU_VIEWS_PER_S} "
                       f"views/s (BEiTv2-B bf16 at 224, assumed); student GPU {STUDENT_GPU_IMAGES_PER_S} images/s "
                       "(GhostNetV3 1.0x training, assumed); per-item costs as measured at the largest N",
        "shard_h": round(n * last["shard_s"] / r["n"][-1] / 3600, 2),
        "open_s": round(n * last["open_s"] / r["n"][-1], 1),
        "open_by_tar_scan_s": round(n * last["scan_s"] / r["n"][-1], 1),
        "teach_loader_h": round(teach_loader_h, 1),
        "teach_gpu_h": round(n * v / TEACHER_GPU_VIEWS_PER_S / 3600, 1),
        "teach_h": round(max(teach_loader_h, n * v / TEACHER_GPU_VIEWS_PER_S / 3600), 1),
        "student_loader_epoch_min": round(student_loader_s / 60, 1),
        "student_gpu_epoch_min": round(n / STUDENT_GPU_IMAGES_PER_S / 60, 1),
        "student_loader_images_per_s": round(cores * last["student_views_per_s_core"]),
        "store_gb": round(n * v * last["store_bytes_per_view"] / 1e9, 2),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,8000,32000", help="comma-separated N (images)")
    parser.add_argument("--sample", type=int, default=512, help="images rendered per teach/student measurement")
    parser.add_argument("--num-views", type=int, default=2, help="views per image in the teach measurement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epoch-n", type=int, default=50000, help="images in the student store-side measurement")
    parser.add_argument("--epoch-views", default="4,32", help="comma-separated V of the student store-side measurement")
    parser.add_argument("--parts", default="scale,epochs", help="scale (shard..student loader at each N), epochs, or both")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.stage:
        kwargs = {} if args.stage in ("shard", "open") else dict(sample=args.sample, views=args.num_views)
        result = STAGES[args.stage](args.dir, args.n, **kwargs)
        print(json.dumps({**result, "peak_rss_mb": _rss_mb()}))
        return
    parts = args.parts.split(",")
    report = scale_report(args) if "scale" in parts else {}
    if "epochs" in parts:
        report["student_epochs"] = epochs_report(args)
    print(json.dumps(report))


def scale_report(args) -> dict:
    """Shard, open, teach and the student loader at each N, their growth, peak RSS and the ImageNet estimate."""
    sizes = [int(s) for s in args.sizes.split(",")]
    keys = ("shard_s", "open_s", "scan_s", "teach_views_per_s_core", "teach_forward_views_per_s_core",
            "student_views_per_s_core", "baseline_student_views_per_s_core", "student_render_views_per_s_core",
            "baseline_student_render_views_per_s_core", "store_bytes_per_view")
    r = {"n": sizes, **{k: [] for k in keys}, "peak_rss_mb": {"shard": [], "teach": [], "student": []}}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            out = Path(tmp) / f"shards-{n}"
            shard = _run("shard", out, n, args)
            opened = _run("open", out, n, args)
            teach = _run("teach", out, n, args)
            loaders = _run("student", out, n, args)
            student, baseline = loaders["fast"], loaders["reference"]
            shutil.rmtree(out)
            for k, value in (("shard_s", shard["shard_s"]), ("open_s", opened["open_s"]), ("scan_s", opened["scan_s"]),
                             ("teach_views_per_s_core", teach["views_per_s_core"]),
                             ("teach_forward_views_per_s_core", teach["forward_views_per_s_core"]),
                             ("student_views_per_s_core", student["views_per_s_core"]),
                             ("baseline_student_views_per_s_core", baseline["views_per_s_core"]),
                             ("student_render_views_per_s_core", student["render_views_per_s_core"]),
                             ("baseline_student_render_views_per_s_core", baseline["render_views_per_s_core"]),
                             ("store_bytes_per_view", teach["store_bytes_per_view"])):
                r[k].append(round(value, 3))
            for k, res in (("shard", shard), ("teach", teach), ("student", loaders)):
                r["peak_rss_mb"][k].append(round(res["peak_rss_mb"], 1))
            print(f"# n={n} done", file=sys.stderr)
    a, b = (-1, -2) if len(sizes) > 1 else (-1, -1)

    def teach_t(i):
        return r["open_s"][i] + sizes[i] * args.num_views / r["teach_views_per_s_core"][i]

    def epoch_t(i):
        return r["open_s"][i] + sizes[i] / r["student_views_per_s_core"][i]

    r["growth"] = {"n_ratio": sizes[a] / sizes[b], "shard": round(r["shard_s"][a] / r["shard_s"][b], 3),
                   "open": round(r["open_s"][a] / r["open_s"][b], 3), "teach": round(teach_t(a) / teach_t(b), 3),
                   "student_epoch": round(epoch_t(a) / epoch_t(b), 3)}
    r["rss_flatness"] = {k: round(max(v) / min(v), 3) for k, v in r["peak_rss_mb"].items()}
    r["speedup_student_loader"] = round(r["student_views_per_s_core"][-1] / r["baseline_student_views_per_s_core"][-1], 3)
    r["speedup_student_render"] = round(r["student_render_views_per_s_core"][-1]
                                        / r["baseline_student_render_views_per_s_core"][-1], 3)
    r["imagenet_estimate"] = _estimate(r)
    r["settings"] = {"sample": args.sample, "views": args.num_views, "threads": args.threads, "shard_maxcount": 1000,
                     "pool_distinct_images": POOL}
    return r




def epochs_report(args) -> dict:
    """A KD student's store side at each V on the same N: peak RSS and bytes read per epoch, beside the store's
    size and the all-in-memory reference."""
    views = [int(v) for v in args.epoch_views.split(",")]
    r = {"n": args.epoch_n, "epochs": EPOCHS, "batch": BATCH, "world": 1, "student_peak_rss_mb": {},
         "student_bytes_read_per_epoch": {}, "store_bytes": {}, "read_per_epoch_over_store": {},
         "student_rss_before_reads_mb": {}, "student_cpu_s_per_epoch": {}, "pairs_held_per_epoch": {},
         "all_in_memory_peak_rss_mb": {}, "all_in_memory_held_mb": {}}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _tiny_shards(out / "shards", args.epoch_n)
        for v in views:
            _write_store(out / f"store-v{v}.zarr", out / "shards", v)
            epochs, ref = _run("epochs", out, args.epoch_n, args, v), _run("all_in_memory", out, args.epoch_n, args, v)
            size = sum(f.stat().st_size for f in (out / f"store-v{v}.zarr").rglob("*") if f.is_file())
            for key, value in (("student_peak_rss_mb", epochs["peak_rss_mb"]),
                               ("student_bytes_read_per_epoch", int(epochs["bytes_read_per_epoch"])),
                               ("store_bytes", size), ("read_per_epoch_over_store", epochs["bytes_read_per_epoch"] / size),
                               ("student_rss_before_reads_mb", epochs["rss_before_reads_mb"]),
                               ("student_cpu_s_per_epoch", epochs["cpu_s_per_epoch"]),
                               ("pairs_held_per_epoch", epochs["pairs_held_per_epoch"]),
                               ("all_in_memory_peak_rss_mb", ref["peak_rss_mb"]), ("all_in_memory_held_mb", ref["held_mb"])):
                r[key][str(v)] = round(value, 3) if isinstance(value, float) else value
            shutil.rmtree(out / f"store-v{v}.zarr")
            print(f"# V={v} done", file=sys.stderr)
    for key in ("student_peak_rss_mb", "all_in_memory_peak_rss_mb"):
        r[key.replace("peak_rss_mb", "rss_max_over_min")] = round(max(r[key].values()) / min(r[key].values()), 3)
    return r


if __name__ == "__main__":
    main()
