"""Teachers: a spec (manifests/teachers/*.yaml) -> a frozen model plus a digest of its weights.

The weights digest goes into the logit store's key, so two teachers with the same architecture but
different weights never share a store. A spec's `source:` names one of SOURCES, each a TeacherSource that
fills the spec's defaults, loads the model under its trust rule, digests its weights and saves a fine-tuned
copy; adding a source is adding one class to SOURCES.

torch.export (``.pt2``) files are refused: torch 2.14's ``torch.export.load`` unpickles constants and
example inputs and retries with ``weights_only=False``, so a crafted file runs code; it has no safe mode.
"""

import io
import logging
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.io import sha256_file, state_digest
from pipeline.manifests import load_spec, spec_path
from pipeline.models import timm_cfg
from pipeline.preprocess import Preprocess, timm_defaults
from pipeline.records import NAME, check_model_kwargs
from pipeline.runtime import Normalize, amp_dtype, autocast

_logger = logging.getLogger(__name__)

REFUSED = {"export": "torch.export.load"}  # sources refused: their loader unpickles with weights_only=False
SAFE_WEIGHTS = ("save the weights as safetensors (safetensors.torch.save_file(model.state_dict(), PATH)) and give a "
                "timm `model:` with `weights: PATH`")
SAFE_FORMAT = f"{SAFE_WEIGHTS}, or save a model you made with torch.jit.save (source: torchscript, trust_code: true)"
SPEC_KEYS = {"name", "model", "source", "pretrained", "weights", "model_kwargs", "input_size", "mean",
             "std", "interpolation", "crop_pct", "num_classes", "description", "trust_code"}


class TeacherSource:
    """Where a teacher comes from: its spec defaults, its loader, its weights digest, its fine-tuned copy.

    The defaults here are those of a user's own model, which has no pretrained config to read: the spec states
    its preprocessing, and the whole image is used unless the spec states a crop.
    """

    name = ""
    runs_code = False  # loading runs code stored in the file: only a spec the user names may vouch (`trust_code`)
    model_file = False  # `model:` is a file path (relative to its spec file, as `weights:` is)
    tuned_file = ""  # the file a fine-tuned copy is saved to, beside its teacher.yaml

    def resolve(self, spec: dict) -> Preprocess:
        """The spec's preprocessing (its values over the source's defaults); the source's other defaults are
        filled in place."""
        missing = [k for k in ("input_size", "mean", "std", "num_classes") if k not in spec]
        if missing:
            raise UserError(f"teacher '{spec['name']}': a {self.name} teacher must state its preprocessing; add "
                            f"{missing} to its spec")
        # a user's own model: no centre crop unless its spec states one
        return preprocess_of({"interpolation": "bicubic", "crop_pct": 1.0, **spec})

    def load(self, spec: dict) -> nn.Module:
        """The model of a resolved spec."""
        raise NotImplementedError

    def digest(self, spec: dict, model: nn.Module) -> str:
        """sha256 of the weights `load` gave (what the store key holds)."""
        raise NotImplementedError

    def check_weights(self, spec: dict) -> None:
        """UserError when the spec names no weights to load (before a teacher pass labels with random ones)."""

    def trainable(self, spec: dict, num_classes: int, pretrained: bool) -> tuple[nn.Module, str]:
        """(the model to fine-tune with a `num_classes` head, where its weights came from)."""
        raise UserError(f"teacher '{spec['name']}': a {self.name} teacher cannot be fine-tuned; {SAFE_FORMAT}")

    def save(self, model: nn.Module) -> tuple[bytes, dict]:
        """A fine-tuned `model` as the bytes of `tuned_file` and the spec fields that point at that file."""
        raise NotImplementedError


