"""Teachers: a spec (manifests/teachers/*.yaml) -> a frozen model plus a digest of its weights.

The weights digest goes into the logit store's key, so two teachers with the same architecture but
different weights never share a store. Sources:

- ``timm``: ``timm.create_model(model, pretrained=...)`` through timm's own hub/cache loading
  (honours HF_HUB_OFFLINE), or ``weights:`` a local safetensors file / checkpoint (read with
  ``weights_only=True``, never unpickled).

- ``torchscript``: a ``torch.jit.save`` file, for a user's own teacher; its preprocessing (input_size,
  mean, std) must be given in the spec. A TorchScript file is a program (PyTorch's security policy:
  treat it as code; ``torch.jit.load`` has no safe mode), so it is loaded only when its spec says
  ``trust_code: true``: the user vouches for a file they made, and a file merely named is never run.

torch.export (``.pt2``) files are refused: torch 2.14's ``torch.export.load`` unpickles constants and
example inputs and retries with ``weights_only=False``, so a crafted file runs code; it has no safe mode.
"""

import hashlib
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.io import sha256_file
from pipeline.manifests import load_spec, spec_path
from pipeline.records import NAME, check_model_kwargs

SOURCES = ("timm", "torchscript")
CODE_SOURCES = {"export": "torch.export.load"}  # refused: it unpickles with weights_only=False
SAFE_WEIGHTS = ("save the weights as safetensors (safetensors.torch.save_file(model.state_dict(), PATH)) and give a "
                "timm `model:` with `weights: PATH`")
SAFE_FORMAT = f"{SAFE_WEIGHTS}, or save a model you made with torch.jit.save (source: torchscript, trust_code: true)"
SPEC_KEYS = {"name", "model", "source", "pretrained", "weights", "model_kwargs", "input_size", "mean",
             "std", "interpolation", "crop_pct", "num_classes", "description", "trust_code"}


