"""Train a student against stored teacher logits (or labels only when alpha = 0).

Per epoch: student_loader replays, for every sample, one of the V views the teachers saw (at the
student's own resolution and normalisation), the stores give the teacher targets of exactly those
(sample, view) pairs, and the loss is pipeline.distill.kd_loss. A rank holds the stored numbers of its own
pairs of the current epoch only (EpochViews: O(N / world x K) in memory, flat in V), the next epoch's read
while this one trains. The epochs run in pipeline.loop.fit, the training loop a fine-tuned teacher shares:
timm's optimizer (weight decay filtered off norms and biases), per-update schedule and weight EMA, the
objective (loop.KDLoss) and the validation.

Exact resume (explicit, `--resume`; the policy is pipeline.loop's): every epoch ends with one atomic
checkpoint (model, EMA, optimizer, counters, history); the learning rate is a pure function of the update
count and every random stream (loader order, views, dropout, Mixup) is reseeded from (seed, epoch, rank), so
a resumed run replays the uninterrupted one.

More than one process: run under torchrun; each rank takes a strided share of every global batch
(the recipe's batch_size is global) and DDP averages gradients. BatchNorm statistics are per rank
unless recipe.sync_bn (CUDA only: torch has no CPU SyncBatchNorm). channels_last everywhere; CUDA: bf16
autocast.
"""

import csv
import dataclasses
import hashlib
import io
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import save
from tqdm import tqdm

from pipeline.models import pretrained_overlay  # (importing pipeline.models registers the rep_* students in timm)
from pipeline.data.loaders import eval_loader, replay_mismatch, student_batches, student_loader, view_environment
from pipeline.data.shards import ShardManifest
from pipeline.data.views import ViewPlan
from pipeline.errors import UserError
from pipeline.io import atomic_write_bytes, atomic_write_json, claim_out_dir, state_digest
from pipeline.loop import CHECKPOINT, KDLoss, fit
from pipeline.models.rep import check_num_branches, rep_settings
from pipeline.recipes import Recipe, branch_budget_note
from pipeline.records import STUDENT_JSON, StudentSpec, TrainedStudent
from pipeline.runtime import Normalize, init_distributed, resolve_device, set_threads
from pipeline.store import TARGET_ARRAYS

OUTPUTS = (CHECKPOINT, "model.safetensors", "ema.safetensors", STUDENT_JSON, "state.json")  # what it writes in --out
PLOT_COLUMNS = ["epoch", "step", "loss", "ce", "kd", "lr", "top1", "top5", "ema_top1", "ema_top5", "seconds"]


def student_size(student: StudentSpec, recipe: Recipe) -> int:
    """The student's square input size: the recipe's img_size, else the student spec's (its timm cfg's)."""
    size = recipe.img_size or student.preprocess.input_size
    if student.min_input_size and size < student.min_input_size:
        low = student.min_input_size
        raise UserError(
            f"student {student.model} needs images of at least {low} px (its timm pretrained_cfg's min_input_size), "
            f"got {size}; set img_size >= {low} (--img-size) and render small datasets larger once "
            f"(`pipeline shard --image-size {low}`)"
        )
    student.check_size(size)
    return size


REP_FIELDS = ("num_branches", "scale_branch", "identity_branch", "branch_bn_init")  # recipe fields that are rep_* model kwargs


