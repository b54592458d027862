"""Fine-tune a teacher spec on the train shards: fit its classes, and fit it to the views it will label.

Function matching only helps when the teacher is right on the augmented views: a teacher that is good
on clean images can be poor on strong views (measured: 83 % clean, 52 % on the stored views, and KD from
it lost to labels only). So the teacher trains on the SAME view plan that `pipeline teach` uses, and the
summary gives top-1 on clean val and on val views before and after.

timm teachers start from their pretrained weights where they can be had (the classifier is replaced to
fit the dataset's classes) and from scratch otherwise; a TorchScript teacher trains its own parameters
(its class count must already match) and is saved as TorchScript again. torch.export programs are
refused: their graph is fixed in the mode it was exported in and cannot be saved back after training.
AdamW + cosine; a checkpoint after every epoch lets an interrupted run resume where it stopped. The
result is a weights file plus a teacher spec YAML that `pipeline teach --teacher {out}/teacher.yaml` accepts.
"""

import hashlib
import io
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.data.loaders import eval_loader, student_loader
from pipeline.data.shards import read_manifest
from pipeline.data.views import ViewPlan
from pipeline.errors import UserError
from pipeline.io import atomic_write_bytes, atomic_write_json, stable_hash
from pipeline.metrics import predict, topk_accuracy
from pipeline.progress import progress
from pipeline.runtime import set_threads
from pipeline.teachers import check_num_classes, load_teacher, read_state_dict, resolve_spec

_logger = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"
SCRIPT = "teacher.pt"  # a fine-tuned TorchScript teacher
SPEC = "teacher.yaml"
RESUME = "resume.safetensors"


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


def _save_resume(path: Path, model, optimizer, epoch: int, config_key: str) -> None:
    save_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "progress": {"epoch": epoch, "config": config_key}})


def _load_resume(path: Path, model, optimizer, config_key: str) -> int:
    """Epochs already done by an interrupted run with the same settings (0 if none)."""
    if not path.is_file():
        return 0
    try:
        state = load_checkpoint(path)
    except UserError:  # a torn or foreign checkpoint is simply not resumed
        return 0
    if state.get("progress", {}).get("config") != config_key:
        return 0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["progress"]["epoch"])


