"""Training recipes: every knob of the student run, from manifests/recipes/*.yaml plus overrides.

A recipe is a flat mapping so that an ablation is one override (`--set alpha=0.9`, or a
`set:` list in params.yaml). Unknown keys, wrong types and out-of-range values are refused
with a message naming the recipe and the key. The views are one field, `plan` (ViewPlan's
fields, checked by ViewPlan alone; `--set plan={FIELD: VALUE}` replaces it), used only by a
student without a teacher store.
"""

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Optional

import yaml

from pipeline.errors import UserError
from pipeline.manifests import load_spec

SCHEDULES = ("cosine", "step")

# What the re-parameterized branches (the models' defaults: N=3 + 1x1 + identity, branch_bn_init 0) gained on
# real data, trained from scratch: benchmarks/bench_recipe.py (CIFAR-10, 200 train and 200 disjoint val images
# per class at 64 px, GhostNetV3 0.5x, demo recipe, KD from a fitted ResNet-10-T; docs/measurements.md).
# epochs -> (val top-1 % with the branches, without them), both with KD. Below BRANCH_GAIN points of gain the
# branches only cost time (about 2x a plain training step).
BRANCHES_MEASURED = {6: (38.4, 38.0), 24: (50.1, 49.0)}
BRANCH_GAIN = 0.5


def knob(default, help: str):
    """A recipe field with the one-line help that `pipeline student --help` shows."""
    return field(default=default, metadata={"help": help})


@dataclass
class Recipe:
    name: str = "custom"
    epochs: int = knob(10, "Training epochs.")
    batch_size: int = knob(128, "GLOBAL batch size (all processes together); lr is not rescaled.")
    opt: str = knob("lamb", "timm optimizer name: lamb, adamw, sgd, ...")
    lr: float = knob(5e-3, "Peak learning rate (after warmup).")
    weight_decay: float = knob(0.05, "Weight decay; never applied to norms and biases (1-d params).")
    momentum: float = knob(0.9, "Momentum (sgd/rmsprop-style optimizers).")
    grad_clip: Optional[float] = knob(None, "Clip the global gradient norm to this value; null = no clipping "
                                            "(also none inside the optimizer: timm's Lamb would clip at 1.0).")
    sched: str = knob("cosine", "LR schedule, stepped every update: cosine (to min_lr) or step.")
    min_lr: float = knob(0.0, "Final learning rate of the cosine schedule.")
    warmup_epochs: float = knob(0, "Epochs of linear warmup from warmup_lr up to lr (reached at its end).")
    warmup_lr: float = knob(1e-6, "Learning rate at the start of the warmup.")
    decay_epochs: float = knob(30, "step schedule: epochs between decays.")
    decay_rate: float = knob(0.1, "step schedule: factor per decay.")
    ema_decay: Optional[float] = knob(0.9999, "Weight EMA decay per update (timm ModelEmaV3); null = no EMA.")
    ema_warmup: bool = knob(False, "Ramp the EMA decay up over the first updates (short runs).")
    alpha: float = knob(0.5, "KD weight: loss = (1-alpha) CE + alpha tau^2 KL; 0 = labels only, no store.")
    tau: float = knob(1.0, "KD temperature (exact at 1; see pipeline.distill for tau != 1).")
    label_smoothing: float = knob(0.1, "Label smoothing of the CE term.")
    num_branches: Optional[int] = knob(None, "rep_* students: parallel kxk branches N (1..5); null = the student "
                                             "spec's, else the model's (3).")
    scale_branch: Optional[bool] = knob(None, "rep_* students: add the 1x1 depthwise branch; null = the student "
                                              "spec's, else the model's (on).")
    identity_branch: Optional[bool] = knob(None, "rep_* students: add the BN identity branch where shapes allow; "
                                                 "null = the student spec's, else the model's (on). N=1 with no 1x1 "
                                                 "and no identity is the stock network.")
    branch_bn_init: Optional[float] = knob(None, "rep_* students from scratch: initial BatchNorm weight of every branch "
                                                 "but the first (0 = the training form starts as the stock network "
                                                 "of its seed and grows its extra branches; 1 = the paper's init; "
                                                 "an --init always starts them at 0); null = the student spec's, "
                                                 "else the model's (0).")
    plan: Optional[dict] = knob(None, "Views without a store (alpha 0, no --views-from): a mapping of ViewPlan "
                                      "fields (pipeline/data/views.py) or a YAML file of them; fields left out: the "
                                      "run's seed, the student's size and interpolation, else ViewPlan's defaults. "
                                      "null with a store: the store's plan is the views.")
    num_views: Optional[int] = knob(None, "Views per sample without a store (alpha 0); null = epochs.")
    mixup: float = knob(0.0, "Mixup Beta alpha (Table 8 ablation only; the paper uses none).")
    cutmix: float = knob(0.0, "CutMix Beta alpha (Table 8 ablation only; the paper uses none).")
    img_size: Optional[int] = knob(None, "Student input size in px; null = the student manifest's.")
    sync_bn: bool = knob(False, "SyncBatchNorm across processes (CUDA only: torch has none on CPU).")
    seed: int = knob(0, "Seed of the initial weights, sample order, view choice, dropout and Mixup.")
    description: str = field(default="", compare=False)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Recipe)}
HINTS = typing.get_type_hints(Recipe)
# Field -> its plain type (Optional[X] -> X); NULLABLE: the Optional ones.
TYPES = {k: next(a for a in typing.get_args(t) or (t,) if a is not type(None)) for k, t in HINTS.items()}
NULLABLE = {k for k, t in HINTS.items() if type(None) in typing.get_args(t)}


