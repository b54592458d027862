"""Does the recipe beat its twins on real data at the budgets users run? The comparison, through the product.

Builds a class-balanced split of the shared CIFAR-10 train archive (`--per-class` train images and a
DISJOINT `--val-per-class` per class as val, 32-px photos rendered at 64 px), fine-tunes the demo's
ResNet-10-T teacher on the teach plan's views once (`pipeline finetune-teacher`), stores its logits once
(`pipeline teach`), then trains GhostNetV3 0.5x at every budget in `--epochs`, all students from one seed
(one init: the rep forms' first branches ARE the plain network's weights) on the same stored views:

    plain    stock network, labels only (--views-from the store)
    kd       stock network + KD (alpha 0.5, tau 1)
    rep      the paper's branches (N=3 + 1x1 + identity, branch_bn_init 1), labels only
    recipe   the paper's branches + KD: the paper's recipe as named options
    default  what `pipeline student` does with no branch option given (+ KD)

    python benchmarks/bench_recipe.py --per-class 200 --epochs 6,24 --threads 1 [--jobs 2] [--work DIR]

Prints ONE JSON object: {"epochs": {"E": {"plain": top1, ...}}, "teacher": {"clean": top1, "views": top1},
"detail": {...}} (top-1 in percent on the whole val split: the weights `pipeline fuse` deploys, i.e. the raw
or EMA weights, whichever the student stage picked; `detail` holds both and the per-epoch curves). Work
folders are kept in `--work` and reused, so an interrupted run resumes where it stopped. A benchmark, not a
test: accuracies vary with the seed by about a point at these sizes (see `--seeds`).
"""

import argparse
import concurrent.futures
import csv
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMPTY_PARAMS = ROOT / "tests" / "empty-params.yaml"
PLAN = {"seed": 0, "size": 64, "scale": [0.35, 1.0], "ratio": [0.75, 1.3333333333333333], "hflip": 0.5,
        "auto_augment": "rand-m6-mstd0.5", "re_prob": 0.25, "re_mode": "pixel", "re_count": 1,
        "interpolation": "bicubic"}
PLAIN = ["--num-branches", "1", "--no-scale-branch", "--no-identity-branch"]
PAPER = ["--num-branches", "3", "--scale-branch", "--identity-branch", "--branch-bn-init", "1"]
KD = ["--alpha", "0.5", "--teachers"]
LABELS = ["--alpha", "0", "--views-from"]
STUDENTS = {"plain": (PLAIN, LABELS), "kd": (PLAIN, KD), "rep": (PAPER, LABELS), "recipe": (PAPER, KD), "default": ([], KD)}


