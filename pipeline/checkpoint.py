"""Training checkpoints as ONE safetensors file: tensors plus a JSON state in its metadata.

One file written atomically means model, EMA, optimizer and counters can never disagree after a
crash, and nothing is ever unpickled: nested state (an optimizer's state_dict, which holds tensors
inside dicts, lists and even param_groups) is flattened into named tensors + JSON with references.
"""

import json

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from pipeline.errors import UserError
from pipeline.io import atomic_write_bytes, remove_stale_temps, state_digest

_REF = "__tensor__"


def _flatten(obj, prefix: str, tensors: dict):
    """JSON-able copy of `obj` whose tensors are moved into `tensors` under path-like names."""
    if isinstance(obj, torch.Tensor):
        # a packed NCHW copy: safetensors refuses shared storage and channels_last strides
        tensors[prefix] = obj.detach().cpu().clone(memory_format=torch.contiguous_format)
        return {_REF: prefix}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"cannot checkpoint dict keys of {prefix}")
        # Keys keep their type (optimizer state is keyed by int) through a [key, value] list.
        return {"__items__": [[k, _flatten(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint {type(obj).__name__} at {prefix}")


def _unflatten(obj, tensors: dict):
    if isinstance(obj, dict) and _REF in obj:
        return tensors[obj[_REF]]
    if isinstance(obj, dict):
        return {k: _unflatten(v, tensors) for k, v in obj["__items__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_checkpoint(path, parts: dict) -> None:
    """parts: name -> nested state (state_dicts, plain dicts); written atomically to `path`."""
    tensors = {}
    tree = {name: _flatten(state, name, tensors) for name, state in parts.items()}
    remove_stale_temps(path)  # a 15 MB temp file of a killed run
    metadata = {"tree": json.dumps(tree), "sha256": state_digest(tensors)}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_checkpoint(path) -> dict:
    """Inverse of save_checkpoint; tensors that no longer bear the digest written with them are refused."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            tree = json.loads(metadata["tree"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if state_digest(tensors) != metadata["sha256"]:
            raise ValueError("its tensors do not match the sha256 written with them: changed or corrupt")
        return {name: _unflatten(state, tensors) for name, state in tree.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as err:
        raise UserError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); delete it to start "
                        "over") from None
