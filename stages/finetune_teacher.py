"""`pipeline finetune-teacher`: fit a teacher spec to the dataset's classes before `pipeline teach`."""

from pathlib import Path

import click

from pipeline.finetune import finetune_teacher


@click.command("finetune-teacher")
@click.option("--teacher", required=True, help="Teacher spec: a name under manifests/teachers/ or a YAML path.")
@click.option("--shards", "shard_dir", default="data/shards", show_default=True, type=click.Path(path_type=Path),
              help="Shard directory written by `pipeline shard` (train split trains, val split scores).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output directory: weights.safetensors, teacher.yaml (give it to `pipeline teach --teacher`), "
                   "metrics.json; an interrupted run resumes from its resume.safetensors.")
@click.option("--epochs", default=10, show_default=True, help="Passes over the train split.")
@click.option("--batch-size", default=64, show_default=True, help="Images per optimizer step.")
@click.option("--lr", default=2e-3, show_default=True, help="Peak AdamW learning rate (cosine decay, linear warmup).")
@click.option("--weight-decay", default=0.05, show_default=True, help="AdamW weight decay.")
@click.option("--warmup-epochs", default=1.0, show_default=True, help="Epochs of linear learning-rate warmup.")
@click.option("--label-smoothing", default=0.1, show_default=True, help="Cross-entropy label smoothing.")
@click.option("--size", type=int, default=None, help="Training/eval resolution in px [default: the spec's input_size].")
@click.option("--scale-min", default=0.35, show_default=True, help="Smallest RandomResizedCrop area fraction.")
@click.option("--hflip", default=0.5, show_default=True, help="Horizontal flip probability (0 for digits, text).")
@click.option("--auto-augment", default="rand-m9-mstd0.5", show_default=True,
              help="timm RandAugment spec; 'none' turns it off.")
@click.option("--re-prob", default=0.0, show_default=True, help="RandomErasing probability.")
@click.option("--seed", default=0, show_default=True, help="Seed of the initial weights and the views.")
@click.option("--pretrained/--scratch", default=None,
              help="Start from the hub weights (falls back to scratch when they cannot be had) or from scratch "
                   "[default: the spec's `pretrained`].")
@click.option("--workers", default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(teacher, shard_dir, out_dir, auto_augment, **options):
    """Fine-tune TEACHER on the train shards; write weights + a teacher spec that `pipeline teach` accepts."""
    auto_augment = None if str(auto_augment).lower() in ("none", "", "false") else auto_augment
    metrics = finetune_teacher(teacher, shard_dir, out_dir, auto_augment=auto_augment, **options)
    click.echo(f"teacher {metrics['teacher']}: val top-1 {metrics['val_top1']:.2f}% after {metrics['epochs']} "
               f"epochs from {metrics['init']} ({metrics['seconds']:.0f} s); spec {out_dir / 'teacher.yaml'}")
