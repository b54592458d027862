"""Teachers: a spec (manifests/teachers/*.yaml) -> a frozen model plus a digest of its weights.

The weights digest goes into the logit store's key, so two teachers with the same architecture but
different weights never share a store. Sources:

- ``timm``: ``timm.create_model(model, pretrained=...)`` through timm's own hub/cache loading
  (honours HF_HUB_OFFLINE), or ``weights:`` a local safetensors file / checkpoint (read with
  ``weights_only=True``, never unpickled).
- ``torchscript``: a ``torch.jit.save`` file; ``export``: a ``torch.export.save`` file. For a user's
  own teacher; its preprocessing (input_size, mean, std) must be given in the spec.
"""

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.io import sha256_file
from pipeline.manifests import load_spec

SOURCES = ("timm", "torchscript", "export")
SPEC_KEYS = {"name", "model", "source", "pretrained", "weights", "model_kwargs", "input_size", "mean",
             "std", "interpolation", "crop_pct", "num_classes", "description"}


def resolve_spec(name_or_spec) -> dict:
    """Load a teacher spec (name, YAML path or dict) and fill preprocessing defaults from timm."""
    spec = dict(load_spec("teachers", name_or_spec) if isinstance(name_or_spec, (str, Path)) else name_or_spec)
    name = spec.setdefault("name", "teacher")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise UserError(f"teacher '{name}': unknown spec keys {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    if "model" not in spec:
        raise UserError(f"teacher '{name}': the spec needs `model:` (a timm model name or a file path)")
    source = spec.setdefault("source", "timm")
    if source not in SOURCES:
        raise UserError(f"teacher '{name}': source '{source}' is not one of {', '.join(SOURCES)}")
    if source == "timm":
        import timm

        if not timm.is_model(spec["model"].split(".")[0]):
            raise UserError(f"teacher '{name}': '{spec['model']}' is not a timm model name")
        spec.setdefault("pretrained", not spec.get("weights"))
        cfg = timm.models.get_pretrained_cfg(spec["model"])
        cfg = cfg.to_dict() if cfg else {}
        for key, default in (("input_size", 224), ("mean", (0.485, 0.456, 0.406)), ("std", (0.229, 0.224, 0.225)),
                             ("interpolation", "bicubic"), ("crop_pct", 0.875), ("num_classes", 1000)):
            spec.setdefault(key, cfg.get(key, default))
    else:
        missing = [k for k in ("input_size", "mean", "std", "num_classes") if k not in spec]
        if missing:
            raise UserError(f"teacher '{name}': a {source} teacher must state its preprocessing; add {missing} "
                            "to its spec")
        spec.setdefault("interpolation", "bicubic")
        spec.setdefault("crop_pct", 1.0)  # a user's own model: no centre crop unless its spec states one
    if isinstance(spec["input_size"], (list, tuple)):  # timm style (3, H, W)
        spec["input_size"] = int(spec["input_size"][-1])
    spec["mean"], spec["std"] = [float(v) for v in spec["mean"]], [float(v) for v in spec["std"]]
    spec["num_classes"] = int(spec["num_classes"])
    return spec


def state_digest(state: dict) -> str:
    """sha256 over the tensors of a state dict (names, dtypes, shapes, bytes), in name order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_state_dict(path: Path, name: str) -> dict:
    """A local weights file: safetensors, or a torch checkpoint read with weights_only=True."""
    if not path.is_file():
        raise UserError(f"teacher '{name}': weights file {path} not found; fix `weights:` in its spec")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a user error here
        raise UserError(f"teacher '{name}': cannot read weights {path} ({type(err).__name__}: {err}); "
                        "give a .safetensors file or a plain tensor checkpoint") from None
    for wrapper in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            return state[wrapper]
    return state


def _timm_teacher(spec: dict) -> nn.Module:
    import timm

    name, kwargs = spec["name"], dict(spec.get("model_kwargs") or {})
    if spec.get("weights"):
        model = timm.create_model(spec["model"], pretrained=False, num_classes=spec["num_classes"], **kwargs)
        state = read_state_dict(Path(spec["weights"]), name)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise UserError(f"teacher '{name}': weights {spec['weights']} do not fit {spec['model']} with "
                            f"num_classes={spec['num_classes']} ({first}); fix `model`/`num_classes`") from None
        return model
    try:
        model = timm.create_model(spec["model"], pretrained=bool(spec["pretrained"]), **kwargs)
    except OSError as err:  # huggingface_hub's LocalEntryNotFoundError and network errors are OSErrors
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "HF_HUB_OFFLINE is set and they are not in the local cache" if offline else f"download failed ({err})"
        raise UserError(
            f"teacher '{name}': no weights for timm model '{spec['model']}' ({why}); run once with network "
            f"access to fill the Hugging Face cache, or set `weights: /path/to/file.safetensors` in its spec"
        ) from None
    if model.num_classes != spec["num_classes"]:
        raise UserError(f"teacher '{name}': timm model '{spec['model']}' has {model.num_classes} classes but its "
                        f"spec says num_classes={spec['num_classes']}; fine-tune it (pipeline finetune-teacher) "
                        "or fix the spec")
    return model


def _file_teacher(spec: dict) -> tuple[nn.Module, str]:
    name, path = spec["name"], Path(spec["model"])
    if not path.is_file():
        raise UserError(f"teacher '{name}': {spec['source']} file {path} not found; fix `model:` in its spec")
    try:
        if spec["source"] == "torchscript":
            model = torch.jit.load(str(path), map_location="cpu")
        else:
            model = torch.export.load(str(path)).module()
    except Exception as err:  # noqa: BLE001 - a bad user file
        saver = "torch.jit.save" if spec["source"] == "torchscript" else "torch.export.save (a .pt2 file)"
        raise UserError(f"teacher '{name}': cannot load {spec['source']} file {path} ({type(err).__name__}); "
                        f"save it with {saver}") from None

    return model, sha256_file(path)


def load_teacher(spec) -> tuple[nn.Module, str]:
    """Build the teacher of `spec` (resolved by resolve_spec) in eval mode; return (model, weights digest)."""
    spec = resolve_spec(spec)
    if spec["source"] == "timm":
        model = _timm_teacher(spec)
        digest = state_digest(model.state_dict())
    else:
        model, digest = _file_teacher(spec)
    if spec["source"] != "export":  # an exported program keeps the mode it was exported in (eval() refused)
        model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, digest


def check_num_classes(spec: dict, num_classes: int) -> None:
    if spec["num_classes"] != num_classes:
        raise UserError(f"teacher '{spec['name']}' predicts {spec['num_classes']} classes but the dataset has "
                        f"{num_classes}; fine-tune the teacher on this dataset (pipeline finetune-teacher) "
                        "or pick a teacher spec with the same classes")
