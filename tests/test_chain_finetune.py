"""pipeline finetune-teacher: a teacher spec fitted to the shards' classes, resumable, accepted by teach."""

import json

import pytest
import timm
import torch
import yaml
from click.testing import CliRunner

import pipeline.finetune as finetune
from pipeline.teachers import TimmSource, load_teacher
from stages.cli import main
from tests._chain_helpers import tiny_shards

PLAN = {"size": 64, "auto_augment": None}  # partial: ViewPlan's defaults fill the rest


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_shards(tmp_path_factory.mktemp("finetune"), num_classes=3, per_class=4)


def _run(shards, out, *extra):
    return CliRunner().invoke(main, ["finetune-teacher", "--teacher", "demo-resnet10t", "--shards", str(shards),
                                     "--out", str(out), "--batch-size", "8", "--quiet",
                                     *extra])


def test_finetuned_spec_is_a_teacher_for_the_shards(tmp_path, shards):
    result = _run(shards, tmp_path / "t", "--epochs", "1")
    assert result.exit_code == 0, result.output
    spec = yaml.safe_load((tmp_path / "t" / "teacher.yaml").read_text())
    assert spec["num_classes"] == 3 and spec["pretrained"] is False
    assert spec["name"] == "demo-resnet10t-ft"  # named apart from its source: its own store, pointer, report rows
    model, digest = load_teacher(str(tmp_path / "t" / "teacher.yaml"))
    assert model.num_classes == 3 and len(digest) == 64
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["init"] == "scratch" and 0 <= metrics["val_top1"] <= 100
    assert not (tmp_path / "t" / "checkpoint.safetensors").exists()


def test_interrupted_run_resumes_after_the_last_finished_epoch(tmp_path, shards, monkeypatch):
    real, epochs = finetune.student_loader, []

    def loader(shard_dir, split, *args, epoch, **kwargs):
        if split != "train":  # the val-views scores
            return real(shard_dir, split, *args, epoch=epoch, **kwargs)
        epochs.append(epoch)
        if epoch == 1 and len(epochs) == 2:
            raise KeyboardInterrupt  # killed during the second epoch
        return real(shard_dir, split, *args, epoch=epoch, **kwargs)

    monkeypatch.setattr(finetune, "student_loader", loader)
    with pytest.raises(KeyboardInterrupt):
        finetune.finetune_teacher("demo-resnet10t", shards, tmp_path / "t", epochs=2, batch_size=8, plan=PLAN,
                                  quiet=True)
    assert (tmp_path / "t" / "checkpoint.safetensors").is_file() and not (tmp_path / "t" / "weights.safetensors").exists()
    finetune.finetune_teacher("demo-resnet10t", shards, tmp_path / "t", epochs=2, batch_size=8, plan=PLAN,
                              quiet=True, resume=True)
    assert epochs == [0, 1, 1]
    assert (tmp_path / "t" / "weights.safetensors").is_file() and not (tmp_path / "t" / "checkpoint.safetensors").exists()


def test_pretrained_weights_fall_back_to_scratch_offline(monkeypatch):
    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("no network")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    spec = {"name": "t", "model": "resnet10t", "source": "timm"}
    model, origin = TimmSource().trainable(spec, num_classes=5, pretrained=True)
    assert origin == "scratch" and model.num_classes == 5


def _script_teacher(tmp_path, num_classes=3):
    """A user's own TorchScript teacher (a timm resnet10t, random init) + its spec without crop_pct."""
    model = timm.create_model("resnet10t", num_classes=num_classes).eval()
    torch.jit.save(torch.jit.script(model), str(tmp_path / "own.pt"))
    spec = tmp_path / "own.yaml"
    spec.write_text(yaml.safe_dump({"name": "own", "model": str(tmp_path / "own.pt"), "source": "torchscript", "trust_code": True,
                                    "input_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3,
                                    "num_classes": num_classes}))
    return spec


def test_torchscript_teacher_is_fitted_to_the_teach_plan(tmp_path, shards):
    """Default plan: params.yaml's teach.plan; summary: clean and views top-1 before -> after; TorchScript out."""
    params = tmp_path / "params.yaml"
    plan = {"seed": 3, "size": 64, "scale": [0.5, 1.0], "hflip": 0.0, "auto_augment": "rand-m5", "re_prob": 0.25}
    params.write_text(yaml.safe_dump({"teach": {"num-views": 2, "plan": plan}}))
    result = CliRunner().invoke(main, ["--params", str(params), "finetune-teacher", "--teacher",
                                       str(_script_teacher(tmp_path)), "--shards", str(shards), "--out",
                                       str(tmp_path / "t"), "--epochs", "1", "--batch-size", "8", "--quiet",
                                       "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "clean val" in result.output and "on views" in result.output and "->" in result.output
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["plan"]["seed"] == 3 and metrics["plan"]["auto_augment"] == "rand-m5"
    assert metrics["num_views"] == 2 and metrics["threads"] == 1
    assert set(metrics["before"]) == set(metrics["after"]) == {"clean", "views"}
    spec = yaml.safe_load((tmp_path / "t" / "teacher.yaml").read_text())
    assert spec["source"] == "torchscript" and spec["model"] == "teacher.pt"  # relative to teacher.yaml
    assert spec["crop_pct"] == 1.0
    tuned, _ = load_teacher(str(tmp_path / "t" / "teacher.yaml"))
    original, _ = load_teacher(str(tmp_path / "own.yaml"))
    x = torch.randn(2, 3, 64, 64)
    assert not torch.allclose(tuned(x), original(x))  # it trained


def test_export_teacher_is_refused(tmp_path, shards):
    spec = tmp_path / "ex.yaml"
    spec.write_text(yaml.safe_dump({"name": "ex", "model": str(tmp_path / "m.pt2"), "source": "export",
                                    "input_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "num_classes": 3}))
    result = CliRunner().invoke(main, ["finetune-teacher", "--teacher", str(spec), "--shards", str(shards),
                                       "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "torch.jit.save" in result.output, result.output


def test_a_finetuned_teacher_may_not_keep_its_sources_name(tmp_path, shards):
    result = _run(shards, tmp_path / "t", "--epochs", "1", "--name", "demo-resnet10t")
    assert result.exit_code == 2 and "other than its source's 'demo-resnet10t'" in result.output
    assert not (tmp_path / "t" / "teacher.yaml").exists()
