"""Re-parameterizable students and their fusion into stock inference architectures.

Importing this package registers in timm: rep_ghostnetv3_050/_100/_130/_160, rep_mobilenetv2_100/_140,
rep_shufflenetv2_100/_200 (kwargs: num_branches 1..5, scale_branch, identity_branch, num_classes; with
num_branches=1, scale_branch=False, identity_branch=False the training form IS the stock network). After
`reparameterize(model)` every RepConvBN is one conv with bias; `to_stock(model)` loads those weights
(strict) into the stock timm / torchvision model, so deployment needs no code of ours.
"""

import copy
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.utils.model import reparameterize_model
from torch.utils.flop_counter import FlopCounterMode

from pipeline.errors import UserError
from pipeline.io import sha256_file
from pipeline.models import mobilenetv2, shufflenetv2
from pipeline.models.ghostnet import GHOSTNET_CFGS, WIDTHS, convert_timm_ghostnetv3, stock_ghostnetv2
from pipeline.models.rep import RepConvBN, stock_state_dict

__all__ = ["reparameterize", "stock_model_name", "create_stock_model", "to_stock", "count_params_macs",
           "convert_timm_ghostnetv3", "pretrained_overlay", "deploy_spec"]

# rep student -> stock architecture name (timm, except torchvision's shufflenet_v2_*; timm registers no
# ghostnetv2_050, which is built as timm GhostNet(version='v2', width=0.5))
STOCK_NAMES = {
    **{f"rep_ghostnetv3_{w}": f"ghostnetv2_{w}" for w in WIDTHS},
    **mobilenetv2.STOCK,
    **shufflenetv2.STOCK,
}


def pretrained_overlay(name: str, init: str) -> tuple[dict, dict]:
    """timm's `pretrained_cfg_overlay` that makes `timm.create_model(name, pretrained=True)` load `init`, and its record.

    `init` is a .safetensors file of the stock architecture (or of a rep training form), or a timm pretrained
    tag (`mobilenetv2_100.ra_in1k`, `rep_ghostnetv3_100.in1k`): each model's checkpoint filter maps the
    weights into the training form. Other files are refused: a pickle is never loaded.
    """
    path = Path(init)
    if path.suffix == ".safetensors" or path.exists():
        if path.suffix != ".safetensors" or not path.is_file():
            raise UserError(f"--init {init}: {'not a file' if path.suffix == '.safetensors' else 'not a .safetensors file'}; "
                            "give a safetensors file of the stock architecture (safetensors.torch.save_file) "
                            "or a timm pretrained tag such as mobilenetv2_100.ra_in1k")
        from safetensors import safe_open

        head = f"{timm.models.get_pretrained_cfg(name).classifier}.weight"
        try:
            with safe_open(str(path), "pt") as f:
                classes = f.get_slice(head).get_shape()[0] if head in f.keys() else None
        except Exception as err:  # noqa: BLE001 - any unreadable file is a user error
            raise UserError(f"--init {init} is not a readable safetensors file ({type(err).__name__}: {err})") from None
        overlay = dict(file=str(path), **({"num_classes": classes} if classes else {}))
        return overlay, {"source": str(path), "sha256": sha256_file(path)}
    cfg = timm.models.get_pretrained_cfg(init) if "." in init else None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise UserError(f"--init {init}: neither a file nor a timm pretrained tag with weights; "
                        "see timm.list_pretrained() or give a .safetensors file")
    keys = ("hf_hub_id", "hf_hub_filename", "url", "num_classes")
    overlay = {k: getattr(cfg, k) for k in keys if getattr(cfg, k) is not None}
    return overlay, {"source": init, "sha256": None, **{k: overlay[k] for k in ("hf_hub_id", "url") if k in overlay}}


def reparameterize(model: nn.Module) -> nn.Module:
    """Fold every re-parameterizable block in place (inference form); returns the model."""
    return reparameterize_model(model, inplace=True)


