"""The whole chain under DVC on a tiny config: shard -> finetune-teacher -> teach -> student -> fuse ->
evaluate -> report, then the caching promises: a second repro runs nothing, a new student runs no
teacher stage, a changed student option re-runs only that student's side."""

import csv
import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.models import create_stock_model
from tests._dvc_helpers import REPO, dvc, dvc_project, git, ran

TINY = {
    "launch": {"teach": "pipeline", "student": "pipeline"},
    "shard": {"source": "synthetic", "num-classes": 4, "per-class": 12, "image-size": 64, "val-fraction": 0.25},
    "finetune-teacher": {"epochs": 1, "batch-size": 16, "quiet": True},  # on teach's plan
    "finetune": {"demo-resnet10t-ft": {"teacher": "demo-resnet10t"}},
    "teachers": {"demo-resnet10t-ft": {"spec": "outputs/teachers/demo-resnet10t-ft/teacher.yaml"}},
    "teach": {"num-views": 2, "k": 3, "batch-size": 32, "quiet": True,
              "plan": {"seed": 0, "size": 64, "scale": [0.5, 1.0], "hflip": 0.0, "auto_augment": None,
                       "re_prob": 0.0}},
    "student": {"recipe": "demo", "quiet": True},
    "students": {"gnv3": {"student": "ghostnetv3-050", "teachers": "demo-resnet10t-ft", "alpha": 0.5, "epochs": 1,
                          "batch-size": 16}},
    "fuse": {"check-images": 8},
    "evaluate": {"latency-runs": 5, "latency-batch": 4, "threads": 1, "quiet": True},
    "report": {},
}


# The README's experiment commands, verbatim (the test checks the README spells them so).
EXP_RUN = ["exp", "run", "--temp"]
EXP_SHOW = ["exp", "show", "--no-pager", "--only-changed", "--drop", "Created", "--keep",
            "'.*:top1|.*:latency_ms.torch'"]

def _write_params(root: Path, params: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_dvc_chain_end_to_end(tmp_path):
    root = dvc_project(tmp_path / "repo")
    params = json.loads(json.dumps(TINY))
    _write_params(root, params)

    first = ran(dvc(root, "repro"))
    assert first == {"shard", "finetune-teacher@demo-resnet10t-ft", "teach@demo-resnet10t-ft", "student@gnv3",
                     "fuse@gnv3", "evaluate@gnv3", "report"}

    metrics = json.loads((root / "outputs/eval/gnv3.json").read_text())
    assert metrics["val_samples"] == 12 and 0 <= metrics["top1"] <= metrics["top5"] <= 100
    assert set(metrics["latency_ms"]) == {"torch", "onnx"}
    assert metrics["teacher_agreement"]["demo-resnet10t-ft"] is not None
    assert metrics["fused_check"]["max_abs_diff"] < 1e-3 and metrics["onnx_check"]["max_abs_diff"] < 1e-3
    fuse_info = json.loads((root / "outputs/fused/gnv3/fuse.json").read_text())
    stock = create_stock_model(fuse_info["stock_model"], num_classes=4)
    stock.load_state_dict(load_file(str(root / "outputs/fused/gnv3/fused.safetensors")), strict=True)
    assert stock.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 4)
    assert "| gnv3 |" in (root / "outputs/report/report.md").read_text()
    assert (root / "outputs/report/report.png").is_file()

    assert ran(dvc(root, "repro")) == set(), "a second repro must run nothing"

    params["students"]["plain"] = {"student": "ghostnetv3-050", "alpha": 0.0, "num-branches": 1,
                                   "scale-branch": False, "identity-branch": False, "epochs": 1, "batch-size": 16,
                                   "views-from": "demo-resnet10t-ft"}
    _write_params(root, params)
    assert ran(dvc(root, "repro")) == {"student@plain", "fuse@plain", "evaluate@plain", "report"}
    plain = json.loads((root / "outputs/eval/plain.json").read_text())
    assert plain["teachers"] == [] and "labels only, plain (stock network)" in plain["recipe_summary"]
    twin = json.loads((root / "outputs/students/plain/student.json").read_text())
    assert twin["views_from"] == json.loads((root / "outputs/teach/demo-resnet10t-ft.json").read_text())["key"]

    curves = list(csv.DictReader((root / "outputs/curves/gnv3/plots.csv").open()))
    assert [row["epoch"] for row in curves] == ["1"] and {"loss", "top1", "ema_top1"} <= set(curves[0])
    plots = json.loads(dvc(root, "plots", "show", "--json"))
    assert not plots.get("errors") and "outputs/curves/gnv3/plots.csv" in plots["data"], plots

    # the README's experiment workflow: commit dvc.lock (the baseline), run the ablation in a temporary
    # copy so that the workspace keeps the baseline, compare with the documented `dvc exp show` call
    readme = (REPO / "README.md").read_text()
    assert "dvc " + " ".join(EXP_RUN) in readme and "dvc " + " ".join(EXP_SHOW) in readme
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "baseline")
    baseline = (root / "outputs/eval/gnv3.json").read_bytes()
    exp_ran = ran(dvc(root, *[a.strip("'") for a in EXP_RUN], "-S", "students.gnv3.alpha=0.9"))
    assert exp_ran == {"student@gnv3", "fuse@gnv3", "evaluate@gnv3", "report"}
    assert (root / "outputs/eval/gnv3.json").read_bytes() == baseline, "the workspace keeps the baseline"
    assert yaml.safe_load((root / "params.yaml").read_text())["students"]["gnv3"]["alpha"] == 0.5
    table = list(csv.DictReader(io.StringIO(dvc(root, *[a.strip("'") for a in EXP_SHOW], "--csv"))))
    assert [row["students.gnv3.alpha"] for row in table] == ["0.5", "0.5", "0.9"], table  # workspace, HEAD, exp
    assert all(row["outputs/eval/gnv3.json:top1"] not in ("", "!") for row in table), table
    assert {"outputs/eval/plain.json:top1", "outputs/eval/gnv3.json:latency_ms.torch"} <= set(table[0]), table

    # a recipe edit makes exactly the students that use it out of date; a report edit only the report
    with open(root / "manifests/recipes/demo.yaml", "a") as f:
        f.write("# edited\n")
    with open(root / "pipeline/report.py", "a") as f:
        f.write("# edited\n")
    assert set(json.loads(dvc(root, "status", "--json"))) == {"student@gnv3", "student@plain", "report"}
