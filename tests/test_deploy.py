"""Every fused student deploys with timm / torchvision alone: fuse.json's "deploy" call, run in a process
that never imports this project, builds a model into which the fused weights load strictly."""

import importlib
import json
import subprocess
import sys

import timm
import torch
from safetensors.torch import save_file

from pipeline.models import STOCK_NAMES, create_stock_model, deploy_spec, to_stock

BUILD = """
import importlib, json, sys
import torch
from safetensors.torch import load_file
for item in json.load(open(sys.argv[1])):
    fuse = {"deploy": item["deploy"]}
    module, _, name = fuse["deploy"]["call"].rpartition(".")
    model = getattr(importlib.import_module(module), name)(*fuse["deploy"]["args"], **fuse["deploy"]["kwargs"])
    model.load_state_dict(load_file(item["weights"]), strict=True)
    import timm, torchvision  # what the one-line form names
    again = eval(fuse["deploy"]["python"])
    again.load_state_dict(load_file(item["weights"]), strict=True)
    logits = model.eval()(torch.zeros(1, 3, 64, 64))
    assert logits.shape == (1, 7), (item["name"], logits.shape)
assert not any(m == "pipeline" or m.startswith("pipeline.") for m in sys.modules), "imported our code"
print("OK", len(json.load(open(sys.argv[1]))))
"""


# One student per kind of deploy call (the other widths take the same path with another name or width).
KINDS = ["rep_ghostnetv3_050", "rep_ghostnetv3_100", "rep_mobilenetv2_100", "rep_shufflenetv2_100"]


def test_every_kind_of_student_deploys_with_timm_or_torchvision_alone(tmp_path):
    assert {deploy_spec(n, 7)["call"] for n in STOCK_NAMES} == {deploy_spec(n, 7)["call"] for n in KINDS} | {
        f"torchvision.models.{deploy_spec('rep_shufflenetv2_200', 7)['call'].rsplit('.', 1)[1]}"}
    items = []
    for name in KINDS:
        torch.manual_seed(0)
        stock = to_stock(timm.create_model(name, num_classes=7).eval())
        weights = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in stock.state_dict().items()}, str(weights))
        items.append({"name": name, "deploy": deploy_spec(name, 7), "weights": str(weights)})
    (tmp_path / "items.json").write_text(json.dumps(items))
    proc = subprocess.run([sys.executable, "-c", BUILD, str(tmp_path / "items.json")], capture_output=True,
                          text=True, cwd=tmp_path, env={"PATH": "", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["OK", str(len(KINDS))]


def test_ghostnet_half_width_needs_no_private_or_missing_timm_name():
    spec = deploy_spec("rep_ghostnetv3_050", 10)
    assert spec["call"] == "timm.models.ghostnet.GhostNet" and spec["kwargs"]["width"] == 0.5
    assert deploy_spec("rep_ghostnetv3_100", 10)["python"] == 'timm.create_model("ghostnetv2_100", num_classes=10)'
    assert deploy_spec("rep_shufflenetv2_100", 10)["python"] == "torchvision.models.shufflenet_v2_x1_0(num_classes=10)"


def test_every_registered_student_has_a_family_that_deploys_it():
    """Found from timm's registry, not a list kept here: each rep_* student a family registers names its stock
    architecture, and its family's deploy call builds the model create_stock_model gives (class and tensors)."""
    names = timm.list_models("rep_*")
    assert names and sorted(STOCK_NAMES) == names
    for name in names:
        spec = deploy_spec(name, 7)
        module, _, attr = spec["call"].rpartition(".")
        built = getattr(importlib.import_module(module), attr)(*spec["args"], **spec["kwargs"])
        stock = create_stock_model(name, 7)
        assert type(built) is type(stock), name
        shapes = {k: v.shape for k, v in stock.state_dict().items()}
        assert {k: v.shape for k, v in built.state_dict().items()} == shapes, name