def stock_model_name(name: str) -> str:
    """The stock architecture a rep student fuses into, e.g. rep_ghostnetv3_100 -> ghostnetv2_100."""
    if name not in STOCK_NAMES:
        raise ValueError(f"unknown student model '{name}'; known: {', '.join(STOCK_NAMES)}")
    return STOCK_NAMES[name]


def create_stock_model(name: str, num_classes: int = 1000) -> nn.Module:
    """The stock timm / torchvision model for a rep student name (or a stock name), randomly initialised."""
    stock = STOCK_NAMES.get(name, name)
    if stock not in STOCK_NAMES.values():
        raise ValueError(f"no stock architecture for '{name}'; known: {', '.join(STOCK_NAMES)}")
    if stock == "ghostnetv2_050":
        return stock_ghostnetv2(0.5, num_classes=num_classes)
    if stock in shufflenetv2.STOCK.values():
        return shufflenetv2.stock_shufflenetv2(stock, num_classes=num_classes)
    return timm.create_model(stock, num_classes=num_classes)


def to_stock(model: nn.Module) -> nn.Module:
    """The stock architecture (eval mode, `model`'s device and dtype) holding the fused weights of `model`,
    loaded strictly.

    `model` is a rep student made by timm.create_model; an unfused one is fused on a copy.
    """
    if any(isinstance(m, RepConvBN) and m.fused is None for m in model.modules()):
        model = reparameterize(copy.deepcopy(model))
    like = next(model.parameters())
    stock = create_stock_model(model.pretrained_cfg["architecture"], num_classes=model.num_classes)
    stock = stock.to(device=like.device, dtype=like.dtype)  # loading into float32 would round float64 weights
    stock.load_state_dict(stock_state_dict(model), strict=True)
    return stock.eval()


@torch.no_grad()
def count_params_macs(model: nn.Module, size: int = 224) -> tuple[int, int]:
    """(parameters, multiply-accumulates) of one size x size image, by torch's FLOP counter (MACs = FLOPs/2).

    Count a fused (or stock) model for deploy figures; BN, activations and additions are not counted.
    """
    params = sum(p.numel() for p in model.parameters())
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
    model.train(was_training)
    return params, counter.get_total_flops() // 2


def deploy_spec(name: str, num_classes: int) -> dict:
    """How to build the stock architecture of `name` with timm or torchvision alone (fuse.json's "deploy").

    {"call": dotted callable, "args": [...], "kwargs": {...}, "python": the same call as one line of code,
    "label": the call without the block table, for tables}.
    timm registers no GhostNetV2 0.5x and its ghostnetv2_* entry points fix the width, so that one is
    timm's public `GhostNet` class with the block table carried in the kwargs.
    """
    stock = STOCK_NAMES.get(name, name)
    if stock not in STOCK_NAMES.values():
        raise ValueError(f"no stock architecture for '{name}'; known: {', '.join(STOCK_NAMES)}")
    kwargs = {"num_classes": num_classes}
    if stock == "ghostnetv2_050":
        call, args = "timm.models.ghostnet.GhostNet", []
        kwargs = {"cfgs": GHOSTNET_CFGS, "width": 0.5, "version": "v2", **kwargs}
        python = f'timm.models.ghostnet.GhostNet(cfgs=fuse["deploy"]["kwargs"]["cfgs"], width=0.5, version="v2", ' \
                 f'num_classes={num_classes})'
        label = 'timm GhostNet(width=0.5, version="v2", cfgs from fuse.json)'
    elif stock in shufflenetv2.STOCK.values():
        call, args = f"torchvision.models.{stock}", []
        python = f"torchvision.models.{stock}(num_classes={num_classes})"
        label = f"torchvision {stock}"
    else:
        call, args = "timm.create_model", [stock]
        python = f'timm.create_model("{stock}", num_classes={num_classes})'
        label = f"timm {stock}"
    return {"call": call, "args": args, "kwargs": kwargs, "python": python, "label": label}
