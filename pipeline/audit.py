"""Replay-fidelity audit of a teacher store: re-render stored views, re-run the teacher, compare.

The student trusts that stored view (i, v) is what the teacher saw and that its logits are what the
teacher outputs on it. The audit checks both on a random sample: the views are rendered from the
params READ FROM THE STORE (as the student does), the teacher is loaded as `pipeline teach` loads it
(its spec from the store's provenance, or the one given) and run with the store's autocast; then
top-1 agreement, KL(stored || fresh) on the stored top-k + rest buckets, and the lse difference.
It also re-derives the sampled params from the plan (a different numpy/timm/Pillow draws others).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.codec import encode_lse
from pipeline.data.loaders import replay_mismatch, replay_views
from pipeline.data.shards import ShardManifest
from pipeline.data.views import ViewPlan
from pipeline.distill import bucket_kl, teacher_target
from pipeline.errors import UserError
from pipeline.runtime import resolve_device
from pipeline.store import VIEW_ARRAYS
from pipeline.teachers import Forward, artifact_spec, load_teacher, teacher_spec

MAX_KL = 1e-2  # nats: f16/BitRound storage costs ~1e-4; a view rendered differently costs far more
MAX_LSE_DIFF = 5e-2


def audit_store(store, shards, *, teacher=None, weights=None, samples: int | str = 64, batch_size: int = 32,
                device: str = "auto", seed: int = 0, max_kl: float = MAX_KL, max_lse_diff: float = MAX_LSE_DIFF) -> dict:
    """Compare `samples` distinct random stored views (drawn without replacement; "all": every view of the
    finished shards) with a fresh teacher pass; "ok" is False beyond a tolerance."""
    p = store.provenance
    manifest = ShardManifest.read(shards)
    store.check_compatible(manifest.fingerprint, p["plan_hash"])
    # the user's spec, else the store's provenance, which names a model but never grants trust
    spec = teacher_spec(teacher if teacher is not None else artifact_spec(p["teacher"], f"teacher store {store.path}"),
                        weights)
    if spec.get("weights") and not Path(spec["weights"]).is_file():
        raise UserError(f"the teacher weights '{spec['weights']}' of store {store.path} are not here; give the "
                        f"teacher's spec (--teacher SPEC.yaml) or its weights (--weights FILE)")
    model, digest = load_teacher(spec)
    if digest != p["weights_digest"]:
        raise UserError(f"teacher '{spec['name']}' has weights {digest[:16]} but store {store.path} was made with "
                        f"{p['weights_digest'][:16]}; give the teacher that made it (--teacher / --weights)")
    done = np.flatnonzero(store.done_mask())
    if not len(done):
        raise UserError(f"teacher store {store.path} has no finished shard to audit; run `pipeline teach` first")
    rows_done = np.concatenate([np.arange(r.start, r.stop) for r in map(store.shard_rows_range, done)])
    rows = draw_views(len(rows_done), store.num_views, samples, seed)
    rows[:, 0] = rows_done[rows[:, 0]]
    count = len(rows)
    plan = ViewPlan.load(store.plan, f"teacher store {store.path}")
    stored = store.read_views(rows[:, 0], rows[:, 1], VIEW_ARRAYS)  # the sampled views only, checked as read
    forward = Forward(model, spec, resolve_device(device), p.get("amp", "none"))
    fresh = torch.cat([forward(replay_views(shards, p["split"], plan, rows[s:s + batch_size], stored,
                                            spec["input_size"])).cpu() for s in range(0, count, batch_size)])
    index, view = torch.from_numpy(rows[:, 0]), torch.from_numpy(rows[:, 1])
    z, classes, lse = stored.lookup(index, view)
    target = teacher_target(z, classes, lse, store.num_classes)
    kl = bucket_kl(fresh, target, reduction="none")
    lse_diff = (stored_lse(torch.logsumexp(fresh.double(), 1)) - lse.double()).abs()  # both as the store rounds
    stored_top1 = classes.gather(1, z.argmax(1, keepdim=True))[:, 0]
    mismatch = replay_mismatch(shards, p["split"], plan, stored, samples=count, seed=seed)
    result = {"store": str(store.path), "teacher": spec["name"], "samples": count,
              "of_views": len(rows_done) * store.num_views,
              "top1_agreement": round(float((stored_top1 == fresh.argmax(1)).float().mean()), 4),
              "mean_kl": float(f"{kl.mean():.4g}"), "max_kl": float(f"{kl.max():.4g}"),
              "mean_lse_diff": float(f"{lse_diff.mean():.4g}"), "max_lse_diff": float(f"{lse_diff.max():.4g}"),
              "params_rederived": mismatch is None, "tolerance": {"max_kl": max_kl, "max_lse_diff": max_lse_diff}}
    result["ok"] = bool(result["max_kl"] <= max_kl and result["max_lse_diff"] <= max_lse_diff and mismatch is None)
    return result


def draw_views(num_rows: int, num_views: int, samples: int | str, seed: int = 0) -> np.ndarray:
    """int64 [n, 2] distinct (row, view) pairs of num_rows x num_views, drawn without replacement and sorted
    (one decode per sample): n = min(samples, all of them), or all of them for "all"."""
    total = num_rows * num_views
    count = total if samples == "all" else min(int(samples), total)
    flat = np.sort(np.random.default_rng(seed).choice(total, count, replace=False))
    return np.stack([flat // num_views, flat % num_views], 1).astype(np.int64)


def stored_lse(lse: torch.Tensor) -> torch.Tensor:
    """float64 lse as the store keeps it (codec.encode_lse): a faithful store then differs by 0."""
    return torch.from_numpy(encode_lse(lse)).double()
