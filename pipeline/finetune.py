"""Fine-tune a teacher spec on the train shards: fit its classes, and fit it to the views it will label.

Function matching only helps when the teacher is right on the augmented views: a teacher that is good
on clean images can be poor on strong views, and KD from it can lose to labels only. So the teacher trains
on the SAME view plan that `pipeline teach` uses, and the summary gives top-1 on clean val and on val views
before and after.

timm teachers start from their pretrained weights where they can be had (the classifier is replaced to
fit the dataset's classes) and from scratch otherwise; a TorchScript teacher trains its own parameters
(its class count must already match) and is saved as TorchScript again.

Fine-tuning is training with alpha = 0 on the teacher: the epochs run in the student's loop (pipeline.loop.fit)
with a labels-only KDLoss and a Recipe of AdamW + cosine to lr/100 after a linear warmup from lr/100, label
smoothing, no EMA. So it shares the student's checkpoint and resume policy: `--resume` continues from
{out}/checkpoint.safetensors after the last finished epoch, a checkpoint of other settings is refused (one
line), and a finished run removes its checkpoint (the output directory is a persistent DVC output, where a
stale resume point would outlive the run). The result is a weights file plus a teacher spec YAML that
`pipeline teach --teacher {out}/teacher.yaml` accepts.
"""

import dataclasses
import hashlib
import time
from pathlib import Path

import torch
import yaml

from pipeline.data.loaders import eval_loader, student_loader
from pipeline.data.shards import ShardManifest
from pipeline.data.views import ViewPlan
from pipeline.errors import UserError
from pipeline.io import atomic_write_bytes, atomic_write_json, claim_out_dir
from pipeline.loop import CHECKPOINT, KDLoss, fit
from pipeline.metrics import accuracy
from pipeline.recipes import Recipe
from pipeline.runtime import Normalize, set_threads
from pipeline.teachers import NAME, SOURCES, preprocess_of, resolve_spec, source_of

SPEC = "teacher.yaml"
METRICS = "metrics.json"


