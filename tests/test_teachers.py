"""Teacher specs and weights sources: local safetensors / checkpoint, TorchScript, torch.export, errors."""

import pytest
import torch
import yaml
from torch import nn

from pipeline.errors import UserError
from pipeline.io import state_digest
from pipeline.teachers import (SOURCES, TeacherSource, artifact_spec, load_teacher, resolve_spec,
                               source_of)
from tests._teach_helpers import tiny_teacher


def test_shipped_specs_resolve_with_preprocessing():
    for name, model in [("beitv2", "beitv2_base_patch16_224.in1k_ft_in22k_in1k"),
                        ("deit", "deit_base_patch16_224.fb_in1k"), ("resnet", "resnet101.tv_in1k")]:
        spec = resolve_spec(name)
        assert spec["model"] == model and spec["num_classes"] == 1000 and spec["input_size"] == 224


def test_safetensors_and_weights_only_checkpoint_give_the_same_teacher(tmp_path):
    spec = yaml.safe_load(tiny_teacher(tmp_path).read_text())
    a, digest_a = load_teacher(spec)
    torch.save({"state_dict": a.state_dict()}, tmp_path / "tiny.pth")
    b, digest_b = load_teacher({**spec, "weights": str(tmp_path / "tiny.pth")})
    assert digest_a == digest_b and not a.training
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(a(x), b(x))


def test_pickled_objects_are_never_loaded(tmp_path):
    spec = yaml.safe_load(tiny_teacher(tmp_path).read_text())
    torch.save({"state_dict": {}, "cfg": object.__new__(Opaque)}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="pickled objects other than tensors, refused"):
        load_teacher({**spec, "weights": str(tmp_path / "evil.pth")})
    with pytest.raises(UserError, match="do not fit"):
        load_teacher({**spec, "num_classes": 7})


class Opaque:
    pass


class Own(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_users_own_torchscript_teacher(tmp_path):
    model, x = Own().eval(), torch.randn(2, 3, 16, 16)
    path = tmp_path / "own.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    spec = {"name": "own", "model": str(path), "source": "torchscript"}
    with pytest.raises(UserError, match="trust_code: true"):  # a program: runs only when vouched for
        load_teacher({**spec, "input_size": 16, "mean": [0, 0, 0], "std": [1, 1, 1], "num_classes": 5})
    spec["trust_code"] = True
    with pytest.raises(UserError, match="must state its preprocessing"):
        load_teacher(spec)
    loaded, digest = load_teacher({**spec, "input_size": 16, "mean": [0, 0, 0], "std": [1, 1, 1], "num_classes": 5})
    torch.testing.assert_close(loaded(x), model(x))
    assert len(digest) == 64


def test_export_teacher_is_refused_before_loading(tmp_path):
    """torch.export.load unpickles with weights_only=False: refused before any load."""
    path = tmp_path / "own.pt2"
    torch.export.save(torch.export.export(Own().eval(), (torch.randn(2, 3, 16, 16),)), str(path))
    spec = {"name": "own", "model": str(path), "source": "export", "input_size": 16, "mean": [0, 0, 0],
            "std": [1, 1, 1], "num_classes": 5}
    with pytest.raises(UserError, match="source 'export' is refused.*safetensors"):
        load_teacher(spec)


def test_bad_specs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no teacher spec 'nope'"):
        resolve_spec("nope")
    with pytest.raises(UserError, match="not a timm model"):
        resolve_spec({"name": "x", "model": "no_such_model_abc"})
    with pytest.raises(UserError, match="unknown spec keys"):
        resolve_spec({"name": "x", "model": "resnet18", "colour": 1})
    with pytest.raises(UserError, match="not found"):
        load_teacher({"name": "x", "model": "resnet18", "weights": str(tmp_path / "missing.safetensors")})


@pytest.mark.parametrize("source", ["torchscript"])  # export is refused (test_export_teacher_is_refused_before_loading)
def test_file_teacher_without_crop_pct_gets_the_whole_image(source):
    """A user's own model states no crop: 1.0 (a silent 0.875 centre crop cost a 32-px teacher 6 points)."""
    spec = resolve_spec({"name": "own", "model": "own.pt", "source": source, "trust_code": True,
                         "input_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "num_classes": 10})
    assert spec["crop_pct"] == 1.0
    assert resolve_spec({**spec, "crop_pct": 0.9})["crop_pct"] == 0.9


class Held(TeacherSource):
    """A teacher source written for this test alone: models held in memory by name (what a new source needs)."""

    name = "held"
    models = {}

    def load(self, spec):
        return self.models[spec["model"]]

    def digest(self, spec, model):
        return state_digest(model.state_dict())


def test_a_new_source_is_one_class(monkeypatch):
    """Registered in SOURCES, one class resolves, loads, digests; it runs no code, so an artifact may name it; its
    defaults are a user's own model's; it cannot be fine-tuned unless it says how."""
    monkeypatch.setitem(SOURCES, Held.name, Held)
    monkeypatch.setitem(Held.models, "own", Own())
    spec = {"name": "own", "model": "own", "source": "held", "input_size": 16, "mean": [0, 0, 0], "std": [1, 1, 1],
            "num_classes": 5}
    assert resolve_spec(spec)["crop_pct"] == 1.0 and artifact_spec(spec, "a store") == resolve_spec(spec)
    model, digest = load_teacher(spec)
    assert model is Held.models["own"] and not model.training and digest == state_digest(model.state_dict())
    with pytest.raises(UserError, match="must state its preprocessing"):
        resolve_spec({k: v for k, v in spec.items() if k != "mean"})
    with pytest.raises(UserError, match="a held teacher cannot be fine-tuned"):
        source_of(resolve_spec(spec)).trainable(resolve_spec(spec), 5, pretrained=False)
