"""Replayable augmented views: the parameters of view (key, v) are a pure function of (plan, key, v).

Teacher and student must see the same pixels (function matching), and the teacher store keeps the
parameters of every view, so a view is described by a small uint16 vector and `render` turns
(image, vector) into pixels. The random choices are ours (a numpy Generator seeded by a hash of
(seed, key, view), never a global RNG); what they mean is timm's: RandomResizedCrop scale/ratio,
timm's RandAugment spec parsing, op set, magnitude mapping and op functions, RandomErasing's box law.

Layout of the vector (P = 6 + 2 * layers + 4 * erase boxes + 1), every slot on a uint16 grid:
    [0:4]   crop: area in the scale range, log-ratio in the ratio range, x and y position (0..GRID)
    [4]     horizontal flip (0/1)
    [5]     number of RandAugment layers applied (those not skipped by the op's probability)
    then per layer: op code (1 + 2 * op index + negated) or 0 if skipped; magnitude * 10
    then per erase box: x0, y0, w, h as fractions of the output (0..GRID), all 0 if unused
    [-1]    noise seed of the erased pixels (0 when nothing is erased)
Unused slots are zero, which keeps the compressed store small.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math

import numpy as np
from PIL import Image
from timm.data.auto_augment import LEVEL_TO_ARG, rand_augment_transform
from timm.data.transforms import str_to_pil_interp

from pipeline.errors import UserError
from pipeline.io import stable_hash

GRID = 1023  # fractions (crop, position, erase boxes) are stored as q / GRID: 10 bits, < 0.5 px at 500 px
MAG_SCALE = 10  # RandAugment magnitudes are stored as round(m * 10): 0.3 degrees of rotation a step
PARAMS_LAYOUT = 1  # part of the plan hash: a new layout never reads stores written with an old one
ERASE_AREA = (0.02, 1 / 3)  # timm RandomErasing defaults (fraction of the image)
ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))
ERASE_FILL = (124, 116, 104)  # ImageNet mean in uint8, timm's fill for geometric ops and const erase
CROP_SLOTS, FLIP_SLOT, LAYERS_SLOT = 4, 4, 5

# timm level functions that flip the sign of their argument with a coin toss, with the centre they
# flip around; we draw the coin ourselves and apply it to timm's unsigned value.
_SIGNED_LEVELS = {
    LEVEL_TO_ARG["Rotate"]: 0.0,
    LEVEL_TO_ARG["ShearX"]: 0.0,
    LEVEL_TO_ARG["TranslateX"]: 0.0,
    LEVEL_TO_ARG["TranslateXRel"]: 0.0,
    LEVEL_TO_ARG["ColorIncreasing"]: 1.0,
}


@dataclasses.dataclass(frozen=True)
class ViewPlan:
    """Everything that defines the V views of every sample; its hash names the teacher store."""

    seed: int = 0
    size: int = 224
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5"
    re_prob: float = 0.25
    re_mode: str = "pixel"
    re_count: int = 1
    interpolation: str = "bicubic"

    def __post_init__(self):
        object.__setattr__(self, "scale", tuple(float(x) for x in self.scale))
        object.__setattr__(self, "ratio", tuple(float(x) for x in self.ratio))
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise UserError(f"view plan scale {self.scale} must satisfy 0 < min <= max <= 1")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise UserError(f"view plan ratio {self.ratio} must satisfy 0 < min <= max")
        if self.re_mode not in ("pixel", "rand", "const"):
            raise UserError(f"view plan re_mode '{self.re_mode}' must be one of pixel, rand, const")
        if self.re_count < 1:
            raise UserError(f"view plan re_count {self.re_count} must be >= 1")
        _rand_augment(self.auto_augment, self.size, self.interpolation)  # fail early on a bad spec

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ViewPlan":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UserError(f"unknown view plan fields {sorted(unknown)}")
        return cls(**d)

    def hash(self) -> str:
        return stable_hash({**self.to_dict(), "params_layout": PARAMS_LAYOUT})

    @property
    def num_layers(self) -> int:
        return _rand_augment(self.auto_augment, self.size, self.interpolation).num_layers

    @property
    def params_dim(self) -> int:
        return 6 + 2 * self.num_layers + 4 * self.re_count + 1


@functools.lru_cache(maxsize=32)
def _rand_augment(spec, size, interpolation):
    """timm's RandAugment for a spec, with every hparam fixed so no op draws anything at call time."""
    if not spec:
        return _NoAugment()
    if not spec.startswith("rand"):
        raise UserError(f"auto_augment '{spec}' is not supported: use a RandAugment spec such as rand-m9-mstd0.5")
    hparams = dict(translate_const=int(size * 0.45), img_mean=ERASE_FILL,
                   interpolation=str_to_pil_interp(interpolation))
    try:
        ra = rand_augment_transform(spec, hparams)
    except (AssertionError, ValueError) as err:
        raise UserError(f"bad RandAugment spec '{spec}' ({err or 'unknown section'}); "
                        "see timm's rand_augment_transform for the syntax") from None
    if any((op.magnitude_max or 10) > 10 for op in ra.ops):
        raise UserError(f"RandAugment spec '{spec}': mmax above 10 is not supported for replayable views")
    return ra


class _NoAugment:
    ops, num_layers, choice_weights = (), 0, None


