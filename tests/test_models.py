"""Students: re-parameterized training form == fused form == stock architecture; counts; timm conversion."""

import pytest
import timm
import torch
import torch.nn as nn

from pipeline.models import (
    convert_timm_ghostnetv3,
    count_params_macs,
    create_stock_model,
    reparameterize,
    stock_model_name,
    to_stock,
)
from pipeline.models.ghostnet import GHOSTNET_CFGS
from pipeline.models.rep import RepConvBN, rep_settings

MODELS = timm.list_models("rep_*")  # every student a family registers (importing pipeline.models)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine terms, so a folding mistake shows in the outputs.

    A quarter of the channels get a variance near eps (0.1 to 2 eps), where forgetting eps in a fold changes
    the channel's scale by 1.2x to 3.3x; their weight is scaled by sqrt(var + eps) to keep activations O(1).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                var = torch.rand(n, generator=gen) * 1.5 + 0.5
                weight = torch.rand(n, generator=gen) + 0.5
                tiny = torch.rand(n, generator=gen) < 0.25
                var[tiny] = m.eps * (0.1 + 1.9 * torch.rand(int(tiny.sum()), generator=gen))
                weight[tiny] *= torch.sqrt(var[tiny] + m.eps)
                m.running_mean.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
                m.running_var.copy_(var)
                m.weight.copy_(weight)
                m.bias.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
    return model.eval()


def assert_same_logits(ref: torch.Tensor, out: torch.Tensor, rtol: float = 1e-4):
    """max |diff| <= rtol * max |logit| and the same top-1 class for every sample."""
    scale = ref.abs().max().item()
    assert scale > 0
    diff = (ref - out).abs().max().item()
    assert diff <= rtol * scale, f"max|diff| {diff:.3g} > {rtol:g} * max|logit| {scale:.3g}"
    assert torch.equal(ref.argmax(-1), out.argmax(-1))


