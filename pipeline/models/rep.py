"""A re-parameterizable conv-BN block (GhostNetV3 / MobileOne / RepVGG style).

Training form: N parallel kxk conv+BN branches, an optional 1x1 conv+BN "scale" branch and an optional
BN-only identity branch, summed. All of them are linear in the input (eval-mode BN is affine), so
`reparameterize()` folds them into one kxk conv with bias that computes the same function.
"""

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F


# The re-parameterization knobs of every rep_* model: their ONE default (the paper's, Table 2: N=3 kxk
# branches + the 1x1 scale branch; the BN identity branch where shapes allow) and ONE range check (N in 1..5,
# the paper's ablation range; branch_bn_init in [0, 1]). Specs and recipes that leave a knob unset (null) get these.
BRANCH_DEFAULTS = {"num_branches": 3, "scale_branch": True, "identity_branch": True, "branch_bn_init": 0.0}
MAX_BRANCHES = 5


def check_num_branches(num_branches) -> None:
    """ValueError naming the knob unless 1 <= num_branches <= MAX_BRANCHES (an int)."""
    if isinstance(num_branches, bool) or not isinstance(num_branches, int) or not 1 <= num_branches <= MAX_BRANCHES:
        raise ValueError(f"num_branches must be in 1..{MAX_BRANCHES}, got {num_branches!r}")


def check_branch_bn_init(branch_bn_init) -> None:
    """ValueError naming the knob unless 0 <= branch_bn_init <= 1 (a number): the initial BatchNorm weight of
    the extra branches, from 0 (they add nothing at first) to 1 (the paper's init)."""
    number = isinstance(branch_bn_init, (int, float)) and not isinstance(branch_bn_init, bool)
    if not (number and 0 <= branch_bn_init <= 1):  # NaN fails the comparison
        raise ValueError(f"branch_bn_init must be in [0, 1], got {branch_bn_init!r}")


def branch_settings(num_branches=None, scale_branch=None, identity_branch=None, branch_bn_init=None) -> dict:
    """The knobs a rep model is built with: the given ones, BRANCH_DEFAULTS for those left None."""
    given = {"num_branches": num_branches, "scale_branch": scale_branch, "identity_branch": identity_branch,
             "branch_bn_init": branch_bn_init}
    return {k: BRANCH_DEFAULTS[k] if v is None else v for k, v in given.items()}


class ConvBn(nn.Sequential):
    """conv (no bias) + BatchNorm, one branch of a RepConvBN."""

    def __init__(self, in_chs, out_chs, kernel_size, stride, padding, groups, eps):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False),
            bn=nn.BatchNorm2d(out_chs, eps=eps),
        ))


