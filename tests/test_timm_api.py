"""The rep students are timm models: timm's model API, TorchScript, FX, features_only and pretrained kwargs.

What timm's own tests/test_models.py checks of its models, checked here of ours in the training form and after
`reparameterize` (fused in place), at 64 px; plus the detection use: a fused features_only backbone into an FPN.
"""

import copy
from collections import OrderedDict

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models import FeatureGraphNet, GhostNet, group_parameters
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import FeaturePyramidNetwork

from pipeline.models import create_stock_model, reparameterize, stock_model_name
from tests.test_models import images, randomize_bn

FAMILIES = ["rep_ghostnetv3_050", "rep_mobilenetv2_100", "rep_shufflenetv2_100"]
# A 4-block GhostNet with every block kind (plain, stride-2 DW, SE, DFC attention) for the slow compilers
TINY = {"rep_ghostnetv3_050": dict(cfgs=[[[3, 16, 16, 0, 1]], [[3, 48, 24, 0, 2]], [[5, 72, 40, 0.25, 2]],
                                         [[3, 120, 40, 0.25, 1]]])}


def assert_fused_close(ref: torch.Tensor, out: torch.Tensor, rtol: float = 1e-4):
    """The fusion tolerance of tests/test_models.py: max |diff| <= rtol * max |ref|."""
    assert out.shape == ref.shape
    diff, scale = (ref - out).abs().max().item(), ref.abs().max().item()
    assert diff <= rtol * scale, f"max|diff| {diff:.3g} > {rtol:g} * max|ref| {scale:.3g}"


@pytest.mark.parametrize("name", FAMILIES)
def test_timm_model_api(name):
    """Features, pre-logits, headless and pool-less forms, parameter groups, grad checkpointing, factory kwargs."""
    model = timm.create_model(name, num_classes=5).eval()
    x = images()
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        pre_logits = model.forward_head(feats, pre_logits=True)
        assert feats.shape == (2, model.num_features, 2, 2)  # stride 32
        assert pre_logits.shape == (2, model.head_hidden_size)
        torch.testing.assert_close(model.forward_head(feats), logits)
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(x), logits)
        model.reset_classifier(0)
        assert model.num_classes == 0
        torch.testing.assert_close(model(x), pre_logits)
    state = model.state_dict()
    assert f"{model.pretrained_cfg['first_conv']}.weight" in state and model.in_chans == 3
    assert len(set(group_parameters(model, model.group_matcher(), reverse=True).values())) > 1
    assert timm.create_model(name, num_classes=0)(x).shape == pre_logits.shape
    if not isinstance(model, GhostNet):  # GhostNet pools before its head conv (timm's "early pool" models)
        assert timm.create_model(name, num_classes=0, global_pool="")(x).shape == feats.shape
    grey = timm.create_model(name, in_chans=1, drop_rate=0.1, num_classes=3).train()
    grey(torch.randn(2, 1, 64, 64)).mean().backward()
    assert all(p.grad is not None for p in grey.parameters())
    meta = timm.create_model(name, device="meta", dtype=torch.float64)
    tensors = list(meta.parameters()) + list(meta.buffers())
    assert {t.device.type for t in tensors} == {"meta"}
    assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.float64}


@pytest.mark.parametrize("name", FAMILIES)
def test_torchscript_in_both_forms(name):
    """TorchScript compiles the training form (no sliced ModuleList) and the fused one: the same outputs."""
    with timm.set_scriptable(True):
        model = randomize_bn(timm.create_model(name, num_classes=5, **TINY.get(name, {})))
    x = images()
    for form in ("training", "fused"):
        if form == "fused":
            reparameterize(model)
        scripted = torch.jit.script(model)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), model(x), msg=form)


def test_ghostnet_fx_in_both_forms():
    """torch.fx traces GhostNet past its input-size check (an FX leaf): forward gives the same outputs, backward
    reaches every parameter, the traced training form scripts (timm's fx_torchscript), and timm's FX feature
    extractor works. (MobileNetV2 and ShuffleNetV2 always traced; their FX paths run in the tests below.)"""
    x = images()
    for form in ("training", "fused"):
        model = timm.create_model("rep_ghostnetv3_050", num_classes=5, **TINY["rep_ghostnetv3_050"])
        if form == "fused":
            reparameterize(randomize_bn(model))
        graph = torch.fx.symbolic_trace(model.eval())
        with torch.no_grad():
            torch.testing.assert_close(graph(x), model(x), msg=form)
            if form == "training":
                torch.testing.assert_close(torch.jit.script(graph)(x), model(x))
            taps = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
            torch.testing.assert_close(FeatureGraphNet(model, out_indices=(1, 2))(x), taps, msg=form)
        graph.train()(x).mean().backward()
        assert all(p.grad is not None for p in graph.parameters()), form