def images(n=2, size=64, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("in_chs,out_chs,k,stride,groups", [
    (8, 8, 3, 1, 8),    # depthwise, identity branch
    (8, 8, 3, 2, 8),    # depthwise stride 2
    (8, 8, 5, 1, 8),    # depthwise 5x5
    (8, 8, 5, 2, 8),
    (8, 16, 3, 1, 4),   # grouped, no identity
    (12, 12, 3, 1, 3),  # grouped, identity
    (8, 8, 1, 1, 1),    # 1x1: no scale branch, identity
    (8, 6, 1, 2, 1),
])
@pytest.mark.parametrize("num_branches", [1, 3])
@pytest.mark.parametrize("scale_branch", [True, False])
def test_rep_block_fuses_exactly(in_chs, out_chs, k, stride, groups, num_branches, scale_branch):
    block = randomize_bn(RepConvBN(in_chs, out_chs, k, stride, groups=groups, num_branches=num_branches,
                                   scale_branch=scale_branch))
    assert (block.identity is not None) == (stride == 1 and in_chs == out_chs)
    assert (block.scale is not None) == (scale_branch and k > 1)
    x = torch.randn(2, in_chs, 9, 9)
    with torch.no_grad():
        ref = block(x)
        block.reparameterize()
        out = block(x)
    assert isinstance(block.fused, nn.Conv2d) and block.fused.bias is not None
    assert len(block.convs) == 0 and block.scale is None and block.identity is None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_fusion_check_detects_a_wrong_fold():
    """The comparison fails when one branch is folded wrongly (the tests above can fail)."""
    block = randomize_bn(RepConvBN(8, 8, 3, 1, groups=8))
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        ref = block(x)
        block.reparameterize()
        block.fused.bias += 0.01 * torch.randn(8)  # e.g. an identity BN's mean forgotten
        with pytest.raises(AssertionError):
            assert_same_logits(ref.flatten(1), block(x).flatten(1))


def test_scale_branch_needs_same_padding():
    with pytest.raises(ValueError, match="padding"):
        RepConvBN(8, 8, 3, 1, padding=0, groups=8)
    with pytest.raises(ValueError, match="num_branches"):
        RepConvBN(8, 8, 3, 1, num_branches=6)


@pytest.mark.parametrize("scale_branch", [True, False])
@pytest.mark.parametrize("num_branches", [1, 3, 5])
@pytest.mark.parametrize("name", MODELS)
def test_fused_equals_training_form_and_stock(name, num_branches, scale_branch):
    """Exact up to rounding: in float64, so float32 rounding (amplified by randomize_bn's near-eps channels,
    ~1e-4 of the logits) cannot hide a folding mistake."""
    model = timm.create_model(name, num_classes=10, num_branches=num_branches, scale_branch=scale_branch)
    randomize_bn(model, seed=num_branches).double()
    x = images().double()
    with torch.no_grad():
        ref = model(x)
        fused = reparameterize(model)
        assert not any(isinstance(m, RepConvBN) and m.fused is None for m in fused.modules())
        out = fused(x)
        assert_same_logits(ref, out, rtol=1e-9)
        stock = to_stock(fused)  # loads strict
        assert type(stock) is type(create_stock_model(stock_model_name(name), 10))
        assert_same_logits(ref, stock(x), rtol=1e-9)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_plain_training_form_is_the_stock_network(name):
    """N=1, no 1x1, no identity: exactly the stock model's parameters, and the same function as its fused form."""
    model = timm.create_model(name, num_classes=10, num_branches=1, scale_branch=False, identity_branch=False)
    assert n_params(model) == n_params(create_stock_model(name, 10))
    assert rep_settings(model) == {"num_branches": 1, "scale_branch": False, "identity_branch": False,
                                   "branch_bn_init": 0.0}
    randomize_bn(model, seed=7)
    x = images()
    with torch.no_grad():
        assert_same_logits(model(x), to_stock(model)(x))


def test_rep_settings_say_what_was_built():
    model = timm.create_model("rep_mobilenetv2_100", num_branches=2, identity_branch=False)
    assert rep_settings(model) == {"num_branches": 2, "scale_branch": True, "identity_branch": False,
                                   "branch_bn_init": 0.0}
    assert rep_settings(timm.create_model("rep_shufflenetv2_100"))["identity_branch"] is True
    assert rep_settings(create_stock_model("rep_ghostnetv3_050", 10)) == {}
    with pytest.raises(ValueError, match="before reparameterize"):
        rep_settings(reparameterize(model))


@pytest.mark.parametrize("name", MODELS)
def test_training_form_starts_as_the_plain_network_of_its_seed(name):
    """From scratch the extra branches start at zero (branch_bn_init 0) on top of the stock network's own init,
    so a rep student and its plain twin of one seed compute the same function in train and eval mode;
    branch_bn_init 1 (the paper's) does not."""
    def build(**kw):
        torch.manual_seed(0)
        return timm.create_model(name, num_classes=10, **kw)

    plain = {"num_branches": 1, "scale_branch": False, "identity_branch": False}
    x = images()
    for mode in ("train", "eval"):
        outputs = []
        for model in (build(), build(**plain), build(branch_bn_init=1.0)):
            getattr(model, mode)()
            torch.manual_seed(1)  # dropout draws alike
            with torch.no_grad():
                outputs.append(model(x))
        assert torch.equal(outputs[0], outputs[1]), mode
        assert not torch.allclose(outputs[2], outputs[1], atol=1e-3), mode


def test_branch_options_change_the_training_form():
    def count(**kw):
        return sum(p.numel() for p in timm.create_model("rep_ghostnetv3_050", **kw).parameters())
    assert (count(num_branches=1, scale_branch=False, identity_branch=False) < count(num_branches=1, scale_branch=False)
            < count(num_branches=1) < count(num_branches=3))
    with pytest.raises(ValueError, match="num_branches"):
        timm.create_model("rep_ghostnetv3_050", num_branches=0)


def test_stock_targets():
    assert stock_model_name("rep_ghostnetv3_100") == "ghostnetv2_100"
    assert stock_model_name("rep_mobilenetv2_140") == "mobilenetv2_140"
    assert stock_model_name("rep_shufflenetv2_200") == "shufflenet_v2_x2_0"
    with pytest.raises(ValueError, match="unknown student"):
        stock_model_name("resnet50")
    # the 0.5x target is timm's GhostNet class in its v2 form at width 0.5
    stock = create_stock_model("rep_ghostnetv3_050", num_classes=10)
    ref = timm.models.ghostnet.GhostNet(GHOSTNET_CFGS, num_classes=10, width=0.5, version="v2")
    assert {k: v.shape for k, v in stock.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_to_stock_leaves_the_training_model_alone():
    model = randomize_bn(timm.create_model("rep_shufflenetv2_100", num_classes=5))
    x = images()
    with torch.no_grad():
        assert_same_logits(model(x), to_stock(model)(x))
    assert all(m.fused is None for m in model.modules() if isinstance(m, RepConvBN))


def test_timm_ghostnetv3_converts_with_identical_outputs():
    theirs = randomize_bn(timm.create_model("ghostnetv3_100", num_classes=10), seed=3)
    ours = timm.create_model("rep_ghostnetv3_100", num_classes=10, num_branches=3, scale_branch=True)
    ours.load_state_dict(convert_timm_ghostnetv3(theirs.state_dict()), strict=True)
    ours.eval()
    x = images()
    with torch.no_grad():
        ref = theirs(x)
        assert_same_logits(ref, ours(x))
        assert_same_logits(ref, to_stock(ours)(x))


# timm's and torchvision's own parameter counts of the stock architectures (their BN layers stay separate)
DEPLOY_SIZES = {
    "rep_ghostnetv3_050": (2_857_836, 49.6),
    "rep_ghostnetv3_100": (6_156_908, 167.0),
    "rep_ghostnetv3_130": (8_960_404, 269.3),
    "rep_ghostnetv3_160": (12_392_698, 398.6),
    "rep_mobilenetv2_100": (3_504_872, 300.8),
    "rep_shufflenetv2_100": (2_278_604, 144.9),
}


@pytest.mark.parametrize("name", DEPLOY_SIZES)
def test_deploy_params_and_macs_are_the_stock_models(name):
    params, macs = count_params_macs(to_stock(timm.create_model(name, num_classes=1000)), size=224)
    assert params == DEPLOY_SIZES[name][0]
    assert macs / 1e6 == pytest.approx(DEPLOY_SIZES[name][1], abs=0.05)


def test_ghostnet_rejects_too_small_inputs():
    model = timm.create_model("rep_ghostnetv3_050", num_classes=10).eval()
    with pytest.raises(ValueError, match="too small"):
        model(torch.zeros(1, 3, 32, 32))
    assert model(torch.zeros(1, 3, 40, 40)).shape == (1, 10)


def test_student_manifests_build_their_models():
    from pipeline.manifests import MANIFEST_ROOT
    from pipeline.models.rep import BRANCH_DEFAULTS
    from pipeline.records import StudentSpec

    names = sorted(p.stem for p in (MANIFEST_ROOT / "students").glob("*.yaml"))
    assert len(names) == len(MODELS)
    assert {StudentSpec.resolve(n).model for n in names} == set(MODELS)
    spec = StudentSpec.resolve("ghostnetv3-100")
    assert (spec.preprocess.input_size, spec.preprocess.interpolation, spec.min_input_size) == (224, "bicubic", 64)
    model = timm.create_model(spec.model, num_classes=3, **spec.model_kwargs)
    assert len(model.blocks[1][0].ghost1.primary_conv[0].convs) == BRANCH_DEFAULTS["num_branches"] == 3
    assert rep_settings(model) == BRANCH_DEFAULTS  # the paper's: N=3 + 1x1 + identity
