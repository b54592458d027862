"""Training recipes: every knob of the student run, from manifests/recipes/*.yaml plus overrides.

A recipe is a flat mapping so that an ablation is one override (`--set alpha=0.9`, or a
`set:` list in params.yaml). Unknown keys, wrong types and out-of-range values are refused
with a message naming the recipe and the key.
"""

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Optional

import yaml

from pipeline.errors import UserError
from pipeline.manifests import load_spec

SCHEDULES = ("cosine", "step")
RE_MODES = ("const", "rand", "pixel")


@dataclass
class Recipe:
    name: str = "custom"
    # Optimisation. batch_size is GLOBAL (all ranks together); lr is for that batch, not rescaled.
    epochs: int = 10
    batch_size: int = 128
    opt: str = "lamb"
    lr: float = 5e-3
    weight_decay: float = 0.05  # timm filters norms and biases (1-d params) out of the decay
    momentum: float = 0.9
    grad_clip: Optional[float] = None
    # Schedule, stepped per update: cosine to min_lr, or step decay; linear warmup from warmup_lr.
    sched: str = "cosine"
    min_lr: float = 0.0
    warmup_epochs: float = 0
    warmup_lr: float = 1e-6
    decay_epochs: float = 30
    decay_rate: float = 0.1
    # EMA of the weights (timm ModelEmaV3); None turns it off.
    ema_decay: Optional[float] = 0.9999
    ema_warmup: bool = False
    # Loss: (1 - alpha) * CE(label_smoothing) + alpha * tau^2 * KL(teacher_tau || student_tau).
    alpha: float = 0.5
    tau: float = 1.0
    label_smoothing: float = 0.1
    # Re-parameterization of rep_* students: N parallel kxk branches + a 1x1 depthwise branch.
    # None leaves the student manifest's value (and lets non-rep timm students train).
    num_branches: Optional[int] = None
    scale_branch: Optional[bool] = None
    # Views. With a teacher store the plan comes from the store: a field set here must match it,
    # None takes the store's value. Without a store (alpha = 0) these build the plan.
    auto_augment: Optional[str] = None
    re_prob: Optional[float] = None
    re_mode: Optional[str] = None
    hflip: Optional[float] = None
    scale: Optional[list] = None
    num_views: Optional[int] = None  # only without a store; None = one fresh view per epoch
    # Mixup/CutMix (Table 8 ablation only; the paper trains without): batch-mode timm Mixup.
    mixup: float = 0.0
    cutmix: float = 0.0
    # Input size of the student; None = the student manifest's input_size.
    img_size: Optional[int] = None
    sync_bn: bool = False  # CUDA + DDP only (torch has no CPU SyncBatchNorm)
    seed: int = 0
    description: str = field(default="", compare=False)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Recipe)}
# Field -> its plain type (Optional[X] -> X).
TYPES = {k: next(a for a in typing.get_args(t) or (t,) if a is not type(None))
         for k, t in typing.get_type_hints(Recipe).items()}


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
        values[key] = _coerce(where, key, value)
    recipe = Recipe(**values)
    _validate(where, recipe)
    return recipe


def _coerce(where, key, value):
    if value is None:
        if FIELDS[key].default is not None:
            raise UserError(f"{where}: '{key}' cannot be null")
        return None
    kind = TYPES[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{where}: '{key}' must be {kind.__name__}, got {value!r}")
    return value


def _validate(where, r: Recipe) -> None:
    def check(cond, msg):
        if not cond:
            raise UserError(f"{where}: {msg}")

    check(r.epochs >= 1, f"epochs must be >= 1, got {r.epochs}")
    check(r.batch_size >= 1, f"batch_size must be >= 1, got {r.batch_size}")
    check(r.lr > 0, f"lr must be > 0, got {r.lr}")
    check(r.weight_decay >= 0, f"weight_decay must be >= 0, got {r.weight_decay}")
    check(0 <= r.alpha <= 1, f"alpha must be in [0, 1], got {r.alpha}")
    check(r.tau > 0, f"tau must be > 0, got {r.tau}")
    check(0 <= r.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {r.label_smoothing}")
    check(r.sched in SCHEDULES, f"sched must be one of {', '.join(SCHEDULES)}, got '{r.sched}'")
    check(0 <= r.warmup_epochs < r.epochs or r.warmup_epochs == 0,
          f"warmup_epochs must be in [0, epochs), got {r.warmup_epochs}")
    check(r.ema_decay is None or 0 < r.ema_decay < 1, f"ema_decay must be in (0, 1) or null, got {r.ema_decay}")
    check(r.num_branches is None or 1 <= r.num_branches <= 5, f"num_branches must be in 1..5, got {r.num_branches}")
    check(r.mixup >= 0 and r.cutmix >= 0, "mixup and cutmix are Beta alphas, >= 0")
    check(r.re_mode is None or r.re_mode in RE_MODES, f"re_mode must be one of {', '.join(RE_MODES)}")
    check(r.num_views is None or r.num_views >= 1, f"num_views must be >= 1, got {r.num_views}")
    check(r.scale is None or (len(r.scale) == 2 and 0 < r.scale[0] <= r.scale[1] <= 1),
          f"scale must be [min, max] within (0, 1], got {r.scale}")
    from timm.optim import list_optimizers

    check(r.opt in list_optimizers(), f"opt '{r.opt}' is not a timm optimizer (e.g. lamb, adamw, sgd)")
