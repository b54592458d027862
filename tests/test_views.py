"""Replayable views: pure parameters, exact replay, same region at any size, timm's op meanings."""

import dataclasses
import hashlib
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.data.views import (
    FLIP_SLOT,
    GRID,
    LAYERS_SLOT,
    MAG_SCALE,
    ViewPlan,
    _op_args,
    _rand_augment,
    crop_box,
    render,
    view_params,
)
from pipeline.errors import UserError

PLAN = ViewPlan(size=64)


def _image(seed=0, size=(80, 64)):
    """A smooth gradient with texture, so crops of different regions differ."""
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    rng = np.random.default_rng(seed)
    pixels = np.stack([xx * 3, yy * 3, (xx + yy) * 2], -1) + rng.integers(0, 20, (size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_params_are_pure_uint16_and_sized():
    p = view_params(PLAN, "a/b", 3)
    assert p.dtype == np.uint16 and p.shape == (PLAN.params_dim,) == (13,)
    np.testing.assert_array_equal(p, view_params(PLAN, "a/b", 3))
    assert not np.array_equal(p, view_params(PLAN, "a/b", 4))
    assert not np.array_equal(p, view_params(dataclasses.replace(PLAN, seed=1), "a/b", 3))


def test_plan_dict_roundtrip_and_stable_hash():
    plan = ViewPlan.load(PLAN.to_dict())
    assert plan == PLAN and plan.hash() == PLAN.hash()
    assert ViewPlan().hash() == "15ed67ddf6c99707"  # changing it orphans every store (layout 2: timm's crop law)
    assert dataclasses.replace(PLAN, re_prob=0.3).hash() != PLAN.hash()
    with pytest.raises(UserError, match="unknown view plan fields"):
        ViewPlan.load({"sed": 1})


def test_load_fills_what_a_source_leaves_out(tmp_path):
    """One loader for mappings and files: left-out fields take the caller's defaults, then ViewPlan's."""
    assert ViewPlan.load({"re_prob": 0.1}) == dataclasses.replace(ViewPlan(), re_prob=0.1)
    assert ViewPlan.load(None) == ViewPlan() and ViewPlan.load(PLAN) is PLAN
    run = ViewPlan.load({"re_prob": 0.1, "size": 96}, seed=3, size=64)
    assert (run.seed, run.size, run.re_prob) == (3, 96, 0.1)  # the source wins over the run's defaults
    (tmp_path / "plan.yaml").write_text("re_prob: 0.1\nscale: [0.5, 1.0]\n")
    (tmp_path / "pointer.json").write_text('{"store": "s.zarr", "plan": {"re_prob": 0.1, "scale": [0.5, 1.0]}}')
    expected = dataclasses.replace(ViewPlan(), re_prob=0.1, scale=(0.5, 1.0))
    assert ViewPlan.load(tmp_path / "plan.yaml") == ViewPlan.load(str(tmp_path / "pointer.json")) == expected
    assert ViewPlan.read(tmp_path / "plan.yaml") == {"re_prob": 0.1, "scale": [0.5, 1.0]}  # only what it sets


@pytest.mark.parametrize("source, message", [
    ({"sed": 1}, r"unknown view plan fields \['sed'\]; the fields are seed, size, scale"),
    ({"hflip": 7}, r"hflip: 7 must be a probability"),
    ({"re_mode": "blur"}, "re_mode 'blur' must be one of"),
    ([0.5, 1.0], "a view plan is a mapping of ViewPlan fields"),
    ("missing.yaml", "file not found"),
    ("bad.yaml", "is not valid YAML"),
])
def test_load_refuses_in_one_line_naming_the_source(tmp_path, source, message):
    (tmp_path / "bad.yaml").write_text("size: [64\n")
    if isinstance(source, str):
        source = tmp_path / source
    with pytest.raises(UserError, match=message) as err:
        ViewPlan.load(source, "recipe 'x' plan" if isinstance(source, (dict, list)) else None)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith("recipe 'x' plan: " if isinstance(source, (dict, list)) else f"view plan file {source}")


def test_shipped_plans_keep_their_store_hashes():
    """ViewPlan.load of the plans we ship gives the hashes the former loaders gave (ViewPlan.from_dict, computed
    before it; the ImageNet plan's includes the fast renderer's version, 2): stores on disk stay valid. The last:
    a labels-only demo student's plan (recipe seed 0, the student's 64 px, bicubic)."""
    import yaml

    root = Path(__file__).resolve().parent.parent
    for name, pinned in (("params.yaml", "3002a60bc2ef19ca"), ("params-imagenet.yaml", "e6c2c599784d5fe3")):
        plan = ViewPlan.load(yaml.safe_load((root / name).read_text())["teach"]["plan"])
        assert plan.hash() == pinned, name
    assert ViewPlan.load(None, seed=0, size=64, interpolation="bicubic").hash() == "93aa5e023a1a8c74"


@pytest.mark.parametrize("spec", ["rand-q5", "original-mstd0.5", "rand-m9-mmax20"])
def test_bad_augment_spec_is_a_user_error(spec):
    with pytest.raises(UserError):
        ViewPlan(auto_augment=spec)


@settings(max_examples=25, deadline=None)
@given(key=st.text(min_size=1, max_size=20), view=st.integers(0, 1000), seed=st.integers(0, 2**31))
def test_replay_from_stored_params_is_exact(key, view, seed):
    plan = dataclasses.replace(PLAN, seed=seed, re_prob=0.5)
    params = view_params(plan, key, view)
    stored = params.astype(np.int32)  # as the teacher store keeps them
    image = _image()
    np.testing.assert_array_equal(render(image, params, plan), render(image, stored, plan))
    assert np.array_equal(params, view_params(plan, key, view))


def test_replay_in_another_process_and_order():
    pairs = [(f"k{i}", v) for i in range(6) for v in range(3)]
    here = _digest(render(_image(), view_params(PLAN, k, v), PLAN) for k, v in reversed(pairs))
    code = (
        "import sys; sys.path.insert(0, 'tests'); from test_views import _digest, _image, PLAN, pairs_render;"
        "print(pairs_render())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == here


def pairs_render():
    """Renders in forward order (the other process); the test renders in reverse order."""
    pairs = [(f"k{i}", v) for i in range(6) for v in range(3)]
    images = [render(_image(), view_params(PLAN, k, v), PLAN) for k, v in pairs]
    return _digest(reversed(images))


def test_same_region_at_two_resolutions():
    plan = ViewPlan(size=224, auto_augment=None, re_prob=0.0, hflip=0.0)
    image = _image(size=(300, 240))
    for v in range(5):
        params = view_params(plan, "x", v)
        box = crop_box(params, plan, image.size)
        big, small = render(image, params, plan, 224), render(image, params, plan, 160)
        down = np.asarray(Image.fromarray(big).resize((160, 160), Image.Resampling.BOX), dtype=np.float32)
        ref = np.asarray(image.resize((160, 160), Image.Resampling.BOX, box=box), dtype=np.float32)
        assert np.abs(down - small).mean() < 4 and np.abs(ref - small).mean() < 4
        assert 0 <= box[0] < box[2] <= 300 and 0 <= box[1] < box[3] <= 240


def test_erased_region_scales_with_size():
    plan = dataclasses.replace(PLAN, auto_augment=None, re_prob=1.0, re_mode="const", hflip=0.0)
    params = view_params(plan, "e", 0)
    flat = Image.new("RGB", (64, 64), (0, 0, 0))
    masks = [(render(flat, params, plan, s) != 0).any(-1) for s in (64, 128)]
    x0, y0, w, h = (int(x) / GRID for x in params[-5:-1])
    assert abs(masks[0].mean() - w * h) < 0.05 and abs(masks[1].mean() - masks[0].mean()) < 0.02


def test_op_arguments_are_timms():
    """Every op's argument at either sign is one timm itself produces at that magnitude."""
    ra = _rand_augment("rand-m9-mstd0.5", 64, "bicubic")
    for op in ra.ops:
        if op.level_fn is None:
            continue
        timm_args = {round(op.level_fn(7.5, op.hparams)[0], 6) for _ in range(64)}
        ours = {round(_op_args(op, 7.5, neg)[0], 6) for neg in (False, True)}
        assert ours == timm_args, op.name


def test_view_statistics_follow_the_plan():
    plan = ViewPlan(size=64)
    params = np.stack([view_params(plan, f"s{i}", 0) for i in range(2000)])
    assert 0.45 < params[:, FLIP_SLOT].mean() < 0.55  # flip p=0.5
    assert 0.9 < params[:, LAYERS_SLOT].mean() < 1.1  # 2 layers, each applied with p=0.5
    assert 0.22 < (params[:, -1] > 0).mean() < 0.28  # erase p=0.25
    mag = LAYERS_SLOT + 2
    mags = params[:, mag][params[:, mag] > 0] / MAG_SCALE
    assert 8.8 < mags.mean() < 9.2 and mags.max() <= 10


def _jpeg(size=(500, 375), seed=0):
    """An ImageNet-sized JPEG (q 90) with texture at several scales."""
    import io

    rng = np.random.default_rng(seed)
    base = Image.fromarray((rng.random((size[1] // 25 + 2, size[0] // 25 + 2, 3)) * 255).astype(np.uint8))
    pixels = np.asarray(base.resize(size, Image.Resampling.BICUBIC)) + rng.normal(0, 12, (size[1], size[0], 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_renderer_is_part_of_the_plan_hash():
    fast = dataclasses.replace(PLAN, renderer="fast")
    assert fast.hash() != PLAN.hash() and ViewPlan.load(fast.to_dict()) == fast
    assert ViewPlan().hash() == "15ed67ddf6c99707"  # the reference adds nothing to the hash (layout 2 did)
    with pytest.raises(UserError, match="renderer 'pillow'"):
        ViewPlan(renderer="pillow")


def test_fast_renderer_stays_close_to_the_reference():
    """Same views (params); the fast path's pixels differ by a few levels (bilinear warp, DCT-scaled
    decode): measured mean |diff| 1.6 levels (worst view 3.1) at 224 px, 2.6 (worst 5.9) at 96 px."""
    from pipeline.data.images import Source

    ref = ViewPlan()
    fast = dataclasses.replace(ref, renderer="fast")
    sources = [Source(_jpeg(seed=s), f"img{s}") for s in range(4)]
    diffs = []
    for j in range(120):
        params = view_params(ref, f"k{j}", 0)
        for size in (224, 96):  # 96 px: most crops decode at reduced size
            a = render(sources[j % 4], params, ref, size).astype(np.int16)
            b = render(sources[j % 4], params, fast, size).astype(np.int16)
            assert a.shape == b.shape == (size, size, 3)
            diffs.append(np.abs(a - b).mean())
    assert np.mean(diffs) < 3 and np.max(diffs) < 8, (np.mean(diffs), np.max(diffs))


def test_jpeg_decode_gives_opencvs_pixels():
    """simplejpeg decodes the fast renderer's JPEGs: the same pixels OpenCV's decode gave renderer 2, for
    every subsampling, grey, CMYK (Adobe), progressive, at every DCT scale; a PNG goes to OpenCV."""
    import io

    from pipeline.data.images import Source, _opencv_decode, _turbo_decode

    image = Image.open(io.BytesIO(_jpeg(size=(203, 150))))
    for mode, options in (("RGB", {}), ("RGB", {"subsampling": 0}), ("RGB", {"subsampling": 1}), ("L", {}),
                          ("CMYK", {}), ("RGB", {"progressive": True})):
        buf = io.BytesIO()
        image.convert(mode).save(buf, format="JPEG", quality=90, **options)
        for reduce in (1, 2, 4, 8):
            ours = _turbo_decode(buf.getvalue(), reduce)
            assert ours is not None and ours.shape == (-(-150 // reduce), -(-203 // reduce), 3), (mode, options, reduce)
            np.testing.assert_array_equal(ours, _opencv_decode(buf.getvalue(), reduce), err_msg=f"{mode} {options} {reduce}")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    assert _turbo_decode(buf.getvalue(), 1) is None
    source = Source(buf.getvalue(), "x")
    assert source.size == (203, 150)
    np.testing.assert_array_equal(source.pixels(), np.asarray(image))


def test_fast_lookup_table_ops_equal_timms():
    from timm.data import auto_augment

    from pipeline.data.views import _LUT_OPS

    image = _image(size=(64, 48))
    cases = {auto_augment.invert: [()], auto_augment.posterize: [(b,) for b in (1, 4, 8)],
             auto_augment.solarize: [(t,) for t in (0, 100, 256)], auto_augment.solarize_add: [(a,) for a in (0, 50, 110)]}
    for fn, arg_sets in cases.items():
        for args in arg_sets:
            np.testing.assert_array_equal(_LUT_OPS[fn](*args)[np.asarray(image)], np.asarray(fn(image, *args)))


def test_fast_colour_ops_match_timms():
    """The fast renderer's OpenCV colour ops against timm's PIL ones, at the magnitudes RandAugment
    uses: the histogram ops are exact, the blends truncate as PIL does (the grey of Color is OpenCV's
    fixed point: a rare pixel one level off)."""
    import io

    from timm.data import auto_augment

    from pipeline.data.views import _FAST_OPS

    for seed in range(2):
        image = Image.open(io.BytesIO(_jpeg(size=(96, 80), seed=seed))).convert("RGB")
        for fn, fast in _FAST_OPS.items():
            factors = [()] if fn in (auto_augment.auto_contrast, auto_augment.equalize) else [
                (f,) for f in (0.1, 0.5, 1.0, 1.37, 1.9)]
            for args in factors:
                diff = np.abs(np.asarray(fn(image, *args)).astype(np.int16) - fast(np.asarray(image), *args))
                assert diff.max() <= 1 and diff.mean() < 1e-3, (fn.__name__, args, diff.max(), diff.mean())


def _area_and_log_ratio(boxes, size) -> np.ndarray:
    """Per crop: area as a fraction of the image, and log(width / height)."""
    b = np.asarray(boxes, dtype=np.float64)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    return np.stack([w * h / (size[0] * size[1]), np.log(w / h)], 1)


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.5, 1.0)])
@pytest.mark.parametrize("size", [(400, 400), (400, 300), (300, 400), (600, 200)])
def test_crop_law_is_timms_random_resized_crop(size, scale):
    """Area and aspect ratio of our crops vs timm's RandomResizedCrop.get_params: a two-sample KS test."""
    from scipy.stats import ks_2samp
    from timm.data.transforms import RandomResizedCropAndInterpolation

    n = 3000
    plan = ViewPlan(size=64, scale=scale, auto_augment=None, re_prob=0.0)
    ours = _area_and_log_ratio([crop_box(view_params(plan, f"s{i}", 0), plan, size) for i in range(n)], size)
    random.seed(0)  # timm draws from Python's global RNG
    image = Image.new("RGB", size)
    theirs = []
    for _ in range(n):
        top, left, h, w = RandomResizedCropAndInterpolation.get_params(image, plan.scale, plan.ratio)
        theirs.append((left, top, left + w, top + h))
    theirs = _area_and_log_ratio(theirs, size)
    for column, name in enumerate(("area", "log aspect ratio")):
        result = ks_2samp(ours[:, column], theirs[:, column])
        assert result.pvalue > 1e-3, f"{name}: KS {result.statistic:.3f}, p {result.pvalue:.2g}"


def test_crop_falls_back_to_timms_centre_crop():
    """No draw fits a 3:1 image at area 1 and ratio 1: the centre square, as timm's fallback gives."""
    from timm.data.transforms import RandomResizedCropAndInterpolation

    plan = ViewPlan(size=64, scale=(1.0, 1.0), ratio=(1.0, 1.0), auto_augment=None, re_prob=0.0)
    top, left, h, w = RandomResizedCropAndInterpolation.get_params(Image.new("RGB", (600, 200)), plan.scale, plan.ratio)
    assert crop_box(view_params(plan, "x", 0), plan, (600, 200)) == (left, top, left + w, top + h) == (200, 0, 400, 200)
    for v in range(20):  # a crop that fits is never clamped: its aspect stays in the ratio range
        box = crop_box(view_params(ViewPlan(size=64), "y", v), ViewPlan(size=64), (600, 200))
        aspect = (box[2] - box[0]) / (box[3] - box[1])
        assert 3 / 4 - 0.02 < aspect < 4 / 3 + 0.02 and box[3] <= 200


@pytest.mark.parametrize("renderer", ["reference", "fast"])
def test_posterize_to_zero_bits_renders_black(renderer):
    """timm's 'Posterize' level is 0 bits below magnitude 2.5 (rand-m3-mstd0.5 draws it); Pillow refuses
    0 bits, so a plan with low magnitudes crashed mid-run. Both renderers give the TPU policy's black."""
    plan = ViewPlan(size=32, auto_augment="rand-n1-m0-mstd0", re_prob=0.0, hflip=0.0, renderer=renderer)
    from pipeline.data.views import LAYERS_SLOT, _rand_augment

    ops = _rand_augment(plan.auto_augment, plan.size, plan.interpolation).ops
    posterize = next(i for i, op in enumerate(ops) if op.name == "Posterize")
    params = view_params(plan, "k", 0)
    params[LAYERS_SLOT], params[LAYERS_SLOT + 1], params[LAYERS_SLOT + 2] = 1, 1 + 2 * posterize, 0
    pixels = render(_image(), params, plan, 32)
    assert pixels.shape == (32, 32, 3) and not pixels.any()
