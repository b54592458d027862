"""Fine-tune a teacher spec on the train shards: fit its classes, and fit it to the views it will label.

Function matching only helps when the teacher is right on the augmented views: a teacher that is good
on clean images can be poor on strong views (measured: 83 % clean, 52 % on the stored views, and KD from
it lost to labels only). So the teacher trains on the SAME view plan that `pipeline teach` uses, and the
summary gives top-1 on clean val and on val views before and after.

timm teachers start from their pretrained weights where they can be had (the classifier is replaced to
fit the dataset's classes) and from scratch otherwise; a TorchScript teacher trains its own parameters
(its class count must already match) and is saved as TorchScript again. torch.export programs are
refused: their graph is fixed in the mode it was exported in and cannot be saved back after training.

Fine-tuning is training with alpha = 0 on the teacher: the epochs run in the student's loop (pipeline.loop.fit)
with a labels-only KDLoss and a Recipe of AdamW + cosine to lr/100 after a linear warmup from lr/100, label
smoothing, no EMA. So it shares the student's checkpoint and resume policy: `--resume` continues from
{out}/checkpoint.safetensors after the last finished epoch, a checkpoint of other settings is refused (one
line), and a finished run removes its checkpoint (the output directory is a persistent DVC output, where a
stale resume point would outlive the run). The result is a weights file plus a teacher spec YAML that
`pipeline teach --teacher {out}/teacher.yaml` accepts.
"""

import hashlib
import io
import logging
import time
from pathlib import Path

import torch
import yaml

from pipeline.data.loaders import eval_loader, student_loader
from pipeline.data.shards import read_manifest
from pipeline.data.views import ViewPlan
from pipeline.errors import UserError
from pipeline.io import atomic_write_bytes, atomic_write_json, claim_out_dir
from pipeline.loop import CHECKPOINT, KDLoss, fit
from pipeline.metrics import accuracy
from pipeline.recipes import Recipe
from pipeline.runtime import Normalize, set_threads
from pipeline.teachers import NAME, check_num_classes, load_teacher, read_state_dict, resolve_spec

_logger = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"
SCRIPT = "teacher.pt"  # a fine-tuned TorchScript teacher
SPEC = "teacher.yaml"
METRICS = "metrics.json"


def build_model(spec: dict, num_classes: int, pretrained: bool):
    """The spec's timm model with a `num_classes` head; returns (model, where its weights came from)."""
    import timm

    if spec["source"] == "torchscript":
        check_num_classes(spec, num_classes)
        model = load_teacher(spec)[0]
        for p in model.parameters():
            p.requires_grad_(True)
        return model, f"torchscript {spec['model']}"
    if spec["source"] != "timm":
        raise UserError(f"teacher '{spec['name']}': a {spec['source']} teacher cannot be fine-tuned (its graph is "
                        "fixed in the mode it was exported in); save it with torch.jit.save (source: torchscript) "
                        "or give a timm model with `weights:` (safetensors)")
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
            return timm.create_model(spec["model"], pretrained=True, num_classes=num_classes, **kwargs), "pretrained"
        except (OSError, RuntimeError) as err:  # offline, no cache, or no pretrained tag
            _logger.warning("teacher '%s': no pretrained weights (%s); training from scratch", spec["name"], err)
    return model, "scratch"


def finetune_teacher(teacher, shard_dir, out_dir, *, epochs: int = 10, batch_size: int = 64, lr: float = 2e-3,
                     weight_decay: float = 0.05, warmup_epochs: float = 1.0, label_smoothing: float = 0.1,
                     img_size: int | None = None, seed: int = 0, pretrained: bool | None = None, workers: int = 0,
                     quiet: bool = False, plan=None, num_views: int | None = None, threads: int | None = None,
                     resume: bool = False, name: str | None = None) -> dict:
    """Train, write {out}/weights.safetensors (or teacher.pt) + teacher.yaml + metrics.json; return the metrics.

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
    from safetensors.torch import save

    set_threads(threads)
    spec = resolve_spec(teacher)
    manifest = read_manifest(shard_dir)
    num_classes = manifest["num_classes"]
    size = int(img_size or spec["input_size"])
    if epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {epochs}")
    name = tuned_name(spec["name"], name)
    out_dir = Path(out_dir)
    claim_out_dir(out_dir, (WEIGHTS, SCRIPT, SPEC, METRICS, CHECKPOINT), "finetune-teacher")

    torch.manual_seed(seed)
    use_pretrained = spec.get("pretrained", False) if pretrained is None else pretrained
    model, origin = build_model(spec, num_classes, bool(use_pretrained))
    plan = ViewPlan.load(plan)
    num_views = num_views or epochs
    val = eval_loader(shard_dir, "val", size=size, crop_pct=spec["crop_pct"], interpolation=spec["interpolation"],
                      batch_size=128, workers=workers)
    normalize = Normalize(spec["mean"], spec["std"])  # of the view loaders' uint8 images (finetuning is on the CPU)

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
    run_id = {"recipe": recipe.to_dict(), "teacher": spec, "shards": manifest["fingerprint"], "init": origin,
              "plan": plan.to_dict(), "num_views": num_views}
    started = time.time()
    history, _ = fit(model, recipe, KDLoss(label_smoothing=label_smoothing), epoch_loader,
                     -(-manifest["splits"]["train"]["count"] // batch_size), out_dir, run_id, normalize=normalize,
                     resume=resume,
                     val=lambda last: (val, manifest["splits"]["val"]["count"]), val_every=epochs, quiet=quiet,
                     name=f"finetune {spec['name']}")
    last = history[-1]  # validated on clean val: the last epoch always is
    after = {"clean": last["top1"], "views": views_top1()}
    tuned = {k: v for k, v in spec.items() if k != "pretrained"}
    if spec["source"] == "torchscript":
        buf = io.BytesIO()
        torch.jit.save(model, buf)
        weights = buf.getvalue()
        atomic_write_bytes(out_dir / SCRIPT, weights)
        tuned.update(model=SCRIPT)  # relative to teacher.yaml
    else:
        weights = save({k: v.contiguous() for k, v in model.state_dict().items()})
        atomic_write_bytes(out_dir / WEIGHTS, weights)
        tuned.update(pretrained=False, weights=WEIGHTS)  # relative to teacher.yaml
    tuned.update(name=name, num_classes=num_classes, input_size=size,
                 description=f"{spec['model']} fine-tuned by `pipeline finetune-teacher` on {manifest['dataset']} "
                             f"({epochs} epochs from {origin}; val top-1 {last['top1']:.2f}%; weights sha256 "
                             f"{hashlib.sha256(weights).hexdigest()[:16]})")
    atomic_write_bytes(out_dir / SPEC, yaml.safe_dump(tuned, sort_keys=False).encode())
    metrics = {"teacher": spec["name"], "name": name, "dataset": manifest["dataset"], "epochs": epochs, "init": origin,
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

