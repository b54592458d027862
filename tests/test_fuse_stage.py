"""pipeline fuse: the fused checkpoint loads strictly into the stock architecture and computes what the
training form computes; a failed check exits 2 and writes nothing."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import pipeline.models
from pipeline.metrics import onnx_runner
from pipeline.fuse import compare_outputs, export_onnx, fuse_student, load_trained_student
from stages.cli import main
from tests._chain_helpers import fake_student, tiny_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_shards(tmp_path_factory.mktemp("fuse"))


def test_fused_loads_into_stock_and_matches_training_form(tmp_path, shards):
    student = fake_student(tmp_path / "student")
    info = fuse_student(student, shards, tmp_path / "fused", onnx=False)
    assert info.stock_model == "ghostnetv2_050"
    assert info.fused_check["max_abs_diff"] < 1e-4 and info.fused_check["argmax_agreement"] == 100.0
    assert info.training_form["params"] > 0 and not (tmp_path / "fused" / "model.onnx").exists()

    stock = pipeline.models.create_stock_model("rep_ghostnetv3_050", num_classes=4).eval()
    stock.load_state_dict(load_file(str(tmp_path / "fused" / "fused.safetensors")), strict=True)
    trained, _, _ = load_trained_student(student)
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        assert (stock(x) - trained(x)).abs().max() < 1e-4
    assert json.loads((tmp_path / "fused" / "fuse.json").read_text())["checkpoint"] == "ema.safetensors"


def test_plain_twin_through_the_cli(tmp_path, shards):
    student = fake_student(tmp_path / "plain", num_branches=1, scale_branch=False)
    result = CliRunner().invoke(main, ["fuse", "--student-dir", str(student), "--shards", str(shards),
                                       "--out", str(tmp_path / "out"), "--no-onnx", "--checkpoint", "model"])
    assert result.exit_code == 0, result.output
    assert "ghostnetv2_050" in result.output
    assert json.loads((tmp_path / "out" / "fuse.json").read_text())["checkpoint"] == "model.safetensors"


def test_failed_check_exits_2_and_writes_nothing(tmp_path, shards, monkeypatch):
    student = fake_student(tmp_path / "student")
    real = pipeline.models.to_stock

    def broken(model):
        stock = real(model)
        with torch.no_grad():
            stock.get_classifier().bias.add_(1.0)
        return stock

    monkeypatch.setattr(pipeline.models, "to_stock", broken)
    result = CliRunner().invoke(main, ["fuse", "--student-dir", str(student), "--shards", str(shards),
                                       "--out", str(tmp_path / "out"), "--no-onnx"])
    assert result.exit_code == 2
    assert "fused vs training form" in result.output and "max |diff|" in result.output
    assert not (tmp_path / "out" / "fused.safetensors").exists()


def test_missing_student_is_a_user_error(tmp_path, shards):
    result = CliRunner().invoke(main, ["fuse", "--student-dir", str(tmp_path / "nope"), "--shards", str(shards),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "pipeline student" in result.output


def test_onnx_export_matches_torch(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()
    export_onnx(model, 16, tmp_path / "m.onnx")
    x = torch.randn(7, 3, 16, 16)  # another batch size than exported: the batch dimension is dynamic
    with torch.inference_mode():
        check = compare_outputs(model(x), onnx_runner(tmp_path / "m.onnx", threads=1)(x))
    assert check["max_abs_diff"] < 1e-5 and check["argmax_agreement"] == 100.0


def test_compare_outputs_tolerates_only_near_ties():
    ref = torch.tensor([[1.0, 0.9995, 0.0], [3.0, 0.0, 0.0]])
    near_tie = torch.tensor([[0.9995, 1.0, 0.0], [3.0, 0.0, 0.0]])
    assert compare_outputs(ref, near_tie, atol=1e-3)["clear_flips"] == 0
    flipped = torch.tensor([[1.0, 0.9995, 0.0], [0.0, 3.0, 0.0]])
    result = compare_outputs(ref, flipped, atol=1e-3)
    assert result["clear_flips"] == 1 and result["argmax_agreement"] == 50.0 and result["max_abs_diff"] == 3.0


def test_default_deploys_the_weights_student_json_chose_on_val(tmp_path, shards):
    student = fake_student(tmp_path / "student")
    info = json.loads((student / "student.json").read_text())
    choice = {"rule": "better val top-1 at the last epoch (EMA on a tie)", "model_top1": 90.0, "ema_top1": 87.0}
    (student / "student.json").write_text(json.dumps({**info, "weights": "model.safetensors",
                                                      "weights_choice": choice}))
    (tmp_path / "params.yaml").write_text("{}\n")  # no `fuse:` section: the built-in default
    result = CliRunner().invoke(main, ["--params", str(tmp_path / "params.yaml"), "fuse", "--student-dir", str(student),
                                       "--shards", str(shards), "--out", str(tmp_path / "out"), "--no-onnx"])
    assert result.exit_code == 0, result.output
    fused = json.loads((tmp_path / "out" / "fuse.json").read_text())
    assert fused["checkpoint"] == "model.safetensors" and fused["checkpoint_choice"] == choice
    assert fused["deploy"]["python"].startswith("timm.models.ghostnet.GhostNet(")
