"""Fine-tuning a teacher runs the student's training loop (pipeline.loop.fit): same exact resume, same policy."""

import json

import pytest
import torch
from safetensors.torch import load_file

import pipeline.finetune as finetune
import pipeline.loop as loop
from pipeline.checkpoint import load_checkpoint
from pipeline.errors import UserError
from tests._chain_helpers import tiny_shards

RUN = {"epochs": 2, "batch_size": 8, "plan": {"size": 32, "auto_augment": None}, "img_size": 32, "quiet": True,
       "threads": 1}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_shards(tmp_path_factory.mktemp("ftloop"), num_classes=3, per_class=4)


def _interrupt_in_epoch(monkeypatch, stop_epoch: int) -> list:
    """Kill the next fine-tune when it starts epoch `stop_epoch` (0-based) once; returns the epochs started."""
    real, started = finetune.student_loader, []

    def loader(shard_dir, split, *args, epoch, **kwargs):
        if split == "train":
            started.append(epoch)
            if epoch == stop_epoch and started.count(epoch) == 1:
                raise KeyboardInterrupt
        return real(shard_dir, split, *args, epoch=epoch, **kwargs)

    monkeypatch.setattr(finetune, "student_loader", loader)
    return started


def test_resumed_finetune_replays_the_uninterrupted_run(shards, tmp_path, monkeypatch):
    """As the student's resume test: the same weights, loss, scores before and after, as one uninterrupted run."""
    full = finetune.finetune_teacher("demo-resnet10t", shards, tmp_path / "full", **RUN)
    started = _interrupt_in_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        finetune.finetune_teacher("demo-resnet10t", shards, tmp_path / "cut", **RUN)
    state = load_checkpoint(tmp_path / "cut" / loop.CHECKPOINT)["state"]
    assert state["epoch"] == 1 and [row["epoch"] for row in state["history"]] == [1]  # the loop's checkpoint
    cut = finetune.finetune_teacher("demo-resnet10t", shards, tmp_path / "cut", **RUN, resume=True)
    assert started == [0, 1, 1]
    for key in ("train_loss", "val_top1", "val_top5", "before", "after"):
        assert cut[key] == pytest.approx(full[key], rel=1e-5, abs=1e-6), (key, cut[key], full[key])
    wa, wb = load_file(tmp_path / "full" / "weights.safetensors"), load_file(tmp_path / "cut" / "weights.safetensors")
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6) for k in wa)
    assert not (tmp_path / "cut" / loop.CHECKPOINT).exists()  # a finished run leaves no resume point


def test_a_checkpoint_of_other_settings_is_refused_and_kept(shards, tmp_path, monkeypatch):
    """The student's policy: --resume with another run's checkpoint is one line naming the fix; nothing is lost.
    Without --resume the run starts over (no silent resume either way)."""
    started = _interrupt_in_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        finetune.finetune_teacher("demo-resnet10t", shards, tmp_path / "t", **RUN)
    written = (tmp_path / "t" / loop.CHECKPOINT).read_bytes()
    with pytest.raises(UserError, match=r"different run \(recipe differ\); drop --resume") as err:
        finetune.finetune_teacher("demo-resnet10t", shards, tmp_path / "t", **{**RUN, "lr": 1e-3}, resume=True)
    assert "\n" not in str(err.value)
    assert (tmp_path / "t" / loop.CHECKPOINT).read_bytes() == written
    metrics = finetune.finetune_teacher("demo-resnet10t", shards, tmp_path / "t", **{**RUN, "lr": 1e-3})
    assert started == [0, 1, 0, 1] and metrics["epochs"] == 2
    assert json.loads((tmp_path / "t" / "metrics.json").read_text())["val_top1"] == metrics["val_top1"]


def test_labels_only_objective_is_the_old_fine_tune_loss():
    """KDLoss without targets (alpha 0) is CE with label smoothing, what finetune.py computed on its own before."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    x, labels = torch.randn(6, 3, 2, 2), torch.tensor([0, 1, 2, 3, 4, 0])
    terms = loop.KDLoss(label_smoothing=0.1)(model, x, {"label": labels})
    want = torch.nn.functional.cross_entropy(model(x), labels, label_smoothing=0.1)
    assert torch.allclose(terms["loss"], want) and float(terms["kd"]) == 0.0
    with pytest.raises(UserError, match="needs teacher targets"):
        loop.KDLoss(alpha=0.5)


def test_the_recipe_tau_reaches_targets_and_loss_together():
    """KDLoss.from_recipe builds the stored targets and the loss from one recipe: one temperature for both."""
    from types import SimpleNamespace

    from pipeline.recipes import load_recipe

    store = SimpleNamespace(temperatures=[1.0, 2.0, 4.0])
    loss = loop.KDLoss.from_recipe(load_recipe("demo", {"tau": 2.0, "alpha": 0.5}), 5, [store])
    assert loss.tau == loss.targets.tau == 2.0 and loss.targets.exact and loss.targets.stores == [store]
    assert loop.KDLoss.from_recipe(load_recipe("demo", {"alpha": 0.0}), 5).targets is None
