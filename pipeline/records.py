"""What stages hand each other: a student spec, a trained student (student.json), a fused student (fuse.json).

One frozen dataclass per hand-off, and it alone spells the keys: the writer writes every field, the
reader refuses a file with a missing or an unknown key (a file from an older version, or edited by
hand) in one line that names the file and the stage to re-run. Nothing downstream reads a raw dict or
guesses a default.

A student spec (manifests/students/*.yaml) states only what differs from its model's timm
`pretrained_cfg`, which owns the preprocessing (input_size, mean, std, interpolation) and the smallest
input size; the re-parameterization knobs default in the model (pipeline.models.rep.BRANCH_DEFAULTS).
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.errors import UserError
from pipeline.io import atomic_write_bytes, atomic_write_json, sha256_file
from pipeline.manifests import load_spec, spec_path

STUDENT_JSON = "student.json"
FUSE_JSON = "fuse.json"
FUSED = "fused.safetensors"
ONNX = "model.onnx"


def _check_keys(cls, data, where: str, fix: str) -> None:
    """`data` is a mapping with every required field of `cls` and nothing else, or one UserError line."""
    if not isinstance(data, dict):
        raise UserError(f"{where} is not a mapping of {cls.__name__} keys; {fix}")
    names = [f.name for f in dataclasses.fields(cls)]
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    unknown, missing = sorted(set(data) - set(names)), [k for k in required if k not in data]
    if unknown or missing:
        parts = ([f"unknown keys {unknown}"] if unknown else []) + ([f"no {', '.join(missing)}"] if missing else [])
        raise UserError(f"{where}: {' and '.join(parts)} (allowed: {', '.join(names)}); {fix}")


def _read_json(path: Path, fix: str):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is unreadable ({type(err).__name__}); {fix}") from None


def _floats(values) -> tuple:
    return tuple(float(v) for v in values)


# ---------------------------------------------------------------------------------------------- student spec

@dataclass(frozen=True)
class StudentSpec:
    """A resolved manifests/students spec: the timm model to train and how its inputs are prepared."""

    name: str
    model: str                      # a timm model name (importing pipeline.models registers the rep_* ones)
    model_kwargs: dict              # more timm.create_model arguments; unset rep knobs: the model's defaults
    input_size: int                 # px (the recipe's img_size wins)
    mean: tuple
    std: tuple
    interpolation: str
    crop_pct: float | None          # eval centre crop; None: the dataset's (the shards' manifest.json)
    min_input_size: int | None      # smallest input side the student trains at; None: no limit
    description: str = ""

    @classmethod
    def resolve(cls, name_or_spec) -> "StudentSpec":
        """A spec from manifests/students/{name}.yaml, a YAML path or a mapping; unset keys from timm's cfg."""
        if isinstance(name_or_spec, (str, Path)):
            spec, where = load_spec("students", name_or_spec), str(spec_path("students", name_or_spec))
        else:
            spec = dict(name_or_spec)
            where = f"student spec '{spec.setdefault('name', 'student')}'"
        fix = "fix it in the spec (keys that are not given come from the model's timm pretrained_cfg)"
        if not isinstance(spec.get("model"), str):
            raise UserError(f"{where}: `model:` must name a timm model (e.g. rep_ghostnetv3_100); {fix}")
        import timm

        import pipeline.models  # noqa: F401  (registers the rep_* students in timm)

        cfg = timm.models.get_pretrained_cfg(spec["model"])
        if cfg is None:
            raise UserError(f"{where}: {spec['model']!r} is not a timm model (see timm.list_models()); {fix}")
        defaults = {"model_kwargs": {}, "input_size": cfg.input_size[-1], "mean": cfg.mean, "std": cfg.std,
                    "interpolation": cfg.interpolation, "crop_pct": None,
                    "min_input_size": cfg.min_input_size[-1] if cfg.min_input_size else None}
        spec = {**defaults, **spec}
        _check_keys(cls, spec, where, fix)
        return cls(**spec)._checked(where, fix)

    def _checked(self, where: str, fix: str) -> "StudentSpec":
        from pipeline.models.rep import check_num_branches

        if not isinstance(self.model_kwargs, dict):
            raise UserError(f"{where}: `model_kwargs` must be a mapping of timm.create_model arguments; {fix}")
        if self.model_kwargs.get("num_branches") is not None:
            try:
                check_num_branches(self.model_kwargs["num_branches"])
            except ValueError as err:
                raise UserError(f"{where}: model_kwargs.{err}; {fix}") from None
        size = self.input_size[-1] if isinstance(self.input_size, (list, tuple)) else self.input_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise UserError(f"{where}: `input_size: {self.input_size!r}` must be a number of pixels; {fix}")
        for key in ("mean", "std"):
            values = getattr(self, key)
            if (not isinstance(values, (list, tuple)) or len(values) != 3
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
                raise UserError(f"{where}: `{key}: {values!r}` must be three numbers (R, G, B); {fix}")
        if self.crop_pct is not None and not (isinstance(self.crop_pct, (int, float)) and 0 < self.crop_pct <= 1):
            raise UserError(f"{where}: `crop_pct: {self.crop_pct!r}` must be in (0, 1] or null; {fix}")
        return dataclasses.replace(self, input_size=size, mean=_floats(self.mean), std=_floats(self.std),
                                   crop_pct=None if self.crop_pct is None else float(self.crop_pct))

    @classmethod
    def read(cls, path) -> "StudentSpec":
        return cls.resolve(Path(path))

    def write(self, path) -> None:
        """The fully resolved spec as YAML (what `resolve` reads back unchanged)."""
        atomic_write_bytes(path, yaml.safe_dump(self.to_dict(), sort_keys=False).encode())

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}