class TimmSource(TeacherSource):
    """``timm.create_model(model, pretrained=...)`` through timm's own hub/cache loading (honours
    HF_HUB_OFFLINE), or ``weights:`` a local safetensors file / checkpoint (read with ``weights_only=True``,
    never unpickled). Its defaults come from timm's pretrained config."""

    name = "timm"
    tuned_file = "weights.safetensors"

    def resolve(self, spec: dict) -> Preprocess:
        import timm

        if not isinstance(spec["model"], str) or not timm.is_model(spec["model"].split(".")[0]):
            raise UserError(f"teacher '{spec['name']}': {spec['model']!r} is not a timm model name")
        spec.setdefault("pretrained", not spec.get("weights"))
        cfg = timm_cfg(spec["model"], f"teacher '{spec['name']}'", "fix `model:` in its spec")
        spec.setdefault("num_classes", cfg.num_classes if cfg else 1000)
        return preprocess_of({**timm_defaults(cfg), **spec})

    def load(self, spec: dict) -> nn.Module:
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

    def digest(self, spec: dict, model: nn.Module) -> str:
        return state_digest(model.state_dict())

    def check_weights(self, spec: dict) -> None:
        if not spec.get("weights") and not spec.get("pretrained"):
            raise UserError(f"teacher '{spec['name']}' has no weights (pretrained: false and no `weights:`); "
                            "give --weights FILE.safetensors, set `weights:` in its spec, or `pretrained: true`")

    def trainable(self, spec: dict, num_classes: int, pretrained: bool) -> tuple[nn.Module, str]:
        """Its `weights:` (the tensors that fit a `num_classes` head), else timm's pretrained weights where they can
        be had (the classifier replaced), else scratch."""
        import timm

        kwargs = dict(spec.get("model_kwargs") or {})
        model = timm.create_model(spec["model"], pretrained=False, num_classes=num_classes, **kwargs)
        if spec.get("weights"):
            state = read_state_dict(Path(spec["weights"]), spec["name"])
            own = model.state_dict()
            fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
            model.load_state_dict(fitting, strict=False)
            return model, f"{spec['weights']} ({len(fitting)}/{len(own)} tensors)"
        if pretrained:
            try:
                return (timm.create_model(spec["model"], pretrained=True, num_classes=num_classes, **kwargs),
                        "pretrained")
            except (OSError, RuntimeError) as err:  # offline, no cache, or no pretrained tag
                _logger.warning("teacher '%s': no pretrained weights (%s); training from scratch", spec["name"], err)
        return model, "scratch"

    def save(self, model: nn.Module) -> tuple[bytes, dict]:
        from safetensors.torch import save

        weights = save({k: v.contiguous() for k, v in model.state_dict().items()})
        return weights, {"pretrained": False, "weights": self.tuned_file}


class TorchScriptSource(TeacherSource):
    """A ``torch.jit.save`` file, for a user's own teacher; its preprocessing (input_size, mean, std) must be given
    in the spec. A TorchScript file is a program (PyTorch's security policy: treat it as code; ``torch.jit.load``
    has no safe mode), so it is loaded only when its spec says ``trust_code: true``: the user vouches for a file
    they made, and a file merely named is never run. Fine-tuning trains its own parameters (its class count must
    already match) and saves it as TorchScript again."""

    name = "torchscript"
    runs_code = True
    model_file = True
    tuned_file = "teacher.pt"

    def load(self, spec: dict) -> nn.Module:
        name, path = spec["name"], Path(spec["model"])
        if not path.is_file():
            raise UserError(f"teacher '{name}': {self.name} file {path} not found; fix `model:` in its spec")
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except Exception as err:  # noqa: BLE001 - a bad user file
            raise UserError(f"teacher '{name}': cannot load {self.name} file {path} ({type(err).__name__}); "
                            "save it with torch.jit.save") from None

    def digest(self, spec: dict, model: nn.Module) -> str:
        return sha256_file(spec["model"])

    def trainable(self, spec: dict, num_classes: int, pretrained: bool) -> tuple[nn.Module, str]:
        check_num_classes(spec, num_classes)
        model = load_teacher(spec)[0]
        for p in model.parameters():
            p.requires_grad_(True)
        return model, f"torchscript {spec['model']}"

    def save(self, model: nn.Module) -> tuple[bytes, dict]:
        buf = io.BytesIO()
        torch.jit.save(model, buf)
        return buf.getvalue(), {"model": self.tuned_file}


SOURCES = {source.name: source for source in (TimmSource, TorchScriptSource)}


def source_of(spec: dict) -> TeacherSource:
    """The source of a resolved spec."""
    return SOURCES[spec["source"]]()


def preprocess_of(spec: dict) -> Preprocess:
    """The preprocessing a spec states (a resolved spec states all of it), checked."""
    return Preprocess.from_dict(spec, f"teacher '{spec['name']}'", "fix it in its spec")


