"""rep-GhostNetV3: timm's GhostNetV2 architecture with the GhostNetV3 re-parameterized branches.

The model IS timm's `GhostNet(version='v2')` with three conv+BN pairs per ghost bottleneck swapped for
RepConvBN blocks (the paper's placement): the primary 1x1 conv of each ghost module (N branches), its
cheap 3x3 depthwise conv (N branches + 1x1 DW scale + BN identity), and the stride-2 depthwise conv
of a bottleneck (N branches + 1x1 DW scale). Everything else (stem, DFC attention in blocks 2..15, SE,
shortcuts, head) is timm's own code, so the fused weights load into stock `ghostnetv2_*` unchanged.
"""

import re

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models.ghostnet import GhostBottleneck, GhostNet

from pipeline.models.rep import branch_settings, rep_state_dict, replace_conv_bn, timm_deploy

# Smallest input side: 5 stride-2 stages leave 1 pixel at 32 px, which DFC attention's 2x2 average pool
# cannot take (forward_features refuses it). Students train at >= MIN_TRAIN_SIZE, the pretrained_cfg's
# min_input_size that the student stage enforces: 33 px would leave a 2x2 last stage.
MIN_INPUT_SIZE = 33
MIN_TRAIN_SIZE = 64

# GhostNet block table (k, expansion, out channels, SE ratio, stride) per stage, from the GhostNet paper.
GHOSTNET_CFGS = [
    [[3, 16, 16, 0, 1]],
    [[3, 48, 24, 0, 2]],
    [[3, 72, 24, 0, 1]],
    [[5, 72, 40, 0.25, 2]],
    [[5, 120, 40, 0.25, 1]],
    [[3, 240, 80, 0, 2]],
    [[3, 200, 80, 0, 1], [3, 184, 80, 0, 1], [3, 184, 80, 0, 1], [3, 480, 112, 0.25, 1],
     [3, 672, 112, 0.25, 1]],
    [[5, 672, 160, 0.25, 2]],
    [[5, 960, 160, 0, 1], [5, 960, 160, 0.25, 1], [5, 960, 160, 0, 1], [5, 960, 160, 0.25, 1]],
]

WIDTHS = {"050": 0.5, "100": 1.0, "130": 1.3, "160": 1.6}
STOCK = {f"rep_ghostnetv3_{w}": f"ghostnetv2_{w}" for w in WIDTHS}  # GhostNetV3 deploys as GhostNetV2


def stock_model(stock: str, num_classes: int = 1000) -> GhostNet:
    """timm's GhostNetV2 `stock`, randomly initialised: timm registers only 1.0/1.3/1.6 as ghostnetv2_*, so
    the others are timm's GhostNet class at their width."""
    if timm.is_model(stock):
        return timm.create_model(stock, num_classes=num_classes)
    return GhostNet(GHOSTNET_CFGS, num_classes=num_classes, width=WIDTHS[stock[-3:]], version="v2")


def deploy_spec(stock: str, num_classes: int) -> dict:
    """How timm alone builds `stock` (pipeline.models.deploy_spec): by name, or, at a width timm does not
    register, its public GhostNet class with the block table carried in the kwargs."""
    if timm.is_model(stock):
        return timm_deploy(stock, num_classes)
    width = WIDTHS[stock[-3:]]
    return {"call": "timm.models.ghostnet.GhostNet", "args": [],
            "kwargs": {"cfgs": GHOSTNET_CFGS, "width": width, "version": "v2", "num_classes": num_classes},
            "python": f'timm.models.ghostnet.GhostNet(cfgs=fuse["deploy"]["kwargs"]["cfgs"], width={width}, '
                      f'version="v2", num_classes={num_classes})',
            "label": f'timm GhostNet(width={width}, version="v2", cfgs from fuse.json)'}


@torch.fx.wrap
def check_input_size(x: torch.Tensor, min_size: int = MIN_INPUT_SIZE) -> torch.Tensor:
    """`x`, or ValueError when it is smaller than `min_size`: an FX leaf (FX cannot branch on a traced size),
    scriptable (the default argument, not a global, carries the limit into TorchScript)."""
    if min(x.shape[-2], x.shape[-1]) < min_size:
        raise ValueError(f"GhostNet input {x.shape[-2]}x{x.shape[-1]} is too small: its DFC attention needs at least "
                         f"{min_size}x{min_size} pixels (64 or more recommended); render or resize the images larger")
    return x