def finetune_teacher(teacher, shard_dir, out_dir, *, epochs: int = 10, batch_size: int = 64, lr: float = 2e-3,
                     weight_decay: float = 0.05, warmup_epochs: float = 1.0, label_smoothing: float = 0.1,
                     img_size: int | None = None, seed: int = 0, pretrained: bool | None = None, workers: int = 0,
                     quiet: bool = False, plan=None, num_views: int | None = None, threads: int | None = None,
                     resume: bool = False, name: str | None = None) -> dict:
    """Train, write the fine-tuned teacher (its source's file: weights.safetensors, teacher.pt) + teacher.yaml +
    metrics.json into `out_dir`; return the metrics.

    Args:
        teacher: a manifests/teachers spec (name, path or dict); its weights are the start.
        shard_dir, out_dir: the `pipeline shard` output; where the fine-tuned teacher goes (resumable).
        epochs, batch_size, lr, weight_decay, warmup_epochs, label_smoothing, seed: the schedule (AdamW,
            cosine to lr/100 after a linear warmup from lr/100: the fields of a Recipe, see finetune_recipe).
        img_size: training input size [default: the spec's input_size].
        pretrained: override the spec's `pretrained` (None keeps it).
        plan / num_views: the view plan (what ViewPlan.load takes; None: ViewPlan's defaults, as
            `pipeline teach`'s) and V [default: epochs]: give teach's, so the teacher trains on the views it
            will label.
        workers, quiet, threads: DataLoader workers, no progress bars, torch CPU threads (None: torch's choice).
        resume: continue an interrupted run of the same settings from {out}/checkpoint.safetensors (pipeline.loop's
            policy: a checkpoint of other settings is refused).
        name: the fine-tuned teacher's name [default: `{source name}-ft`]; never the source's, so that its store,
            pointer and report rows are told apart from the source teacher's.
    """
    set_threads(threads)
    spec = resolve_spec(teacher)
    manifest = ShardManifest.read(shard_dir)
    num_classes = manifest.num_classes
    size = int(img_size or spec["input_size"])
    pre = dataclasses.replace(preprocess_of(spec), input_size=size)  # scored on clean val at the size it trains at
    if epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {epochs}")
    name = tuned_name(spec["name"], name)
    out_dir = Path(out_dir)
    tuned_files = [s.tuned_file for s in SOURCES.values() if s.tuned_file]  # what each source saves
    claim_out_dir(out_dir, (*tuned_files, SPEC, METRICS, CHECKPOINT), "finetune-teacher")

    torch.manual_seed(seed)
    use_pretrained = spec.get("pretrained", False) if pretrained is None else pretrained
    source = source_of(spec)
    model, origin = source.trainable(spec, num_classes, bool(use_pretrained))
    plan = ViewPlan.load(plan)
    num_views = num_views or epochs
    val = eval_loader(shard_dir, "val", pre, batch_size=128, workers=workers)
    normalize = Normalize.of(pre)  # of the view loaders' uint8 images (finetuning is on the CPU)

    def views_top1() -> float:
        """top-1 on one view per val image (the plan at the teacher's size)."""
        views = student_loader(shard_dir, "val", plan, num_views=num_views, size=size, batch_size=128,
                               seed=plan.seed, epoch=0, workers=workers)
        return accuracy(model, views, normalize)[1]

    def epoch_loader(epoch):
        return student_loader(shard_dir, "train", plan, num_views=num_views, size=size, batch_size=batch_size,
                              seed=seed, epoch=epoch, workers=workers)

    before = {"clean": accuracy(model, val, normalize)[1], "views": views_top1()}  # the start weights
    recipe = finetune_recipe(epochs, batch_size, lr, weight_decay, warmup_epochs, label_smoothing, seed)
    run_id = {"recipe": recipe.to_dict(), "teacher": spec, "shards": manifest.fingerprint, "init": origin,
              "plan": plan.to_dict(), "num_views": num_views}
    started = time.time()
    history, _ = fit(model, recipe, KDLoss.from_recipe(recipe, num_classes), epoch_loader,
                     -(-manifest.splits["train"]["count"] // batch_size), out_dir, run_id, normalize=normalize,
                     resume=resume,
                     val=lambda last: (val, manifest.splits["val"]["count"]), val_every=epochs, quiet=quiet,
                     name=f"finetune {spec['name']}")
    last = history[-1]  # validated on clean val: the last epoch always is
    after = {"clean": last["top1"], "views": views_top1()}
    weights, points_at = source.save(model)
    atomic_write_bytes(out_dir / source.tuned_file, weights)
    tuned = {k: v for k, v in spec.items() if k != "pretrained"} | points_at  # relative to teacher.yaml
    tuned.update(name=name, num_classes=num_classes, input_size=size,
                 description=f"{spec['model']} fine-tuned by `pipeline finetune-teacher` on {manifest.dataset} "
                             f"({epochs} epochs from {origin}; val top-1 {last['top1']:.2f}%; weights sha256 "
                             f"{hashlib.sha256(weights).hexdigest()[:16]})")
    atomic_write_bytes(out_dir / SPEC, yaml.safe_dump(tuned, sort_keys=False).encode())
    metrics = {"teacher": spec["name"], "name": name, "dataset": manifest.dataset, "epochs": epochs, "init": origin,
               "train_loss": last["loss"], "val_top1": last["top1"], "val_top5": last["top5"],
               "before": before, "after": after, "plan": plan.to_dict(), "num_views": num_views,
               "threads": torch.get_num_threads(), "seconds": round(time.time() - started, 1)}
    atomic_write_json(out_dir / METRICS, metrics)
    (out_dir / CHECKPOINT).unlink(missing_ok=True)  # finished: no resume point outlives the run
    return metrics


def tuned_name(source: str, name: str | None) -> str:
    """The fine-tuned teacher's name: `name`, or `{source}-ft`; the source's own name is refused (one line)."""
    name = name or f"{source}-ft"
    if name == source or not NAME.fullmatch(name) or ".." in name:
        raise UserError(f"--name {name!r}: a fine-tuned teacher needs a plain name (letters, digits, '_', '-', '.') "
                        f"other than its source's '{source}', so that its store and report rows are its own")
    return name


def finetune_recipe(epochs: int, batch_size: int, lr: float, weight_decay: float, warmup_epochs: float,
                    label_smoothing: float, seed: int) -> Recipe:
    """The fine-tune options as the Recipe the training loop runs: labels only (alpha 0), AdamW, cosine to
    lr/100 after a linear warmup from lr/100 (timm train.py's shape), no EMA, no Mixup."""
    return Recipe(name="finetune-teacher", epochs=epochs, batch_size=batch_size, opt="adamw", lr=lr,
                  weight_decay=weight_decay, sched="cosine", min_lr=lr * 1e-2, warmup_epochs=warmup_epochs,
                  warmup_lr=lr * 1e-2, ema_decay=None, alpha=0.0, label_smoothing=label_smoothing, seed=seed)

