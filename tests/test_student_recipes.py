"""Recipes: the paper's values, overrides, refusals; checkpoints round-trip optimizer state."""

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.data.views import ViewPlan
from pipeline.errors import UserError
from pipeline.recipes import BRANCHES_MEASURED, branch_budget_note, load_recipe, parse_overrides
from pipeline.loop import create_optimizer, create_scheduler


def test_paper_recipe_holds_the_papers_values():
    r = load_recipe("ghostnetv3-paper")
    assert (r.batch_size, r.opt, r.lr, r.sched, r.min_lr, r.weight_decay, r.epochs) == (
        2048, "lamb", 5e-3, "cosine", 0.0, 0.05, 600)
    assert (r.ema_decay, r.alpha, r.tau, r.num_branches, r.scale_branch) == (0.9999, 0.5, 1.0, 3, True)
    assert r.branch_bn_init is None  # the models' default (0); the paper's init is the named option branch_bn_init=1
    assert (r.mixup, r.cutmix) == (0.0, 0.0)
    # its views are the store's plan, else ViewPlan's defaults: the paper's RandAugment + RandomErasing
    plan = ViewPlan.load(r.plan)
    assert r.plan is None and (plan.auto_augment, plan.re_prob, plan.scale) == ("rand-m9-mstd0.5", 0.25, (0.08, 1.0))
    assert r.warmup_epochs > 0 and r.label_smoothing > 0


def test_branch_budget_note_only_where_the_branches_were_measured_not_to_help():
    branches = {"num_branches": 3, "scale_branch": True, "identity_branch": True}
    plain = {"num_branches": 1, "scale_branch": False, "identity_branch": False}
    short = min(BRANCHES_MEASURED)
    note = branch_budget_note(short, branches, pretrained=False)
    with_branches, without = BRANCHES_MEASURED[short]
    assert note.startswith("note:") and f"{with_branches:.1f} vs {without:.1f} % at {short}" in note
    assert branch_budget_note(short, {**plain, "identity_branch": True}, pretrained=False)  # the BN identity is a branch
    assert branch_budget_note(short, plain, pretrained=False) is None
    assert branch_budget_note(short, {}, pretrained=False) is None  # a stock (non-rep) model
    assert branch_budget_note(short, branches, pretrained=True) is None  # measured from scratch only
    assert branch_budget_note(10 * max(BRANCHES_MEASURED), branches, pretrained=False) is None  # not measured there


def test_overrides_as_strings_or_dict():
    r = load_recipe("ghostnetv3-paper", ["alpha=0.9", "sched=step", "ema_decay=null", "plan={scale: [0.25, 1]}"])
    assert (r.alpha, r.sched, r.ema_decay, r.plan) == (0.9, "step", None, {"scale": [0.25, 1]})
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
    (["grad_clip=0"], "grad_clip must be > 0 or null"),
    (["identity_branch=1"], "'identity_branch' must be bool"),
    (["branch_bn_init=2"], r"branch_bn_init must be in \[0, 1\]"),
    (["warmup_epochs=.inf"], "warmup_epochs must be a finite number"),
    (["lr=.nan"], "lr must be a finite number"),
    (["sched=step", "decay_epochs=0"], "decay_epochs must be > 0"),
    (["min_lr=-1"], "min_lr and warmup_lr must be >= 0"),
    (["warmup_lr=-1"], "min_lr and warmup_lr must be >= 0"),
    (["img_size=100000"], "img_size must be in 8..4096"),
    (["seed=18446744073709551616"], "seed must be in 0..2"),
    (["plan={sed: 1}"], r"recipe 'demo' plan: unknown view plan fields \['sed'\]; the fields are seed, size"),
    (["plan={re_mode: blur}"], "recipe 'demo' plan: view plan re_mode 'blur' must be one of"),
    (["plan=no-such-plan.yaml"], "recipe 'demo' plan: file not found"),
    (["plan=7"], "recipe 'demo' plan: a view plan is a mapping"),
])
def test_bad_overrides_are_refused_by_name(bad, message):
    with pytest.raises(UserError, match=message):
        load_recipe("demo", bad)


def test_recipe_plan_from_a_file_is_kept_as_its_fields(tmp_path):
    """A plan file is read when the recipe loads: the recipe (student.json, the resume check) holds what it sets."""
    (tmp_path / "plan.yaml").write_text("re_prob: 0.1\nhflip: 0.0\n")
    r = load_recipe("demo", [f"plan={tmp_path / 'plan.yaml'}"])
    assert r.plan == {"re_prob": 0.1, "hflip": 0.0} and r.to_dict()["plan"] == r.plan


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


def _lamb_after_two_steps(optimizer_for):
    """Weights after two Lamb steps whose gradients differ 1000x in norm (so a norm clip changes the result)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = optimizer_for(model)
    x = torch.randn(16, 8)
    for scale in (1000.0, 1.0):
        opt.zero_grad()
        (scale * model(x).square().mean()).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_grad_clip_null_means_no_clipping_in_lamb_either():
    """timm's Lamb clips the global grad norm at 1.0 unless told otherwise; the recipe's null must hold."""
    recipe = load_recipe("ghostnetv3-paper")
    assert recipe.grad_clip is None
    timm_lamb = dict(opt="lamb", lr=recipe.lr, weight_decay=recipe.weight_decay)
    ours = _lamb_after_two_steps(lambda m: create_optimizer(m, recipe))
    unclipped = _lamb_after_two_steps(lambda m: create_optimizer_v2(m, **timm_lamb, max_grad_norm=None))
    clipped = _lamb_after_two_steps(lambda m: create_optimizer_v2(m, **timm_lamb))
    assert not torch.allclose(clipped, unclipped)  # the test can tell the two apart
    torch.testing.assert_close(ours, unclipped, rtol=0, atol=0)


@pytest.mark.parametrize("sched", ["cosine", "step"])
def test_warmup_ends_at_the_peak_lr(sched):
    recipe = load_recipe("demo", {"sched": sched, "epochs": 6, "warmup_epochs": 2, "decay_epochs": 2})
    steps, warmup = 7, 14
    opt = create_optimizer(torch.nn.Linear(2, 2), recipe)
    scheduler = create_scheduler(opt, recipe, steps)
    lrs = []
    for update in range(recipe.epochs * steps):
        scheduler.step_update(update)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == recipe.warmup_lr and all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup + 1]))
    assert lrs[warmup] == max(lrs) == recipe.lr
    assert lrs[-1] < 0.2 * recipe.lr  # and it still decays within the run
