"""Replayable augmented views: the parameters of view (key, v) are a pure function of (plan, key, v).

Teacher and student must see the same pixels (function matching), and the teacher store keeps the
parameters of every view, so a view is described by a small uint16 vector and `render` turns
(image, vector) into pixels. The random choices are ours (a numpy Generator seeded by a hash of
(seed, key, view), never a global RNG); what they mean is timm's: RandomResizedCrop's law (up to 10
draws of area and log-ratio, the first that fits the image, else the centre crop clamped to the ratio
range), timm's RandAugment spec parsing, op set, magnitude mapping and op functions, RandomErasing's box law.

Layout of the vector (P = 4 + 2 * layers + 4 * erase boxes + 1), every slot on a uint16 grid:
    [0:2]   crop seed (32 bits, low word first): the crop's draws, replayed by `crop_box` for an image size
    [2]     horizontal flip (0/1)
    [3]     number of RandAugment layers applied (those not skipped by the op's probability)
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
import re
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from timm.data import auto_augment
from timm.data.auto_augment import LEVEL_TO_ARG, rand_augment_transform
from timm.data.transforms import str_to_pil_interp

from pipeline.data.images import opencv
from pipeline.errors import UserError
from pipeline.io import finite_number, stable_hash

GRID = 1023  # erase-box fractions are stored as q / GRID: 10 bits, < 0.5 px at 500 px
MAG_SCALE = 10  # RandAugment magnitudes are stored as round(m * 10): 0.3 degrees of rotation a step
# Part of the plan hash: a new layout or crop law never reads stores written with an old one.
# 2: timm's RandomResizedCrop tries + centre fallback from a stored crop seed (1 clamped the box to the image).
PARAMS_LAYOUT = 2
ERASE_AREA = (0.02, 1 / 3)  # timm RandomErasing defaults (fraction of the image)
ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))
MAX_ERASE = 8  # erase boxes per view (timm's RandomErasing max_count); each takes 4 params slots
MAX_SIZE = 4096  # px of a rendered view
# The resize filters by timm's names (str_to_pil_interp; torchvision's modes for eval): the one list that plans,
# teacher and student specs and records are checked against (another name is a KeyError deep in a loader).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
RA_SECTION = re.compile(r"(m|n|mstd|mmax|inc|p)\d+(\.\d+)?")  # the sections of a RandAugment spec timm reads
ERASE_FILL = (124, 116, 104)  # ImageNet mean in uint8, timm's fill for geometric ops and const erase
CROP_SLOTS, FLIP_SLOT, LAYERS_SLOT = 2, 2, 3
CROP_TRIES = 10  # timm RandomResizedCrop's attempts before its centre-crop fallback
# Renderers a plan can name, with their versions (in the plan hash: new pixels never mix into an old store).
# reference: PIL all the way (resize of the crop box, timm's op functions). fast: a JPEG decoded at
# reduced size when the crop is >= 2x the output, crop + flip + affine ops (Rotate, Shear, Translate)
# in one bilinear OpenCV resampling (PIL's bicubic affine alone costs ~7 ms at 224 px), the colour ops
# in OpenCV (histogram ops exact, blends within a level of PIL's), the same erasing. Same views, pixels
# within a few levels of the reference (tests/test_views.py). 2: OpenCV colour ops, resize without warp.
RENDERERS = {"reference": 1, "fast": 2}

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
    renderer: str = "reference"

    def __post_init__(self):
        _check_types(self)
        object.__setattr__(self, "scale", tuple(float(x) for x in self.scale))
        object.__setattr__(self, "ratio", tuple(float(x) for x in self.ratio))
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise UserError(f"view plan scale {self.scale} must satisfy 0 < min <= max <= 1")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise UserError(f"view plan ratio {self.ratio} must satisfy 0 < min <= max")
        if self.re_mode not in ("pixel", "rand", "const"):
            raise UserError(f"view plan re_mode '{self.re_mode}' must be one of pixel, rand, const")
        if self.renderer not in RENDERERS:
            raise UserError(f"view plan renderer '{self.renderer}' must be one of {', '.join(RENDERERS)}")
        _rand_augment(self.auto_augment, self.size, self.interpolation)  # fail early on a bad spec

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        return d

    @classmethod
    def load(cls, source, where: str | None = None, **defaults) -> "ViewPlan":
        """The one loader of plans (teach, finetune-teacher, recipes, stores all use it).

        `source`: a ViewPlan, a mapping of ViewPlan fields, a YAML file of them (a path; the fields may also
        sit under `plan:`, as in a teach pointer file), or None (no fields). Fields it leaves out come from
        `defaults` (what the run itself knows, e.g. a labels-only student's seed and size), then from the
        dataclass defaults. Unknown fields and bad values are one UserError naming `where` (default: the file).
        """
        if isinstance(source, cls):
            return source
        fields, where = cls._fields(source, where)
        try:
            return cls(**{**defaults, **fields})
        except UserError as err:
            raise UserError(f"{where}: {err}" if where else str(err)) from None

    @classmethod
    def read(cls, source, where: str | None = None) -> dict:
        """The fields `source` (as for `load`) gives, checked as a plan: for a recipe, which keeps what it
        sets and lets the run fill in the rest."""
        fields, where = cls._fields(source, where)
        cls.load(fields, where)
        return fields

    @classmethod
    def _fields(cls, source, where: str | None) -> tuple[dict, str | None]:
        """(fields, where) of a plan source: a mapping, a YAML file of one (a path), or None."""
        if source is None:
            return {}, where
        if isinstance(source, (str, Path)):
            path = Path(source)
            where = where or f"view plan file {path}"
            if not path.is_file():
                raise UserError(f"{where}: file not found; give a YAML file of ViewPlan fields")
            try:
                source = yaml.safe_load(path.read_text()) or {}
            except (yaml.YAMLError, UnicodeDecodeError) as err:
                raise UserError(f"{where} is not valid YAML ({' '.join(str(err).split())[:160]}); fix it") from None
            if isinstance(source, dict) and isinstance(source.get("plan"), dict):
                source = source["plan"]
        prefix = f"{where}: " if where else ""
        if not isinstance(source, dict):
            raise UserError(f"{prefix}a view plan is a mapping of ViewPlan fields (or a YAML file of one), "
                            f"not {type(source).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(map(str, source)) - set(known))
        if unknown:
            raise UserError(f"{prefix}unknown view plan fields {unknown}; the fields are {', '.join(known)}")
        return dict(source), where

    def hash(self) -> str:
        d = {**self.to_dict(), "params_layout": PARAMS_LAYOUT}
        if self.renderer == "reference":
            del d["renderer"]  # the hash of plans made before renderers were selectable stays the same
        else:
            d["renderer_version"] = RENDERERS[self.renderer]
        return stable_hash(d)

    @property
    def num_layers(self) -> int:
        return _rand_augment(self.auto_augment, self.size, self.interpolation).num_layers

    @property
    def params_dim(self) -> int:
        return CROP_SLOTS + 2 + 2 * self.num_layers + 4 * self.re_count + 1


def _check_types(plan: "ViewPlan") -> None:
    """Field types and ranges before anything uses them: a bad plan value is one line, not a traceback."""
    def check(ok, field, want):
        if not ok:
            raise UserError(f"view plan {field}: {getattr(plan, field)!r} must be {want}")

    check(isinstance(plan.seed, int) and not isinstance(plan.seed, bool), "seed", "an integer")
    check(isinstance(plan.size, int) and not isinstance(plan.size, bool) and 8 <= plan.size <= MAX_SIZE, "size",
          f"an integer number of pixels in 8..{MAX_SIZE}")
    for field in ("hflip", "re_prob"):
        check(finite_number(getattr(plan, field)) and 0 <= getattr(plan, field) <= 1, field, "a probability in [0, 1]")
    for field in ("scale", "ratio"):
        value = getattr(plan, field)
        check(isinstance(value, (list, tuple)) and len(value) == 2 and all(map(finite_number, value)), field,
              "two numbers [min, max]")
    check(isinstance(plan.re_count, int) and not isinstance(plan.re_count, bool) and 1 <= plan.re_count <= MAX_ERASE,
          "re_count", f"an integer in 1..{MAX_ERASE}")
    check(plan.auto_augment is None or isinstance(plan.auto_augment, str), "auto_augment", "a RandAugment spec or null")
    check(plan.interpolation in INTERPOLATIONS, "interpolation", f"one of {', '.join(INTERPOLATIONS)}")


@functools.lru_cache(maxsize=32)
def _rand_augment(spec, size, interpolation):
    """timm's RandAugment for a spec, with every hparam fixed so no op draws anything at call time."""
    if not spec:
        return _NoAugment()
    sections = spec.split("-")
    if sections[0] != "rand":
        raise UserError(f"auto_augment '{spec}' is not supported: use a RandAugment spec such as rand-m9-mstd0.5")
    unknown = [part for part in sections[1:] if not RA_SECTION.fullmatch(part)]
    if unknown:  # timm skips a section it cannot parse: the plan would silently be another one
        raise UserError(f"RandAugment spec '{spec}': section {unknown[0]!r} is not one of m, n, mstd, mmax, inc, p "
                        "followed by a number (e.g. rand-m9-mstd0.5)")
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
    p[:CROP_SLOTS] = rng.integers(0, 1 << 16, CROP_SLOTS)
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


def crop_box(params, plan: ViewPlan, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Source-pixel box (left, top, right, bottom) of the crop; independent of the output size.

    timm RandomResizedCrop's law with our draws (from the view's stored crop seed, so the box is a pure
    function of the stored params and the image size): up to 10 tries of (area, log-ratio) uniform in the
    plan's ranges, sides rounded to pixels, the first that fits at a uniform pixel position; else the centre
    crop of the image clamped to the ratio range.
    """
    width, height = image_size
    rng = np.random.default_rng(int(params[0]) | int(params[1]) << 16)
    log_ratio = (math.log(plan.ratio[0]), math.log(plan.ratio[1]))
    for _ in range(CROP_TRIES):
        area = rng.uniform(*plan.scale) * width * height
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    w, h = width, height
    if width / height < plan.ratio[0]:
        h = round(width / plan.ratio[0])
    elif width / height > plan.ratio[1]:
        w = round(height * plan.ratio[1])
    left, top = (width - w) // 2, (height - h) // 2
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


def render(image, params, plan: ViewPlan, size: int | None = None) -> np.ndarray:
    """Render the view described by `params` as uint8 [size, size, 3]; same region at any size.

    `image` is a decoded PIL image or a `pipeline.data.images.Source` (the image's bytes, which lets
    the fast renderer decode a JPEG at reduced size); the loaders always pass a Source, so a teacher
    and a student rendering the same params with the same plan get the same pixels.
    """
    size = int(size or plan.size)
    params = np.asarray(params).astype(np.int64)
    ra = _rand_augment(plan.auto_augment, plan.size, plan.interpolation)
    ops = []
    for slot in range(LAYERS_SLOT + 1, LAYERS_SLOT + 1 + 2 * int(params[LAYERS_SLOT]), 2):
        idx, negated = divmod(int(params[slot]) - 1, 2)
        ops.append((ra.ops[idx], _op_args(ra.ops[idx], params[slot + 1] / MAG_SCALE, bool(negated))))
    draw = _render_fast if plan.renderer == "fast" else _render_reference
    pixels = draw(image, params, plan, size, ops)
    seed = int(params[-1])
    if not seed:
        return pixels
    return _erase(np.array(pixels), params[LAYERS_SLOT + 1 + 2 * ra.num_layers: -1], plan.re_mode, seed)


def _render_reference(image, params, plan, size, ops) -> np.ndarray:
    """PIL resize of the crop box, flip, then timm's op functions one after the other."""
    img = image if isinstance(image, Image.Image) else image.decoded()
    if img.mode != "RGB":
        img = img.convert("RGB")
    img = img.resize((size, size), str_to_pil_interp(plan.interpolation), box=crop_box(params, plan, img.size))
    if params[FLIP_SLOT]:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for op, args in ops:
        img = Image.fromarray(_colour_op(np.asarray(img), op, args))
    return np.asarray(img)


def _render_fast(image, params, plan, size, ops) -> np.ndarray:
    """The reference's crop, flip and affine ops composed into one bilinear OpenCV resampling from the
    source (decoded at 1/2..1/8 scale while the crop still spans >= `size` pixels there), so a view
    costs one JPEG decode and one resampling; colour ops in OpenCV, between resamplings."""
    full = image.size
    box = crop_box(params, plan, full)
    if isinstance(image, Image.Image):
        src = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    else:
        side = min(box[2] - box[0], box[3] - box[1])
        src = image.pixels(next((r for r in (8, 4, 2) if side / r >= size), 1))
    sx, sy = src.shape[1] / full[0], src.shape[0] / full[1]  # libjpeg rounds a reduced size up
    w, h = box[2] - box[0], box[3] - box[1]
    to_source = np.array([[w / size * sx, 0, box[0] * sx], [0, h / size * sy, box[1] * sy], [0, 0, 1]])
    geometry = np.array([[-1.0, 0, size], [0, 1, 0], [0, 0, 1]]) if params[FLIP_SLOT] else np.eye(3)
    pixels, affine, pending = src, False, True
    crop = box if (sx, sy) == (1, 1) else None  # whole source pixels: a plain resize of the box will do
    for op, args in ops:
        if op.name in _AFFINE_OPS:
            geometry = geometry @ np.vstack([np.reshape(_AFFINE_OPS[op.name](args[0], size, size), (2, 3)), [0, 0, 1]])
            affine = pending = True
            continue
        if pending:
            pixels = _warp(pixels, to_source, geometry, size, affine, crop)
            to_source, geometry, affine, pending, crop = None, np.eye(3), False, False, None
        pixels = _FAST_OPS[op.aug_fn](pixels, *args) if op.aug_fn in _FAST_OPS else _colour_op(pixels, op, args)
    return _warp(pixels, to_source, geometry, size, affine, crop) if pending else pixels


def _colour_op(pixels: np.ndarray, op, args) -> np.ndarray:
    """One RandAugment op on uint8 pixels as the reference renders it: a lookup table where there is
    one (Pillow refuses posterize to 0 bits), else timm's op function."""
    if op.aug_fn in _LUT_OPS:
        return opencv().LUT(pixels, _LUT_OPS[op.aug_fn](*args))
    return np.asarray(op.aug_fn(Image.fromarray(pixels), *args, **op.kwargs))


def _warp(pixels: np.ndarray, to_source, geometry: np.ndarray, size: int, affine: bool, crop=None) -> np.ndarray:
    """Resample `pixels` through `to_source @ geometry` (continuous coordinates, output -> input,
    PIL's pixel-centre convention); with `affine` ops in `geometry`, the output pixels it maps
    outside the size x size view get timm's fill colour, as PIL's transform gives them. Without
    affine ops, a `crop` box in whole pixels is resized (the same bilinear map, a third of the cost)."""
    cv2 = opencv()
    if crop is not None and not affine:
        out = cv2.resize(pixels[crop[1]:crop[3], crop[0]:crop[2]], (size, size), interpolation=cv2.INTER_LINEAR)
        return cv2.flip(out, 1) if geometry[0, 0] < 0 else out
    m = geometry if to_source is None else to_source @ geometry
    cv_m = np.hstack([m[:2, :2], (m[:2, :2].sum(1) / 2 + m[:2, 2] - 0.5)[:, None]])
    out = cv2.warpAffine(pixels, cv_m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REPLICATE)
    if affine:
        g = np.hstack([geometry[:2, :2], (geometry[:2, :2].sum(1) / 2 + geometry[:2, 2] - 0.5)[:, None]])
        outside = cv2.warpAffine(np.zeros((size, size), np.uint8), g, (size, size),
                                 flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP, borderValue=1)
        cv2.copyTo(_fill(size), outside, out)  # a masked copy: numpy's out[mask] = fill costs up to 1 ms here
    return out


@functools.cache
def _fill(size: int) -> np.ndarray:
    fill = np.empty((size, size, 3), np.uint8)
    fill[:] = ERASE_FILL
    fill.flags.writeable = False
    return fill


def _rotate_matrix(degrees: float, w: int, h: int) -> tuple:
    """PIL's inverse map of `Image.rotate(degrees)` about the centre (what timm's rotate calls)."""
    t = -math.radians(degrees)
    a, b, d, e = math.cos(t), math.sin(t), -math.sin(t), math.cos(t)
    cx, cy = w / 2, h / 2
    return a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy


_LEVELS = np.arange(256)
# timm's per-pixel-value ops as uint8 tables: PIL's exact values (PIL builds the same table in Python for
# every call, a fifth of a fast view's time). Posterize to 0 bits (timm's 'Posterize' level below 2.5) is
# black, as in the TPU policy timm follows; Pillow >= 11 raises for it, so both renderers use the tables.
_LUT_OPS = {
    auto_augment.invert: lambda: (255 - _LEVELS).astype(np.uint8),
    auto_augment.posterize: lambda bits: (_LEVELS if bits >= 8 else _LEVELS & ~(2 ** (8 - bits) - 1)).astype(np.uint8),
    auto_augment.solarize: lambda thresh: np.where(_LEVELS < thresh, _LEVELS, 255 - _LEVELS).astype(np.uint8),
    auto_augment.solarize_add: lambda add, thresh=128: np.where(
        _LEVELS < thresh, np.minimum(255, _LEVELS + add), _LEVELS).astype(np.uint8),
}


def _per_channel_lut(pixels: np.ndarray, make) -> np.ndarray:
    """Apply `make(histogram) -> uint8 [256]` per channel: how PIL's autocontrast and equalize work."""
    cv2 = opencv()
    hists = [cv2.calcHist([pixels], [c], None, [256], [0, 256]).reshape(-1).astype(np.int64) for c in range(3)]
    return cv2.LUT(pixels, np.stack([make(h) for h in hists], 1).reshape(1, 256, 3))


def _auto_contrast_lut(hist: np.ndarray) -> np.ndarray:
    """PIL ImageOps.autocontrast's table (no cutoff): [lo, hi] stretched to [0, 255], truncated."""
    used = np.flatnonzero(hist)
    lo, hi = used[0], used[-1]
    if hi <= lo:
        return _LEVELS.astype(np.uint8)
    scale = 255.0 / (hi - lo)
    return np.clip((_LEVELS * scale + -lo * scale).astype(np.int64), 0, 255).astype(np.uint8)


def _equalize_lut(hist: np.ndarray) -> np.ndarray:
    """PIL ImageOps.equalize's table: the cumulative histogram in steps of (total - last bin) // 255."""
    used = hist[hist > 0]
    step = (used.sum() - used[-1]) // 255 if len(used) > 1 else 0
    if not step:
        return _LEVELS.astype(np.uint8)
    return np.clip((step // 2 + np.cumsum(hist) - hist) // step, 0, 255).astype(np.uint8)


_TRUNCATE = 0.499  # OpenCV rounds; minus just under half a level, it truncates as PIL does


def _blend(pixels: np.ndarray, degenerate, factor: float) -> np.ndarray:
    """PIL's Image.blend(degenerate, image, factor) (what ImageEnhance does), truncated as PIL does;
    OpenCV's float32 and fixed-point grey leave a few pixels one level off. `degenerate` is an image or
    a grey level."""
    cv2 = opencv()
    if np.isscalar(degenerate):
        return cv2.addWeighted(pixels, factor, pixels, 0.0, (1.0 - factor) * degenerate - _TRUNCATE)
    return cv2.addWeighted(pixels, factor, degenerate, 1.0 - factor, -_TRUNCATE)


def _grey(pixels: np.ndarray) -> np.ndarray:
    return opencv().cvtColor(pixels, opencv().COLOR_RGB2GRAY)


def _smoothed(pixels: np.ndarray) -> np.ndarray:
    """PIL's ImageFilter.SMOOTH (3x3, centre 5, sum 13), whose border pixels stay as they are."""
    out = opencv().filter2D(pixels, -1, _SMOOTH)
    out[[0, -1]], out[:, [0, -1]] = pixels[[0, -1]], pixels[:, [0, -1]]
    return out


_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13
# The fast renderer's colour ops, on uint8 RGB pixels with timm's arguments (tests/test_views.py bounds
# each against timm's PIL function).
_FAST_OPS = {
    auto_augment.auto_contrast: lambda px: _per_channel_lut(px, _auto_contrast_lut),
    auto_augment.equalize: lambda px: _per_channel_lut(px, _equalize_lut),
    auto_augment.brightness: lambda px, f: _blend(px, 0, f),
    auto_augment.color: lambda px, f: _blend(px, opencv().cvtColor(_grey(px), opencv().COLOR_GRAY2RGB), f),
    auto_augment.contrast: lambda px, f: _blend(px, int(_grey(px).mean() + 0.5), f),
    auto_augment.sharpness: lambda px, f: _blend(px, _smoothed(px), f),
}
# timm's affine RandAugment ops as PIL inverse maps (output -> input) of their argument and the size
_AFFINE_OPS = {
    "Rotate": _rotate_matrix,
    "ShearX": lambda f, w, h: (1, f, 0, 0, 1, 0),
    "ShearY": lambda f, w, h: (1, 0, 0, f, 1, 0),
    "TranslateX": lambda px, w, h: (1, 0, px, 0, 1, 0),
    "TranslateY": lambda px, w, h: (1, 0, 0, 0, 1, px),
    "TranslateXRel": lambda pct, w, h: (1, 0, pct * w, 0, 1, 0),
    "TranslateYRel": lambda pct, w, h: (1, 0, 0, 0, 1, pct * h),
}


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
