"""DataLoaders over the shards: teacher (every view once), student (one view per sample per epoch), eval.

Each loader is a map-style dataset whose items are whole batches (DataLoader batch_size=None): the
batch plan is fixed up front, DataLoader hands batches to workers in order and yields them in order,
so a split across workers can have no gap and no duplicate, and a sample decoded once serves all of
its views in the batch.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import torch
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset

from pipeline.data.shards import MANIFEST, ShardReader
from pipeline.data.views import ViewPlan, render, view_params
from pipeline.errors import UserError


class _Batches(Dataset):
    """Item b = the batch built by `build(reader, rows[b])` (rows[b]: int64 [B, 2] index, view)."""

    def __init__(self, reader: ShardReader, rows, build):
        self.reader, self.rows, self.build = reader, rows, build

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, b: int) -> dict:
        return self.build(self.reader, self.rows[b])


@functools.lru_cache(maxsize=8)
def _cached_reader(shard_dir: str, split: str, manifest_stamp: tuple) -> ShardReader:
    return ShardReader(shard_dir, split)


def _reader(shard_dir, split: str) -> ShardReader:
    """One tar index per split, reused by the loaders of every epoch until the manifest changes."""
    manifest = Path(shard_dir).resolve() / MANIFEST
    stamp = (manifest.stat().st_mtime_ns, manifest.stat().st_size) if manifest.is_file() else ()
    return _cached_reader(str(manifest.parent), split, stamp)


def _loader(reader, rows, build, workers) -> DataLoader:
    return DataLoader(_Batches(reader, rows, build), batch_size=None, shuffle=False, num_workers=workers,
                      persistent_workers=False)


def _chunks(pairs: np.ndarray, batch_size: int) -> list[np.ndarray]:
    _check_batch_size(batch_size)
    return [pairs[s:s + batch_size] for s in range(0, len(pairs), batch_size)]


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")


@dataclasses.dataclass(frozen=True)
class _SampleMajorRows:
    """Batch b of the flat (i, v) sequence, i over `indices`, v over range(V); built on demand
    (N x V rows of a large dataset need not sit in memory)."""

    indices: np.ndarray
    num_views: int
    batch_size: int

    def __len__(self) -> int:
        return -(-len(self.indices) * self.num_views // self.batch_size)

    def __getitem__(self, b: int) -> np.ndarray:
        if not 0 <= b < len(self):
            raise IndexError(b)
        t = np.arange(b * self.batch_size, min((b + 1) * self.batch_size, len(self.indices) * self.num_views))
        return np.stack([self.indices[t // self.num_views], t % self.num_views], 1)


def _render_views(reader: ShardReader, rows: np.ndarray, plan: ViewPlan, size: int, stored=None):
    """uint8 [B, 3, H, W] images (channels-last memory: the renders' own layout, no copy) and int32 [B, P]
    params of the (index, view) rows: the store's when `stored` (a store.StoredViews holding the rows) is
    given, else derived from the plan."""
    if stored is None:
        params = np.stack([view_params(plan, reader.key(int(i)), int(v)) for i, v in rows]).astype(np.int32)
    else:
        params = stored.params(rows[:, 0], rows[:, 1]).astype(np.int32)
    images = np.empty((len(rows), size, size, 3), dtype=np.uint8)
    last, image = -1, None
    for j, (i, v) in enumerate(rows):
        if i != last:
            last, image = i, reader.source(int(i))
        images[j] = render(image, params[j], plan, size)
    return torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(params)


def _index_view(rows: np.ndarray) -> dict:
    return {"index": torch.from_numpy(rows[:, 0].copy()), "view": torch.from_numpy(rows[:, 1].copy())}


@dataclasses.dataclass(frozen=True)
class _TeacherBatch:
    plan: ViewPlan
    size: int

    def __call__(self, reader, rows):
        images, params = _render_views(reader, rows, self.plan, self.size)
        return {**_index_view(rows), "image": images, "params": params,
                "label": torch.from_numpy(reader.labels[rows[:, 0]])}


@dataclasses.dataclass(frozen=True)
class _StudentBatch:
    plan: ViewPlan
    size: int
    stored: object = None  # store.StoredViews

    def __call__(self, reader, rows):
        images, _ = _render_views(reader, rows, self.plan, self.size, self.stored)
        return {**_index_view(rows), "image": images, "label": torch.from_numpy(reader.labels[rows[:, 0]])}


@dataclasses.dataclass(frozen=True)
class _EvalBatch:
    transform: object

    def __call__(self, reader, rows):
        images = torch.stack([self.transform(reader.image(int(i))) for i in rows])
        return {"index": torch.from_numpy(rows.copy()), "image": images,
                "label": torch.from_numpy(reader.labels[rows])}


def _check_indices(indices: np.ndarray, n: int) -> np.ndarray:
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(indices) and (indices.min() < 0 or indices.max() >= n):
        raise UserError(f"sample indices must lie in [0, {n}), got {indices.min()}..{indices.max()}")
    return indices


def teacher_loader(shard_dir, split, plan: ViewPlan, num_views: int, indices, size: int,
                   batch_size: int, workers: int = 0) -> DataLoader:
    """Every (i in indices, v in range(num_views)) exactly once, sample-major, as uint8 batches."""
    reader = _reader(shard_dir, split)
    _check_batch_size(batch_size)
    rows = _SampleMajorRows(_check_indices(indices, len(reader)), int(num_views), int(batch_size))
    return _loader(reader, rows, _TeacherBatch(plan, size), workers)


def epoch_view(seed: int, epoch: int, num_views: int) -> int:
    """The stored view every sample uses in `epoch`: a seeded permutation of range(V) over each V consecutive
    epochs, so all V views get used. One view for all samples is the same law as one drawn per sample (view v
    of each sample is its own draw from (plan seed, key, v)), and it makes an epoch read 1/V of the store."""
    return int(np.random.default_rng([seed, num_views]).permutation(num_views)[epoch % num_views])


def student_batches(shard_dir, split, num_views: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                    world_size: int = 1, drop_last: bool = False) -> list[np.ndarray]:
    """This rank's batches of `epoch` as int64 [B, 2] (index, view) rows: student_loader's, and what the
    student reads from its stores for that epoch (a pure function of its arguments: resume replays it)."""
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} must lie in [0, world_size={world_size})")
    reader = _reader(shard_dir, split)
    perm = np.random.default_rng([seed, epoch]).permutation(len(reader))
    perm = perm[: len(perm) // world_size * world_size][rank::world_size]
    rows = _chunks(np.stack([perm, np.full_like(perm, epoch_view(seed, epoch, num_views))], 1), batch_size)
    if drop_last and rows and len(rows[-1]) < batch_size:
        rows = rows[:-1]
    return rows


def student_loader(shard_dir, split, plan: ViewPlan, num_views: int, size: int,
                   batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                   workers: int = 0, drop_last: bool = False, stored_params=None) -> DataLoader:
    """One view per sample for `epoch`, globally shuffled; rank r takes a strided share of each
    global batch of world_size * batch_size samples (so 2 ranks x b sees what 1 rank x 2b sees).
    Images are uint8, as the teacher's: the trainer normalises them on its device (runtime.Normalize),
    which keeps a float pass and 4x the bytes out of the loader workers and the host-to-GPU copy.

    `stored_params` (a store.StoredViews holding this epoch's rows, LogitStore.read_views): replay exactly
    the views the store holds (the store is the truth about what the teacher saw); without it the params
    are derived from the plan."""
    rows = student_batches(shard_dir, split, num_views, batch_size, seed, epoch, rank, world_size, drop_last)
    return _loader(_reader(shard_dir, split), rows, _StudentBatch(plan, size, stored_params), workers)


def replay_mismatch(shard_dir, split, plan: ViewPlan, stored, samples: int = 64, seed: int = 0):
    """A random sample of the view params `stored` holds (a store.StoredViews) re-derived from the plan here:
    the first (index, view) that differs, or None. A difference means another numpy/timm/Pillow drew the
    views than this environment."""
    reader = _reader(shard_dir, split)
    codes = np.random.default_rng(seed).choice(stored.codes, min(samples, len(stored)), replace=False)
    for i, v in zip(*np.divmod(codes, stored.num_views)):
        if not np.array_equal(view_params(plan, reader.key(int(i)), int(v)), stored.params([i], [v])[0]):
            return int(i), int(v)
    return None


def view_environment() -> dict:
    """Versions of the libraries that draw and render views (numpy's RNG, timm's ops, Pillow, and
    simplejpeg and OpenCV for the fast renderer's decode and warp)."""
    import cv2
    import PIL
    import simplejpeg
    import timm

    return {"numpy": np.__version__, "timm": timm.__version__, "Pillow": PIL.__version__, "opencv": cv2.__version__,
            "simplejpeg": simplejpeg.__version__}


def replay_views(shard_dir, split, plan: ViewPlan, rows: np.ndarray, stored, size: int):
    """uint8 [B, 3, size, size] renders of the (index, view) `rows` from the params `stored` holds for them
    (a store.StoredViews)."""
    return _render_views(_reader(shard_dir, split), np.asarray(rows), plan, size, stored)[0]


def eval_loader(shard_dir, split, pre, batch_size: int, workers: int = 0,
                subset: tuple[int, int] | None = None) -> DataLoader:
    """A model's clean eval images (its pipeline.preprocess.Preprocess): resize to input_size / crop_pct and
    centre-crop (timm's eval transform), as uint8: the model's side normalises on its device
    (runtime.Normalize.of), as for every view (timm's prefetcher form).

    subset (count, seed): only that many images, a fixed seeded choice (in split order), for cheap
    per-epoch validation."""
    reader = _reader(shard_dir, split)
    transform = create_transform(input_size=pre.input_size, is_training=False, interpolation=pre.interpolation,
                                 crop_pct=pre.crop_pct, use_prefetcher=True)
    indices = np.arange(len(reader), dtype=np.int64)
    if subset is not None and subset[0] < len(reader):
        indices = np.sort(np.random.default_rng(subset[1]).choice(indices, size=subset[0], replace=False))
    return _loader(reader, _chunks(indices, batch_size), _EvalBatch(transform), workers)
