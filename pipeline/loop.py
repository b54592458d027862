"""The one training loop: students (train.py) and fine-tuned teachers (finetune.py) both run `fit`.

Fine-tuning a teacher is training with alpha = 0 on another model, so both share one optimizer and
schedule (timm's, from a Recipe), one objective object (KDLoss: labels-only when it has no teacher
targets), one epoch checkpoint and one resume policy, one validation. What differs (the model, the
views, the outputs) is the caller's: it hands `fit` a loader per epoch and a hook per epoch.

Resume policy (student and teacher alike): resuming is explicit (`--resume`); it continues from
OUT/checkpoint.safetensors only when that file was written by the same run (the caller's run id: recipe,
model, data, views), and refuses a checkpoint of a different run with one line naming the fix (drop
--resume or delete the file), so a changed setting never silently discards or mixes finished epochs.
Without --resume a run starts over and overwrites the checkpoint after its first epoch.

Exact resume: the learning rate is a pure function of the update count and every random stream
(dropout, Mixup; the callers' loaders are seeded by epoch) is reseeded from (seed, epoch, rank), so a
resumed run replays the uninterrupted one.
"""

import hashlib
import inspect
import json
import time
from pathlib import Path

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.optim import create_optimizer_v2, get_optimizer_class
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.distill import Targets, kd_loss
from pipeline.errors import UserError
from pipeline.metrics import accuracy
from pipeline.progress import progress
from pipeline.recipes import Recipe
from pipeline.runtime import autocast, barrier, mean_across_ranks, student_amp

CHECKPOINT = "checkpoint.safetensors"
LOG_EVERY = 20  # steps between progress-bar updates and NaN checks (each one waits for the device)


def create_optimizer(model, recipe: Recipe):
    """timm's optimizer for the recipe, with no clipping of its own: recipe.grad_clip is the only one that holds.

    (timm's Lamb family clips the global gradient norm at 1.0 by default; the paper mentions no clipping.)
    """
    extra = {}
    if "max_grad_norm" in inspect.signature(get_optimizer_class(recipe.opt, bind_defaults=False)).parameters:
        extra["max_grad_norm"] = None
    return create_optimizer_v2(model, opt=recipe.opt, lr=recipe.lr, weight_decay=recipe.weight_decay,
                               momentum=recipe.momentum, **extra)


def create_scheduler(optimizer, recipe: Recipe, steps_per_epoch: int):
    """timm's per-update schedule: linear warmup that ends AT recipe.lr, then the decay over the remaining updates.

    Counted in updates (timm's warmup_prefix starts the decay at the peak; without it the cosine starts during
    warmup and the peak is never reached). A run no longer than its warmup is all warmup.
    """
    warmup = round(recipe.warmup_epochs * steps_per_epoch)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=recipe.sched, num_epochs=max(1, recipe.epochs * steps_per_epoch - warmup),
        decay_epochs=recipe.decay_epochs * steps_per_epoch, decay_rate=recipe.decay_rate, min_lr=recipe.min_lr,
        warmup_lr=recipe.warmup_lr, warmup_epochs=warmup, warmup_prefix=True, step_on_epochs=False,
        updates_per_epoch=1)
    return scheduler