@pytest.mark.parametrize("name", FAMILIES)
def test_features_only_and_intermediates(name):
    """Each feature_info level: features_only (timm's list, getter and fx wrappers), forward_intermediates."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    info = model.feature_info
    assert len(info) == 5 and [level["reduction"] for level in info] == [2, 4, 8, 16, 32]
    x = images()
    with torch.no_grad():
        final, taps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        side = [64 // level["reduction"] for level in info]
        assert [t.shape[1:] for t in taps] == [(level["num_chs"], s, s) for level, s in zip(info, side)]
        for feature_cls in ("list", "getter", "fx"):
            torch.manual_seed(0)  # the same weights as `model`
            backbone = timm.create_model(name, features_only=True, feature_cls=feature_cls).eval()
            assert backbone.feature_info.channels() == [level["num_chs"] for level in info]
            for tap, out in zip(taps, backbone(x), strict=True):
                torch.testing.assert_close(out, tap, msg=feature_cls)
        pruned = copy.deepcopy(model)
        kept = pruned.prune_intermediate_layers([2])
        torch.testing.assert_close(pruned.forward_intermediates(x, indices=kept, intermediates_only=True)[0], taps[2])


def _save(model: nn.Module, path) -> str:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def _stock_twin(name: str, path: str, **kwargs) -> nn.Module:
    """The stock architecture loaded from `path` as stock timm loads it with `kwargs` (torchvision's ShuffleNet
    by hand: timm's in_chans=1 sums the first conv over RGB, num_classes=0 leaves pooled features)."""
    if "shufflenet" not in name:
        return timm.create_model(stock_model_name(name), pretrained=True, pretrained_cfg_overlay=dict(file=path),
                                 **kwargs).eval()
    from safetensors.torch import load_file

    stock = create_stock_model(name)
    stock.load_state_dict(load_file(path))
    if kwargs.get("in_chans") == 1:
        conv = stock.conv1[0]
        stock.conv1[0] = nn.Conv2d(1, conv.out_channels, 3, 2, 1, bias=False)
        stock.conv1[0].weight.data = conv.weight.sum(1, keepdim=True)
    stock.fc = nn.Identity()
    return stock.eval()


@pytest.mark.parametrize("kwargs", [dict(num_classes=0), dict(in_chans=1, num_classes=0),
                                    dict(in_chans=1, num_classes=5), dict(in_chans=1, features_only=True)],
                         ids=["headless", "grey-headless", "grey-5-classes", "grey-features"])
@pytest.mark.parametrize("name", ["rep_ghostnetv3_100", "rep_mobilenetv2_100", "rep_shufflenetv2_100"])
def test_pretrained_composes_with_timm_kwargs(name, kwargs, tmp_path):
    """A stock weights file loads with timm's kwargs exactly as stock timm loads it: same features."""
    path = _save(randomize_bn(create_stock_model(name)), tmp_path / "stock.safetensors")
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs).eval()
    x = torch.randn(2, kwargs.get("in_chans", 3), 64, 64)
    features_only = kwargs.pop("features_only", False)
    stock = _stock_twin(name, path, **{**kwargs, "num_classes": 0})
    with torch.no_grad():
        if features_only:
            names = model.feature_info.module_name()
            maps = create_feature_extractor(stock, return_nodes=names)(x)
            for out, ref in zip(model(x), maps.values(), strict=True):
                assert_fused_close(ref, out)
        else:
            assert_fused_close(stock(x), model.forward_head(model.forward_features(x), pre_logits=True))
    if kwargs.get("num_classes"):
        assert model(x).shape == (2, kwargs["num_classes"])


@pytest.mark.parametrize("name", FAMILIES)
def test_fused_backbone_serves_detection(name):
    """features_only of the fused student = the training form's feature maps, the same maps as torchvision's
    create_feature_extractor on the fused full model, and they feed an FPN. In float64, as the fusion test of
    tests/test_models.py: float32 rounding, amplified by randomize_bn's near-eps channels, would hide little."""
    x = images().double()
    torch.manual_seed(0)
    backbone = randomize_bn(timm.create_model(name, features_only=True, out_indices=(2, 3, 4))).double()
    torch.manual_seed(0)
    full = randomize_bn(timm.create_model(name)).double()
    with torch.no_grad():
        ref = backbone(x)
        fused = reparameterize(copy.deepcopy(backbone))(x)
        nodes = backbone.feature_info.module_name()
        extracted = create_feature_extractor(reparameterize(full), return_nodes=nodes)(x)
        fpn = FeaturePyramidNetwork(backbone.feature_info.channels(), out_channels=32).double()
        pyramid = fpn(OrderedDict(zip(nodes, fused)))
    for r, f, e in zip(ref, fused, extracted.values(), strict=True):
        assert_fused_close(r, f, rtol=1e-9)
        assert_fused_close(r, e, rtol=1e-9)
    assert [p.shape for p in pyramid.values()] == [(2, 32, *r.shape[-2:]) for r in ref]