def _freeze_preprocessing(record) -> None:
    """The preprocessing fields student.json and fuse.json both carry, as tuples (JSON gives lists)."""
    object.__setattr__(record, "mean", _floats(record.mean))
    object.__setattr__(record, "std", _floats(record.std))
    object.__setattr__(record, "teachers", tuple(record.teachers))


# ------------------------------------------------------------------------------------------- trained student

@dataclass(frozen=True)
class TrainedStudent:
    """student.json: what `pipeline student` trained, and with what (written last, by train._save_final)."""

    model: str
    model_kwargs: dict              # as built: the rep knobs always included (pipeline.models.rep.rep_settings)
    num_classes: int
    input_size: int
    mean: tuple
    std: tuple
    crop_pct: float
    interpolation: str
    teachers: tuple
    teacher_weights: tuple | None
    recipe: dict                    # Recipe.to_dict()
    view_plan: dict                 # ViewPlan.to_dict()
    num_views: int
    epochs: int
    init: dict | None               # pipeline.models.pretrained_overlay's record
    threads: int
    views_from: str | None          # key of the store whose views a labels-only student replayed
    weights: str                    # model.safetensors or ema.safetensors: the one fuse deploys by default
    weights_choice: dict            # the rule and the val top-1 figures behind `weights`

    def __post_init__(self):
        _freeze_preprocessing(self)
        if self.teacher_weights is not None:
            object.__setattr__(self, "teacher_weights", _floats(self.teacher_weights))

    @classmethod
    def read(cls, student_dir) -> "TrainedStudent":
        """{student_dir}/student.json; a missing, unreadable, older or edited file is one line naming the fix."""
        path = Path(student_dir) / STUDENT_JSON
        fix = f"re-run `pipeline student --out {student_dir}`"
        if not path.is_file():
            raise UserError(f"{path} not found: {student_dir} is not a finished student; {fix} first")
        data = _read_json(path, fix)
        _check_keys(cls, data, str(path), fix)
        return cls(**data)

    def write(self, student_dir) -> None:
        atomic_write_json(Path(student_dir) / STUDENT_JSON, dataclasses.asdict(self))


# --------------------------------------------------------------------------------------------- fused student

@dataclass(frozen=True)
class FusedStudent:
    """fuse.json: the deployable student, where it came from, the checks it passed and its files' digests."""

    student: str                    # the name in the report
    student_dir: str
    checkpoint: str                 # the training-form weights file that was fused
    checkpoint_choice: dict | str   # ema / model as asked, or student.json's weights_choice (best)
    model: str
    model_kwargs: dict
    stock_model: str                # the stock architecture the fused weights load into
    deploy: dict                    # pipeline.models.deploy_spec: build it with timm / torchvision alone
    num_classes: int
    input_size: int
    mean: tuple
    std: tuple
    crop_pct: float
    interpolation: str
    teachers: tuple
    recipe: dict
    init: dict | None
    fused_check: dict               # fused vs training form (pipeline.fuse.compare_outputs)
    onnx_check: dict | None         # ONNX vs torch; None: no model.onnx
    training_form: dict             # params and MACs before fusion
    sha256: dict                    # file name -> digest of every file this record describes

    def __post_init__(self):
        _freeze_preprocessing(self)

    @classmethod
    def read(cls, fused_dir) -> "FusedStudent":
        """{fused_dir}/fuse.json, with every file it lists still bearing the digest it was written with."""
        fused_dir = Path(fused_dir)
        path = fused_dir / FUSE_JSON
        fix = f"re-run `pipeline fuse --out {fused_dir}`"
        if not path.is_file():
            raise UserError(f"{path} not found; run `pipeline fuse --out {fused_dir}` first")
        data = _read_json(path, fix)
        _check_keys(cls, data, str(path), fix)
        record = cls(**data)
        if not isinstance(record.sha256, dict) or FUSED not in record.sha256:
            raise UserError(f"{path} lists no digest of {FUSED} (an interrupted fuse); {fix}")
        for name, digest in record.sha256.items():
            file = fused_dir / Path(str(name)).name
            if not file.is_file() or sha256_file(file) != digest:
                raise UserError(f"{file} is missing or is not the file {path} describes (another or an "
                                f"interrupted fuse run); {fix}")
        return record

    def write(self, fused_dir) -> None:
        atomic_write_json(Path(fused_dir) / FUSE_JSON, dataclasses.asdict(self))


def load_safetensors(path, fix: str) -> dict:
    """The tensors of a weights file a record names; an unreadable one is one line ending in `fix`."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...: an unreadable user file
        first = (str(err).strip().splitlines() or [""])[0][:120]
        raise UserError(f"{path} is not a readable safetensors file ({first}); {fix}") from None


def load_fused(fused_dir):
    """(stock model in eval mode, FusedStudent): what a deployment does, with our helper for the stock arch."""
    from pipeline.models import create_stock_model

    record = FusedStudent.read(fused_dir)
    model = create_stock_model(record.stock_model, num_classes=record.num_classes)
    model.load_state_dict(load_safetensors(Path(fused_dir) / FUSED, f"re-run `pipeline fuse --out {fused_dir}`"),
                          strict=True)
    return model.eval(), record
