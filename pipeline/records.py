"""What stages hand each other: a student spec, a trained student (student.json), a fused student (fuse.json).

One frozen dataclass per hand-off, and it alone spells the keys: the writer writes every field, the
reader refuses a file with a missing or an unknown key (a file from an older version, or edited by
hand) in one line that names the file and the stage to re-run. Nothing downstream reads a raw dict or
guesses a default.

A student spec (manifests/students/*.yaml) states only what differs from its model's timm
`pretrained_cfg`, which owns the preprocessing (input_size, mean, std, interpolation; the eval crop_pct is the
dataset's unless stated) and the smallest input size; the re-parameterization knobs default in the model
(pipeline.models.rep.BRANCH_DEFAULTS). Files spell the preprocessing as five flat keys (pipeline.preprocess.KEYS);
the records hold it as one Preprocess.
"""

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.errors import UserError
from pipeline.io import atomic_write_bytes, atomic_write_json, check_keys, read_json, sha256_file
from pipeline.manifests import load_spec, spec_path
from pipeline.preprocess import KEYS, Preprocess, timm_defaults

STUDENT_JSON = "student.json"
FUSE_JSON = "fuse.json"
FUSED = "fused.safetensors"
ONNX = "model.onnx"


def _spell(name: str) -> tuple:
    """The keys a field is written as: a Preprocess is its five keys, in its place."""
    return KEYS if name == "preprocess" else (name,)


def _floats(values) -> tuple:
    return tuple(float(v) for v in values)


def _nested(data: dict, where: str, fix: str, data_crop: bool = False) -> dict:
    """A file's keys as the record's fields: the five preprocessing keys as one Preprocess, checked."""
    rest = {key: value for key, value in data.items() if key not in KEYS}
    return {**rest, "preprocess": Preprocess.from_dict(data, where, fix, data_crop)}


def _flat(record) -> dict:
    """A record as its file spells it: its fields in order, the Preprocess as its five keys in its place."""
    data = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        data.update(value.to_dict() if f.name == "preprocess" else {f.name: value})
    return data


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a teacher name names files: {root}/{name}-{key}.zarr, {name}.json
DROP_RATES = ("drop_rate", "drop_path_rate")  # timm.create_model's dropout knobs, each in [0, 1)


def check_model_kwargs(kwargs, where: str, fix: str) -> dict:
    """The one allow-list of `model_kwargs`, for specs and records alike: the re-parameterization knobs
    (pipeline.models.rep.BRANCH_DEFAULTS) and timm's drop rates, each in its range (None: the model's default).
    Anything else is refused: timm.create_model also takes arguments that name files to load (checkpoint_path,
    pretrained_cfg_overlay), and what a spec or record says must never make us read one."""
    from pipeline.models.rep import BRANCH_DEFAULTS, check_branch_bn_init, check_num_branches

    if not isinstance(kwargs, dict):
        raise UserError(f"{where}: `model_kwargs` must be a mapping of timm.create_model arguments; {fix}")
    allowed = [*BRANCH_DEFAULTS, *DROP_RATES]
    unknown = sorted(str(k) for k in kwargs if k not in allowed)
    if unknown:
        raise UserError(f"{where}: model_kwargs {', '.join(unknown)} not allowed (only {', '.join(allowed)}: another "
                        f"timm argument may name a file to load); {fix}")
    ranges = {"num_branches": check_num_branches, "branch_bn_init": check_branch_bn_init}  # the models' own checks
    for key, value in kwargs.items():
        if value is None:
            continue
        if key in ranges:
            try:
                ranges[key](value)
            except ValueError as err:
                raise UserError(f"{where}: model_kwargs.{err}; {fix}") from None
        elif key in DROP_RATES:
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1):  # not NaN
                raise UserError(f"{where}: model_kwargs.{key} must be a number in [0, 1), got {value!r}; {fix}")
        elif not isinstance(value, bool):  # the branch switches
            raise UserError(f"{where}: model_kwargs.{key} must be true or false, got {value!r}; {fix}")
    return kwargs