def branch_budget_note(epochs: int, model_kwargs: dict, pretrained: bool) -> str | None:
    """One line for a student whose re-parameterized branches train from scratch at a budget where they were
    measured not to help (BRANCHES_MEASURED), naming the figures and the switch to the plain network; else None."""
    from pipeline.models.rep import adds_branches  # lazily: stages import recipes without torch

    gains = {e: round(w - wo, 1) for e, (w, wo) in BRANCHES_MEASURED.items()}
    first_gain = min((e for e, g in gains.items() if g >= BRANCH_GAIN), default=max(gains) + 1)
    if not adds_branches(model_kwargs) or pretrained or epochs >= first_gain:
        return None
    figures = ", ".join(f"{BRANCHES_MEASURED[e][0]:.1f} vs {BRANCHES_MEASURED[e][1]:.1f} % at {e}" for e in gains)
    return (f"note: at {epochs} epochs from scratch the re-parameterized branches are not measured to help "
            f"(with vs without, KD: {figures} epochs; benchmarks/bench_recipe.py) and cost ~2x the step time: "
            "--num-branches 1 --no-scale-branch --no-identity-branch trains the plain network")


def parse_overrides(items) -> dict:
    """['alpha=0.9', 'sched=step'] -> {'alpha': 0.9, 'sched': 'step'} (values parsed as YAML)."""
    out = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise UserError(f"override '{item}' is not key=value (e.g. --set alpha=0.9)")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"override '{item}': cannot parse the value '{value}'") from None
    return out


def load_recipe(name_or_path: str, overrides=None) -> Recipe:
    """Recipe from manifests/recipes/{name}.yaml (or a YAML path) with overrides applied.

    `overrides` is a dict or a list of 'key=value' strings.
    """
    spec = load_spec("recipes", name_or_path)
    if not isinstance(overrides, dict):
        overrides = parse_overrides(overrides)
    where = f"recipe '{spec['name']}'"
    values = {}
    for key, value in {**spec, **overrides}.items():
        if key not in FIELDS:
            raise UserError(f"{where}: unknown key '{key}'; known keys: {', '.join(sorted(FIELDS))}")
        values[key] = _plan(where, value) if key == "plan" else _coerce(where, key, value)
    recipe = Recipe(**values)
    _validate(where, recipe)
    return recipe


def _plan(where, value) -> dict | None:
    """The recipe's plan fields (a YAML file is read here, so the recipe records what it sets), checked by ViewPlan."""
    from pipeline.data.views import ViewPlan

    return None if value is None else ViewPlan.read(value, f"{where} plan")


def _coerce(where, key, value):
    if value is None:
        if key not in NULLABLE:
            raise UserError(f"{where}: '{key}' cannot be null")
        return None
    kind = TYPES[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{where}: '{key}' must be {kind.__name__}, got {value!r}")
    return value


def _validate(where, r: Recipe) -> None:
    # num_branches: range-checked by the models' one check (pipeline.models.rep) when the student is built
    def check(cond, msg):
        if not cond:
            raise UserError(f"{where}: {msg}")

    for name, kind in TYPES.items():  # every number finite (nan and inf pass most comparisons below)
        value = getattr(r, name)
        check(kind is not float or value is None or math.isfinite(value),
              f"{name} must be a finite number, got {value}")
    check(1 <= r.epochs <= 100_000, f"epochs must be in 1..100000, got {r.epochs}")
    check(1 <= r.batch_size <= 1_000_000, f"batch_size must be in 1..1000000, got {r.batch_size}")
    check(0 <= r.seed < 2**32, f"seed must be in 0..2**32-1, got {r.seed}")
    check(r.lr > 0, f"lr must be > 0, got {r.lr}")
    check(r.min_lr >= 0 and r.warmup_lr >= 0, f"min_lr and warmup_lr must be >= 0, got {r.min_lr}, {r.warmup_lr}")
    check(r.decay_epochs > 0, f"decay_epochs must be > 0, got {r.decay_epochs}")
    check(0 < r.decay_rate <= 1, f"decay_rate must be in (0, 1], got {r.decay_rate}")
    check(r.weight_decay >= 0, f"weight_decay must be >= 0, got {r.weight_decay}")
    check(0 <= r.alpha <= 1, f"alpha must be in [0, 1], got {r.alpha}")
    check(r.tau > 0, f"tau must be > 0, got {r.tau}")
    check(0 <= r.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {r.label_smoothing}")
    check(r.sched in SCHEDULES, f"sched must be one of {', '.join(SCHEDULES)}, got '{r.sched}'")
    check(r.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {r.warmup_epochs}")
    check(r.grad_clip is None or r.grad_clip > 0, f"grad_clip must be > 0 or null, got {r.grad_clip}")
    check(r.ema_decay is None or 0 < r.ema_decay < 1, f"ema_decay must be in (0, 1) or null, got {r.ema_decay}")
    check(r.mixup >= 0 and r.cutmix >= 0, "mixup and cutmix are Beta alphas, >= 0")
    check(r.img_size is None or 8 <= r.img_size <= 4096, f"img_size must be in 8..4096 px or null, got {r.img_size}")
    if r.branch_bn_init is not None:  # the models' own range (pipeline.models.rep), as for a spec's model_kwargs
        from pipeline.models.rep import check_branch_bn_init

        try:
            check_branch_bn_init(r.branch_bn_init)
        except ValueError as err:
            raise UserError(f"{where}: {err} (or null)") from None
    check(r.num_views is None or 1 <= r.num_views <= 100_000, f"num_views must be in 1..100000, got {r.num_views}")
    from timm.optim import list_optimizers

    check(r.opt in list_optimizers(), f"opt '{r.opt}' is not a timm optimizer (e.g. lamb, adamw, sgd)")