def fold_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel, bias) of conv(kernel) followed by `bn` in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class RepConvBN(nn.Module):
    """Sum of `num_branches` kxk conv+BN branches, a 1x1 conv+BN scale branch and a BN identity branch.

    The scale branch exists only for k > 1 (for k == 1 it would be one more branch); the identity branch
    only where it is shape-preserving (stride 1, in == out). Both need 'same' padding (k // 2) so that the
    1x1 / identity taps land on the kxk centre. `stock_bn` names the BatchNorm sibling that this block
    replaces in the stock architecture (see `replace_conv_bn`).
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int,
            stride: int = 1,
            padding: int | None = None,
            groups: int = 1,
            num_branches: int = BRANCH_DEFAULTS["num_branches"],
            scale_branch: bool = BRANCH_DEFAULTS["scale_branch"],
            identity: bool = BRANCH_DEFAULTS["identity_branch"],
            branch_bn_init: float = BRANCH_DEFAULTS["branch_bn_init"],
            eps: float = 1e-5,
    ):
        super().__init__()
        check_num_branches(num_branches)
        check_branch_bn_init(branch_bn_init)
        padding = kernel_size // 2 if padding is None else padding
        self.in_chs, self.out_chs, self.kernel_size = in_chs, out_chs, kernel_size
        self.stride, self.padding, self.groups, self.eps = stride, padding, groups, eps
        self.stock_bn = None
        centred = padding == kernel_size // 2 and kernel_size % 2 == 1
        self.convs = nn.ModuleList(
            ConvBn(in_chs, out_chs, kernel_size, stride, padding, groups, eps) for _ in range(num_branches))
        self.scale = None
        if scale_branch and kernel_size > 1:
            if not centred:
                raise ValueError(f"a 1x1 scale branch needs odd k and padding k//2, got k={kernel_size}, "
                                 f"padding={padding}")
            self.scale = ConvBn(in_chs, out_chs, 1, stride, 0, groups, eps)
        self.identity = None
        if identity and stride == 1 and in_chs == out_chs and centred:
            self.identity = nn.BatchNorm2d(out_chs, eps=eps)
        self.branch_bn_init = branch_bn_init
        with torch.no_grad():
            for bn in self.extra_branch_bns():
                bn.weight.fill_(branch_bn_init)
        self.fused = None

    def extra_branch_bns(self) -> list[nn.BatchNorm2d]:
        """The BatchNorms of every branch but the first: their weight scales what the extra capacity adds."""
        bns = [branch.bn for branch in self.convs[1:]]
        bns += [self.scale.bn] if self.scale is not None else []
        return bns + ([self.identity] if self.identity is not None else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x)
        out = self.convs[0](x)
        for i, branch in enumerate(self.convs):  # not self.convs[1:]: TorchScript cannot iterate a sliced ModuleList
            if i > 0:
                out = out + branch(x)
        if self.scale is not None:
            out = out + self.scale(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return out

    @torch.no_grad()
    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single kxk kernel and bias equal to the sum of all branches (BN in eval mode)."""
        if self.fused is not None:
            return self.fused.weight, self.fused.bias
        kernel, bias = 0, 0
        for branch in self.convs:
            k, b = fold_bn(branch.conv.weight, branch.bn)
            kernel, bias = kernel + k, bias + b
        pad = self.kernel_size // 2
        if self.scale is not None:
            k, b = fold_bn(self.scale.conv.weight, self.scale.bn)
            kernel, bias = kernel + F.pad(k, [pad, pad, pad, pad]), bias + b
        if self.identity is not None:
            w = self.convs[0].conv.weight
            eye = torch.zeros_like(w)
            in_per_group = self.in_chs // self.groups
            idx = torch.arange(self.out_chs, device=w.device)
            eye[idx, idx % in_per_group, pad, pad] = 1
            k, b = fold_bn(eye, self.identity)
            kernel, bias = kernel + k, bias + b
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self):
        """Replace the branches by one conv with bias (inference form); a no-op once fused.

        The name follows timm's convention, so `timm.utils.reparameterize_model` fuses these blocks too.
        """
        if self.fused is not None:
            return
        kernel, bias = self.fused_kernel_bias()
        self.fused = nn.Conv2d(self.in_chs, self.out_chs, self.kernel_size, self.stride, self.padding,
                               groups=self.groups, bias=True, device=kernel.device, dtype=kernel.dtype)
        self.fused.weight.copy_(kernel)
        self.fused.bias.copy_(bias)
        self.convs, self.scale, self.identity = nn.ModuleList(), None, None

    def extra_repr(self) -> str:
        return (f"{self.in_chs}, {self.out_chs}, k={self.kernel_size}, s={self.stride}, g={self.groups}, "
                f"stock_bn={self.stock_bn}")


def replace_conv_bn(parent: nn.Module, conv_name: str, bn_name: str, **kwargs) -> RepConvBN:
    """Swap the stock `conv -> bn` pair `parent.<conv_name>`, `parent.<bn_name>` for a RepConvBN.

    The RepConvBN takes the conv's slot; the BN slot keeps only the activation of a timm BatchNormAct2d
    (or becomes Identity), so the forward code of the stock model runs unchanged and the fused weights map
    back onto the stock conv + BN names (`stock_state_dict`). The first branch takes over the stock conv + BN
    as initialised by the stock model, so with `branch_bn_init=0` (extra branches add zero) a training form
    starts as exactly the stock network its seed builds: rep and plain twins share one init.
    """
    conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
    with torch.device(conv.weight.device):  # the stock model's device and dtype (timm's device=, dtype=, e.g. meta)
        rep = RepConvBN(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0],
                        conv.groups, eps=bn.eps, **kwargs).to(conv.weight.dtype)
    rep.stock_bn = bn_name
    rep.convs[0].conv.load_state_dict(conv.state_dict())
    rep.convs[0].bn.load_state_dict(bn.state_dict(), strict=False)  # a timm BatchNormAct2d also holds its act
    setattr(parent, conv_name, rep)
    act = getattr(bn, "act", None)
    setattr(parent, bn_name, nn.Identity() if act is None else act)
    return rep