def resolve_spec(name_or_spec) -> dict:
    """Load a teacher spec (name, YAML path or dict) and fill preprocessing defaults from timm.

    A relative `weights:` (or a TorchScript `model:` file) in a spec file is relative to that file, so a
    spec moves with its weights.
    """
    if isinstance(name_or_spec, (str, Path)):
        spec, path = load_spec("teachers", name_or_spec), spec_path("teachers", name_or_spec)
        if isinstance(spec.get("weights"), str) and not Path(spec["weights"]).is_absolute():
            spec["weights"] = str(path.parent / spec["weights"])
        if spec.get("source", "timm") != "timm" and isinstance(spec.get("model"), str) \
                and not Path(spec["model"]).is_absolute() and (path.parent / spec["model"]).is_file():
            spec["model"] = str(path.parent / spec["model"])  # a file teacher's model file, as its weights
    else:
        spec = dict(name_or_spec)
    name = spec.setdefault("name", "teacher")
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise UserError(f"teacher name {name!r} is not a plain name (letters, digits, '_', '-', '.', no '..' or '/'): "
                        "it names the store and pointer files; fix `name:` in its spec")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise UserError(f"teacher '{name}': unknown spec keys {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    if "model" not in spec:
        raise UserError(f"teacher '{name}': the spec needs `model:` (a timm model name or a file path)")
    source = spec.setdefault("source", "timm")
    if source in CODE_SOURCES:
        raise UserError(f"teacher '{name}': source '{source}' is refused: {CODE_SOURCES[source]} can run code stored in "
                        f"the file and cannot load it safely; {SAFE_FORMAT}")
    if source not in SOURCES:
        raise UserError(f"teacher '{name}': source '{source}' is not one of {', '.join(SOURCES)}")
    if source == "torchscript" and spec.get("trust_code") is not True:
        raise UserError(f"teacher '{name}': a TorchScript file is a program that runs when loaded; if you made "
                        f"{spec['model']} yourself add `trust_code: true` to its spec, else {SAFE_WEIGHTS}")
    import timm

    if source == "timm":
        if not isinstance(spec["model"], str) or not timm.is_model(spec["model"].split(".")[0]):
            raise UserError(f"teacher '{name}': {spec['model']!r} is not a timm model name")
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
    _check_values(spec)
    if spec.get("weights") is not None and not isinstance(spec["weights"], (str, Path)):
        raise UserError(f"teacher '{name}': `weights: {spec['weights']!r}` must be a file path; fix it in its spec")
    check_model_kwargs(spec.get("model_kwargs") or {}, f"teacher '{name}'", "fix it in its spec")
    return spec


def artifact_spec(spec, where: str) -> dict:
    """A teacher spec read from an artifact (a store's provenance), resolved: an artifact may name a model but
    never grants trust, so a spec naming a file that runs when loaded (TorchScript) is refused in one line."""
    if not isinstance(spec, dict):
        raise UserError(f"{where} holds no teacher spec mapping; re-run `pipeline teach`")
    if spec.get("source", "timm") != "timm" or "trust_code" in spec:
        raise UserError(f"{where} names the {spec.get('source')} teacher file {spec.get('model')!r}, a program that "
                        "runs when loaded, refused: trust comes only from a spec you name, never from an artifact; "
                        "give the teacher's spec yourself (e.g. `pipeline store audit --teacher SPEC.yaml`)")
    return resolve_spec(spec)


def _check_values(spec: dict) -> None:
    """Preprocessing values of the right type and shape (normalised in place): a bad one is one line."""
    name = spec["name"]

    def bad(key, want):
        raise UserError(f"teacher '{name}': `{key}: {spec[key]!r}` must be {want}; fix it in its spec")

    size = spec["input_size"]
    size = size[-1] if isinstance(size, (list, tuple)) and size else size  # timm style (3, H, W)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        bad("input_size", "a positive number of pixels")
    spec["input_size"] = size
    for key, low in (("mean", None), ("std", 0.0)):
        values = spec[key]
        if (not isinstance(values, (list, tuple)) or len(values) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
                or (low is not None and not all(v > low for v in values))):
            bad(key, "three numbers (R, G, B)" + (", each > 0" if low is not None else ""))
        spec[key] = [float(v) for v in values]
    num = spec["num_classes"]
    if not isinstance(num, int) or isinstance(num, bool) or num < 1:
        bad("num_classes", "a positive integer")
    if not isinstance(spec["crop_pct"], (int, float)) or not 0 < spec["crop_pct"] <= 1:
        bad("crop_pct", "a number in (0, 1]")


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
    except pickle.UnpicklingError:  # torch's message advises weights_only=False: exactly what must not be done
        raise UserError(f"teacher '{name}': weights {path} hold pickled objects other than tensors, refused "
                        f"(unpickling them could run code); {SAFE_FORMAT}") from None
    except Exception as err:  # noqa: BLE001 - any unreadable file is a user error here
        first = (str(err).strip().splitlines() or [""])[0]
        raise UserError(f"teacher '{name}': cannot read weights {path} ({type(err).__name__}: {first}); "
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
        model = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # noqa: BLE001 - a bad user file
        raise UserError(f"teacher '{name}': cannot load {spec['source']} file {path} ({type(err).__name__}); "
                        "save it with torch.jit.save") from None
    return model, sha256_file(path)


def load_teacher(spec) -> tuple[nn.Module, str]:
    """Build the teacher of `spec` (resolved by resolve_spec) in eval mode; return (model, weights digest)."""
    spec = resolve_spec(spec)
    if spec["source"] == "timm":
        model = _timm_teacher(spec)
        digest = state_digest(model.state_dict())
    else:
        model, digest = _file_teacher(spec)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, digest


def check_num_classes(spec: dict, num_classes: int) -> None:
    if spec["num_classes"] != num_classes:
        raise UserError(f"teacher '{spec['name']}' predicts {spec['num_classes']} classes but the dataset has "
                        f"{num_classes}; fine-tune the teacher on this dataset (pipeline finetune-teacher) "
                        "or pick a teacher spec with the same classes")
