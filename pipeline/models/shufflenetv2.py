"""rep-ShuffleNetV2: torchvision's ShuffleNetV2 with every depthwise and 1x1 conv of its units re-parameterized.

Depthwise 3x3 convs get N branches + a 1x1 DW scale branch (+ BN identity at stride 1), 1x1 convs get
N branches (+ BN identity where in == out). Stem conv and conv5 stay plain. The fused model loads into
stock torchvision `shufflenet_v2_x1_0` / `shufflenet_v2_x2_0`.
"""

import torch.nn as nn
import torchvision.models as tvm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torchvision.models.shufflenetv2 import InvertedResidual, ShuffleNetV2

from pipeline.models.rep import branch_settings, rep_state_dict, replace_conv_bn

# stages_repeats, stages_out_channels of torchvision's width variants
_ARCH = {"100": ([4, 8, 4], [24, 116, 232, 464, 1024]), "200": ([4, 8, 4], [24, 244, 488, 976, 2048])}
# (conv, bn) Sequential indices inside torchvision's InvertedResidual branches
_CONV_BN_PAIRS = {"branch1": (("0", "1"), ("2", "3")), "branch2": (("0", "1"), ("3", "4"), ("5", "6"))}

STOCK = {"rep_shufflenetv2_100": "shufflenet_v2_x1_0", "rep_shufflenetv2_200": "shufflenet_v2_x2_0"}


def stock_shufflenetv2(name: str, num_classes: int = 1000) -> ShuffleNetV2:
    return getattr(tvm, name)(weights=None, num_classes=num_classes)


class RepShuffleNetV2(ShuffleNetV2):
    """ShuffleNetV2 training form, plus the few timm model attributes the training code relies on."""

    def __init__(self, width: str = "100", num_classes: int = 1000, in_chans: int = 3, num_branches: int | None = None,
                 scale_branch: bool | None = None, identity_branch: bool | None = None):
        """Branch knobs left None: pipeline.models.rep.BRANCH_DEFAULTS."""
        if in_chans != 3:
            raise ValueError(f"rep_shufflenetv2 takes 3 input channels, got in_chans={in_chans}")
        super().__init__(*_ARCH[width], num_classes=num_classes)
        self.num_classes = num_classes
        rep = branch_settings(num_branches, scale_branch, identity_branch)
        for unit in self.modules():
            if not isinstance(unit, InvertedResidual):
                continue
            for branch_name, pairs in _CONV_BN_PAIRS.items():
                branch = getattr(unit, branch_name)
                if len(branch) == 0:  # branch1 is empty in stride-1 units
                    continue
                for conv_name, bn_name in pairs:
                    replace_conv_bn(branch, conv_name, bn_name, num_branches=rep["num_branches"],
                                    scale_branch=rep["scale_branch"], identity=rep["identity_branch"])

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int):
        self.num_classes = num_classes
        self.fc = nn.Linear(self.fc.in_features, num_classes)


def _cfg(**kwargs):
    return dict(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv="conv1.0", classifier="fc", **kwargs)


# Pretrained tags: torchvision's ImageNet weights (stock), mapped into the training form by rep_state_dict.
default_cfgs = generate_default_cfgs({
    "rep_shufflenetv2_100.tv_in1k": _cfg(url=tvm.ShuffleNet_V2_X1_0_Weights.IMAGENET1K_V1.url),
    "rep_shufflenetv2_200.tv_in1k": _cfg(url=tvm.ShuffleNet_V2_X2_0_Weights.IMAGENET1K_V1.url),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> RepShuffleNetV2:
    return build_model_with_cfg(RepShuffleNetV2, variant, pretrained, width=variant[-3:],
                                pretrained_filter_fn=rep_state_dict, **kwargs)


@register_model
def rep_shufflenetv2_100(pretrained: bool = False, **kwargs) -> RepShuffleNetV2:
    """rep-ShuffleNetV2 1.0x (deploys as torchvision shufflenet_v2_x1_0)."""
    return _create("rep_shufflenetv2_100", pretrained, **kwargs)


@register_model
def rep_shufflenetv2_200(pretrained: bool = False, **kwargs) -> RepShuffleNetV2:
    """rep-ShuffleNetV2 2.0x (deploys as torchvision shufflenet_v2_x2_0)."""
    return _create("rep_shufflenetv2_200", pretrained, **kwargs)
