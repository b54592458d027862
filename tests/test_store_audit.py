"""Issue 9: stored temperatures, the teacher's top-1 on its views and on clean val, `store audit`."""

import json

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from pipeline.data.shards import ShardReader
from pipeline.data.views import ViewPlan, render
from pipeline.store import open_pointer
from pipeline.teach import view_cost_warning
from pipeline.teachers import load_teacher, resolve_spec
from stages.cli import main
from tests._teach_helpers import teach_args, tiny_shards, tiny_teacher
from tests.conftest import EMPTY_PARAMS

NO_PARAMS = ["--params", EMPTY_PARAMS]


def run_cli(*args):
    return CliRunner().invoke(main, [*NO_PARAMS, *args])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    spec, shards = tiny_teacher(tmp), tiny_shards(tmp)
    result = run_cli(*teach_args(spec, shards, tmp / "ref")[:-1])  # not --quiet: the summary line is checked
    assert result.exit_code == 0, result.output
    return tmp, spec, shards, open_pointer(tmp / "ref" / "out" / "tiny.json"), result.output


def test_store_keeps_lse_at_every_temperature(setup):
    _, spec_path, shards, store, _ = setup
    assert store.temperatures == [1.0, 2.0, 4.0] and store.provenance["temperatures"] == [1.0, 2.0, 4.0]
    spec = resolve_spec(spec_path)
    model, _ = load_teacher(spec)
    plan, reader = ViewPlan.load(store.plan), ShardReader(shards, "train")
    mean, std = torch.tensor(spec["mean"]).view(3, 1, 1), torch.tensor(spec["std"]).view(3, 1, 1)
    for i, v in [(0, 0), (3, 1), (7, 1)]:
        x = torch.from_numpy(render(reader.image(i), store.params(i, v), plan, 64).copy()).permute(2, 0, 1) / 255
        with torch.no_grad():
            z = model(((x - mean) / std)[None])[0].double()
        for tau in (1.0, 2.0, 4.0):
            got = store.lookup_tau(torch.tensor([i]), torch.tensor([v]), tau)[3][0]
            assert abs(float(got) - float(torch.logsumexp(z / tau, 0))) < 2e-3


def test_temperatures_are_part_of_the_key(setup):
    tmp, spec, shards, store, _ = setup
    result = run_cli(*teach_args(spec, shards, tmp / "t2", "--temperatures", "1,2"))
    assert result.exit_code == 0, result.output
    other = open_pointer(tmp / "t2" / "out" / "tiny.json")
    assert other.key != store.key and other.temperatures == [1.0, 2.0]
    bad = run_cli(*teach_args(spec, shards, tmp / "t3", "--temperatures", "1,x"))
    assert bad.exit_code == 2 and "--temperatures" in bad.output


def test_teacher_top1_on_views_and_clean_val(setup):
    _, _, _, store, output = setup
    p = store.provenance
    labels = store.arrays["labels"][:]
    values, indices = store.arrays["values"][:], store.arrays["indices"][:]
    top1 = np.take_along_axis(indices, values.argmax(-1)[..., None], -1)[..., 0]
    assert p["teacher_top1_views"] == round(100 * float((top1 == labels[:, None]).mean()), 2)
    assert 0 <= p["teacher_top1_clean_val"] <= 100
    assert f"{p['teacher_top1_views']:.2f}% on the stored views" in output
    assert f"{p['teacher_top1_clean_val']:.2f}% on clean val" in output
    info = json.loads(run_cli("store", "inspect", str(store.path), "--json").output)
    assert info["teacher_top1_views"] == p["teacher_top1_views"]
    assert info["teacher_top1_clean_val"] == p["teacher_top1_clean_val"]


def test_views_that_cost_the_teacher_warn_naming_the_plan_settings():
    plan = ViewPlan(scale=(0.35, 1.0), auto_augment="rand-m6-mstd0.5", re_prob=0.25)
    line = view_cost_warning({"teacher_top1_views": 52.0, "teacher_top1_clean_val": 83.0}, plan)
    assert "31.0 points" in line and "scale min 0.35" in line and "rand-m6-mstd0.5" in line and "re_prob 0.25" in line
    assert view_cost_warning({"teacher_top1_views": 75.0, "teacher_top1_clean_val": 83.0}, plan) is None


def test_audit_passes_on_a_faithful_store_and_fails_on_a_drifted_one(setup, tmp_path):
    tmp, spec, shards, store, _ = setup
    ok = run_cli("store", "audit", str(store.path), "--shards", str(shards), "--teacher", str(spec), "--samples", "8",
                 "--device", "cpu")
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.output)
    assert report["ok"] and report["top1_agreement"] == 1.0 and report["max_kl"] < 1e-3 and report["params_rederived"]
    # A store whose stored views are not the ones its logits came from (params of another plan seed).
    import shutil

    drifted = tmp_path / "drifted.zarr"
    shutil.copytree(store.path, drifted)
    params = zarr.open_group(drifted, mode="r+")["params"]
    stored = params[:]
    params[:] = np.roll(stored, 1, axis=0)  # every row gets another sample's view params
    bad = run_cli("store", "audit", str(drifted), "--shards", str(shards), "--teacher", str(spec), "--samples", "8",
                  "--device", "cpu")
    assert bad.exit_code == 2 and "fails the replay audit" in bad.output
    assert not json.loads(bad.output[:bad.output.rindex("}") + 1])["ok"]
    other = tiny_teacher(tmp_path, name="tiny", seed=5)
    wrong = run_cli("store", "audit", str(store.path), "--shards", str(shards), "--teacher", str(other))
    assert wrong.exit_code == 2 and "weights" in wrong.output


def test_evaluate_reports_the_teachers_top1_from_the_store(setup):
    from pipeline.evaluate import teacher_top1

    tmp, _, _, store, _ = setup
    p = store.provenance
    assert teacher_top1(["tiny", "absent"], tmp / "ref" / "out") == {
        "tiny": {"views": p["teacher_top1_views"], "clean_val": p["teacher_top1_clean_val"]}}