def resolve_spec(name_or_spec) -> dict:
    """Load a teacher spec (name, YAML path or dict) and fill its defaults (its source's: timm's pretrained config,
    or what a user's own model states).

    A relative `weights:` (or a file source's `model:`) in a spec file is relative to that file, so a spec moves
    with its weights.
    """
    if isinstance(name_or_spec, (str, Path)):
        spec, home = load_spec("teachers", name_or_spec), spec_path("teachers", name_or_spec).parent
    else:
        spec, home = dict(name_or_spec), None
    name = spec.setdefault("name", "teacher")
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise UserError(f"teacher name {name!r} is not a plain name (letters, digits, '_', '-', '.', no '..' or '/'): "
                        "it names the store and pointer files; fix `name:` in its spec")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise UserError(f"teacher '{name}': unknown spec keys {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    if "model" not in spec:
        raise UserError(f"teacher '{name}': the spec needs `model:` (a timm model name or a file path)")
    kind = spec.setdefault("source", "timm")
    if kind in REFUSED:
        raise UserError(f"teacher '{name}': source '{kind}' is refused: {REFUSED[kind]} can run code stored in "
                        f"the file and cannot load it safely; {SAFE_FORMAT}")
    if kind not in SOURCES:
        raise UserError(f"teacher '{name}': source '{kind}' is not one of {', '.join(SOURCES)}")
    source = source_of(spec)
    if home is not None:
        _relative_to(home, spec, source)
    if source.runs_code and spec.get("trust_code") is not True:
        raise UserError(f"teacher '{name}': a {kind} file is a program that runs when loaded; if you made "
                        f"{spec['model']} yourself add `trust_code: true` to its spec, else {SAFE_WEIGHTS}")
    spec.update(source.resolve(spec).to_dict())
    num = spec["num_classes"]
    if not isinstance(num, int) or isinstance(num, bool) or num < 1:
        raise UserError(f"teacher '{name}': `num_classes: {num!r}` must be a positive integer; fix it in its spec")
    if spec.get("weights") is not None and not isinstance(spec["weights"], (str, Path)):
        raise UserError(f"teacher '{name}': `weights: {spec['weights']!r}` must be a file path; fix it in its spec")
    check_model_kwargs(spec.get("model_kwargs") or {}, f"teacher '{name}'", "fix it in its spec")
    return spec


def _relative_to(home: Path, spec: dict, source: TeacherSource) -> None:
    """A spec file's relative `weights:` and (file sources) `model:` made relative to its folder, in place."""
    if isinstance(spec.get("weights"), str) and not Path(spec["weights"]).is_absolute():
        spec["weights"] = str(home / spec["weights"])
    if source.model_file and isinstance(spec["model"], str) and not Path(spec["model"]).is_absolute() \
            and (home / spec["model"]).is_file():
        spec["model"] = str(home / spec["model"])


def artifact_spec(spec, where: str) -> dict:
    """A teacher spec read from an artifact (a store's provenance), resolved: an artifact may name a model but
    never grants trust, so a spec naming a file that runs when loaded (TorchScript), or a source we do not know,
    is refused in one line."""
    if not isinstance(spec, dict):
        raise UserError(f"{where} holds no teacher spec mapping; re-run `pipeline teach`")
    source = SOURCES.get(spec.get("source", "timm"))
    if source is None or source.runs_code or "trust_code" in spec:
        raise UserError(f"{where} names the {spec.get('source')} teacher file {spec.get('model')!r}, a program that "
                        "runs when loaded, refused: trust comes only from a spec you name, never from an artifact; "
                        "give the teacher's spec yourself (e.g. `pipeline store audit --teacher SPEC.yaml`)")
    return resolve_spec(spec)


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


def load_teacher(spec) -> tuple[nn.Module, str]:
    """Build the teacher of `spec` (resolved by resolve_spec) in eval mode; return (model, weights digest)."""
    spec = resolve_spec(spec)
    source = source_of(spec)
    model = source.load(spec)
    digest = source.digest(spec, model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, digest


def teacher_spec(teacher, weights=None) -> dict:
    """The teacher's resolved spec, with `weights` (a file) overriding the spec's own."""
    spec = resolve_spec(teacher)
    if weights:
        spec["weights"], spec["pretrained"] = str(weights), False
    return spec


class Forward:
    """uint8 images -> teacher logits: normalise on the device, optional AMP and channels_last."""

    def __init__(self, model, spec, device, amp="none", channels_last=False):
        self.device, self.channels_last = device, channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=self.memory_format) if channels_last else model.to(device)
        self.normalize = Normalize.of(preprocess_of(spec), device)
        self.amp = amp_dtype(amp)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images).contiguous(memory_format=self.memory_format)
        with autocast(self.device, self.amp):
            return self.model(x).float()


def check_num_classes(spec: dict, num_classes: int) -> None:
    if spec["num_classes"] != num_classes:
        raise UserError(f"teacher '{spec['name']}' predicts {spec['num_classes']} classes but the dataset has "
                        f"{num_classes}; fine-tune the teacher on this dataset (pipeline finetune-teacher) "
                        "or pick a teacher spec with the same classes")
