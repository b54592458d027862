"""`pipeline teach`: stored top-k equals a direct teacher forward; resume after SIGKILL, 2 torchrun
ranks and reruns all give the store one uninterrupted process gives."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.data.shards import ShardManifest, ShardReader
from pipeline.data.views import ViewPlan, render, view_params
from pipeline.errors import UserError
from pipeline.store import ARRAYS, open_pointer, open_store
from pipeline.teachers import load_teacher, resolve_spec
from stages.cli import main
from tests._teach_helpers import teach_args, tiny_shards, tiny_teacher
from tests.conftest import EMPTY_PARAMS

PIPELINE = str(Path(sys.executable).parent / "pipeline")
NO_PARAMS = ["--params", EMPTY_PARAMS]


def run_cli(*args):
    result = CliRunner().invoke(main, [*NO_PARAMS, *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teach")
    spec, shards = tiny_teacher(tmp), tiny_shards(tmp)
    result = run_cli(*teach_args(spec, shards, tmp / "ref"))
    assert result.exit_code == 0, result.output
    return tmp, spec, shards, open_pointer(tmp / "ref" / "out" / "tiny.json")


def data_files(store) -> dict:
    """Every chunk/shard file of the arrays (not the attributes, which hold timings)."""
    root = store.path
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.parent != root}


def assert_same_store(a, b):
    for name in (*ARRAYS, "done"):
        np.testing.assert_array_equal(a.arrays[name][:], b.arrays[name][:], err_msg=name)
    assert data_files(a) == data_files(b)


def test_store_equals_direct_forward(setup):
    _, spec_path, shards, store = setup
    spec = resolve_spec(spec_path)
    model, _ = load_teacher(spec)
    plan, reader = ViewPlan.load(store.plan), ShardReader(shards, "train")
    assert store.complete and store.num_samples == ShardManifest.read(shards).splits["train"]["count"]
    mean, std = torch.tensor(spec["mean"]).view(3, 1, 1), torch.tensor(spec["std"]).view(3, 1, 1)
    index = torch.arange(store.num_samples).repeat_interleave(store.num_views)
    view = torch.arange(store.num_views).repeat(store.num_samples)
    logits, classes, lse = store.lookup(index, view)
    for j, (i, v) in enumerate(zip(index.tolist(), view.tolist())):
        params = view_params(plan, reader.key(i), v)
        np.testing.assert_array_equal(store.params(i, v), params)
        x = torch.from_numpy(np.array(render(reader.image(i), params, plan, spec["input_size"]))).permute(2, 0, 1) / 255
        with torch.no_grad():
            z = model(((x - mean) / std)[None])[0]
        top = z.topk(store.k).indices.sort().values
        assert torch.equal(classes[j], top)
        torch.testing.assert_close(lse[j].float(), torch.logsumexp(z, 0), atol=1e-4, rtol=2**-10)  # 10 mantissa bits kept
        torch.testing.assert_close(logits[j].float(), z[top], atol=2e-3 * max(1, z.abs().max().item()), rtol=0)
    assert (store.arrays["labels"][:] == reader.labels).all()


def test_complete_store_is_up_to_date_without_forward(setup, monkeypatch):
    tmp, spec, shards, store = setup
    monkeypatch.setattr("pipeline.teachers.Forward.__call__", lambda *a: pytest.fail("teacher forward ran"))
    result = run_cli(*teach_args(spec, shards, tmp / "ref")[:-1])
    assert result.exit_code == 0 and "up to date" in result.output


def test_resume_after_sigkill_is_identical(setup):
    tmp, spec, shards, ref = setup
    root = tmp / "killed"
    proc = subprocess.Popen([PIPELINE, *NO_PARAMS, *teach_args(spec, shards, root)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if list(root.glob("*.zarr/done/c/*")):  # mid-run: a shard is written, the others are not
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    store_path = next(root.glob("*.zarr"))
    assert not open_store(store_path, require_complete=False).complete
    with pytest.raises(UserError, match="incomplete"):
        open_store(store_path)
    assert run_cli(*teach_args(spec, shards, root)).exit_code == 0
    assert_same_store(open_pointer(root / "out" / "tiny.json"), ref)


def test_two_torchrun_ranks_equal_one_process(setup):
    tmp, spec, shards, ref = setup
    root = tmp / "ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", PIPELINE,
           *NO_PARAMS, *teach_args(spec, shards, root)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    store = open_pointer(root / "out" / "tiny.json")
    assert store.group.attrs["run"]["world_size"] == 2
    assert_same_store(store, ref)


def test_other_weights_get_their_own_store(setup):
    tmp, spec, shards, ref = setup
    other = tiny_teacher(tmp / "ref", name="tiny", seed=1)  # same name and spec, other weights
    result = run_cli(*teach_args(other, shards, tmp / "ref")[:-1])  # not --quiet: the summary line
    assert result.exit_code == 0 and "16 views in" in result.output and "views/s" in result.output
    stores = sorted((tmp / "ref").glob("tiny-*.zarr"))
    assert len(stores) == 2 and open_pointer(tmp / "ref" / "out" / "tiny.json").key != ref.key
    assert open_store(ref.path).complete  # the first store is untouched


def test_num_classes_mismatch_is_a_user_error(setup):
    tmp, _, shards, _ = setup
    spec = tiny_teacher(tmp, name="ten", num_classes=10)
    result = run_cli(*teach_args(spec, shards, tmp / "ten"))
    assert result.exit_code == 2 and "predicts 10 classes but the dataset has 4" in result.output


def test_offline_without_cached_weights_exits_2_with_one_line(setup):
    tmp, _, shards, _ = setup
    spec = tmp / "hub.yaml"
    spec.write_text("name: hub\nmodel: resnet18.a1_in1k\npretrained: true\nnum_classes: 4\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "empty-hf-home")}
    done = subprocess.run([PIPELINE, *NO_PARAMS, *teach_args(spec, shards, tmp / "hub")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: teacher 'hub'") and "weights" in lines[0], done.stderr


def test_options_and_view_plan_come_from_params_yaml(setup):
    tmp, spec, shards, _ = setup
    params = tmp / "params.yaml"
    params.write_text(f"teach:\n  teacher: {spec}\n  shards: {shards}\n  num-views: 1\n  k: 2\n  device: cpu\n"
                      f"  store-root: {tmp / 'from-params'}\n  out: {tmp / 'from-params'}\n  quiet: true\n"
                      "  plan:\n    seed: 3\n    size: 64\n    auto_augment: rand-m5\n")
    result = CliRunner().invoke(main, ["--params", str(params), "teach"])
    assert result.exit_code == 0, result.output
    store = open_pointer(tmp / "from-params" / "tiny.json")
    assert (store.num_views, store.k, store.plan["seed"], store.plan["auto_augment"]) == (1, 2, 3, "rand-m5")


def test_threads_option_is_recorded(setup, tmp_path):
    _, spec, shards, _ = setup
    before = torch.get_num_threads()
    try:
        result = run_cli(*teach_args(spec, shards, tmp_path / "t", "--threads", "1"))
        assert result.exit_code == 0, result.output
    finally:
        torch.set_num_threads(before)
    store = open_pointer(tmp_path / "t" / "out" / "tiny.json")
    assert store.group.attrs["run"]["threads"] == 1


def test_a_crop_pct_edit_leaves_the_store_key_alone(setup, monkeypatch):
    """The clean eval render (crop_pct, interpolation) is no input of the stored logits: the views are the plan's,
    at the teacher's input size and normalisation. Old code: the edit changed the key and re-ran the teacher."""
    tmp, spec, shards, ref = setup
    stated = yaml.safe_load(spec.read_text())
    cropped = tmp / "cropped.yaml"
    cropped.write_text(yaml.safe_dump({**stated, "crop_pct": 0.5, "interpolation": "bilinear"}))
    with monkeypatch.context() as patch:
        patch.setattr("pipeline.teachers.Forward.__call__", lambda *a: pytest.fail("teacher forward ran"))
        result = run_cli(*teach_args(cropped, shards, tmp / "ref")[:-1])
    assert result.exit_code == 0 and "up to date" in result.output, result.output
    assert open_pointer(tmp / "ref" / "out" / "tiny.json").key == ref.key
    normalised = tmp / "mean.yaml"  # the normalisation changes the numbers: its own store
    normalised.write_text(yaml.safe_dump({**stated, "mean": [0.4, 0.5, 0.5]}))
    assert run_cli(*teach_args(normalised, shards, tmp / "mean")).exit_code == 0
    assert open_pointer(tmp / "mean" / "out" / "tiny.json").key != ref.key
