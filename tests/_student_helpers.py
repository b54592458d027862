"""Tiny shards + teacher stores for the student tests (a synthetic 'teacher' that knows the labels)."""

import numpy as np
import torch

from pipeline.codec import encode_rest, encode_topk
from pipeline.data.shards import ShardManifest, ShardReader
from pipeline.data.views import ViewPlan, view_params
from pipeline.records import StudentSpec
from pipeline.store import create_or_open, open_store, store_key, write_pointer
from tests._data_helpers import synthetic_shards

SPEC = {"name": "tiny", "model": "test_efficientnet", "input_size": 64, "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25], "crop_pct": 1.0, "interpolation": "bilinear"}  # what a manifest states
STUDENT = StudentSpec.resolve(SPEC)
PLAN = ViewPlan(seed=0, size=64, auto_augment="rand-m3-mstd0.5", re_prob=0.25)


def make_shards(out_dir, num_classes=4, per_class=16):
    return synthetic_shards(out_dir, num_classes=num_classes, per_class=per_class, size=64, shard_size=20)


def teacher_logits(labels: np.ndarray, views: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """[N, V, C] logits peaked on the label, with per-(sample, view) noise: a confident, imperfect teacher."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(labels), views, num_classes, generator=g)
    logits[torch.arange(len(labels)), :, torch.from_numpy(labels).long()] += 4.0
    return logits


def make_store(shard_dir, root, name="t1", plan=PLAN, num_views=2, k=2, seed=0, fingerprint=None, temperatures=(1.0,),
               params=None, values="f16", shard_rows=None):
    """A complete store for the train split + its pointer file {root}/{name}.json; returns the store.
    `params` [N, V, P] replaces the view params derived from the plan (a store drawn elsewhere); `values`
    is the value encoding; `shard_rows` (default: all rows in one shard)."""
    manifest = ShardManifest.read(shard_dir)
    reader = ShardReader(shard_dir, "train")
    n, c = len(reader), manifest.num_classes
    labels = np.array([reader.label(i) for i in range(n)])
    fingerprint = fingerprint or manifest.fingerprint
    teacher = {"name": name, "model": "synthetic"}
    key = store_key(dataset_fingerprint=fingerprint, split="train", plan_hash=plan.hash(), teacher=teacher,
                    weights_digest=str(seed), k=k, num_views=num_views, values=values, amp="none",
                    temperatures=temperatures)
    provenance = {"key": key, "dataset": manifest.dataset, "split": "train", "dataset_fingerprint": fingerprint,
                  "plan": plan.to_dict(), "plan_hash": plan.hash(), "teacher": teacher, "k": k}
    writer = create_or_open(f"{root}/{name}-{key}.zarr", provenance, num_samples=n, num_views=num_views, k=k,
                            params_dim=plan.params_dim, num_classes=c, shard_rows=shard_rows or n, values=values,
                            temperatures=temperatures)
    logits = teacher_logits(labels, num_views, c, seed)
    logp, indices, lse = encode_topk(logits.reshape(n * num_views, c), k, values)
    if params is None:
        params = np.stack([[view_params(plan, reader.key(i), v) for v in range(num_views)] for i in range(n)])
    rest = encode_rest(logits.reshape(n * num_views, c), k, temperatures)
    per_row = [a.reshape(n, num_views, *a.shape[1:]) for a in (logp, indices, lse, rest)]
    for shard in range(writer.num_shards):
        r = writer.shard_rows_range(shard)
        s = slice(r.start, r.stop)
        writer.write_shard(shard, per_row[0][s], per_row[1][s], per_row[2][s], params[s], labels[s], rest=per_row[3][s])
    store = open_store(writer.path)
    write_pointer(f"{root}/{name}.json", store)
    return store