class KDLoss:
    """The objective of a batch, in the shape of timm's training tasks (forward + loss -> a dict of terms).

    (1 - alpha) * CE(labels) + alpha * tau^2 * KL(teacher || model) with pipeline.distill.kd_loss, against
    `targets` (distill.Targets: the stored teacher targets of each (sample, view)); without targets it is
    labels only (alpha 0: a labels-only student, a fine-tuned teacher). With timm Mixup/CutMix the batch is
    mixed with its flip and so are the labels and the teacher target (linear in lam).
    """

    def __init__(self, alpha: float = 0.0, tau: float = 1.0, label_smoothing: float = 0.0, targets=None,
                 mixup: Mixup | None = None):
        if alpha > 0 and targets is None:
            raise UserError(f"alpha={alpha} > 0 needs teacher targets; set alpha=0 to train on labels only")
        self.alpha, self.tau, self.label_smoothing = alpha, tau, label_smoothing
        self.targets, self.mixup = targets, mixup

    @classmethod
    def from_recipe(cls, recipe: Recipe, num_classes: int, stores=(), weights=None,
                    flat_tail: bool = False) -> "KDLoss":
        """The recipe's objective against opened teacher `stores` (`weights`: their shares of the ensemble
        target; no stores: labels only). The recipe's tau reaches the targets and the loss here, together."""
        targets = Targets(list(stores), num_classes, recipe.tau, weights, flat_tail) if stores else None
        mixup = None
        if recipe.mixup > 0 or recipe.cutmix > 0:
            mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, mode="batch",
                          label_smoothing=recipe.label_smoothing, num_classes=num_classes)
        return cls(recipe.alpha, recipe.tau, recipe.label_smoothing, targets, mixup)

    def __call__(self, model, x, batch) -> dict:
        """{"loss", "ce", "kd"} of `model` on images `x` (on the device; Mixup mixes them in place)."""
        labels = batch["label"].to(x.device)
        target = self.targets(batch["index"], batch["view"], x.device) if self.targets else None
        if self.mixup:
            lam = self.mixup._mix_batch(x)  # mixes x in place with its flip; returns the (area-corrected) lam
            labels = mixup_target(labels, self.mixup.num_classes, lam, self.mixup.label_smoothing)
            target = target.mix(lam) if target else None
        with autocast(x.device, student_amp(x.device)):
            logits = model(x)
        return kd_loss(logits, labels, target, self.alpha, self.tau, self.label_smoothing)


def _seed(*parts) -> int:
    """A 32-bit seed from any parts (run seed, epoch, rank, stream name)."""
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=4).digest(), "little")


def _check_finite(loss, epoch, step) -> None:
    if not torch.isfinite(loss):
        raise UserError(f"loss became {loss.item()} at epoch {epoch + 1} step {step}; lower the learning rate "
                        f"(--lr) or check the teacher store")


