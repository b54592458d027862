"""Student training: learning, exact resume, refusals, DDP equality, the CLI stage."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import pipeline.loop as loop_mod
import pipeline.train as train_mod
from pipeline.checkpoint import load_checkpoint
from pipeline.errors import UserError
from pipeline.recipes import load_recipe
from pipeline.records import StudentSpec
from pipeline.train import train
from stages.cli import main as cli
from tests._student_helpers import PLAN, SPEC, STUDENT, make_shards, make_store

QUICK = {"epochs": 4, "batch_size": 16, "lr": 2e-2, "warmup_epochs": 0, "ema_decay": 0.9,
         "num_branches": None, "scale_branch": None, "img_size": 64}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("student")
    make_shards(root / "shards")
    store = make_store(root / "shards", root / "teach")
    return root, store


def rows(out):
    with open(Path(out) / "plots.csv") as f:
        return list(csv.DictReader(f))


def test_kd_run_learns_and_writes_outputs(data, tmp_path):
    root, store = data
    recipe = load_recipe("demo", {**QUICK, "epochs": 5})
    last = train(STUDENT, recipe, root / "shards", tmp_path, [store], ["t1"], quiet=True)
    history = rows(tmp_path)
    kd = [float(r["kd"]) for r in history]
    assert kd[-1] < 0.6 * kd[0], kd
    assert last["top1"] >= 60 or last["ema_top1"] >= 60, last  # 4 classes: chance is 25 %
    info = json.loads((tmp_path / "student.json").read_text())
    assert info["teachers"] == ["t1"] and info["num_classes"] == 4 and info["recipe"]["name"] == "demo"
    assert info["view_plan"] == PLAN.to_dict() and info["num_views"] == 2
    weights = load_file(tmp_path / info["weights"])
    assert set(weights) == set(load_file(tmp_path / "model.safetensors"))
    choice = info["weights_choice"]  # deployed: the better on val at the end, and the figures that chose it
    assert (choice["model_top1"], choice["ema_top1"]) == (last["top1"], last["ema_top1"])
    assert info["weights"] == ("ema.safetensors" if last["ema_top1"] >= last["top1"] else "model.safetensors")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epoch"] == 5 and metrics["val"]["top1"] == last["top1"]
    assert [int(r["epoch"]) for r in history] == [1, 2, 3, 4, 5]
    # the training curve travels with the student (student.json -> fuse.json -> evaluate -> report)
    assert [(c["epoch"], c["top1"], c["ema_top1"]) for c in info["val_curve"]] == [
        (int(r["epoch"]), float(r["top1"]), float(r["ema_top1"])) for r in history]


def test_resume_replays_the_uninterrupted_run(data, tmp_path, monkeypatch):
    root, store = data
    recipe = load_recipe("demo", {**QUICK, "epochs": 3, "mixup": 0.4})
    train(STUDENT, recipe, root / "shards", tmp_path / "full", [store], ["t1"], quiet=True)

    real_save, calls = loop_mod.save_checkpoint, []

    def crash_after_first_epoch(*args):
        real_save(*args)
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop_mod, "save_checkpoint", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(STUDENT, recipe, root / "shards", tmp_path / "cut", [store], ["t1"], quiet=True)
    monkeypatch.setattr(loop_mod, "save_checkpoint", real_save)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors")["state"]["epoch"] == 1
    train(STUDENT, recipe, root / "shards", tmp_path / "cut", [store], ["t1"], resume=True, quiet=True)

    full, cut = rows(tmp_path / "full"), rows(tmp_path / "cut")
    for a, b in zip(full, cut, strict=True):
        for key in ("loss", "ce", "kd", "lr", "top1", "ema_top1"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-6), (key, a, b)
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(tmp_path / "full" / name), load_file(tmp_path / "cut" / name)
        assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5) for k in wa)


def test_resume_refuses_another_recipe(data, tmp_path):
    root, store = data
    train(STUDENT, load_recipe("demo", {**QUICK, "epochs": 1}), root / "shards", tmp_path, [store], ["t1"],
          quiet=True)
    with pytest.raises(UserError, match="different run"):
        train(STUDENT, load_recipe("demo", {**QUICK, "epochs": 1, "alpha": 0.9}), root / "shards", tmp_path,
              [store], ["t1"], resume=True, quiet=True)


def test_refuses_a_store_for_other_shards_or_views(data, tmp_path):
    root, _ = data
    other = make_store(root / "shards", tmp_path / "teach", name="other", fingerprint="0123456789abcdef")
    with pytest.raises(UserError, match="0123456789abcdef") as err:
        train(STUDENT, load_recipe("demo", QUICK), root / "shards", tmp_path / "out", [other], ["other"], quiet=True)
    assert "re-run `pipeline teach`" in str(err.value)
    # With a store its plan is the views: a recipe plan beside it (even one that agrees) is refused, naming the fix.
    for plan in ({"re_prob": 0.5}, PLAN.to_dict()):
        with pytest.raises(UserError, match=r"recipe 'demo' sets a view plan.*set plan to null") as err:
            train(STUDENT, load_recipe("demo", {**QUICK, "plan": plan}), root / "shards", tmp_path / "out",
                  [data[1]], ["t1"], quiet=True)
        assert "\n" not in str(err.value) and str(data[1].path) in str(err.value)
    # Two stores of different view plans cannot be ensembled.
    shifted = make_store(root / "shards", tmp_path / "teach", name="shifted", plan=PLAN.__class__(seed=1, size=64))
    with pytest.raises(UserError, match="view plan"):
        train(STUDENT, load_recipe("demo", QUICK), root / "shards", tmp_path / "out", [data[1], shifted],
              ["t1", "shifted"], quiet=True)
    assert not (tmp_path / "out" / "checkpoint.safetensors").exists()


def test_refuses_small_ghostnet_inputs_and_missing_stores(data, tmp_path):
    root, store = data
    ghost = StudentSpec.resolve({**SPEC, "model": "rep_ghostnetv3_050"})
    with pytest.raises(UserError, match="at least 64 px"):
        train(ghost, load_recipe("demo", {**QUICK, "img_size": 32}), root / "shards", tmp_path, [store], ["t1"])
    with pytest.raises(UserError, match="needs teacher stores"):
        train(STUDENT, load_recipe("demo", QUICK), root / "shards", tmp_path, [], [])


def test_cli_plain_ce_ensemble_and_errors(data, tmp_path):
    """The stage end to end: a rep GhostNetV3 student, two teachers (ensemble), params from the CLI."""
    root, _ = data
    make_store(root / "shards", root / "teach", name="t2", seed=1)
    student = tmp_path / "ghost.yaml"
    student.write_text(json.dumps({**SPEC, "model": "rep_ghostnetv3_050"}))
    args = ["student", "--student", str(student), "--teachers", "t1,t2", "--teacher-weights", "2,1",
            "--recipe", "demo", "--shards", str(root / "shards"), "--teach-dir", str(root / "teach"),
            "--out", str(tmp_path / "out"), "--epochs", "1", "--batch-size", "16", "--num-branches", "2",
            "--no-scale-branch", "--no-identity-branch", "--set", "ema_decay=null", "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "out" / "student.json").read_text())
    assert info["model_kwargs"] == {"num_branches": 2, "scale_branch": False, "identity_branch": False,
                                    "branch_bn_init": 0.0}
    # branches from scratch at a budget where they were measured not to help: said once, before training
    [note] = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert "at 1 epochs" in note and "--num-branches 1 --no-scale-branch --no-identity-branch" in note
    assert info["teachers"] == ["t1", "t2"] and info["teacher_weights"] == [2.0, 1.0]
    assert info["weights"] == "model.safetensors" and not (tmp_path / "out" / "ema.safetensors").exists()

    bad = CliRunner().invoke(cli, args[:-1] + ["--alpha", "1.5"])
    assert bad.exit_code == 2 and "alpha must be in [0, 1]" in bad.output
    missing = CliRunner().invoke(cli, [a if a != "t1,t2" else "t1,nope" for a in args])
    assert missing.exit_code == 2 and "nope.json" in missing.output


def test_ddp_two_processes_equal_one(data, tmp_path):
    """torchrun, 2 gloo ranks x 8 == 1 rank x 16 (a LayerNorm model: BN statistics are per rank on CPU)."""
    root, _ = data
    student = tmp_path / "convnext.yaml"
    student.write_text(json.dumps({**SPEC, "model": "test_convnext"}))
    common = ["student", "--student", str(student), "--teachers", "t1", "--recipe", "demo",
              "--shards", str(root / "shards"), "--teach-dir", str(root / "teach"), "--epochs", "2",
              "--batch-size", "16", "--lr", "0.01", "--warmup-epochs", "0", "--quiet",
              "--set", "num_branches=null", "--set", "scale_branch=null"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    script = str(Path(sys.executable).parent / "pipeline")  # the console script
    one = subprocess.run([sys.executable, script] + common + ["--out", str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29531", script] + common + ["--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "state.json").read_text())["world_size"] == 2
    for a, b in zip(rows(tmp_path / "one"), rows(tmp_path / "two"), strict=True):
        for key in ("loss", "ce", "kd"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4), (key, a, b)
    wa, wb = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)


def test_val_every_and_val_samples(data, tmp_path):
    """Skipped epochs have no val figures; others use the fixed subset; the last epoch the whole split."""
    root, _ = data
    recipe = load_recipe("demo", {**QUICK, "epochs": 3, "alpha": 0.0})
    train(STUDENT, recipe, root / "shards", tmp_path, quiet=True, val_every=2, val_samples=5, threads=1)
    history = rows(tmp_path)
    assert [r["top1"] != "" for r in history] == [False, True, True]
    state = load_checkpoint(tmp_path / "checkpoint.safetensors")["state"]["history"]
    assert [r.get("val_images") for r in state] == [None, 5, 16]  # 4 classes x 16 x 20% val
    info = json.loads((tmp_path / "student.json").read_text())
    assert info["threads"] == 1 and info["init"] is None


def test_init_from_stock_weights_records_the_source(data, tmp_path):
    """--init FILE: the source and its sha256 go into student.json; a wrong architecture is one line, exit 2."""
    import timm
    from safetensors.torch import save_file

    from pipeline.io import sha256_file

    root, _ = data
    stock = timm.create_model("test_efficientnet", num_classes=7)
    path = tmp_path / "stock.safetensors"
    save_file(stock.state_dict(), str(path))
    recipe = load_recipe("demo", {**QUICK, "epochs": 1, "alpha": 0.0})
    model, _, record = train_mod.build_student(STUDENT, recipe, 4, init=str(path))
    assert record["source"] == str(path) and record["sha256"] == sha256_file(path)
    own = {k: v for k, v in stock.state_dict().items() if not k.startswith("classifier.")}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in own.items())
    assert model.get_classifier().out_features == 4
    wrong = tmp_path / "wrong.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=4).state_dict(), str(wrong))
    res = CliRunner().invoke(cli, ["student", "--student", "manifests/students/mobilenetv2-100.yaml",
                                   "--shards", str(root / "shards"), "--out", str(tmp_path / "o"),
                                   "--recipe", "demo", "--alpha", "0", "--init", str(wrong)])
    assert res.exit_code == 2, res.output
    assert "does not fit" in res.output and len(res.output.strip().splitlines()) == 1, res.output
    pickle = tmp_path / "weights.pth"
    torch.save(stock.state_dict(), pickle)
    res = CliRunner().invoke(cli, ["student", "--student", "manifests/students/mobilenetv2-100.yaml",
                                   "--shards", str(root / "shards"), "--out", str(tmp_path / "o"),
                                   "--recipe", "demo", "--alpha", "0", "--init", str(pickle)])
    assert res.exit_code == 2 and "not a .safetensors file" in res.output, res.output
