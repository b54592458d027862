"""`pipeline finetune-teacher`: fit a teacher spec to the dataset's classes and to the views before `pipeline teach`."""

from pathlib import Path

import click

from stages import options

FROM_TEACH = "teach"  # --plan default: params.yaml's `teach: plan:` (and `teach: num-views:`)


def _teach_section() -> dict:
    """params.yaml's `teach:` section (the root command's default_map), {} if none."""
    return (click.get_current_context().find_root().default_map or {}).get("teach") or {}


@click.command("finetune-teacher")
@click.option("--teacher", required=True, help="Teacher spec: a name under manifests/teachers/ or a YAML path.")
@options.shards
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output directory: weights.safetensors, teacher.yaml (give it to `pipeline teach --teacher`), "
                   "metrics.json; checkpoint.safetensors after each epoch until the run finishes (--resume).")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(min=1),
              help="Passes over the train split.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Images per optimizer step.")
@click.option("--lr", default=2e-3, show_default=True, type=options.Finite(min=0, min_open=True),
              help="Peak AdamW learning rate (cosine decay, linear warmup).")
@click.option("--weight-decay", default=0.05, show_default=True, type=options.Finite(min=0), help="AdamW weight decay.")
@click.option("--warmup-epochs", default=1.0, show_default=True, type=options.Finite(min=0),
              help="Epochs of linear learning-rate warmup.")
@click.option("--label-smoothing", default=0.1, show_default=True, type=options.Finite(0, 1, max_open=True),
              help="Cross-entropy label smoothing.")
@click.option("--img-size", type=options.PIXELS, default=None,
              help="Training/eval resolution in px [default: the spec's input_size].")
@click.option("--plan", default=FROM_TEACH, show_default=True,
              help="View plan to train on: 'teach' = params.yaml's `teach: plan:` (the views `pipeline teach` "
                   "stores, so the teacher is fitted to what it will label; without one, ViewPlan's defaults, "
                   "as teach's), or a YAML file of ViewPlan fields.")
@click.option("--num-views", type=click.IntRange(min=1), default=None,
              help="Views per image (V) the epochs cycle through [default: params.yaml's teach num-views with "
                   "--plan teach, else --epochs].")
@click.option("--name", default=None,
              help="Name of the fine-tuned teacher (its teacher.yaml `name:`, hence its store, its pointer "
                   "{teach --out}/{name}.json and its rows in the report) [default: TEACHER's name + '-ft']; never "
                   "TEACHER's own, so the fitted and the unfitted teacher are told apart. Give one per fine-tune "
                   "when several of one teacher are taught into the same directory.")
@options.threads
@click.option("--seed", default=0, show_default=True,
              help="Seed of the initial weights and the sample order (the views' seed is the plan's).")
@click.option("--pretrained/--scratch", default=None,
              help="Start from the hub weights (falls back to scratch when they cannot be had) or from scratch "
                   "[default: the spec's `pretrained`].")
@options.resume
@options.workers
@options.quiet
def command(teacher, shards, out_dir, plan, num_views, **kwargs):
    """Fine-tune TEACHER on the train shards (timm or TorchScript); write weights + a teacher spec for `pipeline teach`."""
    from pipeline.finetune import finetune_teacher

    if plan == FROM_TEACH:
        plan = _teach_section().get("plan")
        num_views = num_views or (_teach_section().get("num-views") if plan else None)
    metrics = finetune_teacher(teacher, shards, out_dir, plan=options.PlanParam().convert(plan, None, None),
                               num_views=num_views, **kwargs)
    before, after = metrics["before"], metrics["after"]
    click.echo(f"teacher {metrics['teacher']} -> {metrics['name']}: top-1 clean val {before['clean']:.2f}% -> {after['clean']:.2f}%, "
               f"on views {before['views']:.2f}% -> {after['views']:.2f}% after {metrics['epochs']} epochs from "
               f"{metrics['init']} ({metrics['seconds']:.0f} s); spec {out_dir / 'teacher.yaml'}")
