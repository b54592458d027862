"""pipeline evaluate: metric helpers on known values, and the stage on a tiny fused student."""

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from pipeline.evaluate import recipe_summary
from pipeline.scores import Metrics
from pipeline.fuse import fuse_student
from pipeline.metrics import agreement, latency_ms, topk_accuracy
from stages.cli import main
from tests._chain_helpers import fake_student, tiny_shards


def test_topk_accuracy_on_known_logits():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 1])
    acc = topk_accuracy(logits, labels, ks=(1, 2, 5))  # k=5 is capped at the 3 classes
    assert acc[1] == pytest.approx(100 / 3) and acc[2] == pytest.approx(200 / 3) and acc[5] == 100.0


def test_agreement_counts_equal_argmax():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    assert agreement(a, b) == 50.0


def test_latency_is_the_median_of_the_timed_runs():
    calls = []
    ms = latency_ms(calls.append, "x", runs=100, warmup=3)
    assert len(calls) == 103 and 0 <= ms < 1


DEMO = {"name": "demo", "alpha": 0.5, "tau": 1.0, "epochs": 6, "opt": "lamb"}


@pytest.fixture(scope="module")
def fused_record(tmp_path_factory):
    """The FusedStudent of a real (tiny, fake-trained) fuse run."""
    root = tmp_path_factory.mktemp("record")
    return fuse_student(fake_student(root / "student"), tiny_shards(root), root / "fused", check_images=4, onnx=False)


@pytest.mark.parametrize("kwargs, teachers, recipe, expected", [
    # branches from scratch at a budget where they were measured not to help: the column says so
    ({"num_branches": 3, "scale_branch": True, "identity_branch": True}, ["t1", "t2"], DEMO,
     "demo: KD a=0.5 tau=1 from t1+t2, re-param N=3 + 1x1 + identity (below the branches' measured budget), "
     "6 ep lamb"),
    ({"num_branches": 3, "scale_branch": True, "identity_branch": True}, ["t"], {**DEMO, "epochs": 600},
     "demo: KD a=0.5 tau=1 from t, re-param N=3 + 1x1 + identity, 600 ep lamb"),
    ({"num_branches": 1, "scale_branch": False, "identity_branch": False}, [], {**DEMO, "alpha": 0.0},
     "demo: labels only, plain (stock network), 6 ep lamb"),
    # N=1 without the 1x1 still had the identity BN in many blocks: not the stock network
    ({"num_branches": 1, "scale_branch": False, "identity_branch": True}, [], {**DEMO, "alpha": 0.0},
     "demo: labels only, re-param N=1 + identity (below the branches' measured budget), 6 ep lamb"),
    ({}, ["t"], {**DEMO, "alpha": 0.9}, "demo: KD a=0.9 tau=1 from t, stock model, 6 ep lamb"),
])
def test_recipe_summary(fused_record, kwargs, teachers, recipe, expected):
    info = dataclasses.replace(fused_record, model_kwargs=kwargs, teachers=teachers, recipe=recipe)
    assert recipe_summary(info) == expected


def test_evaluate_stage_writes_metrics_and_skips_unknown_teacher(tmp_path):
    shards = tiny_shards(tmp_path)
    student = fake_student(tmp_path / "student", teachers=["ghost-teacher"])
    fuse_student(student, shards, tmp_path / "fused", onnx=False)
    out = tmp_path / "eval" / "student.json"
    result = CliRunner().invoke(main, ["evaluate", "--fused-dir", str(tmp_path / "fused"), "--shards", str(shards),
                                       "--teach-dir", str(tmp_path / "teach"), "--out", str(out),
                                       "--latency-runs", "3", "--latency-batch", "2", "--threads", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    m = json.loads(out.read_text())
    assert m["val_samples"] == 12 and 0 <= m["top1"] <= m["top5"] <= 100
    assert m["params"] < m["training_form"]["params"] and m["macs"] < m["training_form"]["macs"]
    assert set(m["latency_ms"]) == {"torch"} and m["latency_ms"]["torch"] > 0 and m["throughput"]["torch"] > 0
    assert m["teacher_agreement"] == {"ghost-teacher": None}
    assert "pipeline teach" in m["teacher_notes"]["ghost-teacher"]
    assert m["throughput_batch"] == 2 and m["torch_threads"] == 1 and m["stock_model"] == "ghostnetv2_050"
    assert m["deploy"].startswith("timm GhostNet(width=0.5")  # what the report names: a call timm has
    assert m["val_curve"] == [{"epoch": 1, "top1": 0.0, "ema_top1": 0.0, "val_images": 1}]  # student.json's, via fuse
    assert Metrics.read(out) == Metrics(**m)  # what report reads: every key evaluate writes, and no other


def test_latency_is_interleaved_with_median_and_spread():
    """Call i of every runner runs back to back, so load changes hit all runners alike."""
    from pipeline.metrics import interleaved_latency

    calls = []
    runners = {"a": lambda x: calls.append("a"), "b": lambda x: calls.append("b")}
    out = interleaved_latency(runners, None, runs=5, warmup=1)
    assert calls == ["a", "b"] * 6
    for median, p10, p90 in out.values():
        assert 0 <= p10 <= median <= p90


def test_recipe_summary_names_the_pretrained_init(fused_record):
    info = dataclasses.replace(fused_record, init={"source": "/w/mobilenetv2_100.safetensors", "sha256": "ab" * 32,
                                                   "init_state_sha256": "cd" * 32})
    assert recipe_summary(info).endswith("init mobilenetv2_100.safetensors sha256 abababababab")


def test_metrics_keep_four_significant_digits_so_small_figures_stay_visible():
    from pipeline.io import significant

    metrics = {"top1": 87.19444444, "fused_check": {"max_abs_diff": 1.2345678e-06}, "params": 1590000,
               "latency_ms": [12.34567, 0.000123456], "student": "g"}
    assert significant(metrics) == {"top1": 87.19, "fused_check": {"max_abs_diff": 1.235e-06}, "params": 1590000,
                                    "latency_ms": [12.35, 0.0001235], "student": "g"}
