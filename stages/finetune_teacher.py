"""`pipeline finetune-teacher`: fit a teacher spec to the dataset's classes and to the views before `pipeline teach`."""

from pathlib import Path

import click

from pipeline.errors import UserError
from stages import options
from stages.teach import PlanParam

FROM_TEACH = "teach"  # --plan default: params.yaml's `teach: plan:` (and `teach: num-views:`)


def _scale(value) -> tuple[float, float]:
    """'0.35,1' or [0.35, 1] (params.yaml) -> (0.35, 1.0), as the student's --scale."""
    items = value if isinstance(value, (list, tuple)) else str(value).strip("[]").split(",")
    try:
        low, high = (float(v) for v in items)
    except ValueError:
        raise UserError(f"--scale must be MIN,MAX area fractions like 0.35,1.0, got {value!r}") from None
    return low, high


def _teach_section() -> dict:
    """params.yaml's `teach:` section (the root command's default_map), {} if none."""
    return (click.get_current_context().find_root().default_map or {}).get("teach") or {}


@click.command("finetune-teacher")
@click.option("--teacher", required=True, help="Teacher spec: a name under manifests/teachers/ or a YAML path.")
@options.shards
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output directory: weights.safetensors, teacher.yaml (give it to `pipeline teach --teacher`), "
                   "metrics.json; checkpoint.safetensors after each epoch until the run finishes (--resume).")
@click.option("--epochs", default=10, show_default=True, help="Passes over the train split.")
@click.option("--batch-size", default=64, show_default=True, help="Images per optimizer step.")
@click.option("--lr", default=2e-3, show_default=True, help="Peak AdamW learning rate (cosine decay, linear warmup).")
@click.option("--weight-decay", default=0.05, show_default=True, help="AdamW weight decay.")
@click.option("--warmup-epochs", default=1.0, show_default=True, help="Epochs of linear learning-rate warmup.")
@click.option("--label-smoothing", default=0.1, show_default=True, help="Cross-entropy label smoothing.")
@click.option("--img-size", type=click.IntRange(min=8), default=None,
              help="Training/eval resolution in px [default: the spec's input_size].")
@click.option("--plan", default=FROM_TEACH, show_default=True,
              help="View plan to train on: 'teach' = params.yaml's `teach: plan:` (the views `pipeline teach` "
                   "stores, so the teacher is fitted to what it will label; falls back to 'flags' without one), "
                   "a YAML file of ViewPlan fields, or 'flags' = --scale/--hflip/--auto-augment/--re-prob.")
@click.option("--num-views", type=click.IntRange(min=1), default=None,
              help="Views per image (V) the epochs cycle through [default: params.yaml's teach num-views with "
                   "--plan teach, else --epochs].")
@options.threads
@click.option("--scale", default="0.35,1.0", show_default=True,
              help="RandomResizedCrop area range MIN,MAX (as the student's --scale).")
@click.option("--hflip", default=0.5, show_default=True, help="Horizontal flip probability (0 for digits, text).")
@click.option("--auto-augment", default="rand-m9-mstd0.5", show_default=True,
              help="timm RandAugment spec; 'none' turns it off.")
@click.option("--re-prob", default=0.0, show_default=True, help="RandomErasing probability.")
@click.option("--seed", default=0, show_default=True, help="Seed of the initial weights and the views.")
@click.option("--pretrained/--scratch", default=None,
              help="Start from the hub weights (falls back to scratch when they cannot be had) or from scratch "
                   "[default: the spec's `pretrained`].")
@options.resume
@options.workers
@options.quiet
def command(teacher, shards, out_dir, auto_augment, plan, num_views, scale, **kwargs):
    """Fine-tune TEACHER on the train shards (timm or TorchScript); write weights + a teacher spec for `pipeline teach`."""
    from pipeline.finetune import finetune_teacher

    auto_augment = None if str(auto_augment).lower() in ("none", "", "false") else auto_augment
    view_plan = None
    if plan == FROM_TEACH and _teach_section().get("plan"):
        view_plan = PlanParam().convert(_teach_section()["plan"], None, None)
        num_views = num_views or _teach_section().get("num-views")
    elif plan not in (FROM_TEACH, "flags"):
        view_plan = PlanParam().convert(plan, None, None)
    metrics = finetune_teacher(teacher, shards, out_dir, auto_augment=auto_augment, plan=view_plan,
                               num_views=num_views, scale=_scale(scale), **kwargs)
    before, after = metrics["before"], metrics["after"]
    click.echo(f"teacher {metrics['teacher']}: top-1 clean val {before['clean']:.2f}% -> {after['clean']:.2f}%, "
               f"on views {before['views']:.2f}% -> {after['views']:.2f}% after {metrics['epochs']} epochs from "
               f"{metrics['init']} ({metrics['seconds']:.0f} s); spec {out_dir / 'teacher.yaml'}")