# ---------------------------------------------------------------------------------------------- student spec

@dataclass(frozen=True)
class StudentSpec:
    """A resolved manifests/students spec: the timm model to train and how its inputs are prepared."""

    name: str
    model: str                      # a timm model name (importing pipeline.models registers the rep_* ones)
    model_kwargs: dict              # more timm.create_model arguments; unset rep knobs: the model's defaults
    preprocess: Preprocess          # input_size: the recipe's img_size wins; crop_pct None: the shards' manifest.json
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
        from pipeline.models import timm_cfg  # importing pipeline.models registers the rep_* students in timm

        cfg = timm_cfg(spec["model"], where, fix)
        if cfg is None:
            raise UserError(f"{where}: {spec['model']!r} is not a timm model (see timm.list_models()); {fix}")
        defaults = {"model_kwargs": {}, **timm_defaults(cfg), "crop_pct": None,
                    "min_input_size": cfg.min_input_size[-1] if cfg.min_input_size else None}
        spec = {**defaults, **spec}
        check_keys(cls, spec, where, fix, _spell)
        check_model_kwargs(spec["model_kwargs"], where, fix)
        low = spec["min_input_size"]
        if low is not None and not (isinstance(low, int) and not isinstance(low, bool) and low >= 1):
            raise UserError(f"{where}: `min_input_size: {low!r}` must be a number of pixels or null; {fix}")
        return cls(**_nested(spec, where, fix, data_crop=True))

    def check_size(self, size: int) -> None:
        """UserError unless the architecture computes `size` px inputs, whatever min_input_size says (GhostNet's DFC
        attention needs 33 px, a ViT its own size): tried once on the meta device (no memory, no arithmetic), so a
        size it cannot take is one line before any work starts, not a traceback in the first step."""
        import timm
        import torch

        try:
            with torch.device("meta"):
                timm.create_model(self.model, num_classes=1).eval()(torch.empty(1, 3, size, size))
        except (ValueError, AssertionError) as err:  # the models' own input checks
            first = (str(err).strip().splitlines() or [""])[0][:160]
            raise UserError(f"student {self.model} cannot take {size} px inputs ({first}); set img_size (--img-size) "
                            "larger") from None

    @classmethod
    def read(cls, path) -> "StudentSpec":
        return cls.resolve(Path(path))

    def write(self, path) -> None:
        """The fully resolved spec as YAML (what `resolve` reads back unchanged)."""
        atomic_write_bytes(path, yaml.safe_dump(self.to_dict(), sort_keys=False).encode())

    def to_dict(self) -> dict:
        return _flat(self)


def _check_record(data: dict, where: str, fix: str) -> None:
    """The fields student.json and fuse.json share, each of its type and range, as a spec's are (the preprocessing:
    Preprocess.from_dict)."""
    def bad(key, want):
        raise UserError(f"{where}: `{key}: {data[key]!r}` must be {want}; {fix}")

    if not isinstance(data["model"], str):
        bad("model", "a timm model name")
    if not isinstance(data["num_classes"], int) or isinstance(data["num_classes"], bool) or data["num_classes"] < 1:
        bad("num_classes", "a positive integer")
    if not isinstance(data["teachers"], list) or not all(isinstance(t, str) and NAME.fullmatch(t) and ".." not in t
                                                          for t in data["teachers"]):
        bad("teachers", "a list of plain teacher names")
    if not isinstance(data["recipe"], dict):
        bad("recipe", "a mapping of the recipe's fields")
    check_model_kwargs(data["model_kwargs"], where, fix)


