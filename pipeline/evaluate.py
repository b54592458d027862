"""What a deployed student is worth: accuracy on the validation split, agreement with its teachers,
size, and CPU speed (eager torch and onnxruntime), measured the same way for every student.
"""

from pathlib import Path

import torch

from pipeline.data.loaders import eval_loader
from pipeline.data.shards import ShardManifest
from pipeline.errors import UserError
from pipeline.io import significant
from pipeline.metrics import agreement, onnx_runner, predict, speed, topk_accuracy, torch_runner
from pipeline.models.rep import adds_branches
from pipeline.recipes import branch_budget_note
from pipeline.records import FUSED, ONNX, FusedStudent, load_fused
from pipeline.runtime import Normalize, set_threads
from pipeline.scores import Metrics


def recipe_summary(info: FusedStudent) -> str:
    """One line saying exactly what the student's recipe had on: KD (alpha, tau, teachers) or labels only,
    the re-parameterized branches (N, 1x1, identity) or the plain stock network, and the schedule."""
    recipe = info.recipe
    kd = (f"KD a={recipe['alpha']:g} tau={recipe['tau']:g} from {'+'.join(info.teachers)}"
          if recipe["alpha"] and info.teachers else "labels only")
    parts = [kd, _branches(info.model_kwargs), f"{recipe['epochs']} ep {recipe['opt']}"]
    if branch_budget_note(recipe["epochs"], info.model_kwargs, info.init is not None):
        parts[1] += " (below the branches' measured budget)"
    if info.init:  # pretrained start (student --init): where from, and the file's digest
        digest = info.init["sha256"] or info.init["init_state_sha256"]  # a file's digest, else the loaded state's
        parts.append(f"init {Path(info.init['source']).name} sha256 {digest[:12]}")
    return f"{recipe['name']}: " + ", ".join(parts)


def _branches(kwargs: dict) -> str:
    """'re-param N=3 + 1x1 + identity', 'plain (stock network)' (N=1, no 1x1, no identity), or 'stock model'."""
    if "num_branches" not in kwargs:  # student.json records the three knobs of every rep model as built
        return "stock model"
    branches = (("scale_branch", "1x1"), ("identity_branch", "identity"))
    on = [f"N={kwargs['num_branches']}"] + [name for key, name in branches if kwargs[key]]
    return "re-param " + " + ".join(on) if adds_branches(kwargs) else "plain (stock network)"


def _teacher_spec(name: str, teach_dir, teacher_dir) -> tuple[dict, str]:
    """The spec of the teacher that made the store `{teach_dir}/{name}.json`, and its weights digest.

    A fine-tuned teacher's spec is `{teacher_dir}/{name}/teacher.yaml` (its weights live there); any other
    is rebuilt from the store's provenance, which never grants trust (teachers.artifact_spec).
    """
    from pipeline.store import open_pointer
    from pipeline.teachers import artifact_spec, resolve_spec

    if teach_dir is None:
        raise UserError("no --teach-dir given")
    pointer = Path(teach_dir) / f"{name}.json"
    provenance = open_pointer(pointer).provenance
    tuned = Path(teacher_dir) / name / "teacher.yaml" if teacher_dir else None
    spec = resolve_spec(str(tuned)) if tuned and tuned.is_file() else artifact_spec(provenance["teacher"],
                                                                                    f"the store of {pointer}")
    return spec, provenance["weights_digest"]


def teacher_agreement(logits, shard_dir, teachers, teach_dir, teacher_dir, batch_size: int, quiet: bool):
    """Top-1 agreement (%) with each teacher on val; a teacher that cannot be loaded, or is not the one
    whose logits the student learned from, is skipped with a note."""
    from pipeline.teachers import load_teacher, preprocess_of

    scores, notes = {}, {}
    for name in teachers:
        scores[name] = None
        try:
            spec, digest = _teacher_spec(name, teach_dir, teacher_dir)
            teacher, loaded = load_teacher(spec)
        except UserError as err:
            notes[name] = f"skipped: {err}"
            continue
        if loaded != digest:
            notes[name] = f"skipped: the weights of teacher '{name}' differ from those that made its store"
            continue
        pre = preprocess_of(spec)
        val = eval_loader(shard_dir, "val", pre, batch_size=batch_size)
        teacher_logits, _ = predict(teacher, val, Normalize.of(pre), quiet=quiet, desc=f"teacher {name}")
        scores[name] = agreement(logits, teacher_logits)
    return scores, notes


