"""Pretrained init: stock weights through timm's own mechanism give a training form that computes the stock model."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from pipeline.models import create_stock_model
from tests.test_models import MODELS, assert_same_logits, images, randomize_bn


def _save(model, path) -> str:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def _from_file(name, path, classes=1000, **kwargs):
    """timm's own loading; `classes` is the class count of the file's classifier."""
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=classes),
                             **kwargs).eval()


SMALLEST = ["rep_ghostnetv3_050", "rep_mobilenetv2_100", "rep_shufflenetv2_100"]


@pytest.mark.parametrize("name,rep", [(name, {}) for name in MODELS]
                         + [(name, dict(num_branches=1, scale_branch=False)) for name in SMALLEST]
                         + [(name, dict(num_branches=5)) for name in SMALLEST]
                         + [(name, dict(identity_branch=False)) for name in SMALLEST]
                         + [(name, dict(num_branches=1, scale_branch=False, identity_branch=False)) for name in SMALLEST])
def test_stock_weights_give_the_stock_function(name, rep, tmp_path):
    stock = randomize_bn(create_stock_model(name, num_classes=1000))
    model = _from_file(name, _save(stock, tmp_path / "stock.safetensors"), num_classes=1000, **rep)
    x = images(size=64)
    with torch.no_grad():
        assert_same_logits(stock(x), model(x))


@pytest.mark.parametrize("name", SMALLEST)
def test_other_class_count_replaces_only_the_classifier(name, tmp_path):
    stock = randomize_bn(create_stock_model(name, num_classes=1000))
    model = _from_file(name, _save(stock, tmp_path / "stock.safetensors"), num_classes=10)
    assert model.get_classifier().out_features == 10
    head = model.pretrained_cfg["classifier"]
    setattr(stock, head, model.get_classifier())  # the 10-class stock twin with the same fresh head
    x = images(size=64)
    with torch.no_grad():
        assert_same_logits(stock(x), model(x))


def test_training_form_weights_load_into_other_branch_counts(tmp_path):
    """A rep_ghostnetv3 checkpoint (N=3 + 1x1) into N=1 without 1x1: folded, same function in eval mode."""
    source = randomize_bn(timm.create_model("rep_ghostnetv3_050", num_classes=10))
    path = _save(source, tmp_path / "rep.safetensors")
    same = _from_file("rep_ghostnetv3_050", path, classes=10, num_classes=10)
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in source.state_dict().items())
    other = _from_file("rep_ghostnetv3_050", path, classes=10, num_classes=10, num_branches=1, scale_branch=False)
    x = images(size=64)
    with torch.no_grad():
        assert_same_logits(source(x), other(x))


@pytest.mark.parametrize("name,source", [("rep_ghostnetv3_100", "ghostnetv3_100"),
                                         ("rep_ghostnetv3_100", "ghostnetv2_100")])
def test_timm_ghostnet_weights(name, source, tmp_path):
    stock = randomize_bn(timm.create_model(source, num_classes=1000))
    model = _from_file(name, _save(stock, tmp_path / "timm.safetensors"), num_classes=1000, num_branches=2)
    x = images(size=64)
    with torch.no_grad():
        assert_same_logits(stock(x), model(x))


@pytest.mark.parametrize("name,wrong", [("rep_mobilenetv2_100", "mobilenetv2_140"),
                                        ("rep_mobilenetv2_100", "rep_shufflenetv2_100"),
                                        ("rep_ghostnetv3_050", "ghostnetv2_100")])
def test_wrong_architecture_is_a_value_error(name, wrong, tmp_path):
    path = _save(create_stock_model(wrong), tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="the weights"):  # not the old "has no pretrained weights"
        _from_file(name, path)
