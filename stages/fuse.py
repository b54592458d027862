"""`pipeline fuse`: a trained student -> checked stock-architecture safetensors + ONNX."""

from pathlib import Path

import click

from pipeline.defaults import CHECKPOINTS
from stages import options


@click.command("fuse")
@click.option("--student-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory of `pipeline student` (student.json, ema.safetensors, model.safetensors).")
@options.shards
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory: fused.safetensors (stock architecture), model.onnx, fuse.json.")
@click.option("--checkpoint", type=click.Choice(CHECKPOINTS), default="best", show_default=True,
              help="Weights to fuse: the better of raw and EMA weights on val (named in student.json), the EMA, "
                   "or the raw model.")
@click.option("--check-images", default=64, show_default=True, type=click.IntRange(min=1),
              help="Validation images on which fused and training form (and ONNX) must agree.")
@click.option("--atol", default=1e-3, show_default=True, type=options.Finite(min=0),
              help="Largest allowed |logit difference|; beyond it (or on a clear top-1 flip) the stage fails.")
@click.option("--onnx/--no-onnx", default=True, show_default=True, help="Also export and check model.onnx.")
@click.option("--name", default=None, help="Student name in fuse.json and the report [default: the student dir name].")
def command(student_dir, shards, out_dir, **kwargs):
    """Fold STUDENT_DIR's re-parameterized branches into the stock inference model, check it, save it."""
    from pipeline.fuse import fuse_student

    fused = fuse_student(student_dir, shards, out_dir, **kwargs)
    check = fused.fused_check
    onnx = f", ONNX max |diff| {fused.onnx_check['max_abs_diff']:.2e}" if fused.onnx_check else ""
    click.echo(f"{fused.student}: {fused.model} -> {fused.stock_model}; fused max |diff| "
               f"{check['max_abs_diff']:.2e}, top-1 agreement {check['argmax_agreement']:.1f}%{onnx}; wrote {out_dir}")
