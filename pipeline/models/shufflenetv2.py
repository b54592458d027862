"""rep-ShuffleNetV2: torchvision's ShuffleNetV2 with every depthwise and 1x1 conv of its units re-parameterized.

Depthwise 3x3 convs get N branches + a 1x1 DW scale branch (+ BN identity at stride 1), 1x1 convs get
N branches (+ BN identity where in == out). Stem conv and conv5 stay plain. The fused model loads into
stock torchvision `shufflenet_v2_x1_0` / `shufflenet_v2_x2_0`. The training form speaks timm's model API
(features, heads, intermediates, features_only) with torchvision's state-dict names.
"""

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torchvision.models.shufflenetv2 import InvertedResidual, ShuffleNetV2

from pipeline.models.rep import branch_settings, rep_state_dict, replace_conv_bn

# stages_repeats, stages_out_channels of torchvision's width variants
_ARCH = {"100": ([4, 8, 4], [24, 116, 232, 464, 1024]), "200": ([4, 8, 4], [24, 244, 488, 976, 2048])}
# (conv, bn) Sequential indices inside torchvision's InvertedResidual branches
_CONV_BN_PAIRS = {"branch1": (("0", "1"), ("2", "3")), "branch2": (("0", "1"), ("3", "4"), ("5", "6"))}

STOCK = {"rep_shufflenetv2_100": "shufflenet_v2_x1_0", "rep_shufflenetv2_200": "shufflenet_v2_x2_0"}
# the modules before conv5, in forward order: each output is one feature level (strides 2, 4, 8, 16, 32)
_FEATURE_MODULES = ("conv1", "maxpool", "stage2", "stage3", "stage4")


def stock_model(stock: str, num_classes: int = 1000) -> ShuffleNetV2:
    """torchvision's ShuffleNetV2 `stock`, randomly initialised."""
    return getattr(tvm, stock)(weights=None, num_classes=num_classes)


def deploy_spec(stock: str, num_classes: int) -> dict:
    """How torchvision alone builds `stock` (pipeline.models.deploy_spec)."""
    return {"call": f"torchvision.models.{stock}", "args": [], "kwargs": {"num_classes": num_classes},
            "python": f"torchvision.models.{stock}(num_classes={num_classes})", "label": f"torchvision {stock}"}


class RepShuffleNetV2(ShuffleNetV2):
    """ShuffleNetV2 training form with timm's model API; the state dict keeps torchvision's names."""

    def __init__(self, width: str = "100", num_classes: int = 1000, in_chans: int = 3, global_pool: str = "avg",
                 drop_rate: float = 0.0, num_branches: int | None = None, scale_branch: bool | None = None,
                 identity_branch: bool | None = None, branch_bn_init: float | None = None, device=None, dtype=None):
        """Branch knobs left None: pipeline.models.rep.BRANCH_DEFAULTS."""
        with torch.device(device) if device is not None else nullcontext():
            self._build(width, num_classes, in_chans, num_branches, scale_branch, identity_branch, branch_bn_init)
        if dtype is not None:
            self.to(dtype)
        self.in_chans, self.drop_rate, self.grad_checkpointing = in_chans, drop_rate, False
        chs = _ARCH[width][1]
        self.num_features = self.head_hidden_size = chs[-1]
        self.feature_info = [dict(num_chs=c, reduction=2 ** (i + 1), module=name)
                             for i, (name, c) in enumerate(zip(_FEATURE_MODULES, [chs[0], *chs[:4]]))]
        self.num_classes = num_classes
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        if num_classes == 0:
            self.fc = nn.Identity()

    def _build(self, width, num_classes, in_chans, num_branches, scale_branch, identity_branch, branch_bn_init):
        """torchvision's network with `in_chans` inputs and every unit's conv + BN pairs re-parameterized; the
        classifier is made before the branches, as in the stock network, so a seed gives both the same one."""
        super().__init__(*_ARCH[width], num_classes=max(num_classes, 1))
        if in_chans != 3:
            self.conv1[0] = nn.Conv2d(in_chans, _ARCH[width][1][0], 3, 2, 1, bias=False)
        rep = branch_settings(num_branches, scale_branch, identity_branch, branch_bn_init)
        for unit in self.modules():
            if not isinstance(unit, InvertedResidual):
                continue
            for branch_name, pairs in _CONV_BN_PAIRS.items():
                branch = getattr(unit, branch_name)
                if len(branch) == 0:  # branch1 is empty in stride-1 units
                    continue
                for conv_name, bn_name in pairs:
                    replace_conv_bn(branch, conv_name, bn_name, num_branches=rep["num_branches"],
                                    scale_branch=rep["scale_branch"], identity=rep["identity_branch"],
                                    branch_bn_init=rep["branch_bn_init"])

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^conv1", blocks=[(r"^stage(\d+)" if coarse else r"^stage(\d+)\.(\d+)", None),
                                              (r"^conv5", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        """A fresh classifier (none for 0: forward gives pooled features) on the model's device and dtype."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        like = self.conv1[0].weight
        self.fc = nn.Linear(self.head_hidden_size, num_classes, device=like.device, dtype=like.dtype) \
            if num_classes > 0 else nn.Identity()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's contract: (final features, [the feature_info levels at `indices`]), or only the list."""
        assert output_fmt == "NCHW", "Output shape must be NCHW."
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        last = max_index if stop_early else len(_FEATURE_MODULES) - 1
        intermediates = []
        for i, name in enumerate(_FEATURE_MODULES[:last + 1]):
            module = getattr(self, name)
            x = checkpoint_seq(module, x) if self.grad_checkpointing and name.startswith("stage") else module(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        if last == len(_FEATURE_MODULES) - 1:
            x = self.conv5(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop what no kept feature level needs (later stages, conv5 and the head); returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        if prune_norm or prune_head or max_index < len(_FEATURE_MODULES) - 1:
            for name in _FEATURE_MODULES[max_index + 1:]:
                setattr(self, name, nn.Identity())
            self.conv5 = nn.Identity()
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stage4, checkpoint_seq(self.stage3, checkpoint_seq(self.stage2, x)))
        else:
            x = self.stage4(self.stage3(self.stage2(x)))
        return self.conv5(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


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
