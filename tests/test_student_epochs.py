"""Issue 22: a student rank reads and holds only its own (sample, view) pairs of the current epoch, and
trains exactly as it did with every stored target in memory."""

import csv

import numpy as np
import pytest
import torch

import pipeline.store as store_mod
import pipeline.train as train_mod
from pipeline.codec import decode_logp, tempered_lse, value_scale
from pipeline.data.loaders import student_batches
from pipeline.recipes import load_recipe
from pipeline.store import VIEW_ARRAYS
from pipeline.train import train
from tests._student_helpers import STUDENT, make_shards, make_store

QUICK = {"epochs": 2, "batch_size": 8, "lr": 2e-2, "warmup_epochs": 0, "ema_decay": 0.9, "tau": 2.0,
         "num_branches": None, "scale_branch": None, "img_size": 64}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Shards of 4 x 16 images (48 train), two teachers of 3 views in shards of 10 rows (the second in f16)."""
    root = tmp_path_factory.mktemp("epochs")
    make_shards(root / "shards")
    kw = dict(num_views=3, k=3, temperatures=(1, 2, 4), shard_rows=10)
    stores = [make_store(root / "shards", root / "teach", name="a", values="logp-s181", **kw),
              make_store(root / "shards", root / "teach", name="b", seed=1, **kw)]
    return root, stores


class AllInMemory:
    """The path before issue 22, kept here only as the reference: every stored target and param of every view
    of the store in memory, indexed [index, view]."""

    def __init__(self, store):
        self.t = {name: torch.from_numpy(np.ascontiguousarray(store.arrays[name][:])) for name in VIEW_ARRAYS}
        step = value_scale(store.provenance["values_encoding"])
        if step is not None:
            self.t["values"] = (self.t["values"].double() * step).round().short()
        self.scale, self.temperatures, self.num_views = step or 1, store.temperatures, store.num_views
        self.codes = np.arange(store.num_samples * store.num_views)

    def __len__(self):
        return len(self.codes)

    def log_probs(self, index, view):
        t, index, view = self.t, torch.as_tensor(index).long(), torch.as_tensor(view).long()
        rest = t["rest"][index, view].int()
        logp = decode_logp(t["values"][index, view].double() / self.scale, rest[:, 0])
        return logp, t["indices"][index, view].long(), rest, t["lse"][index, view].double()

    def lookup(self, index, view):
        logp, classes, _, lse = self.log_probs(index, view)
        return logp + lse[:, None], classes, lse

    def lookup_tau(self, index, view, tau):
        logp, classes, rest, lse = self.log_probs(index, view)
        offset = tempered_lse(logp, rest[:, self.temperatures.index(float(tau))], tau)
        return logp + lse[:, None], classes, lse, lse / tau + offset

    def params(self, index, view):
        return self.t["params"].numpy()[np.asarray(index), np.asarray(view)]


@pytest.mark.parametrize("world,read_views", [(1, None), (2, 1)])
def test_a_rank_reads_and_holds_only_its_pairs_of_the_epoch(data, world, read_views, monkeypatch):
    """Per epoch and rank: exactly the loader's (index, view) pairs are held, and every number served (raw,
    decoded targets at a stored tau, params) is the all-in-memory path's, bit for bit (also when every shard
    is decoded on its own: READ_VIEWS 1)."""
    root, stores = data
    if read_views:
        monkeypatch.setattr(store_mod, "READ_VIEWS", read_views)
    for store in stores:
        old = AllInMemory(store)
        for epoch in range(2):
            for rank in range(world):
                pairs = np.concatenate(student_batches(root / "shards", "train", 3, 8 // world, 0, epoch, rank, world,
                                                       drop_last=True))
                held = store.read_views(pairs[:, 0], pairs[:, 1], VIEW_ARRAYS)
                assert len(held) == len(pairs) == 48 // world  # one view per sample, this rank's samples only
                index, view = torch.from_numpy(pairs[:, 0]), torch.from_numpy(pairs[:, 1])
                for got, want in zip(held.lookup_tau(index, view, 2.0), old.lookup_tau(index, view, 2.0)):
                    assert torch.equal(got, want)
                assert np.array_equal(held.params(pairs[:, 0], pairs[:, 1]), old.params(pairs[:, 0], pairs[:, 1]))
                with pytest.raises(KeyError):  # a pair of another epoch or rank is not held
                    held.params([pairs[0, 0]], [(pairs[0, 1] + 1) % 3])


def test_an_epoch_reads_one_view_of_the_store(data, monkeypatch):
    """An epoch's reads are the files of its one view: 1/V of the store's per-view bytes, not all of them."""
    root, stores = data
    store = stores[0]
    read = []
    real = store_mod.LogitStore._checked_file

    def spying(self, fs, root_, name, shard, *args):
        data_, why = real(self, fs, root_, name, shard, *args)
        read.append(len(data_))
        return data_, why

    monkeypatch.setattr(store_mod.LogitStore, "_checked_file", spying)
    pairs = np.concatenate(student_batches(root / "shards", "train", 3, 8, 0, 1, drop_last=True))
    assert len(set(pairs[:, 1].tolist())) == 1  # one view for the whole epoch
    store.read_views(pairs[:, 0], pairs[:, 1], VIEW_ARRAYS)
    view_bytes = sum(f.stat().st_size for name in VIEW_ARRAYS for f in (store.path / name / "c").rglob("*")
                     if f.is_file())
    assert 0 < sum(read) <= 0.5 * view_bytes, (sum(read), view_bytes)  # V = 3: ~1/3 (per-view files differ a little)


def test_student_trains_bit_for_bit_as_with_every_target_in_memory(data, tmp_path, monkeypatch):
    """Two epochs of a two-teacher ensemble at a stored tau: the epoch-wise reads give the same weights, byte
    for byte, as the all-in-memory path; each epoch's reads hold that epoch's pairs only."""
    root, stores = data
    recipe = load_recipe("demo", QUICK)
    held = []
    real_read = train_mod.EpochViews.read

    def recording(self, epoch):
        views = real_read(self, epoch)
        held.append([len(v) for v in views])
        return views

    monkeypatch.setattr(train_mod.EpochViews, "read", recording)
    train(STUDENT, recipe, root / "shards", tmp_path / "new", stores, ["a", "b"], quiet=True)
    assert held == [[48] * 3] * 2  # two targets reads + one params read, 48 pairs each, per epoch

    class Everything:
        def __init__(self, reads, pairs, epochs):
            self.views = [AllInMemory(store) for store, _ in reads]

        def __call__(self, epoch):
            return self.views

        def close(self):
            pass

    monkeypatch.setattr(train_mod, "EpochViews", Everything)
    train(STUDENT, recipe, root / "shards", tmp_path / "old", stores, ["a", "b"], quiet=True)
    for name in ("model.safetensors", "ema.safetensors"):
        assert (tmp_path / "new" / name).read_bytes() == (tmp_path / "old" / name).read_bytes()
    assert curve(tmp_path / "new") == curve(tmp_path / "old")


def curve(out):
    """plots.csv less the wall time."""
    with open(out / "plots.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]