def _rng(plan: ViewPlan, key: str, view: int) -> np.random.Generator:
    digest = hashlib.blake2b(f"{plan.seed}\x00{key}\x00{view}".encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def _q(frac: float) -> int:
    return int(round(min(max(frac, 0.0), 1.0) * GRID))


def view_params(plan: ViewPlan, key: str, view: int) -> np.ndarray:
    """The uint16 parameter vector of view `view` of sample `key` (pure: no global state)."""
    rng = _rng(plan, key, int(view))
    p = np.zeros(plan.params_dim, dtype=np.uint16)
    p[:CROP_SLOTS] = [_q(x) for x in rng.random(4)]
    p[FLIP_SLOT] = rng.random() < plan.hflip
    ra = _rand_augment(plan.auto_augment, plan.size, plan.interpolation)
    if ra.num_layers:
        chosen = rng.choice(len(ra.ops), ra.num_layers, replace=ra.choice_weights is None, p=ra.choice_weights)
        slot = LAYERS_SLOT + 1
        for idx in chosen:
            op = ra.ops[idx]
            apply, m, coin = rng.random() < op.prob, _magnitude(op, rng), rng.random() < 0.5
            if not apply:
                continue
            negated = coin and op.level_fn in _SIGNED_LEVELS
            p[slot] = 1 + 2 * int(idx) + int(negated)
            p[slot + 1] = round(m * MAG_SCALE) if op.level_fn is not None else 0
            p[LAYERS_SLOT] += 1
            slot += 2
    erase_at = LAYERS_SLOT + 1 + 2 * ra.num_layers
    if rng.random() < plan.re_prob:
        for b in range(int(rng.integers(1, plan.re_count + 1))):
            p[erase_at + 4 * b: erase_at + 4 * b + 4] = _erase_box(rng)
        p[-1] = rng.integers(1, 1 << 16)
    return p


def _magnitude(op, rng) -> float:
    """timm AugmentOp's magnitude law (gauss noise, or uniform when mstd is inf), clamped to [0, 10]."""
    m = op.magnitude
    if op.magnitude_std == float("inf"):
        m = rng.uniform(0, m)
    elif op.magnitude_std > 0:
        m = rng.normal(m, op.magnitude_std)
    return max(0.0, min(float(m), op.magnitude_max or 10.0))


def _erase_box(rng) -> list[int]:
    """timm RandomErasing's box law on a unit square: up to 10 tries, else no box."""
    for _ in range(10):
        area = rng.uniform(*ERASE_AREA)
        aspect = math.exp(rng.uniform(*ERASE_LOG_RATIO))
        h, w = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if w < 1 and h < 1:
            x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
            return [_q(x0), _q(y0), max(_q(w), 1), max(_q(h), 1)]
    return [0, 0, 0, 0]


def crop_box(params, plan: ViewPlan, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Source-pixel box (left, top, right, bottom) of the crop; independent of the output size."""
    width, height = image_size
    s, r, u, v = (int(x) / GRID for x in params[:CROP_SLOTS])
    area = (plan.scale[0] + s * (plan.scale[1] - plan.scale[0])) * width * height
    log_lo, log_hi = math.log(plan.ratio[0]), math.log(plan.ratio[1])
    aspect = math.exp(log_lo + r * (log_hi - log_lo))
    w = min(math.sqrt(area * aspect), width)
    h = min(math.sqrt(area / aspect), height)
    left, top = u * (width - w), v * (height - h)
    return left, top, left + w, top + h


def _op_args(op, magnitude: float, negated: bool) -> tuple:
    """timm's arguments for `op` at `magnitude`, with the sign coin we drew instead of timm's."""
    if op.level_fn is None:
        return ()
    args = op.level_fn(magnitude, op.hparams)
    centre = _SIGNED_LEVELS.get(op.level_fn)
    if centre is None:
        return args
    offset = round(abs(args[0] - centre), 9)
    value = centre - offset if negated else centre + offset
    return (max(0.1, value),) if centre else (value,)


def render(image: Image.Image, params, plan: ViewPlan, size: int | None = None) -> np.ndarray:
    """Render the view described by `params` as uint8 [size, size, 3]; same region at any size."""
    size = int(size or plan.size)
    params = np.asarray(params).astype(np.int64)
    if image.mode != "RGB":
        image = image.convert("RGB")
    resample = str_to_pil_interp(plan.interpolation)
    img = image.resize((size, size), resample, box=crop_box(params, plan, image.size))
    if params[FLIP_SLOT]:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    ra = _rand_augment(plan.auto_augment, plan.size, plan.interpolation)
    for slot in range(LAYERS_SLOT + 1, LAYERS_SLOT + 1 + 2 * int(params[LAYERS_SLOT]), 2):
        idx, negated = divmod(int(params[slot]) - 1, 2)
        op = ra.ops[idx]
        img = op.aug_fn(img, *_op_args(op, params[slot + 1] / MAG_SCALE, bool(negated)), **op.kwargs)
    seed = int(params[-1])
    if not seed:
        return np.asarray(img)
    return _erase(np.array(img), params[LAYERS_SLOT + 1 + 2 * ra.num_layers: -1], plan.re_mode, seed)


def _erase(pixels: np.ndarray, boxes, mode: str, seed: int) -> np.ndarray:
    """RandomErasing in uint8 space, with noise from the stored seed so every renderer agrees."""
    rng = np.random.default_rng(seed)
    size = pixels.shape[0]
    for x0, y0, w, h in np.asarray(boxes).reshape(-1, 4):
        if not w:
            continue
        x0, y0 = int(x0) * size // GRID, int(y0) * size // GRID
        w, h = max(1, int(w) * size // GRID), max(1, int(h) * size // GRID)
        region = pixels[y0:y0 + h, x0:x0 + w]
        if mode == "pixel":
            region[...] = rng.integers(0, 256, region.shape, dtype=np.uint8)
        elif mode == "rand":
            region[...] = rng.integers(0, 256, 3, dtype=np.uint8)
        else:
            region[...] = ERASE_FILL
    return pixels
