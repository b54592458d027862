"""pipeline finetune-teacher: a teacher spec fitted to the shards' classes, resumable, accepted by teach."""

import json

import pytest
import timm
import yaml
from click.testing import CliRunner

import pipeline.finetune as finetune
from pipeline.teachers import load_teacher
from stages.cli import main
from tests._chain_helpers import tiny_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_shards(tmp_path_factory.mktemp("finetune"), num_classes=3, per_class=4)


def _run(shards, out, *extra):
    return CliRunner().invoke(main, ["finetune-teacher", "--teacher", "demo-resnet10t", "--shards", str(shards),
                                     "--out", str(out), "--batch-size", "8", "--auto-augment", "none", "--quiet",
                                     *extra])


def test_finetuned_spec_is_a_teacher_for_the_shards(tmp_path, shards):
    result = _run(shards, tmp_path / "t", "--epochs", "1")
    assert result.exit_code == 0, result.output
    spec = yaml.safe_load((tmp_path / "t" / "teacher.yaml").read_text())
    assert spec["num_classes"] == 3 and spec["pretrained"] is False and spec["name"] == "demo-resnet10t"
    model, digest = load_teacher(str(tmp_path / "t" / "teacher.yaml"))
    assert model.num_classes == 3 and len(digest) == 64
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["init"] == "scratch" and 0 <= metrics["val_top1"] <= 100
    assert not (tmp_path / "t" / "resume.safetensors").exists()


def test_interrupted_run_resumes_after_the_last_finished_epoch(tmp_path, shards, monkeypatch):
    real, epochs = finetune.student_loader, []

    def loader(*args, epoch, **kwargs):
        epochs.append(epoch)
        if epoch == 1 and len(epochs) == 2:
            raise KeyboardInterrupt  # killed during the second epoch
        return real(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(finetune, "student_loader", loader)
    with pytest.raises(KeyboardInterrupt):
        finetune.finetune_teacher("demo-resnet10t", shards, tmp_path / "t", epochs=2, batch_size=8,
                                  auto_augment=None, quiet=True)
    assert (tmp_path / "t" / "resume.safetensors").is_file() and not (tmp_path / "t" / "weights.safetensors").exists()
    finetune.finetune_teacher("demo-resnet10t", shards, tmp_path / "t", epochs=2, batch_size=8, auto_augment=None,
                              quiet=True)
    assert epochs == [0, 1, 1]
    assert (tmp_path / "t" / "weights.safetensors").is_file() and not (tmp_path / "t" / "resume.safetensors").exists()


def test_pretrained_weights_fall_back_to_scratch_offline(monkeypatch):
    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("no network")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    spec = {"name": "t", "model": "resnet10t", "source": "timm"}
    model, origin = finetune.build_model(spec, num_classes=5, pretrained=True)
    assert origin == "scratch" and model.num_classes == 5


def test_non_timm_teacher_is_refused(tmp_path, shards):
    spec = tmp_path / "ts.yaml"
    spec.write_text(yaml.safe_dump({"name": "ts", "model": str(tmp_path / "m.pt"), "source": "torchscript",
                                    "input_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "num_classes": 3}))
    result = CliRunner().invoke(main, ["finetune-teacher", "--teacher", str(spec), "--shards", str(shards),
                                       "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "only timm teachers" in result.output
