"""The typed hand-offs between stages: student spec, student.json, fuse.json (pipeline.records)."""

import dataclasses
import json

import pytest
import yaml
from click.testing import CliRunner

from pipeline.errors import UserError
from pipeline.fuse import fuse_student
from pipeline.preprocess import Preprocess
from pipeline.recipes import load_recipe
from pipeline.records import FusedStudent, StudentSpec, TrainedStudent
from pipeline.scores import Metrics
from pipeline.train import build_student
from stages.cli import main
from tests._chain_helpers import fake_student, metrics, tiny_shards
from tests._student_helpers import make_shards


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """(student dir, fused dir) of a real (tiny, fake-trained) fuse run."""
    root = tmp_path_factory.mktemp("records")
    student = fake_student(root / "student")
    fuse_student(student, tiny_shards(root), root / "fused", check_images=4, onnx=False)
    return student, root / "fused"


def test_a_manifest_with_only_name_and_model_takes_the_models_timm_cfg(tmp_path):
    for model, smallest in (("rep_mobilenetv2_100", None), ("rep_ghostnetv3_050", 64)):
        path = tmp_path / f"{model}.yaml"
        path.write_text(f"name: mine\nmodel: {model}\n")
        spec = StudentSpec.resolve(str(path))
        pre = Preprocess(input_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=None,
                         interpolation="bicubic")
        assert spec == StudentSpec(name="mine", model=model, model_kwargs={}, preprocess=pre, min_input_size=smallest)
    stated = StudentSpec.resolve({"model": "rep_mobilenetv2_100", "input_size": [3, 96, 96], "crop_pct": 1})
    assert (stated.name, stated.preprocess.input_size, stated.preprocess.crop_pct) == ("student", 96, 1.0)


def test_student_spec_round_trips(tmp_path):
    spec = StudentSpec.resolve({"name": "s", "model": "rep_ghostnetv3_050", "model_kwargs": {"num_branches": 2},
                                "mean": [0.5, 0.5, 0.5], "crop_pct": 0.9})
    spec.write(tmp_path / "s.yaml")
    assert StudentSpec.read(tmp_path / "s.yaml") == spec


@pytest.mark.parametrize("change, words", [
    ({"input_sise": 64}, ["unknown keys ['input_sise']"]),
    ({"model": "no_such_net"}, ["'no_such_net' is not a timm model"]),
    ({"model_kwargs": {"num_branches": 6}}, ["model_kwargs.num_branches must be in 1..5, got 6"]),
    ({"mean": [0.5, 0.5]}, ["`mean: [0.5, 0.5]` must be three numbers"]),
])
def test_bad_student_specs_are_one_line_naming_the_file(tmp_path, change, words):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "model": "rep_ghostnetv3_050", **change}))
    with pytest.raises(UserError) as err:
        StudentSpec.resolve(str(path))
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words + [str(path), "fix it in the spec"])


def test_a_branch_count_out_of_range_in_a_manifest_is_refused_by_name_before_training(tmp_path):
    """Old code: the model's ValueError surfaced as "--init None does not fit ..." after reading the shards."""
    make_shards(tmp_path / "shards")
    shards = tmp_path / "shards"
    spec = tmp_path / "six.yaml"
    spec.write_text("model: rep_ghostnetv3_050\nmodel_kwargs: {num_branches: 6}\n")
    result = CliRunner().invoke(main, ["student", "--student", str(spec), "--recipe", "demo", "--shards", str(shards),
                                       "--out", str(tmp_path / "out"), "--alpha", "0", "--epochs", "1",
                                       "--set", "num_branches=null", "--quiet"])
    assert result.exit_code == 2, result.output
    assert f"{spec}: model_kwargs.num_branches must be in 1..5, got 6" in result.output
    assert "--init" not in result.output and not (tmp_path / "out").exists()