def build_student(student: StudentSpec, recipe: Recipe, num_classes: int, init: str | None = None):
    """timm.create_model from the student spec, with the recipe's re-parameterization knobs.

    Returns (model, kwargs, init record); kwargs also hold the branch settings the model was built with
    (rep_settings), so student.json and the report name what was on, defaults included. `init`
    (pipeline.models.pretrained_overlay) starts it from pretrained weights through timm's own loading:
    the training form then computes exactly the stock model.
    """
    knobs = {k: getattr(recipe, k) for k in REP_FIELDS if getattr(recipe, k) is not None}
    if "num_branches" in knobs:  # the models' own range check, with the recipe key named
        try:
            check_num_branches(knobs["num_branches"])
        except ValueError as err:
            raise UserError(f"recipe '{recipe.name}': {err}; set num_branches (--num-branches) to 1..5, or null "
                            "for the student spec's") from None
    kwargs = {**student.model_kwargs, **knobs}
    record, pretrained = None, {}
    if init:
        overlay, record = pretrained_overlay(student.model, init)
        pretrained = dict(pretrained=True, pretrained_cfg_overlay=overlay)
    try:
        model = timm.create_model(student.model, num_classes=num_classes, **kwargs, **pretrained)
    except TypeError as err:
        raise UserError(
            f"student model {student.model} rejects {sorted(kwargs)} ({err}); for a non-rep model set "
            f"{', '.join(REP_FIELDS)} to null in the recipe"
        ) from None
    except ValueError as err:  # the checkpoint filter: weights of another architecture
        raise UserError(f"--init {init} does not fit student model {student.model}: {err}") from None
    except RuntimeError as err:
        raise UserError(f"cannot create student model {student.model}"
                        f"{f' from --init {init}' if init else ''}: {str(err).strip().splitlines()[0]}") from None
    except OSError as err:  # hub download failed / offline
        raise UserError(f"--init {init}: no weights ({type(err).__name__}); run once with network access, or "
                        "give a local .safetensors file") from None
    if record is not None:
        record["init_state_sha256"] = state_digest(model.state_dict())
    return model, {**kwargs, **rep_settings(model)}, record


def resolve_views(recipe: Recipe, stores: list, dataset_fingerprint: str, num_classes: int, size: int,
                  interpolation: str) -> tuple[ViewPlan, int]:
    """The view plan and V the student replays: the stores' (checked against the shards), or the recipe's.

    `stores` are the stores whose views are replayed: the KD teachers', or a labels-only student's
    --views-from store. With one, its plan is the views: a recipe plan beside it is refused rather than
    compared (it could only repeat the store's or contradict it)."""
    if not stores:
        if recipe.alpha > 0:
            raise UserError(f"recipe '{recipe.name}' has alpha={recipe.alpha} > 0: it needs teacher stores "
                            f"(--teachers), or set alpha=0 to train on labels only")
        plan = ViewPlan.load(recipe.plan, f"recipe '{recipe.name}' plan", seed=recipe.seed, size=size,
                             interpolation=interpolation)
        return plan, recipe.num_views or recipe.epochs
    if recipe.plan is not None:
        raise UserError(f"recipe '{recipe.name}' sets a view plan, but this student replays the views of teacher store "
                        f"{stores[0].path}, whose plan is authoritative: set plan to null (--set plan=null), or run "
                        f"`pipeline teach --plan` with the plan you want")
    plan = ViewPlan.load(stores[0].plan, f"teacher store {stores[0].path}")
    for store in stores:
        store.check_compatible(dataset_fingerprint, plan.hash())
        if store.provenance.get("split", "train") != "train":
            raise UserError(f"teacher store {store.path} holds the '{store.provenance['split']}' split; the student "
                            f"trains on 'train': run `pipeline teach` on the train split")
        if int(store.num_classes) != num_classes:
            raise UserError(f"teacher store {store.path} has {store.num_classes} classes, the shards have "
                            f"{num_classes}; teach with a teacher for this dataset")
    return plan, min(int(store.num_views) for store in stores)


