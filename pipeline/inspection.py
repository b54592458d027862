"""What `pipeline store inspect` and `pipeline store list` show of a store: its shape, completeness, size,
top-k mass and the teacher's top-1 against the labels (overall and per class), and the stores under a root."""

from __future__ import annotations

import json
import os

import fsspec
import numpy as np

from pipeline.codec import topk_mass
from pipeline.store import LogitStore, bytes_on_disk, check_root, is_url


def summarize(store: LogitStore) -> dict:
    """What `pipeline store inspect` prints: shape, size, completeness, top-k mass, teacher top-1."""
    p, done = store.provenance, store.done_mask()
    rows = np.concatenate([np.arange(r.start, r.stop) for r in map(store.shard_rows_range, np.flatnonzero(done))]
                          ) if done.any() else np.zeros(0, np.int64)
    info = {"path": str(store.path), "key": store.key, "teacher": p["teacher"]["name"], "model": p["teacher"]["model"],
            "weights_digest": p["weights_digest"][:16], "dataset": p["dataset"], "split": p["split"],
            "dataset_fingerprint": p["dataset_fingerprint"], "plan_hash": p["plan_hash"],
            "shape": [store.num_samples, store.num_views, store.k], "num_classes": store.num_classes,
            "values_encoding": p["values_encoding"], "index_dtype": p["index_dtype"],
            "complete": bool(done.all()), "shards_done": f"{int(done.sum())}/{len(done)}",
            "bytes_on_disk": bytes_on_disk(store.path), "bytes_per_view": round(store.bytes_per_view(), 2),
            "versions": p.get("versions"), "run": dict(store.group.attrs.get("run") or {})}
    info["temperatures"] = store.temperatures
    # teacher top-1 in percent: teach's figures (whole split), else (unfinished store) over the done shards
    info["teacher_top1_views"] = p.get("teacher_top1_views")
    info["teacher_top1_clean_val"] = p.get("teacher_top1_clean_val")
    if len(rows):
        values = store.arrays["values"].get_orthogonal_selection((rows,))
        info["mean_topk_mass"] = round(float(topk_mass(values).mean()), 4)
        if info["teacher_top1_views"] is None:
            info["teacher_top1_views"] = top1_vs_labels(store, rows)
        info["teacher_top1_per_class"] = top1_per_class(store, rows)  # on the views
        if info["mean_topk_mass"] > 1 + MASS_SLACK:
            info["problems"] = [f"mean top-k mass {info['mean_topk_mass']} > 1: the stored values are not "
                                "log-probabilities; re-run `pipeline teach` into a new --store-root"]
    return info


def top1_vs_labels(store: LogitStore, rows=None) -> float:
    """Top-1 (%) of the stored targets against the labels, over `rows` (default: all) and every view;
    read one store shard of rows at a time (a whole ImageNet store would not fit in memory)."""
    g = store.arrays
    rows = np.arange(store.num_samples) if rows is None else np.asarray(rows)
    hits = 0
    for start in range(0, len(rows), store.shard_rows):
        part = (rows[start:start + store.shard_rows],)
        values, indices = g["values"].get_orthogonal_selection(part), g["indices"].get_orthogonal_selection(part)
        top1 = np.take_along_axis(indices, values.argmax(-1)[..., None], -1)[..., 0]
        hits += int((top1 == g["labels"].get_orthogonal_selection(part)[:, None]).sum())
    return round(100.0 * hits / max(len(rows) * store.num_views, 1), 2)


def top1_per_class(store: LogitStore, rows) -> dict[int, float]:
    """Teacher top-1 (%) on the stored views of each label class over `rows` (classes with no row left
    out), read one shard of rows at a time: a view plan that erases a few classes hides in the overall figure."""
    g, rows = store.arrays, np.asarray(rows)
    hits, counts = np.zeros(store.num_classes, np.int64), np.zeros(store.num_classes, np.int64)
    for start in range(0, len(rows), store.shard_rows):
        part = (rows[start:start + store.shard_rows],)
        values, indices = g["values"].get_orthogonal_selection(part), g["indices"].get_orthogonal_selection(part)
        labels = g["labels"].get_orthogonal_selection(part).astype(np.int64)
        top1 = np.take_along_axis(indices, values.argmax(-1)[..., None], -1)[..., 0]
        np.add.at(hits, labels, (top1 == labels[:, None]).sum(1))
        np.add.at(counts, labels, store.num_views)
    return {int(c): round(100.0 * hits[c] / counts[c], 2) for c in np.flatnonzero(counts)}


# f16 log-probabilities round by at most ~1e-3 relative: a top-k mass beyond this is a broken store.
MASS_SLACK = 2e-3


def find_stores(root) -> list:
    """Every store (a zarr group with provenance) under `root`, sorted: Paths under a local folder, URLs under an
    fsspec URL (s3://bucket/prefix, listed through fsspec); `root` itself may be one."""
    root = check_root(root, reach=True)
    fs, top = fsspec.core.url_to_fs(str(root))
    found = []
    for folder, dirs, files in fs.walk(top):
        if "zarr.json" not in files:
            continue
        try:
            attrs = json.loads(fs.cat_file(f"{folder}/zarr.json")).get("attributes") or {}
        except (OSError, ValueError, AttributeError):
            continue
        if "provenance" in attrs:
            found.append(folder)
            dirs.clear()  # its arrays are no stores
    return sorted(fs.unstrip_protocol(f) if is_url(root) else root / os.path.relpath(f, top) for f in found)


def list_row(store: LogitStore) -> dict:
    """One line of `pipeline store list`: what made the store, its shape, completeness and size."""
    p, done = store.provenance, store.done_mask()
    return {"teacher": p["teacher"]["name"], "dataset": f"{p['dataset']}/{p['split']}", "plan": p["plan_hash"][:8],
            "K": store.k, "V": store.num_views, "samples": store.num_samples,
            "complete": f"{int(done.sum())}/{len(done)}" + ("" if done.all() else " (unfinished)"),
            "MB": round(bytes_on_disk(store.path) / 1e6, 2), "path": str(store.path)}