def rep_settings(model: nn.Module) -> dict:
    """{num_branches, scale_branch, identity_branch, branch_bn_init} as built into an unfused model's RepConvBN
    blocks ({} for a model without any): recorded with a run so that its label says what was on, not what was
    asked."""
    blocks = [m for m in model.modules() if isinstance(m, RepConvBN)]
    if not blocks:
        return {}
    if any(b.fused is not None for b in blocks):
        raise ValueError("rep_settings reads the training form: call it before reparameterize(model)")
    return {"num_branches": max(len(b.convs) for b in blocks),
            "scale_branch": any(b.scale is not None for b in blocks),
            "identity_branch": any(b.identity is not None for b in blocks),
            "branch_bn_init": blocks[0].branch_bn_init}


def adds_branches(settings: dict) -> bool:
    """Whether recorded knobs (rep_settings; {} for a stock model) add anything to the stock network: more than
    one kxk branch, the 1x1 or the BN identity."""
    return settings.get("num_branches", 1) > 1 or bool(settings.get("scale_branch") or settings.get("identity_branch"))


def stock_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of a fused model renamed onto the stock architecture.

    Each fused RepConvBN at path P becomes the stock `P.weight` plus a BatchNorm at its `stock_bn`
    sibling that only adds the bias (weight 1, mean 0, var 1 - eps).
    """
    state = model.state_dict()
    for path, rep in model.named_modules():
        if not isinstance(rep, RepConvBN):
            continue
        if rep.fused is None:
            raise ValueError(f"{path} is not fused yet: call reparameterize(model) first")
        parent = path.rpartition(".")[0]
        bn = f"{parent}.{rep.stock_bn}" if parent else rep.stock_bn
        state[f"{path}.weight"] = state.pop(f"{path}.fused.weight")
        bias = state.pop(f"{path}.fused.bias")
        state[f"{bn}.weight"] = torch.ones_like(bias)
        state[f"{bn}.bias"] = bias
        state[f"{bn}.running_mean"] = torch.zeros_like(bias)
        state[f"{bn}.running_var"] = torch.full_like(bias, 1.0 - rep.eps)
        state[f"{bn}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return state


def timm_deploy(stock: str, num_classes: int) -> dict:
    """The deploy spec (pipeline.models.deploy_spec) of a stock architecture that timm registers by name."""
    return {"call": "timm.create_model", "args": [stock], "kwargs": {"num_classes": num_classes},
            "python": f'timm.create_model("{stock}", num_classes={num_classes})', "label": f"timm {stock}"}


def _branch_bn_names(rep: RepConvBN) -> list[str]:
    """State-dict prefixes (inside `rep`) of the BatchNorms of every branch but the first."""
    names = [f"convs.{i}.bn" for i in range(1, len(rep.convs))]
    names += ["scale.bn"] if rep.scale is not None else []
    return names + (["identity"] if rep.identity is not None else [])


@torch.no_grad()
def _fold_foreign(rep: RepConvBN, block: dict[str, torch.Tensor], path: str):
    """(kernel, BN tensors) of another training form's branches at `path`, folded into one conv."""
    branches = {int(k.split(".")[1]) for k in block if k.startswith("convs.")}
    other = RepConvBN(rep.in_chs, rep.out_chs, rep.kernel_size, rep.stride, rep.padding, rep.groups,
                      num_branches=len(branches), scale_branch=any(k.startswith("scale.") for k in block),
                      identity=any(k.startswith("identity.") for k in block), eps=rep.eps)
    try:
        other.load_state_dict(block)
    except RuntimeError as err:
        raise ValueError(f"the re-parameterized weights at {path} do not fit this model "
                         f"({str(err).strip().splitlines()[-1].strip()})") from None
    kernel, bias = other.fused_kernel_bias()
    return kernel, {"weight": torch.ones_like(bias), "bias": bias, "running_mean": torch.zeros_like(bias),
                    "running_var": torch.full_like(bias, 1.0 - rep.eps)}