class EpochViews:
    """What a rank reads from its stores, one epoch at a time: each store's numbers (LogitStore.read_views)
    of the rank's (index, view) pairs of that epoch. The next epoch's are read in a background thread while
    this one trains (reading and hashing release the GIL), so at most three epochs' are held: the one ending,
    this one, the next."""

    def __init__(self, reads: list, pairs, epochs: int):
        """`reads`: [(store, array names)]; `pairs(epoch)`: int64 [n, 2] (index, view); `epochs`: how many."""
        self.reads, self.pairs, self.epochs = reads, pairs, epochs
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epoch-views")
        self.ahead = {}

    def read(self, epoch: int) -> list:
        pairs = self.pairs(epoch)
        return [store.read_views(pairs[:, 0], pairs[:, 1], names) for store, names in self.reads]

    def __call__(self, epoch: int) -> list:
        """Epoch `epoch`'s StoredViews, one per read (waiting for them), the next epoch's read started."""
        pending = self.ahead.pop(epoch, None) or self.pool.submit(self.read, epoch)
        if epoch + 1 < self.epochs:
            self.ahead[epoch + 1] = self.pool.submit(self.read, epoch + 1)
        return pending.result()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def check_replay(store, shard_dir, plan: ViewPlan, stored) -> None:
    """Refuse (one line) when this environment derives other view params than those `stored` (store.StoredViews
    read from `store`) holds."""
    mismatch = replay_mismatch(shard_dir, "train", plan, stored)
    if mismatch is not None:
        made, here = store.provenance.get("versions") or {}, view_environment()
        then = ", ".join(f"{k} {made.get(k, '?')}" for k in here)
        now = ", ".join(f"{k} {v}" for k, v in here.items())
        raise UserError(
            f"view {mismatch[1]} of sample {mismatch[0]} in teacher store {store.path} is not the view this environment "
            f"derives from its plan (views drawn with {then}; here {now}): a numpy/timm/Pillow/OpenCV version mismatch is "
            f"the likely cause; install the store's versions or re-run `pipeline teach` here")


def _safetensors_bytes(state_dict) -> bytes:
    return save({k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in state_dict.items()})


def _write_plots(path, history) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=PLOT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(path, buf.getvalue().encode())


