"""Turn a trained re-parameterized student into its deployable form, and prove it computes the same.

The training-form checkpoint is folded (pipeline.models.to_stock: every RepConvBN -> one conv) into
the STOCK architecture (GhostNetV3 -> timm GhostNetV2, MobileNetV2 -> timm mobilenetv2), compared
with the training form on real validation images, and written as safetensors that load strictly into
the stock model, plus an ONNX file checked against torch with onnxruntime. Nothing is written when a
check fails.
"""

import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save

from pipeline.data.loaders import eval_loader
from pipeline.defaults import CHECKPOINTS
from pipeline.errors import UserError
from pipeline.io import atomic_write_bytes, claim_out_dir, sha256_file, umask_mode
from pipeline.metrics import onnx_runner
from pipeline.records import FUSE_JSON, FUSED, ONNX, STUDENT_JSON, FusedStudent, TrainedStudent, load_safetensors
from pipeline.runtime import Normalize

_logger = logging.getLogger(__name__)


def load_trained_student(student_dir, checkpoint: str = "best"):
    """(training-form model in eval mode, TrainedStudent, checkpoint file used).

    `checkpoint`: best (the default: the one student.json names, the better of raw and EMA weights on
    the validation split), ema (model.safetensors when the run kept no EMA) or model.
    """
    import timm

    import pipeline.models  # noqa: F401  (registers the rep students in timm)

    if checkpoint not in CHECKPOINTS:
        raise UserError(f"--checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
    student_dir = Path(student_dir)
    info = TrainedStudent.read(student_dir)
    path = student_dir / (info.weights if checkpoint == "best" else f"{checkpoint}.safetensors")
    if checkpoint == "ema" and not path.is_file() and (student_dir / "model.safetensors").is_file():
        _logger.warning("%s has no EMA weights (EMA off in its recipe); fusing model.safetensors", student_dir)
        path = student_dir / "model.safetensors"
    if not path.is_file():
        raise UserError(f"{path} not found; re-run `pipeline student --out {student_dir}`")
    try:
        model = timm.create_model(info.model, num_classes=info.num_classes, **info.model_kwargs)
    except (TypeError, RuntimeError) as err:  # knobs the model does not take, a model timm does not know
        raise UserError(f"{student_dir / STUDENT_JSON}: `model: {info.model}` cannot be built with its model_kwargs "
                        f"{info.model_kwargs} ({str(err).splitlines()[0][:120]}); was it edited? re-run `pipeline "
                        f"student --out {student_dir}`") from None
    try:
        model.load_state_dict(load_safetensors(path, f"re-run `pipeline student --out {student_dir}`"))
    except RuntimeError as err:
        raise UserError(f"{path} does not fit {info.model} {info.model_kwargs} "
                        f"({str(err).splitlines()[0]}); was student.json edited?") from None
    return model.eval(), info, path


def validation_images(shard_dir, info: TrainedStudent, count: int) -> torch.Tensor:
    """The first `count` validation images, preprocessed exactly as the student sees them at eval."""
    loader = eval_loader(shard_dir, "val", info.preprocess, batch_size=count)
    return Normalize.of(info.preprocess)(next(iter(loader))["image"][:count])


def compare_outputs(reference: torch.Tensor, candidate: torch.Tensor, atol: float = 1e-3) -> dict:
    """max |diff| of the logits and top-1 agreement (%) between two models on the same inputs.

    `clear_flips` counts top-1 changes on samples whose reference top-two margin exceeds 2 * atol: those
    cannot be ties broken by rounding.
    """
    top2 = reference.topk(min(2, reference.shape[1]), dim=1).values
    margin = (top2[:, 0] - top2[:, -1]) if top2.shape[1] > 1 else torch.full_like(top2[:, 0], float("inf"))
    diff = (reference - candidate).abs().max().item()
    disagree = reference.argmax(1) != candidate.argmax(1)
    return {"max_abs_diff": diff, "argmax_agreement": 100.0 * (1 - disagree.float().mean().item()),
            "clear_flips": int((disagree & (margin > 2 * atol)).sum().item()), "samples": len(reference)}


def check_close(what: str, result: dict, atol: float) -> None:
    if result["max_abs_diff"] > atol or result["clear_flips"]:
        raise UserError(f"{what}: max |diff| {result['max_abs_diff']:.3g} (allowed {atol:g}), top-1 agreement "
                        f"{result['argmax_agreement']:.2f}% on {result['samples']} validation images; the fused "
                        f"model does not compute what the trained one does, nothing written (a bug: please report "
                        f"it with the student.json)")


def export_onnx(model, size: int, path) -> None:
    """ONNX (torch.export based, dynamic batch) written atomically."""
    model.eval()
    example = torch.zeros(2, 3, size, size)
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=["image"], output_names=["logits"],
                                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        program.save(tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def fuse_student(student_dir, shard_dir, out_dir, *, checkpoint: str = "best", check_images: int = 64,
                 atol: float = 1e-3, onnx: bool = True, name: str | None = None) -> FusedStudent:
    """Fold, check, write {out}/fused.safetensors + model.onnx + fuse.json; return fuse.json's FusedStudent.

    Args:
        student_dir, shard_dir, out_dir: a finished `pipeline student` output, its shards (the check images
            are their first val images), and the output directory.
        checkpoint: best, ema or model (see load_trained_student).
        check_images, atol: how many val images the fused and ONNX forms are compared on, and the allowed
            max |logit difference|.
        onnx: also export and check model.onnx.
        name: the student name in fuse.json and the report [default: the student directory's name].
    """
    from pipeline.models import count_params_macs, deploy_spec, stock_model_name, to_stock

    student_dir, out_dir = Path(student_dir), Path(out_dir)
    model, info, weights = load_trained_student(student_dir, checkpoint)
    images = validation_images(shard_dir, info, check_images)
    size = info.preprocess.input_size
    stock = to_stock(model)
    with torch.inference_mode():
        reference, fused_logits = model(images), stock(images)
    fused_check = compare_outputs(reference, fused_logits, atol)
    check_close(f"student {student_dir}: fused vs training form", fused_check, atol)

    claim_out_dir(out_dir, (FUSED, ONNX, FUSE_JSON), "fuse")
    # fuse.json goes first and comes back last, with the digests of the files it describes: a run killed in
    # between leaves no fuse.json, and files changed since are caught by FusedStudent.read
    (out_dir / FUSE_JSON).unlink(missing_ok=True)
    (out_dir / ONNX).unlink(missing_ok=True)
    onnx_check = None
    if onnx:
        export_onnx(stock, size, out_dir / ONNX)
        with torch.inference_mode():
            onnx_check = compare_outputs(fused_logits, onnx_runner(out_dir / ONNX)(images), atol)
        try:
            check_close(f"student {student_dir}: ONNX vs torch", onnx_check, atol)
        except UserError:
            (out_dir / ONNX).unlink(missing_ok=True)
            raise
    stock_model = stock_model_name(info.model)
    atomic_write_bytes(out_dir / FUSED, save({k: v.contiguous() for k, v in stock.state_dict().items()},
                                             metadata={"stock_model": stock_model}))
    train_params, train_macs = count_params_macs(model, size)
    record = FusedStudent(
        student=name or student_dir.name, student_dir=str(student_dir), checkpoint=weights.name,
        checkpoint_choice=checkpoint if checkpoint != "best" else info.weights_choice,
        model=info.model, model_kwargs=info.model_kwargs, stock_model=stock_model,
        deploy=deploy_spec(info.model, info.num_classes), num_classes=info.num_classes, preprocess=info.preprocess,
        teachers=info.teachers, recipe=info.recipe, init=info.init, fused_check=fused_check, onnx_check=onnx_check,
        training_form={"params": train_params, "macs": train_macs}, val_curve=info.val_curve,
        sha256={f: sha256_file(out_dir / f) for f in (FUSED, ONNX) if (out_dir / f).is_file()})
    record.write(out_dir)
    return record
