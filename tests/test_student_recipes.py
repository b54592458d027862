"""Recipes: the paper's values, overrides, refusals; checkpoints round-trip optimizer state."""

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.errors import UserError
from pipeline.recipes import load_recipe, parse_overrides


def test_paper_recipe_holds_the_papers_values():
    r = load_recipe("ghostnetv3-paper")
    assert (r.batch_size, r.opt, r.lr, r.sched, r.min_lr, r.weight_decay, r.epochs) == (
        2048, "lamb", 5e-3, "cosine", 0.0, 0.05, 600)
    assert (r.ema_decay, r.alpha, r.tau, r.num_branches, r.scale_branch) == (0.9999, 0.5, 1.0, 3, True)
    assert (r.auto_augment, r.re_prob, r.mixup, r.cutmix) == ("rand-m9-mstd0.5", 0.25, 0.0, 0.0)
    assert r.warmup_epochs > 0 and r.label_smoothing > 0


def test_overrides_as_strings_or_dict():
    r = load_recipe("ghostnetv3-paper", ["alpha=0.9", "sched=step", "ema_decay=null", "scale=[0.25, 1]"])
    assert (r.alpha, r.sched, r.ema_decay, r.scale) == (0.9, "step", None, [0.25, 1])
    assert load_recipe("demo", {"epochs": 2, "lr": 1}).lr == 1.0
    assert parse_overrides(["tau=4"]) == {"tau": 4}


@pytest.mark.parametrize("bad, message", [
    (["alpha=1.5"], "alpha must be in"),
    (["nope=1"], "unknown key 'nope'"),
    (["epochs=2.5"], "'epochs' must be int"),
    (["opt=adamz"], "not a timm optimizer"),
    (["sched=linear"], "sched must be one of"),
    (["alpha=null"], "'alpha' cannot be null"),
    (["alpha"], "not key=value"),
    (["num_branches=7"], "num_branches must be in 1..5"),
])
def test_bad_overrides_are_refused_by_name(bad, message):
    with pytest.raises(UserError, match=message):
        load_recipe("demo", bad)


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(UserError, match="demo, ghostnetv3-paper"):
        load_recipe("nope")


def test_checkpoint_round_trips_lamb_state(tmp_path):
    model = timm.create_model("test_convnext", num_classes=3)
    opt = create_optimizer_v2(model, opt="lamb", lr=1e-3, weight_decay=0.05)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "c.safetensors", {"optimizer": opt.state_dict(), "state": {"epoch": 1, "h": [1.5]}})
    back = load_checkpoint(tmp_path / "c.safetensors")
    fresh = create_optimizer_v2(model, opt="lamb", lr=1e-3, weight_decay=0.05)
    fresh.load_state_dict(back["optimizer"])
    a, b = opt.state_dict(), fresh.state_dict()
    assert back["state"] == {"epoch": 1, "h": [1.5]}
    assert a["param_groups"][0]["step"] == b["param_groups"][0]["step"]
    assert all(torch.equal(a["state"][i]["exp_avg"], b["state"][i]["exp_avg"]) for i in a["state"])
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="unreadable"):
        load_checkpoint(tmp_path / "bad.safetensors")