def train(student: StudentSpec, recipe: Recipe, shard_dir, out_dir, stores=(), teacher_names=(), teacher_weights=None,
          resume: bool = False, workers: int = 0, quiet: bool = False, eval_batch_size: int = 256,
          init: str | None = None, threads: int | None = None, val_every: int = 1,
          val_samples: int | None = None, views_from=None, flat_tail: bool = False, curves_dir=None) -> dict:
    """Train `student` (a manifests/students spec) with `recipe`; write the outputs into `out_dir`.

    Args:
        student, recipe: the resolved manifests/students spec (StudentSpec.resolve) and the Recipe.
        shard_dir, out_dir: the `pipeline shard` output and the student's output directory.
        stores, teacher_names, teacher_weights: opened LogitStores (pipeline.store.open_store) in the order
            of `teacher_names`, and their weights in the ensemble target (None: equal).
        resume: continue from out_dir's checkpoint.safetensors.
        workers, quiet, eval_batch_size: DataLoader workers, no progress bars, the validation batch.
        init: pretrained weights (pipeline.models.pretrained_overlay).
        threads: torch CPU threads (None: torch's choice).
        val_every, val_samples: validate every `val_every` epochs on `val_samples` fixed seeded images
            (None: all); the last epoch is always validated on the whole split.
        views_from: for a labels-only student (alpha 0), a store whose views (plan, V, stored params) it
            replays, so that it sees exactly what the KD students see.
        flat_tail: accept a tau the stores do not keep.
        curves_dir: where metrics.json and plots.csv go [default: out_dir].

    Returns the last epoch's metrics. Outputs: checkpoint.safetensors (every epoch), model.safetensors,
    ema.safetensors, student.json, state.json, metrics.json, plots.csv (those two per epoch, in `curves_dir`
    when given: dvc.yaml declares them as metrics and plots, which may not lie inside another output).
    """
    out = Path(out_dir)
    set_threads(threads)
    device = resolve_device("auto")
    rank, world, _ = init_distributed(device)  # torchrun tears the group down with the process
    manifest = ShardManifest.read(shard_dir)
    num_classes = int(manifest.num_classes)
    size = student_size(student, recipe)
    crop_pct = student.preprocess.crop_pct
    pre = dataclasses.replace(student.preprocess, input_size=size,  # the spec's eval crop, else the dataset's
                              crop_pct=manifest.crop_pct if crop_pct is None else crop_pct)
    stores = list(stores) if recipe.alpha > 0 else []
    if views_from is not None and recipe.alpha > 0:
        raise UserError("--views-from is for labels-only students (alpha 0); a KD student replays its teachers' views")
    view_stores = stores or ([views_from] if views_from is not None else [])
    plan, num_views = resolve_views(recipe, view_stores, manifest.fingerprint, num_classes,
                                    size, pre.interpolation)
    loss = KDLoss.from_recipe(recipe, num_classes, stores, teacher_weights, flat_tail)
    if loss.targets is not None and not loss.targets.exact and rank == 0:
        tqdm.write(f"warning: tau={recipe.tau:g} is not stored in every teacher store: KD uses the flat-tail "
                   f"approximation (up to 38 % off the coarsened KL at tau 2-4, docs/measurements.md); store it with "
                   f"`pipeline teach --temperatures`")

    if recipe.batch_size % world:
        raise UserError(f"batch_size {recipe.batch_size} (global) is not divisible by {world} processes")
    local_batch = recipe.batch_size // world
    steps_per_epoch = manifest.splits["train"]["count"] // recipe.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"batch_size {recipe.batch_size} is larger than the train split "
                        f"({manifest.splits['train']['count']} samples); lower it (--batch-size)")

    if rank == 0:
        curves = ("metrics.json", "plots.csv")
        claim_out_dir(out, (*OUTPUTS, *(() if curves_dir else curves)), "student")
        if curves_dir:
            claim_out_dir(curves_dir, curves, "student")
    torch.manual_seed(recipe.seed)
    model, model_kwargs, init_record = build_student(student, recipe, num_classes, init)
    note = branch_budget_note(recipe.epochs, model_kwargs, init is not None)
    if note and rank == 0:
        tqdm.write(note)
    if world > 1 and recipe.sync_bn and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)

    # What a resumed run must share with the interrupted one.
    run_id = {"recipe": recipe.to_dict(), "teachers": list(teacher_names), "teacher_weights": teacher_weights,
              "student": student.to_dict(), "shards": manifest.fingerprint, "init": init_record,
              "flat_tail": flat_tail, "views_from": views_from.key if views_from is not None else None}

    def batches(epoch):
        return student_batches(shard_dir, "train", num_views, local_batch, recipe.seed, epoch, rank, world, True)

    # each epoch: the KD stores' targets and the params of the store whose views are replayed, of this rank's pairs
    reads = [(store, TARGET_ARRAYS) for store in stores] + [(store, ("params",)) for store in view_stores[:1]]
    ahead = EpochViews(reads, lambda epoch: np.concatenate(batches(epoch)), recipe.epochs)

    def epoch_loader(epoch):
        stored_params = None
        if reads:
            *kd, stored_params = ahead(epoch)
            check_replay(view_stores[0], shard_dir, plan, stored_params)
            if loss.targets is not None:
                loss.targets.use(kd)
        return student_loader(shard_dir, "train", plan, num_views, size, local_batch, recipe.seed, epoch, rank,
                              world, workers, drop_last=True, stored_params=stored_params)

    val_args = (shard_dir, "val", pre, eval_batch_size, workers)
    val = eval_loader(*val_args) if rank == 0 else None
    val_subset = eval_loader(*val_args, subset=(val_samples, recipe.seed)) if rank == 0 and val_samples else val
    full = manifest.splits["val"]["count"]

    def validation(last):
        """The last epoch sees the whole val split, the others the fixed subset (if any)."""
        loader = val if last else val_subset
        return loader, full if loader is val else min(val_samples, full)

    def epoch_outputs(state):
        _write_epoch(out, Path(curves_dir or out), state)
        if not quiet:
            tqdm.write(_summary(state["history"][-1]))

    try:
        history, ema = fit(model, recipe, loss, epoch_loader,
                           steps_per_epoch, out, run_id, normalize=Normalize.of(pre, device),
                           device=device, rank=rank, world=world, resume=resume,
                           val=validation, val_every=val_every, on_epoch=epoch_outputs, quiet=quiet)
    finally:
        ahead.close()

    if rank == 0:
        _save_final(out, model, ema, history, {
            "model": student.model, "model_kwargs": model_kwargs, "num_classes": num_classes, "preprocess": pre,
            "teachers": list(teacher_names), "teacher_weights": teacher_weights, "recipe": recipe.to_dict(),
            "view_plan": plan.to_dict(), "num_views": num_views, "epochs": recipe.epochs,
            "init": init_record, "threads": torch.get_num_threads(),
            "views_from": views_from.key if views_from is not None else None, "val_curve": val_curve(history),
        })
    return history[-1] if history else {}