def _check_digests(folder: Path, digests, where: str, fix: str, *required: str) -> None:
    """Every file a record lists (name -> sha256, `required` among them) still bears the digest it was written with."""
    if not isinstance(digests, dict) or not all(name in digests for name in required):
        raise UserError(f"{where} lists no digest of {', '.join(required)} (an interrupted run); {fix}")
    for name, digest in digests.items():
        file = folder / Path(str(name)).name
        if not file.is_file() or sha256_file(file) != digest:
            raise UserError(f"{file} is missing or is not the file {where} describes (changed, corrupt, or another "
                            f"or an interrupted run); {fix}")


# ------------------------------------------------------------------------------------------- trained student

@dataclass(frozen=True)
class TrainedStudent:
    """student.json: what `pipeline student` trained, and with what (written last, by train._save_final)."""

    model: str
    model_kwargs: dict              # as built: the rep knobs always included (pipeline.models.rep.rep_settings)
    num_classes: int
    preprocess: Preprocess          # input_size: the size it trained at; crop_pct: the spec's, else the dataset's
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
    val_curve: list                 # per validated epoch: epoch, top1 (and ema_top1), val_images (train.val_curve)
    sha256: dict                    # file name -> digest of the weights files this record describes

    def __post_init__(self):
        object.__setattr__(self, "teachers", tuple(self.teachers))  # JSON gives lists
        if self.teacher_weights is not None:
            object.__setattr__(self, "teacher_weights", _floats(self.teacher_weights))

    @classmethod
    def read(cls, student_dir) -> "TrainedStudent":
        """{student_dir}/student.json; a missing, unreadable, older or edited file is one line naming the fix."""
        path = Path(student_dir) / STUDENT_JSON
        fix = f"re-run `pipeline student --out {student_dir}`"
        if not path.is_file():
            raise UserError(f"{path} not found: {student_dir} is not a finished student; {fix} first")
        data = read_json(path, fix)
        check_keys(cls, data, str(path), fix, _spell)
        _check_record(data, str(path), fix)
        _check_digests(Path(student_dir), data["sha256"], str(path), fix, str(data["weights"]))
        return cls(**_nested(data, str(path), fix))

    def write(self, student_dir) -> None:
        atomic_write_json(Path(student_dir) / STUDENT_JSON, _flat(self))


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
    preprocess: Preprocess          # student.json's
    teachers: tuple
    recipe: dict
    init: dict | None
    fused_check: dict               # fused vs training form (pipeline.fuse.compare_outputs)
    onnx_check: dict | None         # ONNX vs torch; None: no model.onnx
    training_form: dict             # params and MACs before fusion
    val_curve: list                 # student.json's: the training curve the report draws
    sha256: dict                    # file name -> digest of every file this record describes

    def __post_init__(self):
        object.__setattr__(self, "teachers", tuple(self.teachers))  # JSON gives lists

    @classmethod
    def read(cls, fused_dir) -> "FusedStudent":
        """{fused_dir}/fuse.json, with every file it lists still bearing the digest it was written with."""
        fused_dir = Path(fused_dir)
        path = fused_dir / FUSE_JSON
        fix = f"re-run `pipeline fuse --out {fused_dir}`"
        if not path.is_file():
            raise UserError(f"{path} not found; run `pipeline fuse --out {fused_dir}` first")
        data = read_json(path, fix)
        check_keys(cls, data, str(path), fix, _spell)
        _check_record(data, str(path), fix)
        _check_digests(fused_dir, data["sha256"], str(path), fix, FUSED)
        return cls(**_nested(data, str(path), fix))

    def write(self, fused_dir) -> None:
        atomic_write_json(Path(fused_dir) / FUSE_JSON, _flat(self))


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
    fix = f"re-run `pipeline fuse --out {fused_dir}`"
    try:
        model.load_state_dict(load_safetensors(Path(fused_dir) / FUSED, fix), strict=True)
    except RuntimeError as err:
        raise UserError(f"{Path(fused_dir) / FUSED} does not fit the {record.stock_model} that {FUSE_JSON} names "
                        f"({str(err).splitlines()[0][:120]}); {fix}") from None
    return model.eval(), record
