"""The teacher pass: run one teacher once over every (sample, view) and keep its top-k in a store.

Work is split by store shard (a block of rows): each shard's arrays are written, then its done
flag, so a process killed at any moment loses at most the shards in flight and a rerun picks up
the rest. Under torchrun, rank r takes every world-th pending shard: no two ranks touch one file.
The loader's batches never straddle two shards (shard rows x views is a multiple of the batch),
so every view is computed in the same batch whatever was done before or by whom: a resumed or
multi-process run stores exactly what one uninterrupted process stores.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.codec import array_dtypes, check_temperatures, encode_rest, encode_topk, value_scale
from pipeline.defaults import DEFAULT_TEMPERATURES, DEFAULT_VALUES, STORE_ROOT
from pipeline.errors import UserError
from pipeline.progress import progress
from pipeline.runtime import barrier, close_distributed, init_distributed, resolve_device
from pipeline.inspection import top1_vs_labels
from pipeline.store import (ARRAYS, bytes_on_disk, check_pointer_ours, check_root, create_or_open, store_key, store_path,
                            write_pointer)
from pipeline.teachers import Forward, check_num_classes, load_teacher, preprocess_of, source_of, teacher_spec


def aligned_shard_rows(requested: int, num_views: int, batch_size: int) -> int:
    """Round the rows per shard up so a shard holds a whole number of batches."""
    step = batch_size // math.gcd(batch_size, num_views)
    return max(step, math.ceil(requested / step) * step)


def teach(*, teacher, shards, split="train", plan, num_views=4, k=10, batch_size=64, device="auto", amp="none",
          workers=0, store_root=STORE_ROOT, out=None, weights=None, values=DEFAULT_VALUES, shard_rows=256,
          channels_last=False, temperatures=DEFAULT_TEMPERATURES, verify_shards=False, quiet=False, log=print) -> dict:
    """Fill (or finish) the store of `teacher` over `shards`/`split` and return a summary dict.

    Args:
        teacher: a manifests/teachers spec (name, path or dict); `weights` (a file) overrides its own.
        shards, split: the `pipeline shard` output and the split to label.
        plan, num_views: the ViewPlan and V views per sample the teacher sees (the student replays them).
        k, values, temperatures: what is kept per view: the top-k logits (values: their encoding) and the
            logsumexp at each KD temperature.
        batch_size, device, amp, channels_last, workers: how the teacher runs (pipeline.runtime).
        store_root, shard_rows: where the content-addressed store lives, and rows per zarr shard.
        verify_shards: re-hash every shard file, not trusting the hash cache's size + mtime.
        out: a directory for the `{name}.json` pointer the student stage reads (None: no pointer).
        quiet, log: no progress bar; where the summary lines go.
    """
    from pipeline.data.loaders import teacher_loader
    from pipeline.data.shards import verified_manifest

    manifest = verified_manifest(shards, full=verify_shards)
    if split not in manifest.splits:
        raise UserError(f"split '{split}' not in {shards} (has {', '.join(manifest.splits)}); pass --split")
    num_samples = manifest.splits[split]["count"]
    spec = teacher_spec(teacher, weights)
    source_of(spec).check_weights(spec)
    check_num_classes(spec, manifest.num_classes)
    if not 1 <= k <= manifest.num_classes:
        raise UserError(f"--k {k} must lie in 1..{manifest.num_classes} (the number of classes)")
    if num_views < 1 or batch_size < 1:
        raise UserError(f"--num-views ({num_views}) and --batch-size ({batch_size}) must be >= 1")
    temperatures = check_temperatures(temperatures)
    if out is not None:
        check_pointer_ours(Path(out) / f"{spec['name']}.json")
    value_scale(values)  # every input is checked before the teacher loads (a large one takes minutes)
    dev = resolve_device(device)
    store_root = check_root(store_root, reach=True)
    model, digest = load_teacher(spec)
    rank, world, own_group = init_distributed(dev)
    if spec.get("weights"):
        spec = {**spec, "weights": Path(spec["weights"]).name}
    # not inputs of the numbers: where the weights came from (their digest is), and the clean eval render (the
    # views are the plan's, at the teacher's input size and normalisation)
    key_spec = {k: v for k, v in spec.items()
                if k not in ("weights", "pretrained", "description", "crop_pct", "interpolation")}
    key = store_key(dataset_fingerprint=manifest.fingerprint, split=split, plan_hash=plan.hash(), teacher=key_spec,
                    weights_digest=digest, k=k, num_views=num_views, values=values, amp=amp,
                    temperatures=temperatures)
    path = store_path(store_root, f"{spec['name']}-{key}.zarr")
    provenance = dict(key=key, dataset=manifest.dataset, dataset_fingerprint=manifest.fingerprint,
                      split=split, split_fingerprint=manifest.splits[split]["fingerprint"],
                      plan=plan.to_dict(), plan_hash=plan.hash(), teacher=spec, weights_digest=digest, k=k,
                      num_views=num_views, amp=amp, temperatures=temperatures, versions=_versions())
    layout = dict(num_samples=num_samples, num_views=num_views, k=k, params_dim=plan.params_dim,
                  num_classes=manifest.num_classes, shard_rows=aligned_shard_rows(shard_rows, num_views, batch_size),
                  values=values, temperatures=temperatures)
    if rank == 0:
        writer = create_or_open(path, provenance, **layout)
        damaged = writer.damaged_shards(full=True)
        if damaged:  # done flags whose chunks are gone or unreadable: compute those shards again
            log(f"{path}: {len(damaged)} shard(s) marked done lost their data ({next(iter(damaged.values()))}); "
                "recomputing them")
            writer.forget_shards(damaged)
    barrier(world)
    if rank != 0:
        writer = create_or_open(path, provenance, **layout)
    pending = [int(s) for s in np.flatnonzero(~writer.done_mask())]
    barrier(world)  # every rank has read the same done-mask before anyone writes
    start = time.perf_counter()
    mine = pending[rank::world]
    if not pending:
        if rank == 0 and not quiet:
            log(f"{path}: up to date ({num_samples} samples x {num_views} views, K={k}); no teacher forward run; "
                f"{quality_line(writer.provenance)}")
    else:
        forward = Forward(model, spec, dev, amp, channels_last)
        _run_shards(writer, forward, teacher_loader, shards, split, plan, spec, mine, num_views, k, batch_size,
                    workers, values, quiet or rank != 0, num_classes=manifest.num_classes,
                    temperatures=temperatures)
    barrier(world)
    seconds = time.perf_counter() - start
    summary = {"store": str(path), "key": key, "views": num_samples * num_views,
               "computed_views": sum(len(writer.shard_rows_range(s)) for s in pending) * num_views,
               "seconds": round(seconds, 3), "bytes_on_disk": bytes_on_disk(path), "up_to_date": not pending}
    summary["views_per_s"] = round(summary["computed_views"] / seconds, 2) if pending and seconds > 0 else None
    if rank == 0:
        if pending:
            quality = {"teacher_top1_views": top1_vs_labels(writer)}
            if "val" in manifest.splits and split != "val":
                quality["teacher_top1_clean_val"] = clean_val_top1(forward, spec, shards, batch_size, workers)
            writer.record_quality(quality)
            writer.finish({"seconds": summary["seconds"], "views_per_s": summary["views_per_s"], "world_size": world,
                           "device": str(dev), "batch_size": batch_size, "workers": workers,
                           "threads": torch.get_num_threads()})
        quality = {k: writer.provenance.get(k) for k in ("teacher_top1_views", "teacher_top1_clean_val")}
        summary.update(quality)
        if out is not None:
            write_pointer(Path(out) / f"{spec['name']}.json", writer)
        if pending and not quiet:
            log(f"{path}: {summary['computed_views']} views in {seconds:.1f} s ({summary['views_per_s']} views/s), "
                f"{summary['bytes_on_disk'] / 1e6:.2f} MB on disk "
                f"({summary['bytes_on_disk'] / summary['views']:.1f} B/view); {quality_line(quality)}")
        if not quiet:
            given = str(teacher) if isinstance(teacher, (str, Path)) else spec["name"]
            warning = view_cost_warning(quality, plan, given, spec["name"], num_views)
            if warning:
                log(warning)
    close_distributed(own_group)
    return summary


def _run_shards(writer, forward, teacher_loader, shards, split, plan, spec, mine, num_views, k, batch_size, workers,
                values, quiet, num_classes, temperatures):
    rows = np.concatenate([np.arange(r.start, r.stop) for r in map(writer.shard_rows_range, mine)]) if mine else []
    loader = teacher_loader(shards, split, plan, num_views, rows, size=spec["input_size"], batch_size=batch_size,
                            workers=workers)
    buffers: dict[int, dict] = {}
    bar = progress(total=len(rows) * num_views, unit="view", disable=quiet, desc=f"teach {spec['name']}", smoothing=0.1)
    for number, batch in enumerate(loader):
        logits = forward(batch["image"])
        if logits.shape[1] != num_classes:
            raise UserError(f"teacher '{spec['name']}' outputs {logits.shape[1]} classes but the dataset has "
                            f"{num_classes}; fix `num_classes` / the model in its spec")
        if not torch.isfinite(logits).all():
            rows = batch["index"]
            raise UserError(f"teacher '{spec['name']}' output NaN or infinite logits on batch {number} (samples "
                            f"{int(rows.min())}..{int(rows.max())} of split {split}); nothing of it was stored: check "
                            "its weights, or run without --amp")
        logp, idx, lse = encode_topk(logits, k, values)
        rest = encode_rest(logits, k, temperatures)
        index, view = batch["index"].numpy(), batch["view"].numpy()
        for shard in np.unique(index // writer.shard_rows):
            sel = index // writer.shard_rows == shard
            if shard not in buffers:
                buffers[shard] = _new_buffer(writer, shard, num_views)
            buf = buffers[shard]
            r = index[sel] - buf["start"]
            v = view[sel]
            buf["values"][r, v], buf["indices"][r, v], buf["lse"][r, v] = logp[sel], idx[sel], lse[sel]
            buf["rest"][r, v] = rest[sel]
            buf["params"][r, v] = batch["params"].numpy()[sel]
            buf["labels"][r] = batch["label"].numpy()[sel]
            buf["left"] -= int(sel.sum())
            if buf["left"] == 0:
                writer.write_shard(int(shard), *(buf[n] for n in ("values", "indices", "lse", "params", "labels")),
                                   rest=buf["rest"])
                del buffers[shard]
        bar.update(len(index))
    bar.close()


def _new_buffer(writer, shard, num_views) -> dict:
    """One shard's arrays in memory, in the store's dtypes (codec.array_dtypes), filled batch by batch."""
    rows = writer.shard_rows_range(int(shard))
    n, dtypes = len(rows), array_dtypes(writer.provenance["values_encoding"], writer.num_classes)
    return {"start": rows.start, "left": n * num_views,
            **{name: np.zeros((n, *writer.arrays[name].shape[1:]), dtypes[name]) for name in ARRAYS}}


VIEW_COST_WARN = 15.0  # points of top-1 the views may cost the teacher before teach warns


def clean_val_top1(forward: Forward, spec, shards, batch_size, workers) -> float:
    """The teacher's top-1 (%) on clean val images: timm's eval render at its input size and crop_pct
    (what finetune and evaluate score), with the teach pass's device and autocast."""
    from pipeline.data.loaders import eval_loader
    from pipeline.metrics import topk_hits

    loader = eval_loader(shards, "val", preprocess_of(spec), batch_size=batch_size, workers=workers)
    forward.model.eval()
    hits = total = 0
    for batch in loader:
        hits += topk_hits(forward(batch["image"]).cpu(), batch["label"], ks=(1,))[1]
        total += len(batch["label"])
    return round(100.0 * hits / max(total, 1), 2)