def pipeline(*args, threads: int | None = None) -> None:
    """One quiet `pipeline` command with no params.yaml defaults; a failure stops the run with its output."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads or 1)}
    cmd = [str(Path(sys.executable).parent / "pipeline"), "--params", str(EMPTY_PARAMS), *args, "--quiet"]
    cmd += ["--threads", str(threads)] if threads else []
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[2:])} failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")


def extract_split(work: Path, archive: Path, per_class: int, val_per_class: int) -> Path:
    """images/{train,val}/<class>/*.jpg: the first `per_class` of each class (sorted names) and the next ones."""
    images = work / "images"
    if (images / "done").exists():
        return images
    with tarfile.open(archive) as tar:
        by_class = {}
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3:
                by_class.setdefault(parts[1], []).append(member)
        for cls, members in sorted(by_class.items()):
            members.sort(key=lambda m: m.name)
            for split, chosen in (("train", members[:per_class]),
                                  ("val", members[per_class:per_class + val_per_class])):
                folder = images / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                for member in chosen:
                    (folder / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    (images / "done").touch()
    return images


def prepare(work: Path, args) -> dict:
    """Shards, the fitted teacher and its store (each step skipped when its output exists)."""
    images = extract_split(work, args.archive, args.per_class, args.val_per_class)
    (work / "plan.yaml").write_text(json.dumps(PLAN))
    if not (work / "shards" / "manifest.json").exists():
        pipeline("shard", "--source", f"imagefolder:{images}", "--out", str(work / "shards"), "--name", "cifar10",
                 "--image-size", "64", "--crop-pct", "1.0", "--val-fraction", "0")
    teacher = work / "teacher"
    if not (teacher / "teacher.yaml").exists():
        pipeline("finetune-teacher", "--teacher", "demo-resnet10t", "--shards", str(work / "shards"),
                 "--out", str(teacher), "--plan", str(work / "plan.yaml"), "--num-views", str(args.num_views),
                 "--epochs", str(args.teacher_epochs), "--batch-size", "64", "--lr", "2e-3", threads=args.threads)
    if not list((work / "teach").glob("*.json")):
        pipeline("teach", "--teacher", str(teacher / "teacher.yaml"), "--shards", str(work / "shards"),
                 "--plan", str(work / "plan.yaml"), "--num-views", str(args.num_views), "--store-root",
                 str(work / "stores"), "--out", str(work / "teach"), threads=args.threads)
    from pipeline.store import open_pointer

    [pointer] = (work / "teach").glob("*.json")
    quality = open_pointer(pointer).provenance
    return {"name": pointer.stem, "clean": quality.get("teacher_top1_clean_val"),
            "views": quality.get("teacher_top1_views")}


def train(work: Path, teacher: str, name: str, epochs: int, seed: int, threads: int) -> dict:
    """One student; its deployed top-1 (the weights student.json names), raw and EMA top-1 and the curve."""
    out = work / "students" / f"e{epochs}-s{seed}" / name
    if not (out / "student.json").exists():
        pipeline("student", "--student", "ghostnetv3-050", "--recipe", "demo", "--epochs", str(epochs),
                 "--seed", str(seed), *STUDENTS[name][0], *STUDENTS[name][1], teacher, "--shards", str(work / "shards"),
                 "--teach-dir", str(work / "teach"), "--out", str(out), threads=threads)
    choice = json.loads((out / "student.json").read_text())["weights_choice"]
    with open(out / "plots.csv") as f:
        curve = [round(max(float(r["top1"]), float(r.get("ema_top1") or -1)), 2) for r in csv.DictReader(f)
                 if r.get("top1")]
    deployed = max(choice["model_top1"], choice["ema_top1"] if choice["ema_top1"] is not None else -1)
    return {"top1": round(deployed, 2), "model_top1": choice["model_top1"], "ema_top1": choice["ema_top1"],
            "curve": curve}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archive", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10" / "train.tar",
                        help="CIFAR-10 train archive (ImageFolder tar)")
    parser.add_argument("--per-class", type=int, default=200, help="train images per class")
    parser.add_argument("--val-per-class", type=int, default=None, help="val images per class [default: --per-class]")
    parser.add_argument("--epochs", default="6,24", help="comma-separated student budgets")
    parser.add_argument("--students", default=",".join(STUDENTS), help="comma-separated subset of " + ",".join(STUDENTS))
    parser.add_argument("--seeds", default="0", help="comma-separated student seeds (the figures are their mean)")
    parser.add_argument("--num-views", type=int, default=6, help="stored views per image (V)")
    parser.add_argument("--teacher-epochs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--jobs", type=int, default=2, help="students trained at once")
    parser.add_argument("--work", type=Path, default=None, help="work folder [default: /tmp/bench_recipe-N-V]")
    args = parser.parse_args()
    args.val_per_class = args.val_per_class or args.per_class
    work = args.work or Path(f"/tmp/bench_recipe-{args.per_class}-{args.val_per_class}-v{args.num_views}")
    work.mkdir(parents=True, exist_ok=True)
    teacher = prepare(work, args)
    budgets = [int(e) for e in args.epochs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.students.split(",")
    runs = [(e, s, n) for e in budgets for s in seeds for n in names]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(runs, pool.map(lambda r: train(work, teacher["name"], r[2], r[0], r[1], args.threads), runs)))
    table = {str(e): {n: round(sum(results[e, s, n]["top1"] for s in seeds) / len(seeds), 2) for n in names}
             for e in budgets}
    detail = {f"{e}/{s}/{n}": results[e, s, n] for e, s, n in runs}
    print(json.dumps({"epochs": table, "teacher": teacher, "detail": detail,
                      "setup": {"per_class": args.per_class, "val_per_class": args.val_per_class,
                                "num_views": args.num_views, "seeds": seeds, "student": "ghostnetv3-050",
                                "recipe": "demo", "plan": PLAN}}))


if __name__ == "__main__":
    main()