class RepGhostNetV3(GhostNet):
    """GhostNetV3 training form; `pipeline.models.reparameterize` turns it into GhostNetV2's deploy form."""

    def __init__(self, cfgs=GHOSTNET_CFGS, width: float = 1.0, num_branches: int | None = None,
                 scale_branch: bool | None = None, identity_branch: bool | None = None,
                 branch_bn_init: float | None = None, **kwargs):
        """Branch knobs left None: pipeline.models.rep.BRANCH_DEFAULTS."""
        super().__init__(cfgs, width=width, version="v2", **kwargs)
        rep = branch_settings(num_branches, scale_branch, identity_branch, branch_bn_init)
        identity = rep.pop("identity_branch")
        for block in self.modules():
            if not isinstance(block, GhostBottleneck):
                continue
            for ghost in (block.ghost1, block.ghost2):
                replace_conv_bn(ghost.primary_conv, "0", "1", identity=False, **rep)
                replace_conv_bn(ghost.cheap_operation, "0", "1", identity=identity, **rep)
            if block.conv_dw is not None:
                replace_conv_bn(block, "conv_dw", "bn_dw", identity=False, **rep)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # timm's GhostNet.forward_features after the size check (TorchScript has no super())
        x = self.act1(self.bn1(self.conv_stem(check_input_size(x))))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x, flatten=True)
        return self.blocks(x)


# timm ghostnetv3 training-form names -> ours (the rest of the state dict is named alike).
_TIMM_V3_RENAMES = [
    (r"\.primary_rpr_conv\.(\d+)\.", r".primary_conv.0.convs.\1."),
    (r"\.cheap_rpr_conv\.(\d+)\.", r".cheap_operation.0.convs.\1."),
    (r"\.cheap_rpr_scale\.", r".cheap_operation.0.scale."),
    (r"\.cheap_rpr_skip\.", r".cheap_operation.0.identity."),
    (r"\.dw_rpr_conv\.(\d+)\.", r".conv_dw.convs.\1."),
    (r"\.dw_rpr_scale\.", r".conv_dw.scale."),
]


def convert_timm_ghostnetv3(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm `ghostnetv3_*` training-form state dict -> ours (N=3, scale branch on): identical outputs."""
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in _TIMM_V3_RENAMES:
            new, hits = re.subn(pattern, repl, new)
            if hits:  # timm's ConvBnAct calls its norm `bn1` (the reference checkpoints `bn`)
                new = re.sub(r"\.bn1?\.", ".bn.", new)
                break
        out[new] = value
    return out


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: RepGhostNetV3) -> dict[str, torch.Tensor]:
    """timm `ghostnetv2_*` (stock), timm `ghostnetv3_*` or rep_ghostnetv3 weights -> this training form."""
    if any("_rpr_" in key for key in state_dict):
        state_dict = convert_timm_ghostnetv3(state_dict)
    return rep_state_dict(state_dict, model)


def _cfg(**kwargs):
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv="conv_stem", classifier="classifier", min_input_size=(3, MIN_TRAIN_SIZE, MIN_TRAIN_SIZE),
                **kwargs)


# Pretrained tags: timm's own GhostNetV3 / GhostNetV2 ImageNet weights, mapped by checkpoint_filter_fn.
default_cfgs = generate_default_cfgs({
    "rep_ghostnetv3_050": _cfg(),
    "rep_ghostnetv3_100.in1k": _cfg(hf_hub_id="timm/ghostnetv3_100.in1k"),
    "rep_ghostnetv3_100.ghostnetv2_in1k": _cfg(hf_hub_id="timm/ghostnetv2_100.in1k"),
    "rep_ghostnetv3_130.ghostnetv2_in1k": _cfg(hf_hub_id="timm/ghostnetv2_130.in1k"),
    "rep_ghostnetv3_160.ghostnetv2_in1k": _cfg(hf_hub_id="timm/ghostnetv2_160.in1k"),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> RepGhostNetV3:
    return build_model_with_cfg(RepGhostNetV3, variant, pretrained, width=WIDTHS[variant[-3:]],
                                pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(flatten_sequential=True), **kwargs)


@register_model
def rep_ghostnetv3_050(pretrained: bool = False, **kwargs) -> RepGhostNetV3:
    """rep-GhostNetV3 0.5x (deploys as GhostNetV2 0.5x)."""
    return _create("rep_ghostnetv3_050", pretrained, **kwargs)


@register_model
def rep_ghostnetv3_100(pretrained: bool = False, **kwargs) -> RepGhostNetV3:
    """rep-GhostNetV3 1.0x (deploys as timm ghostnetv2_100)."""
    return _create("rep_ghostnetv3_100", pretrained, **kwargs)


@register_model
def rep_ghostnetv3_130(pretrained: bool = False, **kwargs) -> RepGhostNetV3:
    """rep-GhostNetV3 1.3x (deploys as timm ghostnetv2_130)."""
    return _create("rep_ghostnetv3_130", pretrained, **kwargs)


@register_model
def rep_ghostnetv3_160(pretrained: bool = False, **kwargs) -> RepGhostNetV3:
    """rep-GhostNetV3 1.6x (deploys as timm ghostnetv2_160)."""
    return _create("rep_ghostnetv3_160", pretrained, **kwargs)