def quality_line(quality: dict) -> str:
    clean = quality.get("teacher_top1_clean_val")
    views = quality.get("teacher_top1_views")
    return (f"teacher top-1 {'-' if views is None else f'{views:.2f}'}% on the stored views, "
            f"{'-' if clean is None else f'{clean:.2f}'}% on clean val")


def view_cost_warning(quality: dict, plan, teacher: str, name: str, num_views: int) -> str | None:
    """One line when the stored views cost the teacher more than VIEW_COST_WARN points of top-1, naming both
    fixes: a softer plan, or the teacher fitted to these views (issue 24: 44 % -> 69-76 % on the views).
    `teacher` is the spec as the user gave it, `name` the spec's name."""
    clean, views = quality.get("teacher_top1_clean_val"), quality.get("teacher_top1_views")
    if clean is None or views is None or clean - views <= VIEW_COST_WARN:
        return None
    tuned = f"outputs/teachers/{name}-ft"
    return (f"warning: the stored views cost the teacher {clean - views:.1f} points of top-1 ({clean:.1f}% clean val, "
            f"{views:.1f}% on views), so its targets are noisy (`pipeline store show --worst` shows them); either "
            f"soften the view plan (scale min {plan.scale[0]:g}, auto_augment {plan.auto_augment or 'none'}, "
            f"re_prob {plan.re_prob:g}), or fit the teacher to these views: `pipeline finetune-teacher --teacher "
            f"{teacher} --plan teach --num-views {num_views} --out {tuned}` (--plan teach is params.yaml's "
            f"`teach: plan:`; give the plan's YAML if it came from a file; in dvc.yaml: the entry "
            f"`{name}-ft: {{teacher: {teacher}}}` under params.yaml `finetune:`), then teach {tuned}/teacher.yaml")


def _versions() -> dict:
    import zarr

    from pipeline import __version__
    from pipeline.data.loaders import view_environment

    return {"pipeline": __version__, "torch": torch.__version__, "zarr": zarr.__version__, **view_environment()}