def _match_param_layout(optimizer) -> None:
    """Give each per-parameter optimizer buffer its parameter's strides (channels_last): checkpoints hold packed
    tensors, and a norm over a differently laid-out buffer sums in another order, so a resume would drift."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _resume(path: Path, run_id: dict, model, optimizer, ema) -> tuple[int, int, list]:
    """Restore model, optimizer and EMA from the checkpoint at `path` if the same run wrote it; return its (epoch,
    step, history). A different run's checkpoint, or one lacking a part (its digest covers the tensors, not the
    tree that places them), is refused in one line."""
    ckpt = load_checkpoint(path)
    try:
        written, state = ckpt["state"]["run"], ckpt["state"]
        if written != run_id:
            differ = sorted(k for k in set(run_id) | set(written) if run_id.get(k) != written.get(k))
            raise UserError(f"{path} was written by a different run ({', '.join(differ)} differ); drop --resume "
                            f"(or delete it) to start over")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        _match_param_layout(optimizer)
        if ema:
            ema.module.load_state_dict(ckpt["ema"])
        return state["epoch"], state["step"], state["history"]
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:160]
        raise UserError(f"checkpoint {path} lacks what a resume needs ({type(err).__name__}: {first}); drop --resume "
                        "(or delete it) to start over") from None


def fit(model, recipe: Recipe, loss: KDLoss, epoch_loader, steps_per_epoch: int, out_dir, run_id: dict, *,
        normalize, device=torch.device("cpu"), rank: int = 0, world: int = 1, resume: bool = False, val=None,
        val_every: int = 1, on_epoch=None, quiet: bool = False, name: str = ""):
    """Train `model` for recipe.epochs epochs; return (history, ema): the per-epoch rows and the EMA (or None).

    Args:
        model: on the CPU or already on `device`; moved there (channels_last), DDP-wrapped when world > 1.
        recipe: optimizer, schedule, epochs, grad clip, EMA and seed (Recipe fields).
        loss: the batch objective (KDLoss).
        epoch_loader: epoch -> this rank's loader of {"image", "label", "index", "view"} batches, images uint8
            (pipeline.data.loaders.student_loader).
        normalize: a runtime.Normalize for `device`: the images (training and validation) become float there,
            not in the loader.
        steps_per_epoch: updates per epoch (the schedule counts them).
        out_dir, run_id: where checkpoint.safetensors goes, and what a resumed run must share with the
            interrupted one (JSON-able; compared after a JSON round trip).
        device, rank, world: where and as which torchrun rank this process trains.
        resume: continue from out_dir's checkpoint (see the module docstring for the policy).
        val, val_every: `val(last) -> (loader, images)`: the validation loader of an epoch and how many images it
            holds; validated (rank 0) every `val_every` epochs and at the last one. None: no validation.
        on_epoch: rank 0, after each epoch's checkpoint: `on_epoch(state)` with the checkpoint's state
            (epoch, step, world_size, history, run) for the caller's per-epoch outputs.
        quiet, name: no progress bar; the bar's prefix.
    """
    out = Path(out_dir)
    run_id = json.loads(json.dumps(run_id))  # tuples compare as lists, as they come back from the checkpoint
    # channels_last: these CNNs train faster so on CUDA and on the CPU too (benchmarks/bench_memory_format.py)
    model.to(device, memory_format=torch.channels_last)
    optimizer = create_optimizer(model, recipe)
    scheduler = create_scheduler(optimizer, recipe, steps_per_epoch)
    ema = ModelEmaV3(model, decay=recipe.ema_decay, use_warmup=recipe.ema_warmup) if recipe.ema_decay else None

    start_epoch, step, history = 0, 0, []
    if resume and (out / CHECKPOINT).is_file():
        start_epoch, step, history = _resume(out / CHECKPOINT, run_id, model, optimizer, ema)

    core = model
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    amp = student_amp(device)
    for epoch in range(start_epoch, recipe.epochs):
        started = time.perf_counter()
        torch.manual_seed(_seed(recipe.seed, epoch, rank))
        np.random.seed(_seed("mixup", recipe.seed, epoch, rank))
        loader = epoch_loader(epoch)
        model.train()
        sums = {k: torch.zeros((), device=device) for k in ("loss", "ce", "kd")}
        bar = progress(loader, total=steps_per_epoch, desc=f"{name} epoch {epoch + 1}/{recipe.epochs}".strip(),
                       disable=quiet or rank != 0, leave=False)
        for batch in bar:
            scheduler.step_update(step)  # lr of this update: a pure function of the update count
            x = normalize(batch["image"]).contiguous(memory_format=torch.channels_last)
            losses = loss(model, x, batch)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if recipe.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            step += 1
            if ema:
                ema.update(core, step=step)
            for k in sums:
                sums[k] += losses[k].detach()
            if step % LOG_EVERY == 0 or step % steps_per_epoch == 0:  # syncs the device: not every step
                _check_finite(losses["loss"], epoch, step)
                bar.set_postfix(loss=f"{losses['loss'].item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        row = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
               **mean_across_ranks({k: float(v) / steps_per_epoch for k, v in sums.items()}, world, device)}
        last = epoch + 1 == recipe.epochs
        if rank == 0 and val is not None and (last or (epoch + 1) % val_every == 0):
            val_loader, row["val_images"] = val(last)
            row["top1"], row["top5"] = _top1_top5(core, val_loader, normalize, device, amp)
            if ema:
                row["ema_top1"], row["ema_top5"] = _top1_top5(ema.module, val_loader, normalize, device, amp)
        if rank == 0:
            row["seconds"] = round(time.perf_counter() - started, 3)
            history.append(row)
            state = {"epoch": epoch + 1, "step": step, "world_size": world, "history": history, "run": run_id}
            parts = {"model": core.state_dict(), "optimizer": optimizer.state_dict(), "state": state}
            if ema:
                parts["ema"] = ema.module.state_dict()
            save_checkpoint(out / CHECKPOINT, parts)  # the resume point: one atomic file
            if on_epoch is not None:
                on_epoch(state)
        else:
            history.append(row)
        if world > 1:
            barrier(world)
    return history, ema


def _top1_top5(model, loader, normalize, device, amp) -> tuple[float, float]:
    acc = accuracy(model, loader, normalize, device, channels_last=True, amp=amp)
    return acc[1], acc[5]

