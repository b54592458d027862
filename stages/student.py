"""`pipeline student`: train a student against stored teacher logits (pipeline.train).

Every recipe field is also a flat option (--alpha, --epochs, --num-branches, --scale-branch/
--no-scale-branch, --identity-branch/--no-identity-branch, ...) so that an ablation is one option or one
params.yaml key (--num-branches 1 --no-scale-branch --no-identity-branch: the stock network); --set key=value
reaches the same fields (and can set one to null). The views are one of them, --plan (ViewPlan fields as
YAML text or a file; only without a teacher store). Run under torchrun for several processes.
"""

import dataclasses
from pathlib import Path

import click

from pipeline.errors import UserError
from pipeline.recipes import FIELDS, TYPES, Recipe, load_recipe, parse_overrides
from pipeline.records import StudentSpec
from stages import options

RECIPE_OPTIONS = [f.name for f in dataclasses.fields(Recipe) if f.name not in ("name", "description")]


def _names(value) -> list[str]:
    """'a,b' or ['a', 'b'] (params.yaml) -> ['a', 'b']."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(v).strip() for v in items if str(v).strip()]


def _weights(value) -> list[float] | None:
    names = _names(value)
    try:
        return [float(w) for w in names] or None
    except ValueError:
        raise UserError(f"--teacher-weights must be numbers like 1,1 (one per teacher), got {value!r}") from None


def _recipe_option(name: str):
    flag = name.replace("_", "-")
    kind = TYPES[name]
    text = f"{FIELDS[name].metadata['help']} [recipe key {name}]"
    shown = "the --recipe's value"  # recipes differ: `pipeline student --recipe R --help` cannot know it here
    if kind is bool:
        return click.option(f"--{flag}/--no-{flag}", name, default=None, help=text, show_default=shown)
    if kind is dict:  # a mapping from params.yaml as it is; on the command line YAML text or a file path
        return click.option(f"--{flag}", name, type=click.UNPROCESSED, default=None, metavar="YAML",
                            help=text + " As YAML text ({FIELD: VALUE}) or a file path.", show_default=shown)
    return click.option(f"--{flag}", name, type=kind, default=None, help=text, show_default=shown)


def _recipe_overrides(values: dict, set_items) -> dict:
    overrides = parse_overrides(set_items)
    for name in RECIPE_OPTIONS:
        value = values.get(name)
        if value is None:
            continue
        if TYPES[name] is dict and isinstance(value, str):
            value = parse_overrides([f"{name}={value}"])[name]
        overrides[name] = value
    return overrides


def _command(func):
    for name in reversed(RECIPE_OPTIONS):
        func = _recipe_option(name)(func)
    return func


@click.command("student")
@click.option("--student", required=True, help="Student spec: manifests/students/NAME.yaml or a YAML path.")
@click.option("--teachers", default="", show_default=True,
              help="Comma-separated teacher names; their stores are found via TEACH_DIR/NAME.json. "
                   "Several teachers = an ensemble (mean of probabilities). Unused when alpha = 0.")
@click.option("--teacher-weights", default=None,
              help="Comma-separated ensemble weights, one per teacher (default: equal).")
@click.option("--recipe", default="ghostnetv3-paper", show_default=True,
              help="Training recipe: manifests/recipes/NAME.yaml or a YAML path.")
@options.shards
@click.option("--teach-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory holding the teacher pointer files NAME.json (pipeline teach --out).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory: model/ema safetensors, student.json, metrics.json, plots.csv, checkpoint.")
@click.option("--curves", "curves_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for the per-epoch metrics.json and plots.csv (DVC metrics/plots) [default: OUT].")
@click.option("--views-from", default=None,
              help="Labels-only students (alpha 0): replay the stored views of teacher NAME's store "
                   "(TEACH_DIR/NAME.json): same plan, V and per-epoch view choice as the KD students, so the "
                   "two differ only in the loss. Default: fresh views from the recipe.")
@click.option("--flat-tail", is_flag=True,
              help="Allow a KD tau that the teacher stores do not keep, with the flat-tail approximation of "
                   "the tempered tail (up to 38 % off at tau 2-4; prints a warning). Default: refuse.")
@options.resume
@options.workers
@click.option("--eval-batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Batch size of the per-epoch validation.")
@click.option("--init", default=None,
              help="Start from pretrained weights: a .safetensors file of the stock architecture (e.g. timm "
                   "mobilenetv2_100, torchvision shufflenet_v2_x1_0, timm ghostnetv2_100 / ghostnetv3_100) or of "
                   "a rep student, or a timm pretrained tag (mobilenetv2_100.ra_in1k). The training form starts "
                   "as exactly that model; a new classifier when the class count differs. [default: random init]")
@options.threads
@click.option("--val-every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Validate every N epochs; the last epoch is always validated on the whole val split.")
@click.option("--val-samples", type=click.IntRange(min=1), default=None,
              help="Per-epoch validation on this many images (a fixed seeded subset) [default: all].")
@click.option("--set", "set_items", multiple=True, metavar="KEY=VALUE",
              help="Any recipe field, value in YAML (e.g. --set ema_decay=null). Repeatable.")
@options.quiet
@_command
def command(student, teachers, teacher_weights, recipe, shards, teach_dir, out, curves_dir, views_from, flat_tail,
            resume, workers, eval_batch_size, init, threads, val_every, val_samples, set_items, quiet, **recipe_values):
    """Train STUDENT with RECIPE against the stored logits of TEACHERS (the student stage)."""
    from pipeline.store import open_pointer
    from pipeline.train import train

    recipe = load_recipe(recipe, _recipe_overrides(recipe_values, set_items))
    spec = StudentSpec.resolve(student)
    names = _names(teachers)
    stores = []
    if recipe.alpha > 0 and names:
        if teach_dir is None:
            raise UserError("--teachers needs --teach-dir (the `pipeline teach --out` directory)")
        stores = [open_pointer(teach_dir / f"{name}.json") for name in names]
    view_store = None
    if views_from:
        if teach_dir is None:
            raise UserError("--views-from needs --teach-dir (the `pipeline teach --out` directory)")
        view_store = open_pointer(teach_dir / f"{views_from}.json")
    train(spec, recipe, shards, out, stores, names, _weights(teacher_weights), resume=resume,
          workers=workers, quiet=quiet, eval_batch_size=eval_batch_size, init=init, threads=threads,
          val_every=val_every, val_samples=val_samples, views_from=view_store, flat_tail=flat_tail,
          curves_dir=curves_dir)
