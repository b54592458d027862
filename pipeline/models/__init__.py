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
from pipeline.models import ghostnet, mobilenetv2, shufflenetv2
from pipeline.models.ghostnet import convert_timm_ghostnetv3
from pipeline.models.rep import RepConvBN, stock_state_dict

__all__ = ["reparameterize", "stock_model_name", "create_stock_model", "to_stock", "count_params_macs",
           "convert_timm_ghostnetv3", "pretrained_overlay", "deploy_spec", "timm_cfg"]

# Each family module knows its stock architectures: STOCK (rep student -> stock name), stock_model(stock,
# num_classes) and deploy_spec(stock, num_classes).
FAMILIES = (ghostnet, mobilenetv2, shufflenetv2)
STOCK_NAMES = {rep: stock for family in FAMILIES for rep, stock in family.STOCK.items()}
_FAMILY_OF_STOCK = {stock: family for family in FAMILIES for stock in family.STOCK.values()}


def timm_cfg(model: str, where: str, fix: str):
    """timm's pretrained_cfg of a model name or `name.tag` (None: a model timm does not know). An unknown tag of a
    known model is one line naming the tags there are: timm raises a RuntimeError for it (deep in create_model)."""
    try:
        return timm.models.get_pretrained_cfg(model)
    except RuntimeError:
        base = model.split(".")[0]
        tags = ", ".join(timm.list_pretrained(f"{base}.*")[:8]) or "none"
        raise UserError(f"{where}: {model!r} names no pretrained tag of timm model {base} (its tags: {tags}); "
                        f"{fix}") from None


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
    fix = "see timm.list_pretrained() or give a .safetensors file"
    cfg = timm_cfg(init, "--init", fix) if "." in init else None  # a bad tag of a known model: one line
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise UserError(f"--init {init}: neither a file nor a timm pretrained tag with weights; {fix}")
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


def _stock_family(name: str):
    """(the family module, the stock name) of a rep student name or a stock name."""
    stock = STOCK_NAMES.get(name, name)
    if stock not in _FAMILY_OF_STOCK:
        raise ValueError(f"no stock architecture for '{name}'; known: {', '.join(STOCK_NAMES)}")
    return _FAMILY_OF_STOCK[stock], stock


def create_stock_model(name: str, num_classes: int = 1000) -> nn.Module:
    """The stock timm / torchvision model for a rep student name (or a stock name), randomly initialised."""
    family, stock = _stock_family(name)
    return family.stock_model(stock, num_classes=num_classes)


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
    "label": the call without the block table, for tables}: its family module's deploy_spec.
    """
    family, stock = _stock_family(name)
    return family.deploy_spec(stock, num_classes)