def test_trained_and_fused_records_round_trip(fused, tmp_path):
    student_dir, fused_dir = fused
    trained = TrainedStudent.read(student_dir)
    (tmp_path / "s").mkdir()
    for name in trained.sha256:  # the weights it describes, which reading checks
        (tmp_path / "s" / name).write_bytes((student_dir / name).read_bytes())
    trained.write(tmp_path / "s")
    assert TrainedStudent.read(tmp_path / "s") == trained
    assert trained.preprocess.mean == (0.485, 0.456, 0.406) and trained.model_kwargs["num_branches"] == 3
    record = FusedStudent.read(fused_dir)
    assert (record.student, record.model, record.stock_model) == ("student", "rep_ghostnetv3_050", "ghostnetv2_050")
    assert record.preprocess == trained.preprocess and record.onnx_check is None and set(record.sha256) == {
        "fused.safetensors"}
    copy = tmp_path / "f"
    copy.mkdir()
    (copy / "fused.safetensors").write_bytes((fused_dir / "fused.safetensors").read_bytes())
    record.write(copy)
    assert FusedStudent.read(copy) == record


@pytest.mark.parametrize("record, stage", [("student.json", "pipeline student"), ("fuse.json", "pipeline fuse")])
@pytest.mark.parametrize("change", ["unknown", "missing"])
def test_older_or_edited_records_are_refused_with_the_stage_to_re_run(fused, tmp_path, record, stage, change):
    student_dir, fused_dir = fused
    source = student_dir if record == "student.json" else fused_dir
    target = tmp_path / "dir"
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    data = json.loads((target / record).read_text())
    if change == "unknown":
        data["weights_file"] = "model.safetensors"  # a key this version does not know
    else:
        del data["interpolation"]  # e.g. a file written before a key existed
    (target / record).write_text(json.dumps(data))
    read = TrainedStudent.read if record == "student.json" else FusedStudent.read
    with pytest.raises(UserError) as err:
        read(target)
    message = str(err.value)
    assert "\n" not in message and str(target / record) in message and f"re-run `{stage} --out {target}`" in message
    assert ("unknown keys ['weights_file']" if change == "unknown" else "no interpolation") in message


@pytest.mark.parametrize("change", ["unknown", "missing"])
def test_older_or_edited_metrics_are_refused_with_the_stage_to_re_run(tmp_path, change):
    data = metrics("s", 90.0, 1.0)
    if change == "unknown":
        data["latency"] = 1.0
    else:
        del data["teacher_top1"]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError) as err:
        Metrics.read(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "re-run `pipeline evaluate`" in message
    assert ("unknown keys ['latency']" if change == "unknown" else "no teacher_top1") in message


def test_metrics_round_trip_with_teacher_notes_only_when_a_teacher_was_skipped(tmp_path):
    data = metrics("s", 90.0, 1.0)
    Metrics(**data).write(tmp_path / "a.json")
    assert json.loads((tmp_path / "a.json").read_text()) == data
    assert Metrics.read(tmp_path / "a.json") == Metrics(**data)
    noted = {**data, "teacher_notes": {"demo-resnet10t": "skipped: offline"}}
    Metrics(**noted).write(tmp_path / "b.json")
    assert json.loads((tmp_path / "b.json").read_text()) == noted


def test_records_are_frozen(fused):
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainedStudent.read(fused[0]).weights = "model.safetensors"


def test_a_recipe_branch_count_out_of_range_is_refused_by_the_models_check_naming_the_recipe_key(tmp_path):
    """Old code refused it in load_recipe with a second copy of the 1..5 check; now the models' one check
    (pipeline.models.rep.check_num_branches) refuses it when the student is built, before anything is written."""
    recipe = load_recipe("demo", {"num_branches": 7})
    with pytest.raises(UserError) as err:
        build_student(StudentSpec.resolve("ghostnetv3-050"), recipe, num_classes=4)
    assert str(err.value).startswith("recipe 'demo': num_branches must be in 1..5, got 7; set num_branches")
    make_shards(tmp_path / "shards")
    result = CliRunner().invoke(main, ["student", "--student", "ghostnetv3-050", "--recipe", "demo", "--shards",
                                       str(tmp_path / "shards"), "--out", str(tmp_path / "out"), "--alpha", "0",
                                       "--num-branches", "0", "--quiet"])
    assert result.exit_code == 2 and "recipe 'demo': num_branches must be in 1..5, got 0" in result.output
    assert not (tmp_path / "out" / "checkpoint.safetensors").exists() and not (tmp_path / "out" / "student.json").exists()