def teacher_top1(teachers, teach_dir) -> dict:
    """Each teacher's top-1 (%) on its stored views and on clean val, as `pipeline teach` measured them, and its
    weights digest (the report keys teachers by it: two teachers of one name are two rows)."""
    from pipeline.store import open_pointer

    figures = {}
    for name in teachers:
        pointer = Path(teach_dir) / f"{name}.json" if teach_dir else None
        if pointer is None or not pointer.is_file():
            continue
        p = open_pointer(pointer).provenance
        figures[name] = {"views": p.get("teacher_top1_views"), "clean_val": p.get("teacher_top1_clean_val"),
                         "weights_digest": p["weights_digest"]}
    return figures


def check_onnx(model, run_onnx, images, fused_dir, info: FusedStudent) -> None:
    """model.onnx must compute what the fused weights do: its digest in fuse.json proves only that it is the
    file fuse.json names, not that it is the graph fuse exported (an edited digest, a file from elsewhere)."""
    with torch.inference_mode():
        fused, onnx = model(images), run_onnx(images)
    diff = (fused - onnx).abs().max().item() if onnx.shape == fused.shape else float("inf")  # another head too
    allowed = max(1e-3, 2 * info.onnx_check["max_abs_diff"]) if info.onnx_check else 1e-3
    if not diff <= allowed:
        raise UserError(f"{Path(fused_dir) / ONNX} does not compute what {FUSED} does (max |logit diff| "
                        f"{diff:.3g} > {allowed:.3g} on {len(images)} val images); re-run `pipeline fuse --out "
                        f"{fused_dir}`")


def evaluate_fused(fused_dir, shard_dir, *, teach_dir=None, teacher_dir=None, latency_runs: int = 100, batch: int = 32,
                   batch_size: int = 128, threads: int | None = None, quiet: bool = False) -> Metrics:
    """Every figure of one deployed student, to 4 significant digits as its metrics file keeps them (small figures
    stay visible, where fixed decimals would give 0.0).

    Args:
        fused_dir, shard_dir: a `pipeline fuse` output and the shards whose val split it is scored on.
        teach_dir, teacher_dir: the teacher pointers and fine-tuned teachers, for the agreement with each
            teacher (None: no agreement figures).
        latency_runs, batch: interleaved batch-1 latency calls, and the batch of the throughput figure.
        batch_size: the accuracy pass's batch.
        threads: CPU threads of torch and onnxruntime for the speed figures (1 gives steady numbers on a
            shared machine); None keeps the libraries' defaults (all cores).
        quiet: no progress bars.
    """
    from pipeline.models import count_params_macs

    set_threads(threads)
    model, info = load_fused(fused_dir)
    manifest = ShardManifest.read(shard_dir)
    if manifest.num_classes != info.num_classes:
        raise UserError(f"{fused_dir} predicts {info.num_classes} classes but {shard_dir} has "
                        f"{manifest.num_classes}; evaluate on the shards the student was trained on")
    size = info.preprocess.input_size
    val = eval_loader(shard_dir, "val", info.preprocess, batch_size=batch_size)
    logits, labels = predict(model, val, Normalize.of(info.preprocess), quiet=quiet, desc=info.student)
    acc = topk_accuracy(logits, labels)
    params, macs = count_params_macs(model, size)
    teachers = list(info.teachers)
    scores, notes = teacher_agreement(logits, shard_dir, teachers, teach_dir, teacher_dir, batch_size, quiet)
    runners = {"torch": torch_runner(model)}
    onnx_path = Path(fused_dir) / ONNX
    if onnx_path.is_file():
        runners["onnx"] = onnx_runner(onnx_path, threads)
        check_onnx(model, runners["onnx"], Normalize.of(info.preprocess)(next(iter(val))["image"][:16]), fused_dir,
                   info)
    timing = speed(runners, size, runs=latency_runs, batch=batch)
    return Metrics(**significant({
        "student": info.student, "model": info.model, "stock_model": info.stock_model,
        "deploy": info.deploy["label"], "dataset": manifest.dataset, "val_samples": len(labels), "input_size": size,
        "top1": acc[1], "top5": acc[5], "params": params, "macs": macs,
        "training_form": info.training_form, "fused_check": info.fused_check,
        "onnx_check": info.onnx_check, **timing, "latency_runs": latency_runs,
        "torch_threads": torch.get_num_threads(), "teachers": teachers, "teacher_agreement": scores,
        "teacher_top1": teacher_top1(teachers, teach_dir),
        "teacher_notes": notes, "recipe_summary": recipe_summary(info),
        "val_curve": info.val_curve,
    }))
