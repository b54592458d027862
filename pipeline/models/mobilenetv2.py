"""rep-MobileNetV2: timm's MobileNetV2 with every depthwise and 1x1 conv of its blocks re-parameterized.

Depthwise 3x3 convs get N branches + a 1x1 DW scale branch (+ BN identity at stride 1); the 1x1 expansion
and projection convs get N branches. Stem and head stay plain. The fused model loads into stock timm
`mobilenetv2_100` / `mobilenetv2_140`.
"""

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual

from pipeline.models.rep import branch_settings, rep_state_dict, replace_conv_bn, timm_deploy

# (conv, bn) attribute pairs of each timm block type, in forward order
_CONV_BN_PAIRS = {
    DepthwiseSeparableConv: (("conv_dw", "bn1"), ("conv_pw", "bn2")),
    InvertedResidual: (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
}

STOCK = {"rep_mobilenetv2_100": "mobilenetv2_100", "rep_mobilenetv2_140": "mobilenetv2_140"}


def stock_model(stock: str, num_classes: int = 1000):
    """timm's MobileNetV2 `stock`, randomly initialised."""
    return timm.create_model(stock, num_classes=num_classes)


def deploy_spec(stock: str, num_classes: int) -> dict:
    """How timm alone builds `stock` (pipeline.models.deploy_spec)."""
    return timm_deploy(stock, num_classes)


def _rep_mobilenetv2(stock: str, num_branches: int | None = None, scale_branch: bool | None = None,
                     identity_branch: bool | None = None, branch_bn_init: float | None = None, **kwargs):
    """Build the stock timm model and swap its block convs for RepConvBN blocks (knobs left None:
    pipeline.models.rep.BRANCH_DEFAULTS)."""
    model = timm.create_model(stock, **kwargs)
    rep = branch_settings(num_branches, scale_branch, identity_branch, branch_bn_init)
    for block in model.blocks.modules():
        for conv_name, bn_name in _CONV_BN_PAIRS.get(type(block), ()):
            replace_conv_bn(block, conv_name, bn_name, num_branches=rep["num_branches"],
                            scale_branch=rep["scale_branch"], identity=rep["identity_branch"],
                            branch_bn_init=rep["branch_bn_init"])
    return model


def _cfg(**kwargs):
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv="conv_stem", classifier="classifier", **kwargs)


# Pretrained tags: timm's stock MobileNetV2 ImageNet weights, mapped into the training form by rep_state_dict.
default_cfgs = generate_default_cfgs({
    "rep_mobilenetv2_100.ra_in1k": _cfg(hf_hub_id="timm/mobilenetv2_100.ra_in1k"),
    "rep_mobilenetv2_140.ra_in1k": _cfg(hf_hub_id="timm/mobilenetv2_140.ra_in1k"),
})


def _create(variant: str, pretrained: bool = False, **kwargs):
    # features_only: timm's FeatureListNet over the flattened blocks (timm's own 'cfg' mode for EfficientNet)
    return build_model_with_cfg(_rep_mobilenetv2, variant, pretrained, stock=STOCK[variant],
                                pretrained_filter_fn=rep_state_dict, feature_cfg=dict(flatten_sequential=True),
                                **kwargs)


@register_model
def rep_mobilenetv2_100(pretrained: bool = False, **kwargs):
    """rep-MobileNetV2 1.0x (deploys as timm mobilenetv2_100)."""
    return _create("rep_mobilenetv2_100", pretrained, **kwargs)


@register_model
def rep_mobilenetv2_140(pretrained: bool = False, **kwargs):
    """rep-MobileNetV2 1.4x (deploys as timm mobilenetv2_140)."""
    return _create("rep_mobilenetv2_140", pretrained, **kwargs)