def _write_epoch(out: Path, curves: Path, state: dict) -> None:
    """The per-epoch outputs beside the loop's checkpoint: state.json, metrics.json, plots.csv."""
    atomic_write_json(out / "state.json", {k: v for k, v in state.items() if k != "history"})
    curves.mkdir(parents=True, exist_ok=True)
    atomic_write_json(curves / "metrics.json", _metrics(state["history"]))
    _write_plots(curves / "plots.csv", state["history"])


def _save_final(out: Path, core, ema, history, info: dict) -> None:
    """model.safetensors, ema.safetensors and student.json (TrainedStudent `info`), whose "weights" names the
    better of the two."""
    files = {"model.safetensors": _safetensors_bytes(core.state_dict())}
    if ema:
        files["ema.safetensors"] = _safetensors_bytes(ema.module.state_dict())
    else:
        (out / "ema.safetensors").unlink(missing_ok=True)  # a stale one from an earlier run would mislead
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    last = history[-1]
    use_ema = ema is not None and last.get("ema_top1", -1) >= last["top1"]
    choice = {"rule": "better val top-1 at the last epoch (EMA on a tie)", "model_top1": last["top1"],
              "ema_top1": last.get("ema_top1")}  # what `pipeline fuse` deploys by default
    weights = "ema.safetensors" if use_ema else "model.safetensors"
    TrainedStudent(**info, weights=weights, weights_choice=choice,
                   sha256={name: hashlib.sha256(data).hexdigest() for name, data in files.items()}).write(out)


def val_curve(history) -> list[dict]:
    """The validated epochs' val top-1 (raw and EMA) and how many images they saw: the curve the report draws."""
    keys = ("epoch", "top1", "ema_top1", "val_images")
    return [{k: row[k] for k in keys if k in row} for row in history if "top1" in row]


def _metrics(history) -> dict:
    """DVC metrics: the last epoch's values, plus the best validation top-1 seen."""
    last = history[-1]
    best = max((max(r["top1"], r.get("ema_top1", -math.inf)) for r in history if "top1" in r), default=None)
    return {"epoch": last["epoch"], "train": {k: last[k] for k in ("loss", "ce", "kd", "lr")},
            "val": {k: last[k] for k in ("top1", "top5", "ema_top1", "ema_top5") if k in last},
            "best_top1": best}


def _summary(row) -> str:
    ema = f" ema {row['ema_top1']:.2f}" if "ema_top1" in row else ""
    val = f" val top1 {row['top1']:.2f}{ema} on {row['val_images']}" if "top1" in row else ""
    return (f"epoch {row['epoch']}: loss {row['loss']:.4f} (ce {row['ce']:.4f} kd {row['kd']:.4f}) "
            f"lr {row['lr']:.2e}{val} ({row['seconds']:.1f}s)")