@torch.no_grad()
def rep_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Stock-architecture weights (or another training form's) -> a full state dict of the training-form `model`.

    The inverse of `stock_state_dict`, for a timm `pretrained_filter_fn`: each stock conv + BN goes into
    the first branch of its RepConvBN, and every other branch's BatchNorm gets weight 0 and bias 0, so in
    eval mode (and at the first training step) the extra branches add exactly zero: the training form
    computes the stock function, and training then grows the extra capacity. A block already in training
    form with the same branches is copied as is; with other branches (N, scale, identity) it is first
    folded into one conv, which is exact in eval mode. The classifier and the first conv pass through as
    they are, because timm reconciles them after this filter exactly as for its own models: it drops a
    classifier of another class count (num_classes=0, features_only) and adapts the first conv to another
    in_chans. Anything else that does not fit raises ValueError.
    """
    own = model.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    out = {}
    for path, rep in model.named_modules():
        if not isinstance(rep, RepConvBN):
            continue
        prefix = f"{path}."
        mine = {k for k in own if k.startswith(prefix)}
        theirs = {k for k in state if k.startswith(prefix)}
        if theirs == mine:
            out.update((k, state.pop(k)) for k in theirs)
            continue
        if f"{prefix}convs.0.conv.weight" in state:
            kernel, bn = _fold_foreign(rep, {k[len(prefix):]: state.pop(k) for k in theirs}, path)
        elif f"{prefix}weight" in state:
            parent = path.rpartition(".")[0]
            stock_bn = f"{parent}.{rep.stock_bn}" if parent else rep.stock_bn
            kernel = state.pop(f"{prefix}weight")
            missing = [n for n in ("weight", "bias", "running_mean", "running_var") if f"{stock_bn}.{n}" not in state]
            if missing:
                raise ValueError(f"the weights have the conv {path} but not its BatchNorm {stock_bn}")
            bn = {n: state.pop(f"{stock_bn}.{n}") for n in ("weight", "bias", "running_mean", "running_var")}
            state.pop(f"{stock_bn}.num_batches_tracked", None)
        else:
            raise ValueError(f"the weights have no tensor for the conv {path} (neither {prefix}weight nor "
                             f"{prefix}convs.0.conv.weight)")
        block = {k: own[k].clone() for k in mine}
        block[f"{prefix}convs.0.conv.weight"] = kernel
        block.update({f"{prefix}convs.0.bn.{n}": v for n, v in bn.items()})
        for name in _branch_bn_names(rep):
            block[f"{prefix}{name}.weight"].zero_()
            block[f"{prefix}{name}.bias"].zero_()
        out.update(block)
    cfg = getattr(model, "pretrained_cfg", {})
    reconciled = {f"{cfg[name]}.{p}" for name in ("classifier", "first_conv") if cfg.get(name)
                  for p in ("weight", "bias")}
    for key, want in own.items():
        if key in out:
            continue
        have = state.pop(key, None)
        if have is None:
            raise ValueError(f"the weights have no tensor {key}")
        if have.shape != want.shape and key not in reconciled:
            raise ValueError(f"{key} has shape {tuple(have.shape)} in the weights but {tuple(want.shape)} "
                             "in the model (another width or variant?)")
        out[key] = have
    out.update((key, state.pop(key)) for key in reconciled & state.keys())  # timm drops a head the model lacks
    if state:
        raise ValueError(f"the weights hold {len(state)} tensor(s) this model lacks, e.g. {sorted(state)[0]}")
    return out