def finetune_teacher(teacher, shard_dir, out_dir, *, epochs: int = 10, batch_size: int = 64, lr: float = 2e-3,
                     weight_decay: float = 0.05, warmup_epochs: float = 1.0, label_smoothing: float = 0.1,
                     img_size: int | None = None, scale=(0.35, 1.0), hflip: float = 0.5,
                     auto_augment: str | None = "rand-m9-mstd0.5", re_prob: float = 0.0, seed: int = 0,
                     pretrained: bool | None = None, workers: int = 0, quiet: bool = False,
                     plan: ViewPlan | None = None, num_views: int | None = None, threads: int | None = None) -> dict:
    """Train, write {out}/weights.safetensors (or teacher.pt) + teacher.yaml + metrics.json; return the metrics.

    Args:
        teacher: a manifests/teachers spec (name, path or dict); its weights are the start.
        shard_dir, out_dir: the `pipeline shard` output; where the fine-tuned teacher goes (resumable).
        epochs, batch_size, lr, weight_decay, warmup_epochs, label_smoothing, seed: the schedule (AdamW,
            cosine with warmup, as timm's train.py).
        img_size: training input size [default: the spec's input_size].
        scale, hflip, auto_augment, re_prob: timm's training transform, when no `plan` is given.
        pretrained: override the spec's `pretrained` (None keeps it).
        plan / num_views: the view plan and V of `pipeline teach` (then scale, hflip, auto_augment and
            re_prob are unused): the teacher trains on the views it will label.
        workers, quiet, threads: DataLoader workers, no progress bars, torch CPU threads (None: torch's choice).
    """
    from safetensors.torch import save
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    set_threads(threads)
    spec = resolve_spec(teacher)
    manifest = read_manifest(shard_dir)
    num_classes = manifest["num_classes"]
    size = int(img_size or spec["input_size"])
    if epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {epochs}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)
    use_pretrained = spec.get("pretrained", False) if pretrained is None else pretrained
    model, origin = build_model(spec, num_classes, bool(use_pretrained))
    if plan is None:
        plan = ViewPlan(seed=seed, size=size, scale=tuple(scale), hflip=hflip, auto_augment=auto_augment,
                        re_prob=re_prob, interpolation=spec["interpolation"])
    num_views = num_views or epochs
    val = eval_loader(shard_dir, "val", size=size, crop_pct=spec["crop_pct"], mean=spec["mean"], std=spec["std"],
                      interpolation=spec["interpolation"], batch_size=128, workers=workers)

    def scores() -> dict:
        """top-1 on clean val and on one view per val image (the plan at the teacher's size)."""
        views = student_loader(shard_dir, "val", plan, num_views=num_views, size=size, mean=spec["mean"],
                               std=spec["std"], batch_size=128, seed=plan.seed, epoch=0, workers=workers)
        with torch.no_grad():
            return {"clean": topk_accuracy(*predict(model, val, quiet=True))[1],
                    "views": topk_accuracy(*predict(model, views, quiet=True))[1]}
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-manifest["splits"]["train"]["count"] // batch_size)
    scheduler = CosineLRScheduler(optimizer, t_initial=epochs * steps_per_epoch, lr_min=lr * 1e-2,
                                  warmup_t=int(warmup_epochs * steps_per_epoch), warmup_lr_init=lr * 1e-2,
                                  t_in_epochs=False)
    config_key = stable_hash({"spec": spec, "data": manifest["fingerprint"], "plan": plan.to_dict(), "epochs": epochs,
                              "batch_size": batch_size, "lr": lr, "wd": weight_decay, "ls": label_smoothing,
                              "origin": origin, "num_views": num_views})
    resume = out_dir / RESUME
    start = _load_resume(resume, model, optimizer, config_key)
    scheduler.step_update(start * steps_per_epoch)  # the learning rate where the schedule stands
    if start:
        _logger.warning("resuming teacher '%s' fine-tuning after epoch %d", spec["name"], start)
    before = scores()  # after a resume: where the interrupted run stood

    started = time.time()
    bar = progress(total=epochs * steps_per_epoch, initial=start * steps_per_epoch, desc=f"finetune {spec['name']}",
               unit="step", disable=quiet)
    loss_avg = float("nan")
    for epoch in range(start, epochs):
        model.train()
        loader = student_loader(shard_dir, "train", plan, num_views=num_views, size=size, mean=spec["mean"],
                                std=spec["std"], batch_size=batch_size, seed=seed, epoch=epoch, workers=workers)
        for step, batch in enumerate(loader):
            loss = F.cross_entropy(model(batch["image"]), batch["label"], label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step_update(epoch * steps_per_epoch + step + 1)
            loss_avg = loss.item() if loss_avg != loss_avg else 0.9 * loss_avg + 0.1 * loss.item()
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss_avg:.3f}", refresh=False)
        _save_resume(resume, model, optimizer, epoch + 1, config_key)
    bar.close()

    logits, labels = predict(model, val, quiet=quiet, desc="val")
    acc = topk_accuracy(logits, labels)
    after = scores()
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
    tuned.update(num_classes=num_classes, input_size=size,
                 description=f"{spec['model']} fine-tuned by `pipeline finetune-teacher` on {manifest['dataset']} "
                             f"({epochs} epochs from {origin}; val top-1 {acc[1]:.2f}%; weights sha256 "
                             f"{hashlib.sha256(weights).hexdigest()[:16]})")
    atomic_write_bytes(out_dir / SPEC, yaml.safe_dump(tuned, sort_keys=False).encode())
    metrics = {"teacher": spec["name"], "dataset": manifest["dataset"], "epochs": epochs, "init": origin,
               "train_loss": loss_avg, "val_top1": acc[1], "val_top5": acc[5],
               "before": before, "after": after, "plan": plan.to_dict(), "num_views": num_views,
               "threads": torch.get_num_threads(), "seconds": round(time.time() - started, 1)}
    atomic_write_json(out_dir / "metrics.json", metrics)
    resume.unlink(missing_ok=True)
    return metrics

