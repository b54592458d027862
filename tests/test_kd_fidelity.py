"""Issue 9: exact tempered targets from the store, replay from stored params, the labels-only twin."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import pipeline.train as train_mod
from pipeline.data.loaders import student_loader
from pipeline.data.shards import ShardReader
from pipeline.data.views import ViewPlan, render, view_params
from pipeline.distill import Targets, kd_loss
from pipeline.errors import UserError
from pipeline.recipes import load_recipe
from pipeline.store import StoredViews
from pipeline.train import train
from stages.cli import main as cli
from tests._student_helpers import SPEC, STUDENT, make_shards, make_store, teacher_logits

QUICK = {"epochs": 1, "batch_size": 16, "lr": 2e-2, "warmup_epochs": 0, "ema_decay": None,
         "num_branches": None, "scale_branch": None, "img_size": 64}
MEAN, STD = STUDENT.preprocess.mean, STUDENT.preprocess.std
# m6, not the helpers' m3: timm's Posterize at magnitude < 2.5 keeps 0 bits, which Pillow refuses (a views issue)
PLAN = ViewPlan(seed=0, size=64, auto_augment="rand-m6-mstd0.5", re_prob=0.25)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("kdfid")
    make_shards(root / "shards", num_classes=12, per_class=3)
    tempered = make_store(root / "shards", root / "teach", name="t124", plan=PLAN, k=3, temperatures=(1, 2, 4))
    plain = make_store(root / "shards", root / "teach", name="t1", plan=PLAN, k=3)
    return root, tempered, plain


def brute_coarsened(student, teacher, classes, tau):
    """tau^2 KL of the tempered dense softmaxes coarsened onto (the stored classes, rest), row by row."""
    total = 0.0
    for s, t, c in zip(student.double(), teacher.double(), classes):
        p, q = F.softmax(t / tau, 0), F.softmax(s / tau, 0)
        rest = torch.ones_like(p, dtype=torch.bool)
        rest[c] = False
        pb, qb = torch.cat([p[c], p[rest].sum()[None]]), torch.cat([q[c], q[rest].sum()[None]])
        total += (pb * (pb / qb).log()).sum()
    return tau**2 * total / len(student)


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_targets_at_a_stored_tau_are_the_exact_coarsened_kl(data, tau):
    root, store, _ = data
    labels = store.arrays["labels"][:]
    dense = teacher_logits(labels, 2, 12)  # what make_store encoded
    index, view = torch.arange(len(labels)), torch.arange(len(labels)) % 2
    target = Targets([store], 12, tau)(index, view, "cpu")
    student = torch.randn(len(labels), 12, generator=torch.Generator().manual_seed(1)) * 2
    got = tau**2 * kd_loss(student, torch.from_numpy(labels).long(), target, 1.0, tau)["kd"]
    classes = store.lookup(index, view)[1]
    want = brute_coarsened(student, dense[index, view], classes, tau)
    # f16 log-probabilities and f16 lse offsets: 1e-3 relative
    assert abs(float(got) - float(want)) <= 1e-3 * float(want), (float(got), float(want))


def test_unstored_tau_is_refused_naming_the_stored_ones(data, tmp_path, capsys):
    root, tempered, plain = data
    with pytest.raises(UserError, match=r"tau=3 is not stored .* keeps tau 1, 2, 4"):
        Targets([tempered], 12, 3.0)
    with pytest.raises(UserError, match=r"tau=2 is not stored .* keeps tau 1\b.*--flat-tail"):
        train(STUDENT, load_recipe("demo", {**QUICK, "tau": 2.0}), root / "shards", tmp_path, [plain], ["t1"],
              quiet=True)
    assert not (tmp_path / "checkpoint.safetensors").exists()
    train(STUDENT, load_recipe("demo", {**QUICK, "tau": 2.0}), root / "shards", tmp_path, [plain], ["t1"],
          quiet=True, flat_tail=True)
    assert "flat-tail approximation" in capsys.readouterr().out


def test_student_replays_the_stored_params(data):
    """The loader renders the params READ from the store, even where the plan would derive others."""
    root, store, _ = data
    reader = ShardReader(root / "shards", "train")
    other = ViewPlan.load({**PLAN.to_dict(), "seed": 7})
    stored = np.stack([[view_params(other, reader.key(i), v) for v in range(2)] for i in range(len(reader))])
    held = StoredViews(np.arange(stored.shape[0] * 2), 2, {"params": stored.reshape(-1, stored.shape[-1])})
    batch = next(iter(student_loader(root / "shards", "train", PLAN, 2, 64, 4, seed=0, epoch=0,
                                     stored_params=held)))
    for j, (i, v) in enumerate(zip(batch["index"].tolist(), batch["view"].tolist())):
        want = render(reader.image(i), stored[i, v], PLAN, 64)
        assert torch.equal(batch["image"][j].permute(1, 2, 0), torch.from_numpy(want.copy()))


def test_student_refuses_a_store_whose_params_this_environment_does_not_derive(data, tmp_path):
    root, _, _ = data
    reader = ShardReader(root / "shards", "train")
    other = ViewPlan.load({**PLAN.to_dict(), "seed": 7})
    params = np.stack([[view_params(other, reader.key(i), v) for v in range(2)] for i in range(len(reader))])
    drifted = make_store(root / "shards", tmp_path / "teach", name="drift", plan=PLAN, k=3, params=params)
    with pytest.raises(UserError, match="numpy/timm/Pillow/OpenCV version mismatch") as err:
        train(STUDENT, load_recipe("demo", QUICK), root / "shards", tmp_path / "out", [drifted], ["drift"], quiet=True)
    assert "\n" not in str(err.value) and "timm" in str(err.value)
    assert not (tmp_path / "out" / "checkpoint.safetensors").exists()


def test_labels_only_twin_replays_the_kd_students_views(data, tmp_path, monkeypatch):
    """--views-from: same plan, V, per-epoch (index, view) pairs and stored params as a KD student."""
    root, store, _ = data
    seen = {}
    real = train_mod.student_loader

    def recording(*args, **kwargs):
        loader = real(*args, **kwargs)
        pairs = [(b["index"].tolist(), b["view"].tolist()) for b in loader]
        seen.setdefault(kwargs["stored_params"] is not None, []).append((args[2].hash(), args[3], pairs))
        return loader

    monkeypatch.setattr(train_mod, "student_loader", recording)
    recipe = {**QUICK, "epochs": 2, "plan": None}
    train(STUDENT, load_recipe("demo", recipe), root / "shards", tmp_path / "kd", [store], ["t124"], quiet=True)
    kd = seen.pop(True)
    args = ["student", "--student", str(_spec(tmp_path)), "--recipe", "demo", "--shards", str(root / "shards"),
            "--teach-dir", str(root / "teach"), "--out", str(tmp_path / "plain"), "--alpha", "0", "--epochs", "2",
            "--batch-size", "16", "--lr", "0.02", "--warmup-epochs", "0", "--set", "ema_decay=null",
            "--set", "num_branches=null", "--set", "scale_branch=null", "--set", "plan=null", "--img-size", "64",
            "--views-from", "t124", "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert seen.pop(True) == kd and not seen
    info = json.loads((tmp_path / "plain" / "student.json").read_text())
    assert info["view_plan"] == store.plan and info["num_views"] == 2 and info["views_from"] == store.key
    bad = CliRunner().invoke(cli, [a if a != "0" else "0.5" for a in args] + ["--teachers", "t124"])
    assert bad.exit_code == 2 and "--views-from is for labels-only" in bad.output


def _spec(tmp_path) -> Path:
    path = tmp_path / "student.yaml"
    path.write_text(json.dumps(SPEC))
    return path
