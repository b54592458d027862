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


def test_views_that_cost_the_teacher_warn_naming_both_fixes():
    plan = ViewPlan(scale=(0.35, 1.0), auto_augment="rand-m6-mstd0.5", re_prob=0.25)
    quality = {"teacher_top1_views": 52.0, "teacher_top1_clean_val": 83.0}
    line = view_cost_warning(quality, plan, "resnet56", "resnet56", 6)
    assert "31.0 points" in line and "scale min 0.35" in line and "rand-m6-mstd0.5" in line and "re_prob 0.25" in line
    assert ("`pipeline finetune-teacher --teacher resnet56 --plan teach --num-views 6 --out outputs/teachers/resnet56-ft`"
            in line and "`resnet56-ft: {teacher: resnet56}` under params.yaml `finetune:`" in line)
    assert "\n" not in line and "outputs/teachers/resnet56-ft/teacher.yaml" in line
    assert view_cost_warning({"teacher_top1_views": 75.0, "teacher_top1_clean_val": 83.0}, plan, "t", "t", 6) is None


def test_teach_prints_the_warning_with_both_fixes(setup, monkeypatch):
    import pipeline.teach

    tmp, spec, shards, _, _ = setup
    monkeypatch.setattr(pipeline.teach, "VIEW_COST_WARN", -101.0)  # any gap warns: the tiny teacher's is random
    result = run_cli(*teach_args(spec, shards, tmp / "ref")[:-1])  # the finished store: no forward, still checked
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if line.startswith("warning: the stored views")]
    assert len(warning) == 1 and f"--teacher {spec} --plan teach --num-views 2" in warning[0]
    assert "soften the view plan" in warning[0] and "`tiny-ft: {teacher: " in warning[0]


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
    reseal(drifted)  # as if written so: the checksums hold, only the audit can tell
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
        "tiny": {"views": p["teacher_top1_views"], "clean_val": p["teacher_top1_clean_val"],
                 "weights_digest": p["weights_digest"]}}  # the report's key: one name may be two teachers


# Issue 24: `store show`, the gallery of what the teacher saw.

def test_gallery_tile_is_the_teachers_replayed_view(setup, tmp_path):
    from PIL import Image

    from pipeline.gallery import show

    import shutil

    from pipeline.store import StoreWriter, check_metadata, open_store

    _, _, shards, ref, _ = setup
    shutil.copytree(ref.path, tmp_path / "s.zarr")  # views 0 and 1 swapped: the store, not the plan, is the truth
    group = zarr.open_group(tmp_path / "s.zarr", mode="r+")
    group["params"][:] = group["params"][:][:, ::-1]
    writer = StoreWriter(group, tmp_path / "s.zarr", check_metadata(tmp_path / "s.zarr"))
    for shard in range(writer.num_shards):  # sealed as teach seals what it writes: reads check the files
        writer.seal(shard)
    store = open_store(tmp_path / "s.zarr")
    out = tmp_path / "views.png"
    result = run_cli("store", "show", str(store.path), "--shards", str(shards), "--n", "6", "--out", str(out))
    assert result.exit_code == 0, result.output
    shown = show(store, shards, tmp_path / "again.png", n=6)
    assert out.read_bytes() == (tmp_path / "again.png").read_bytes()  # the CLI draws what the library returns
    png = np.asarray(Image.open(out).convert("RGB"))
    plan, reader = ViewPlan.load(store.plan), ShardReader(shards, "train")
    labels, values, indices = store.arrays["labels"][:], store.arrays["values"][:], store.arrays["indices"][:]
    for note in shown["views"]:
        i, v = note["index"], note["view"]
        x0, y0, x1, y1 = note["box"]
        scale = (x1 - x0) // 64  # the teacher renders at its input size, 64 px
        view = render(reader.source(i), ref.params(i, 1 - v), plan, 64)
        assert np.array_equal(png[y0:y1:scale, x0:x1:scale], view)
        assert note["label"] == labels[i] and note["top3"][0][0] == indices[i, v][values[i, v].argmax()]
        frame = png[y0 - 1, x0 - 1]
        assert note["wrong"] == (note["top3"][0][0] != labels[i]) and (tuple(frame) == (220, 30, 30)) == note["wrong"]


def test_gallery_worst_picks_the_views_with_the_lowest_label_probability(setup, tmp_path):
    from pipeline.gallery import pick_views

    _, _, shards, store, _ = setup
    labels, values, indices = store.arrays["labels"][:], store.arrays["values"][:], store.arrays["indices"][:]
    hit = indices == labels[:, None, None]
    p_label = np.where(hit.any(-1), np.exp(np.where(hit, values, -np.inf).max(-1)), -1.0)  # not in top-k: lowest
    assert (p_label < 0).any() and (p_label > 0).any()  # the tiny teacher gives both kinds
    picked = pick_views(store, 5, worst=True)
    chosen = np.zeros(p_label.shape, bool)
    chosen[picked[:, 0], picked[:, 1]] = True
    assert chosen.sum() == 5 and p_label[chosen].max() <= p_label[~chosen].min()
    order = p_label[picked[:, 0], picked[:, 1]]
    assert (order[order > 0] == np.sort(order[order > 0])).all()  # in top-k: lowest first
    result = run_cli("store", "show", str(store.path), "--shards", str(shards), "--worst", "--n", "3",
                     "--out", str(tmp_path / "w.png"))
    assert result.exit_code == 0 and "3 views" in result.output
    other = run_cli("store", "show", str(store.path), "--shards", str(tmp_path / "none"),
                    "--out", str(tmp_path / "x.png"))
    assert other.exit_code == 2 and not (tmp_path / "x.png").exists()


# Issue 19: the audit draws distinct views and can check them all.

def test_audit_draws_distinct_views_and_all_of_them_on_request(setup):
    from pipeline.audit import draw_views

    rows = draw_views(30, 4, 100, seed=3)
    assert len({tuple(r) for r in rows.tolist()}) == 100 and rows[:, 0].max() < 30 and rows[:, 1].max() < 4
    every = draw_views(30, 4, "all")
    assert sorted(map(tuple, every.tolist())) == [(i, v) for i in range(30) for v in range(4)]
    assert len(draw_views(3, 2, 1000)) == 6  # more asked than there are: each view once
    _, spec, shards, store, _ = setup
    result = run_cli("store", "audit", str(store.path), "--shards", str(shards), "--teacher", str(spec), "--samples",
                     "all", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["samples"] == report["of_views"] == store.num_samples * store.num_views and report["ok"]
    bad = run_cli("store", "audit", str(store.path), "--shards", str(shards), "--samples", "some")
    assert bad.exit_code == 2 and "--samples" in bad.output


def reseal(path):
    """Record the done records of a store again after its files were rewritten (a store made so elsewhere)."""
    from pipeline.store import StoreWriter, check_metadata

    writer = StoreWriter(zarr.open_group(path, mode="r+"), path, check_metadata(path))
    for shard in np.flatnonzero(writer.done_mask()):
        writer.seal(int(shard))
