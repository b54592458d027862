"""Shard reader and loaders: coverage across ranks and workers, replay, per-epoch views, eval."""

import collections

import numpy as np
import pytest
import torch
from timm.data import create_transform

from _data_helpers import synthetic_shards
from pipeline.data.loaders import epoch_view, eval_loader, student_loader, teacher_loader
from pipeline.data.shards import ShardManifest, ShardReader
from pipeline.data.views import ViewPlan, render, view_params
from pipeline.errors import UserError
from pipeline.preprocess import Preprocess

PLAN = ViewPlan(size=64, re_prob=0.5)
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shards"
    synthetic_shards(out, num_classes=3, per_class=8, shard_size=5)  # 18 train in 4 shards, 6 val
    return out


def test_reader_random_access(shard_dir):
    reader = ShardReader(shard_dir, "train")
    manifest = ShardManifest.read(shard_dir)
    assert len(reader) == manifest.splits["train"]["count"] == 18
    assert len(set(reader.keys)) == 18 and len(manifest.splits["train"]["shards"]) == 4
    assert reader.key(17) == reader.keys[17] and reader.image(17).size == (64, 64)
    assert reader.image_bytes(3).startswith(b"\x89PNG")
    assert sorted(collections.Counter(reader.labels.tolist()).values()) == [6, 6, 6]


def test_reader_errors(shard_dir, tmp_path):
    with pytest.raises(UserError, match="no manifest.json"):
        ShardManifest.read(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        ShardManifest.read(tmp_path)
    with pytest.raises(UserError, match="split 'test'"):
        ShardReader(shard_dir, "test")


def test_teacher_loader_two_ranks_two_workers_cover_everything_once(shard_dir):
    n, views = 18, 3
    seen = []
    for rank_indices in np.array_split(np.arange(n), 2):
        for batch in teacher_loader(shard_dir, "train", PLAN, views, rank_indices, 64, 4, workers=2):
            assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (3, 64, 64)
            assert batch["params"].dtype == torch.int32 and batch["params"].shape[1] == PLAN.params_dim
            seen += list(zip(batch["index"].tolist(), batch["view"].tolist()))
    assert seen == [(i, v) for i in range(n) for v in range(views)]  # sample-major, view-minor, in order


def test_teacher_batches_do_not_depend_on_worker_count(shard_dir):
    def run(workers, batch_size):
        batches = teacher_loader(shard_dir, "train", PLAN, 2, range(7), 48, batch_size, workers=workers)
        return torch.cat([b["image"] for b in batches]), torch.cat([b["params"] for b in batches])

    (a, pa), (b, pb) = run(0, 5), run(2, 3)
    assert torch.equal(a, b) and torch.equal(pa, pb) and a.shape == (14, 3, 48, 48)


def test_teacher_batches_replay_from_params(shard_dir):
    reader = ShardReader(shard_dir, "train")
    batch = next(iter(teacher_loader(shard_dir, "train", PLAN, 2, [5, 2], 64, 4)))
    for j, (i, v) in enumerate(zip(batch["index"].tolist(), batch["view"].tolist())):
        params = batch["params"][j].numpy()
        np.testing.assert_array_equal(params, view_params(PLAN, reader.key(i), v))
        np.testing.assert_array_equal(batch["image"][j].permute(1, 2, 0).numpy(),
                                      render(reader.image(i), params, PLAN, 64))
        assert batch["label"][j] == reader.label(i)


def test_student_views_cover_all_views_over_epochs(shard_dir):
    views = 3
    per_sample = collections.defaultdict(list)
    for epoch in range(views):
        order = []
        for batch in student_loader(shard_dir, "train", PLAN, views, 64, 8, seed=1, epoch=epoch):
            order += batch["index"].tolist()
            for i, v in zip(batch["index"].tolist(), batch["view"].tolist()):
                per_sample[i].append(v)
        assert sorted(order) == list(range(18)) and order != list(range(18))
    assert all(sorted(v) == list(range(views)) for v in per_sample.values())
    assert epoch_view(1, 4, 3) == epoch_view(1, 1, 3)


def test_student_ranks_split_global_batches(shard_dir):
    args = dict(plan=PLAN, num_views=4, size=64, seed=3, epoch=2)
    single = [b["index"].tolist() for b in student_loader(shard_dir, "train", batch_size=4, **args)]
    ranks = [[b["index"].tolist() for b in student_loader(shard_dir, "train", batch_size=2, rank=r, world_size=2,
                                                          **args)] for r in range(2)]
    assert [sorted(a + b) for a, b in zip(*ranks)] == [sorted(b) for b in single]


def test_student_images_are_the_renders_normalised_on_the_device(shard_dir):
    """The loader hands uint8 renders (no float pass in its workers); runtime.Normalize makes the input."""
    from pipeline.runtime import Normalize

    reader = ShardReader(shard_dir, "train")
    batch = next(iter(student_loader(shard_dir, "train", PLAN, 2, 48, 3, seed=0, epoch=0)))
    i, v = int(batch["index"][0]), int(batch["view"][0])
    pixels = render(reader.image(i), view_params(PLAN, reader.key(i), v), PLAN, 48)
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (3, 3, 48, 48)
    np.testing.assert_array_equal(batch["image"][0].permute(1, 2, 0).numpy(), pixels)
    x = Normalize(MEAN, STD)(batch["image"])
    assert x.is_contiguous() and x.dtype == torch.float32
    back = x[0] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    np.testing.assert_allclose(back.permute(1, 2, 0).numpy() * 255, pixels, atol=1e-3)


def test_eval_loader_is_timms_eval_transform(shard_dir):
    """uint8 out, normalised by the model's side: the same input as timm's eval transform (to float error)."""
    from pipeline.runtime import Normalize

    pre = Preprocess(input_size=56, mean=MEAN, std=STD, crop_pct=0.875, interpolation="bicubic")
    reader = ShardReader(shard_dir, "val")
    batches = list(eval_loader(shard_dir, "val", pre, 4))
    assert [b["index"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5]]
    assert batches[1]["image"].dtype == torch.uint8
    transform = create_transform(56, is_training=False, crop_pct=0.875, mean=MEAN, std=STD,
                                 interpolation="bicubic")
    torch.testing.assert_close(Normalize.of(pre)(batches[1]["image"])[1], transform(reader.image(5)),
                               rtol=0, atol=1e-5)
    assert batches[0]["label"].tolist() == reader.labels[:4].tolist()


def test_fast_renderer_student_replays_the_teachers_pixels(tmp_path):
    """Same renderer both sides (it is part of the plan): the student's view of (i, v) is the teacher's."""
    out = tmp_path / "shards"
    synthetic_shards(out, num_classes=3, per_class=8, shard_size=5, fmt="jpg", size=160)
    plan = ViewPlan(size=64, re_prob=0.5, renderer="fast", scale=(0.5, 1.0))  # crops >= 2x: reduced decode
    teacher = {}
    for batch in teacher_loader(out, "train", plan, 2, range(18), 64, 6):
        for i, v, img in zip(batch["index"].tolist(), batch["view"].tolist(), batch["image"]):
            teacher[i, v] = img
    seen = 0
    for epoch in range(2):
        for batch in student_loader(out, "train", plan, 2, 64, 5, seed=3, epoch=epoch):
            for i, v, img in zip(batch["index"].tolist(), batch["view"].tolist(), batch["image"]):
                torch.testing.assert_close(img, teacher[i, v], rtol=0, atol=0)
                seen += 1
    assert seen == 36
