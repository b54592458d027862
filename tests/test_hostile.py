"""Issue 10: the pipeline as an attacker or a careless user would drive it. Nothing a user names runs code,
nothing of the user's is deleted, nothing corrupt is used, and every user error is one line with exit 2."""

import errno
import io
import json
import os
import shutil
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from pipeline.errors import UserError
from stages.cli import main
from tests._chain_helpers import metrics
from tests._teach_helpers import NUM_CLASSES, teach_args, tiny_shards, tiny_teacher
from tests.conftest import EMPTY_PARAMS


class Payload:
    """Unpickling this creates the file MARKER: proof that a loader ran code from a file."""

    marker = None

    def __reduce__(self):
        return open, (str(Payload.marker), "w")


def payload_pickle(marker: Path) -> bytes:
    Payload.marker = marker
    buf = io.BytesIO()
    torch.save(Payload(), buf)
    return buf.getvalue()


def cli(*args, params=EMPTY_PARAMS):
    return CliRunner().invoke(main, ["--params", str(params), *args])


def assert_one_line_error(result, *words):
    """Exit 2, no traceback, and exactly one `error:` line, which is the last thing printed."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    assert "Traceback" not in result.output and "weights_only=False" not in result.output, result.output
    for word in words:
        assert word in errors[0], result.output


@pytest.fixture(autouse=True)
def _own_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny teacher spec, tiny shards and one finished teach run (store + pointer) to copy from."""
    tmp = tmp_path_factory.mktemp("hostile")
    spec, shards = tiny_teacher(tmp), tiny_shards(tmp)
    result = cli(*teach_args(spec, shards, tmp / "ref"))
    assert result.exit_code == 0, result.output
    return tmp, spec, shards


def copied_store(base, dest: Path) -> tuple[Path, Path]:
    """(store root, store path) of a copy of the reference teach run."""
    tmp, _, _ = base
    shutil.copytree(tmp / "ref", dest)
    return dest, next(dest.glob("tiny-*.zarr"))


class Own(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, NUM_CLASSES, 3), nn.Linear(NUM_CLASSES, NUM_CLASSES)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def own_spec(tmp: Path, source: str, model_path: Path, **extra) -> Path:
    spec = tmp / f"own-{source}.yaml"
    spec.write_text(yaml.safe_dump({"name": "own", "model": str(model_path), "source": source, "input_size": 48,
                                    "mean": [0.5] * 3, "std": [0.25] * 3, "num_classes": NUM_CLASSES, **extra}))
    return spec


def evil_torchscript(tmp: Path, marker: Path) -> Path:
    """A TorchScript archive whose pickled module (data.pkl) is a pickle that creates `marker`."""
    good, evil = tmp / "good.pt", tmp / "evil.pt"
    torch.jit.save(torch.jit.script(Own().eval()), str(good))
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            dst.writestr(item, payload_pickle(marker) if item.filename.endswith("/data.pkl") else data)
    return evil


def evil_pt2(tmp: Path, marker: Path) -> Path:
    """A valid torch.export archive whose sample inputs are a pickle that creates `marker`."""
    good, evil = tmp / "good.pt2", tmp / "evil.pt2"
    torch.export.save(torch.export.export(Own().eval(), (torch.randn(2, 3, 48, 48),)), str(good))
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            dst.writestr(item, payload_pickle(marker) if item.filename.endswith("sample_inputs/model.pt") else data)
    return evil


# ---------------------------------------------------------------- critical: no file a user names runs code

@pytest.mark.parametrize("loader", ["teacher-weights", "export", "torchscript", "torchscript-trusted",
                                    "student-checkpoint", "resume-checkpoint", "store-metadata"])
def test_no_loader_runs_code_from_a_file(base, tmp_path, loader):
    tmp, spec, shards = base
    marker = tmp_path / "MARKER"
    if loader == "teacher-weights":
        (tmp_path / "evil.pth").write_bytes(payload_pickle(marker))
        result = cli(*teach_args(spec, shards, tmp_path / "root", "--weights", str(tmp_path / "evil.pth")))
        assert_one_line_error(result, "refused")
    elif loader == "export":
        result = cli(*teach_args(own_spec(tmp_path, "export", evil_pt2(tmp_path, marker)), shards, tmp_path / "r"))
        assert_one_line_error(result, "refused", "safetensors")
    elif loader == "torchscript":  # a program: never loaded unless its spec vouches for it
        result = cli(*teach_args(own_spec(tmp_path, "torchscript", evil_torchscript(tmp_path, marker)), shards,
                                 tmp_path / "r"))
        assert_one_line_error(result, "trust_code: true", "safetensors")
    elif loader == "torchscript-trusted":  # vouched for: torch.jit.load's own unpickler builds no Python objects
        spec = own_spec(tmp_path, "torchscript", evil_torchscript(tmp_path, marker), trust_code=True)
        assert_one_line_error(cli(*teach_args(spec, shards, tmp_path / "r")), "cannot load torchscript")
    elif loader == "student-checkpoint":
        from tests._chain_helpers import fake_student

        student = fake_student(tmp_path / "student")
        (student / "ema.safetensors").write_bytes(payload_pickle(marker))
        result = cli("fuse", "--student-dir", str(student), "--shards", str(shards), "--out", str(tmp_path / "f"))
        assert_one_line_error(result, "ema.safetensors")
    elif loader == "resume-checkpoint":
        from pipeline.checkpoint import load_checkpoint

        (tmp_path / "checkpoint.safetensors").write_bytes(payload_pickle(marker))
        with pytest.raises(UserError, match="unreadable"):
            load_checkpoint(tmp_path / "checkpoint.safetensors")
    elif loader == "store-metadata":  # a zarr v2 group whose array decodes its chunks with pickle
        store = tmp_path / "evil.zarr"
        (store / "values").mkdir(parents=True)
        (store / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
        (store / ".zattrs").write_text(json.dumps({"provenance": {"key": "k"}}))
        (store / "values" / ".zarray").write_text(json.dumps({
            "zarr_format": 2, "shape": [1], "chunks": [1], "dtype": "|O", "compressor": None, "fill_value": None,
            "filters": [{"id": "pickle", "protocol": 2}], "order": "C"}))
        (store / "values" / "0").write_bytes(payload_pickle(marker))
        assert_one_line_error(cli("store", "inspect", str(store)), "no teacher logit store")
    assert not marker.exists()


def test_fused_weights_and_onnx_are_checked_before_loading(fused_dir, tmp_path, base):
    """fuse.json lists the digests of its files: a swapped-in file (a pickle, or garbage ONNX) is refused."""
    _, _, shards = base
    marker = tmp_path / "MARKER"
    for name in ("fused.safetensors", "model.onnx"):
        fused = fused_dir(tmp_path / name)
        info = json.loads((fused / "fuse.json").read_text())
        info["sha256"].setdefault("model.onnx", "0" * 64)  # as if fuse had written an ONNX file
        (fused / "fuse.json").write_text(json.dumps(info))
        (fused / name).write_bytes(payload_pickle(marker))
        result = cli("evaluate", "--fused-dir", str(fused), "--shards", str(fused.parent / "shards"),
                     "--out", str(tmp_path / "m.json"), "--latency-runs", "1", "--latency-batch", "1", "--quiet")
        assert_one_line_error(result, name, "re-run `pipeline fuse")
    assert not marker.exists() and not (tmp_path / "m.json").exists()


@pytest.fixture(scope="module")
def _fused(tmp_path_factory):
    from pipeline.fuse import fuse_student
    from tests._chain_helpers import fake_student, tiny_shards as chain_shards

    tmp = tmp_path_factory.mktemp("fused")
    shards = chain_shards(tmp, per_class=2)
    fuse_student(fake_student(tmp / "student"), shards, tmp / "fused", check_images=4, onnx=False)
    return tmp


@pytest.fixture
def fused_dir(_fused):
    """A copy of one real fuse output (without ONNX: exporting is slow), next to its shards."""
    def copy(dest: Path) -> Path:
        shutil.copytree(_fused, dest)
        return dest / "fused"

    return copy


# ---------------------------------------------------------------- high: the user's files are never deleted

def shard_args(out, *extra):
    return ["shard", "--source", "synthetic", "--num-classes", "2", "--per-class", "4", "--image-size", "16",
            "--out", str(out), "--quiet", *extra]


@pytest.mark.parametrize("case", ["documents", "cwd", "source", "inside-source", "around-source"])
def test_shard_never_replaces_what_is_not_ours(tmp_path, monkeypatch, case):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("years of work")
    src = tmp_path / "images"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(2):
            from PIL import Image

            Image.new("RGB", (16, 16), (i * 90, 10, 10)).save(src / c / f"{i}.png")
    imagefolder = ["--source", f"imagefolder:{src}"]
    if case == "documents":
        result = cli(*shard_args(docs))
    elif case == "cwd":
        monkeypatch.chdir(docs)
        result = cli(*shard_args("."))
    elif case == "source":
        result = cli(*shard_args(src), *imagefolder)
    elif case == "inside-source":
        result = cli(*shard_args(src / "a" / "shards"), *imagefolder)
    else:
        result = cli(*shard_args(tmp_path), *imagefolder)
    assert_one_line_error(result, "--out")
    assert (docs / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in (src / "a").iterdir()) == ["0.png", "1.png"]


def test_shard_swap_never_loses_the_old_output(tmp_path, monkeypatch):
    out = tmp_path / "shards"
    assert cli(*shard_args(out)).exit_code == 0
    old_manifest = (out / "manifest.json").read_text()

    # the rename that puts the new output in place fails: the old one is put back at once
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name.startswith(".shards.tmp-") and Path(dst) == out:
            raise OSError(errno.EIO, "I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    assert cli(*shard_args(out, "--seed", "1")).exit_code != 0
    monkeypatch.setattr(os, "replace", real_replace)
    assert (out / "manifest.json").read_text() == old_manifest

    # a run killed between the two renames left the old output aside: the next run puts it back
    from pipeline.io import mark_ours

    aside = tmp_path / ".shards.old-killed"
    mark_ours(aside)  # as _replace_dir marks the folder it sets the old output aside in
    os.replace(out, aside / "shards")
    bad = tmp_path / "bad"
    (bad / "a").mkdir(parents=True)
    (bad / "a" / "0.png").write_bytes(b"not a png")
    assert_one_line_error(cli(*shard_args(out, "--source", f"imagefolder:{bad}")), "0.png")
    assert (out / "manifest.json").read_text() == old_manifest and not aside.exists()


# ---------------------------------------------------------------- high: written checksums are checked

def flip_label(shard_dir: Path) -> None:
    """Change one sample's label inside a shard, keeping the tar valid (what a stray edit does)."""
    path = sorted(shard_dir.glob("train-*.tar"))[0]
    with tarfile.open(path) as tar:
        member = next(m for m in tar if m.name.endswith(".cls"))
    with open(path, "r+b") as f:
        f.seek(member.offset_data)
        label = int(f.read(member.size))
        f.seek(member.offset_data)
        f.write(str((label + 1) % NUM_CLASSES).encode())


def test_changed_shard_is_never_used(base, tmp_path):
    _, spec, shards = base
    root, _ = copied_store(base, tmp_path / "root")
    changed = tmp_path / "shards"
    shutil.copytree(shards, changed)
    flip_label(changed)
    # the store for these shards is complete: without verification teach says "up to date"
    assert_one_line_error(cli(*teach_args(spec, changed, root)), "changed since")
    manifest = json.loads((changed / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = __import__("pipeline.io").io.sha256_file(
        sorted(changed.glob("train-*.tar"))[0])
    (changed / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(cli(*teach_args(spec, changed, root)), "fingerprint")


def test_lost_store_chunk_is_an_error_and_teach_repairs_it(base, tmp_path):
    _, spec, shards = base
    root, store = copied_store(base, tmp_path / "root")
    chunk = store / "values" / "c" / "1" / "0" / "0"
    original = chunk.read_bytes()
    chunk.unlink()
    assert_one_line_error(cli("store", "inspect", str(store)), "lost data", "values/c/1/0/0")
    assert_one_line_error(cli("store", "inspect", str(root / "out" / "tiny.json")), "lost data")
    result = cli(*teach_args(spec, shards, root))
    assert result.exit_code == 0, result.output
    assert chunk.read_bytes() == original
    assert cli("store", "inspect", "--verify", str(store)).exit_code == 0


def test_inspect_verify_reads_every_chunk_and_teach_repairs(base, tmp_path):
    _, spec, shards = base
    root, store = copied_store(base, tmp_path / "root")
    chunk = store / "lse" / "c" / "1" / "0"
    original = chunk.read_bytes()
    chunk.write_bytes(bytes(len(original)))  # same size, garbage content
    assert cli("store", "inspect", str(store)).exit_code == 0  # the cheap check sees a file
    assert_one_line_error(cli("store", "inspect", "--verify", str(store)), "lost data", "shard 1")
    assert cli(*teach_args(spec, shards, root)).exit_code == 0
    assert chunk.read_bytes() == original


# ---------------------------------------------------------------- medium

def test_teacher_name_cannot_escape_the_store_root(base, tmp_path):
    _, spec, shards = base
    bad = yaml.safe_load(spec.read_text())
    bad["name"] = "../../escaped/config"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    (tmp_path / "a" / "b").mkdir(parents=True)
    result = cli(*teach_args(tmp_path / "bad.yaml", shards, tmp_path / "a" / "b" / "root"))
    assert_one_line_error(result, "not a plain name")
    assert not (tmp_path / "a" / "escaped").exists() and not (tmp_path / "escaped").exists()


def test_fuse_output_is_one_complete_set(fused_dir, tmp_path):
    """A fuse killed after writing new weights left the old fuse.json: evaluate must not use the mix."""
    from safetensors.torch import load_file, save_file

    from pipeline.records import load_fused

    fused = fused_dir(tmp_path / "copy")
    state = load_file(str(fused / "fused.safetensors"))
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, str(fused / "fused.safetensors"))
    with pytest.raises(UserError, match="is not the file .*fuse.json describes"):
        load_fused(fused)


def tar_of(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def png(shade: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (shade, 40, 80)).save(buf, format="PNG")
    return buf.getvalue()


def test_tar_member_names_are_normalised_or_refused(tmp_path):
    absolute = tar_of(tmp_path / "abs.tar", {f"/{c}/{i}.png": png(i * 50) for c in ("cat", "dog") for i in range(2)})
    result = cli(*shard_args(tmp_path / "o", "--source", f"imagefolder:{absolute}", "--val-fraction", "0"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["classes"] == ["cat", "dog"]
    with tarfile.open(next((tmp_path / "o").glob("train-*.tar"))) as tar:
        assert not any(n.startswith("/") or ".." in n for n in tar.getnames())

    climbing = tar_of(tmp_path / "up.tar", {"cat/../../x.png": png(1), "cat/0.png": png(2)})
    assert_one_line_error(cli(*shard_args(tmp_path / "o2", "--source", f"imagefolder:{climbing}")), "'..'")


@pytest.mark.parametrize("key,label,word", [("../../evil", b"0", "not a plain relative name"),
                                            ("ok", b"-1", "outside 0..")])
def test_webdataset_keys_and_labels_are_checked(tmp_path, key, label, word):
    source = tar_of(tmp_path / "train-000000.tar", {f"{key}.png": png(9), f"{key}.cls": label,
                                                     "fine.png": png(3), "fine.cls": b"1"})
    result = cli(*shard_args(tmp_path / "o", "--source", f"webdataset:{source}", "--val-fraction", "0"))
    assert_one_line_error(result, word)


def test_two_processes_creating_one_store_both_succeed(tmp_path, monkeypatch):
    """The second creator arrives while the first is half-way: it waits, then opens what the first made."""
    import zarr

    from pipeline import store as store_mod

    real_open, state = zarr.open_group, {"first": True}
    half_way = threading.Event()

    def slow_open(path, mode="a", **kw):
        group = real_open(path, mode=mode, **kw)
        if mode == "w" and state.pop("first", False):
            half_way.set()
            time.sleep(1.0)
        return group

    monkeypatch.setattr(store_mod.zarr, "open_group", slow_open)
    layout = dict(num_samples=4, num_views=2, k=2, params_dim=3, num_classes=4, shard_rows=2, values="f16")
    results, path = {}, tmp_path / "t.zarr"

    def create(name):
        try:
            results[name] = store_mod.create_or_open(path, {"key": "same", "plan": {}}, **layout).key
        except Exception as err:  # noqa: BLE001 - recorded and asserted below
            results[name] = err

    first = threading.Thread(target=create, args=("first",))
    first.start()
    assert half_way.wait(10)
    create("second")
    first.join()
    assert results == {"first": "same", "second": "same"}


def test_evaluate_survives_an_export_teacher(tmp_path):
    """A store whose provenance names a torch.export teacher: evaluate notes it, never loads or crashes."""
    import zarr

    from pipeline.evaluate import teacher_agreement
    from pipeline.io import sha256_file
    from tests._student_helpers import make_shards, make_store

    shards = tmp_path / "shards"
    make_shards(shards)
    store = make_store(shards, tmp_path / "teach", name="own")
    pt2 = tmp_path / "own.pt2"
    torch.export.save(torch.export.export(Own().eval(), (torch.randn(2, 3, 64, 64),)), str(pt2))
    group = zarr.open_group(store.path, mode="r+")
    provenance = dict(group.attrs["provenance"])
    provenance.update(teacher={"name": "own", "model": str(pt2), "source": "export", "input_size": 64,
                               "mean": [0.5] * 3, "std": [0.25] * 3, "num_classes": 4, "interpolation": "bilinear",
                               "crop_pct": 1.0}, weights_digest=sha256_file(pt2))
    group.attrs["provenance"] = provenance
    scores, notes = teacher_agreement(torch.zeros(16, 4), shards, ["own"], tmp_path / "teach", None, 8, True)
    assert scores == {"own": None} and "refused" in notes["own"]


def test_store_under_another_teachers_name_is_refused(base, tmp_path):
    root, _ = copied_store(base, tmp_path / "root")
    shutil.copy(root / "out" / "tiny.json", root / "out" / "other.json")
    assert_one_line_error(cli("store", "inspect", str(root / "out" / "other.json")), "other")
    info = json.loads((root / "out" / "tiny.json").read_text())
    (root / "out" / "other.json").write_text(json.dumps({**info, "teacher": "other"}))
    assert_one_line_error(cli("store", "inspect", str(root / "out" / "other.json")), "holds the logits of teacher")


def test_finetuned_teacher_spec_works_from_any_directory(base, tmp_path, monkeypatch):
    from pipeline.teachers import resolve_spec

    _, spec, shards = base
    monkeypatch.chdir(tmp_path)
    result = cli("finetune-teacher", "--teacher", str(spec), "--shards", str(shards), "--out", "tuned",
                 "--epochs", "1", "--batch-size", "8", "--img-size", "32", "--quiet")
    assert result.exit_code == 0, result.output
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert Path(resolve_spec(str(tmp_path / "tuned" / "teacher.yaml"))["weights"]).is_file()


# ---------------------------------------------------------------- low: every user error is one line

SPEC_CASES = {"num_classes: four": {"num_classes": "four"}, "2-value mean": {"mean": [0.5, 0.5]},
              "negative input_size": {"input_size": -5}, "std 0": {"std": [0, 0.25, 0.25]},
              "interpolation foo": {"interpolation": "foo"}, "bad pretrained tag": {"model": "test_resnet.nosuchtag"},
              "bogus model_kwargs": {"model_kwargs": {"bogus_knob": 1}},
              "branch_bn_init 7": {"model_kwargs": {"branch_bn_init": 7}}}
PLAN_CASES = {"malformed plan": "size: [64\n", "plan size abc": "size: abc\n", "plan size 0": "size: 0\n",
              "plan hflip 7": "hflip: 7\n"}


@pytest.mark.parametrize("case", [*SPEC_CASES, *PLAN_CASES, "device tpu", "img-size 0", "img-size -8",
                                  "params list", "section not a mapping", "missing --params", "no train split",
                                  "unreadable safetensors", "unreadable student.json", "unreadable pointer",
                                  "unreadable zarr metadata", "unreadable onnx", "disk full"])
def test_user_errors_are_one_line(base, tmp_path, monkeypatch, fused_dir, case):
    _, spec, shards = base
    words = ()
    if case in SPEC_CASES:
        bad = {**yaml.safe_load(spec.read_text()), **SPEC_CASES[case]}
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        result, words = cli(*teach_args(tmp_path / "bad.yaml", shards, tmp_path / "r")), (next(iter(SPEC_CASES[case])),)
    elif case in PLAN_CASES:
        (tmp_path / "plan.yaml").write_text(PLAN_CASES[case])
        result, words = cli(*teach_args(spec, shards, tmp_path / "r", "--plan", str(tmp_path / "plan.yaml"))), ("plan",)
    elif case == "device tpu":
        result = cli(*teach_args(spec, shards, tmp_path / "r"), "--device", "tpu")
        words = ("--device",)
    elif case.startswith("img-size"):
        result = cli("student", "--student", "mobilenetv2-100", "--recipe", "demo", "--shards", str(shards),
                     "--out", str(tmp_path / "s"), "--img-size", case.split()[-1])
        words = ("img_size",)
    elif case in ("params list", "section not a mapping", "missing --params"):
        params = tmp_path / "params.yaml"
        if case != "missing --params":
            params.write_text("- teach\n- shard\n" if case == "params list" else "teach: 5\n")
        result, words = cli("store", "inspect", "x.zarr", params=params), (str(params),)
    elif case == "no train split":
        result, words = cli(*shard_args(tmp_path / "o", "--val-fraction", "0.99")), ("--val-fraction",)
    elif case in ("unreadable safetensors", "unreadable student.json"):
        from tests._chain_helpers import fake_student

        student = fake_student(tmp_path / "student")
        name = "ema.safetensors" if case == "unreadable safetensors" else "student.json"
        (student / name).write_bytes(b"\x00garbage")
        result, words = cli("fuse", "--student-dir", str(student), "--shards", str(shards), "--out",
                            str(tmp_path / "f")), (name,)
    elif case == "unreadable pointer":
        (tmp_path / "tiny.json").write_text("{not json")
        result, words = cli("store", "inspect", str(tmp_path / "tiny.json")), ("tiny.json",)
    elif case == "unreadable zarr metadata":
        _, store = copied_store(base, tmp_path / "root")
        (store / "values" / "zarr.json").write_text("{broken")
        result, words = cli("store", "inspect", str(store)), ("values/zarr.json",)
    elif case == "unreadable onnx":
        fused = fused_dir(tmp_path / "copy")
        (fused / "model.onnx").write_bytes(b"garbage")
        info = json.loads((fused / "fuse.json").read_text())
        info["sha256"]["model.onnx"] = __import__("hashlib").sha256(b"garbage").hexdigest()
        (fused / "fuse.json").write_text(json.dumps(info))
        result = cli("evaluate", "--fused-dir", str(fused), "--shards", str(fused.parent / "shards"), "--out",
                     str(tmp_path / "m.json"), "--latency-runs", "1", "--latency-batch", "1", "--quiet")
        words = ("model.onnx",)
    else:  # disk full while writing the manifest of a re-shard: the old shards stay as they were
        out = tmp_path / "o"
        assert cli(*shard_args(out)).exit_code == 0
        old = (out / "manifest.json").read_text()

        def no_space(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", no_space)
        result, words = cli(*shard_args(out, "--seed", "3")), ("disk full", "unchanged")
        monkeypatch.undo()
        assert (out / "manifest.json").read_text() == old
    assert_one_line_error(result, *words)


def test_fuse_negative_atol_is_a_usage_error_not_a_bug(tmp_path):
    result = cli("fuse", "--student-dir", str(tmp_path), "--out", str(tmp_path / "f"), "--atol", "-1")
    assert result.exit_code == 2 and "Invalid value for '--atol'" in result.output and "bug" not in result.output


@pytest.mark.parametrize("leftover", ["shard tmp dir", "checkpoint tmp", "zarr partial"])
def test_leftover_temp_files_are_cleaned_by_the_next_run(base, tmp_path, leftover):
    _, spec, shards = base
    if leftover == "shard tmp dir":
        from pipeline.io import mark_ours

        junk = tmp_path / ".o.tmp-killed"
        mark_ours(junk)  # as write_shards marks its temp folder
        (junk / "train-000000.tar").write_bytes(b"x" * 100)
        assert cli(*shard_args(tmp_path / "o")).exit_code == 0
    elif leftover == "checkpoint tmp":
        from pipeline.checkpoint import save_checkpoint

        junk = tmp_path / ".checkpoint.safetensors.killed.tmp"
        junk.write_bytes(b"x" * 100)
        save_checkpoint(tmp_path / "checkpoint.safetensors", {"progress": {"epoch": 1}})
    else:
        root, store = copied_store(base, tmp_path / "root")
        junk = store / "values" / "c" / "0" / "0" / "0.killed.partial"
        junk.write_bytes(b"x" * 100)
        os.utime(junk, (time.time() - 3600, time.time() - 3600))
        assert cli(*teach_args(spec, shards, root)).exit_code == 0
    assert not junk.exists()


# ======================================================================= issue 23: hardening II
# ---------------------------------------------------------------- critical: trust comes only from what the user wrote

def test_a_store_never_makes_the_pipeline_run_its_teachers_code(base, tmp_path, monkeypatch):
    """The user vouched for their TorchScript teacher when teaching; the store's provenance records that spec.
    `store audit` and `evaluate` must not load it from there: an artifact never grants trust_code."""
    from pipeline.evaluate import teacher_agreement

    _, _, shards = base
    own = tmp_path / "own.pt"
    torch.jit.save(torch.jit.script(Own().eval()), str(own))
    root = tmp_path / "root"
    assert cli(*teach_args(own_spec(tmp_path, "torchscript", own, trust_code=True), shards, root)).exit_code == 0

    def no_code(*args, **kwargs):
        raise AssertionError("torch.jit.load ran a file an artifact named")

    monkeypatch.setattr(torch.jit, "load", no_code)
    result = cli("store", "audit", str(root / "out" / "own.json"), "--shards", str(shards), "--samples", "2")
    assert_one_line_error(result, "refused", "--teacher")
    from pipeline.audit import audit_store
    from pipeline.store import open_pointer

    with pytest.raises(UserError, match="refused"):  # the library, not only the CLI
        audit_store(open_pointer(root / "out" / "own.json"), shards, samples=2)
    scores, notes = teacher_agreement(torch.zeros(4, NUM_CLASSES), shards, ["own"], root / "out", None, 8, True)
    assert scores == {"own": None} and "refused" in notes["own"]


@pytest.mark.parametrize("where", ["teacher spec", "student spec", "student.json"])
def test_model_kwargs_are_an_allow_list(base, tmp_path, where):
    """timm.create_model takes checkpoint_path / pretrained_cfg_overlay=dict(file=...): a spec or record naming a
    file to load (or any unknown argument) is refused in one line before anything is built."""
    _, spec, shards = base
    marker = tmp_path / "MARKER"
    (tmp_path / "evil.pth").write_bytes(payload_pickle(marker))
    if where == "teacher spec":
        bad = {**yaml.safe_load(spec.read_text()), "model_kwargs": {"checkpoint_path": str(tmp_path / "evil.pth")}}
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        result = cli(*teach_args(tmp_path / "bad.yaml", shards, tmp_path / "r"))
    elif where == "student spec":
        (tmp_path / "s.yaml").write_text("model: test_efficientnet\nmodel_kwargs: {bogus_knob: 1}\n")
        result = cli("student", "--student", str(tmp_path / "s.yaml"), "--recipe", "demo", "--shards", str(shards),
                     "--out", str(tmp_path / "s"), "--img-size", "48", "--epochs", "1", "--alpha", "0", "--quiet")
    else:
        from tests._chain_helpers import fake_student

        student = fake_student(tmp_path / "student")
        info = json.loads((student / "student.json").read_text())
        info["model_kwargs"]["pretrained_cfg_overlay"] = {"file": str(tmp_path / "evil.pth")}
        (student / "student.json").write_text(json.dumps(info))
        result = cli("fuse", "--student-dir", str(student), "--shards", str(shards), "--out", str(tmp_path / "f"),
                     "--no-onnx")
    assert_one_line_error(result, "model_kwargs")
    assert not marker.exists()


# ---------------------------------------------------------------- high: a user's files are never lost

def test_shard_leaves_leftovers_without_our_marker_alone(tmp_path):
    """`.o.old-*` / `.o.tmp-*` folders of the user's are neither deleted nor restored into --out."""
    aside, tmp = tmp_path / ".o.old-mine", tmp_path / ".o.tmp-mine"
    (aside / "o").mkdir(parents=True)
    (aside / "o" / "thesis.txt").write_text("years of work")
    tmp.mkdir()
    (tmp / "draft.txt").write_text("draft")
    result = cli(*shard_args(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert (aside / "o" / "thesis.txt").read_text() == "years of work" and (tmp / "draft.txt").read_text() == "draft"
    assert (tmp_path / "o" / "manifest.json").is_file() and not (tmp_path / "o" / "thesis.txt").exists()


@pytest.mark.parametrize("files", [("manifest.json",), ("manifest.json", "backup-000001.tar")])
def test_shard_out_is_ours_only_by_our_marker(tmp_path, files):
    out = tmp_path / "o"
    out.mkdir()
    for name in files:
        (out / name).write_text(f"my {name}")
    assert_one_line_error(cli(*shard_args(out)), "--out", "nothing was changed")
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    assert all((out / name).read_text() == f"my {name}" for name in files)


@pytest.mark.parametrize("stage,name", [("teach", "tiny.json"), ("student", "model.safetensors"),
                                        ("fuse", "model.onnx"), ("finetune-teacher", "metrics.json")])
def test_stages_write_only_their_own_files(base, tmp_path, fused_dir, stage, name):
    """A file of the user's where a stage would write one is refused in one line and left as it was."""
    _, spec, shards = base
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("mine")
    if stage == "teach":
        args = teach_args(spec, shards, tmp_path / "root")
        args[args.index("--out") + 1] = str(out)
    elif stage == "student":
        (tmp_path / "s.yaml").write_text("model: test_efficientnet\n")
        args = ["student", "--student", str(tmp_path / "s.yaml"), "--recipe", "demo", "--shards", str(shards),
                "--out", str(out), "--img-size", "48", "--epochs", "1", "--batch-size", "4", "--alpha", "0", "--quiet"]
    elif stage == "fuse":
        from tests._chain_helpers import fake_student

        args = ["fuse", "--student-dir", str(fake_student(tmp_path / "student")), "--shards",
                str(fused_dir(tmp_path / "copy").parent / "shards"), "--out", str(out), "--check-images", "2"]
    else:
        args = ["finetune-teacher", "--teacher", str(spec), "--shards", str(shards), "--out", str(out), "--epochs", "1",
                "--batch-size", "8", "--img-size", "32", "--quiet"]
    assert_one_line_error(cli(*args), name, "did not write")
    assert (out / name).read_text() == "mine"


# ---------------------------------------------------------------- high: what we write we can verify

def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_student_weights_are_checked_before_fusing(base, tmp_path):
    from tests._chain_helpers import fake_student

    _, _, shards = base
    student = fake_student(tmp_path / "student")
    flip_byte(student / "ema.safetensors", -10)  # tensor data, not the header: still a readable file
    result = cli("fuse", "--student-dir", str(student), "--shards", str(shards), "--out", str(tmp_path / "f"),
                 "--no-onnx")
    assert_one_line_error(result, "ema.safetensors")
    assert not (tmp_path / "f" / "fuse.json").exists()


@pytest.mark.parametrize("edit", ["labels in a shard index", "num_classes"])
def test_manifest_edits_are_caught(base, tmp_path, edit):
    """The fingerprint covers what readers use (keys AND labels of the shard indexes); num_classes is its classes'."""
    import hashlib

    _, spec, shards = base
    root, _ = copied_store(base, tmp_path / "root")
    changed = tmp_path / "shards"
    shutil.copytree(shards, changed)
    manifest = json.loads((changed / "manifest.json").read_text())
    if edit == "num_classes":
        manifest["num_classes"] += 1
        (changed / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(UserError, match="num_classes"):
            __import__("pipeline.data.shards").data.shards.ShardManifest.read(changed)
        return
    shard = manifest["splits"]["train"]["shards"][0]
    index = json.loads((changed / shard["index"]).read_text())
    index["labels"][0] = (index["labels"][0] + 1) % NUM_CLASSES
    data = (json.dumps(index, separators=(",", ":")) + "\n").encode()
    (changed / shard["index"]).write_bytes(data)
    shard["index_sha256"] = hashlib.sha256(data).hexdigest()
    (changed / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(cli(*teach_args(spec, changed, root)), "manifest.json")


def test_non_finite_teacher_logits_stop_teach(base, tmp_path):
    from safetensors.torch import load_file, save_file

    _, spec, shards = base
    bad = yaml.safe_load(spec.read_text())
    state = load_file(bad["weights"])
    state["fc.bias"] = torch.full_like(state["fc.bias"], float("nan"))
    save_file(state, str(tmp_path / "nan.safetensors"))
    result = cli(*teach_args(spec, shards, tmp_path / "root", "--weights", str(tmp_path / "nan.safetensors")))
    assert_one_line_error(result, "NaN", "batch 0")
    assert not (tmp_path / "root" / "out" / "tiny.json").exists()


def test_temperatures_out_of_range_are_refused(base, tmp_path):
    _, spec, shards = base
    for value in ("1,nan", "inf", "1e-30"):
        result = cli(*teach_args(spec, shards, tmp_path / "root", "--temperatures", value))
        assert_one_line_error(result, "--temperatures")
    assert not (tmp_path / "root").exists()


def test_checkpoint_with_a_flipped_byte_is_refused_on_resume(tmp_path):
    from pipeline.checkpoint import load_checkpoint, save_checkpoint

    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, {"model": {"w": torch.arange(64, dtype=torch.float32)}, "progress": {"epoch": 1}})
    flip_byte(path, -5)
    with pytest.raises(UserError, match="sha256"):
        load_checkpoint(path)


def test_fused_weights_of_another_graph_are_refused(fused_dir, tmp_path):
    import hashlib

    from safetensors.torch import save_file

    fused = fused_dir(tmp_path / "copy")
    save_file({"fc.weight": torch.zeros(2, 2)}, str(fused / "fused.safetensors"))
    info = json.loads((fused / "fuse.json").read_text())
    info["sha256"]["fused.safetensors"] = hashlib.sha256((fused / "fused.safetensors").read_bytes()).hexdigest()
    (fused / "fuse.json").write_text(json.dumps(info))
    result = cli("evaluate", "--fused-dir", str(fused), "--shards", str(fused.parent / "shards"),
                 "--out", str(tmp_path / "m.json"), "--latency-runs", "1", "--latency-batch", "1", "--quiet")
    assert_one_line_error(result, "fused.safetensors", "does not fit")


@pytest.mark.parametrize("classes", [0, 3], ids=["same head", "another head"])
def test_onnx_of_another_graph_is_refused(fused_dir, tmp_path, classes):
    import hashlib

    from pipeline.fuse import export_onnx

    fused = fused_dir(tmp_path / "copy")
    info = json.loads((fused / "fuse.json").read_text())
    other = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(3, info["num_classes"] + classes))
    export_onnx(other, info["input_size"], fused / "model.onnx")
    info["sha256"]["model.onnx"] = hashlib.sha256((fused / "model.onnx").read_bytes()).hexdigest()
    (fused / "fuse.json").write_text(json.dumps(info))
    result = cli("evaluate", "--fused-dir", str(fused), "--shards", str(fused.parent / "shards"),
                 "--out", str(tmp_path / "m.json"), "--latency-runs", "1", "--latency-batch", "1", "--quiet")
    assert_one_line_error(result, "model.onnx", "does not compute what fused.safetensors does")
    assert not (tmp_path / "m.json").exists()


# ---------------------------------------------------------------- medium/low: one range per value, one line per error

@pytest.mark.parametrize("args,option", [
    (["fuse", "--student-dir", "s", "--out", "f", "--atol", "nan"], "--atol"),
    (["store", "audit", "x.json", "--max-kl", "inf"], "--max-kl"),
    (["finetune-teacher", "--teacher", "t", "--out", "o", "--lr", "nan"], "--lr"),
    (["finetune-teacher", "--teacher", "t", "--out", "o", "--batch-size", "0"], "--batch-size"),
    (["finetune-teacher", "--teacher", "t", "--out", "o", "--img-size", "8"], "--img-size"),
    (["shard", "--source", "synthetic", "--out", "o", "--crop-pct", "nan"], "--crop-pct"),
    (["shard", "--source", "synthetic", "--out", "o", "--image-size", "100000"], "--image-size"),
    (["teach", "--teacher", "t", "--num-views", str(10 ** 9)], "--num-views"),
    (["teach", "--teacher", "t", "--shard-rows", str(10 ** 12)], "--shard-rows"),
    (["teach", "--shards", "s"], "--teacher"),  # click's own usage errors are one line too
    (["no-such-command"], "no-such-command"),
    (["teach", "--teacher", "t", "--store-root", "s3://"], "s3://"),  # no bucket: a local folder `s3:` before
    (["teach", "--teacher", "t", "--store-root", "foo://x"], "foo://x"),
    (["store", "list", "foo://x"], "foo://x"),
    (["student", "--student", "s", "--out", "o", "--warmup-epochs", "inf"], "warmup_epochs"),
    (["student", "--student", "s", "--out", "o", "--sched", "step", "--decay-epochs", "0"], "decay_epochs"),
    (["student", "--student", "s", "--out", "o", "--min-lr", "-1"], "min_lr"),
    (["student", "--student", "s", "--out", "o", "--warmup-lr", "-1"], "warmup_lr"),
    (["student", "--student", "s", "--out", "o", "--img-size", "100000"], "img_size"),
    (["student", "--student", "s", "--out", "o", "--seed", str(2 ** 64)], "seed"),
])
def test_option_values_are_checked_where_parsed(tmp_path, monkeypatch, args, option):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(cli(*args), option)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("record,field,value", [
    ("student.json", "teachers", ["../../x"]), ("student.json", "num_classes", "four"),
    ("student.json", "mean", [0.5, 0.5]), ("student.json", "crop_pct", 0), ("student.json", "model_kwargs", []),
    ("student.json", "model", "test_efficientnet"),  # a model that does not take the record's rep knobs
    ("fuse.json", "teachers", ["../../x"]), ("fuse.json", "input_size", 0), ("fuse.json", "recipe", 5)])
def test_records_are_read_with_ranges(base, fused_dir, tmp_path, record, field, value):
    from tests._chain_helpers import fake_student

    _, _, shards = base
    folder = fake_student(tmp_path / "student") if record == "student.json" else fused_dir(tmp_path / "copy")
    info = json.loads((folder / record).read_text())
    info[field] = value
    (folder / record).write_text(json.dumps(info))
    if record == "student.json":
        result = cli("fuse", "--student-dir", str(folder), "--shards", str(shards), "--out", str(tmp_path / "f"),
                     "--no-onnx")
    else:
        result = cli("evaluate", "--fused-dir", str(folder), "--shards", str(folder.parent / "shards"),
                     "--teach-dir", str(tmp_path), "--out", str(tmp_path / "m.json"), "--latency-runs", "1",
                     "--latency-batch", "1", "--quiet")
    assert_one_line_error(result, record, field)


@pytest.mark.parametrize("field,value", [("re_count", 1000000), ("ratio", [0.75, float("inf")]),
                                         ("auto_augment", "rand-mxx"), ("size", 100000), ("interpolation", "foo")])
def test_view_plan_values_have_ranges(field, value):
    """A plan value beyond what can be rendered (or a RandAugment section timm would silently skip) is refused
    where the plan is parsed, before a teacher is loaded."""
    from pipeline.data.views import ViewPlan

    with pytest.raises(UserError, match=field if field != "auto_augment" else "section 'mxx'"):
        ViewPlan.load({field: value}, "params `teach: plan:`")


# ---------------------------------------------------------------- issue 19 / 23: every byte of a store is checked

STORE_ARRAYS = ("values", "indices", "lse", "rest", "params", "labels")


def store_shard_file(store: Path, name: str, shard: int = 1) -> Path:
    """The file holding store shard `shard` of array `name` (zarr's sharding codec: one file per shard)."""
    path = store / name / "c" / str(shard)
    return path if path.is_file() else next(p for p in sorted(path.rglob("*")) if p.is_file())


def change_one_byte(path: Path, offset=None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", STORE_ARRAYS)
def test_one_changed_byte_in_any_array_is_caught_naming_the_shard(base, tmp_path, name):
    """Each done record holds the sha256 of every array's shard file: inspect --verify and the student's reads
    (targets, params; the labels come from the shards) find one changed byte, every time, and name the shard."""
    from pipeline.store import VIEW_ARRAYS, open_store

    _, store = copied_store(base, tmp_path / "root")
    change_one_byte(store_shard_file(store, name))
    assert_one_line_error(cli("store", "inspect", "--verify", str(store)), "shard 1", f"{name}/c/1")
    opened = open_store(store)
    if name in VIEW_ARRAYS:
        index, view = np.divmod(np.arange(opened.num_samples * opened.num_views), opened.num_views)
        with pytest.raises(UserError, match=f"shard 1: {name}/c/1"):
            opened.read_views(index, view, (name,))


def test_student_refuses_a_changed_store_before_training(base, tmp_path):
    _, _, shards = base
    root, store = copied_store(base, tmp_path / "root")
    change_one_byte(store_shard_file(store, "values"))
    (tmp_path / "s.yaml").write_text("model: test_efficientnet\n")
    result = cli("student", "--student", str(tmp_path / "s.yaml"), "--recipe", "demo", "--shards", str(shards),
                 "--teach-dir", str(root / "out"), "--teachers", "tiny", "--out", str(tmp_path / "s"),
                 "--img-size", "48", "--epochs", "1", "--batch-size", "4", "--set", "num_branches=null",
                 "--set", "scale_branch=null", "--set", "plan=null", "--quiet")
    assert_one_line_error(result, "shard 1", "values/c/1")
    assert not (tmp_path / "s" / "model.safetensors").exists()


def test_a_truncated_chunk_is_one_line_naming_the_shard(base, tmp_path):
    from pipeline.store import open_store

    _, store = copied_store(base, tmp_path / "root")
    chunk = store_shard_file(store, "values")
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    assert_one_line_error(cli("store", "inspect", "--verify", str(store)), "shard 1")
    opened = open_store(store)
    with pytest.raises(UserError, match="shard 1"):  # what the student reads: zarr's checksum traceback before
        opened.read_views(*np.divmod(np.arange(opened.num_samples * opened.num_views), opened.num_views))


@pytest.mark.parametrize("edit", ["plan and plan_hash", "temperatures", "values dtype"])
def test_edited_store_metadata_is_refused(base, tmp_path, edit):
    """The done records hold a digest of the provenance and the arrays' zarr.json: a plan edited with its hash (a
    student would replay views the teacher never saw) or temperatures [1,2,4] -> [1,3,4] (tau 3 would use tau 2's
    numbers) is refused in one line by every open."""
    from pipeline.data.views import ViewPlan

    root, store = copied_store(base, tmp_path / "root")
    node = store / ("values" if edit == "values dtype" else "") / "zarr.json"
    meta = json.loads(node.read_text())
    if edit == "values dtype":
        meta["data_type"] = "int16" if meta["data_type"] != "int16" else "uint16"
    else:
        p = meta["attributes"]["provenance"]
        if edit == "temperatures":
            p["temperatures"] = [1.0, 3.0, 4.0]
        else:
            p["plan"]["seed"] += 1
            p["plan_hash"] = ViewPlan.load(p["plan"]).hash()
    node.write_text(json.dumps(meta))
    assert_one_line_error(cli("store", "inspect", str(store)), "its metadata", "is not what shard")
    assert_one_line_error(cli("store", "inspect", str(root / "out" / "tiny.json")), "its metadata", "is not what shard")


def test_consolidated_metadata_that_changes_a_dtype_is_refused(base, tmp_path):
    _, store = copied_store(base, tmp_path / "root")
    meta = json.loads((store / "zarr.json").read_text())
    values = json.loads((store / "values" / "zarr.json").read_text())
    other = "float32" if values["data_type"] == "float16" else "float16"
    meta["consolidated_metadata"] = {"kind": "inline", "must_understand": False,
                                     "metadata": {"values": {**values, "data_type": other}}}
    (store / "zarr.json").write_text(json.dumps(meta))
    assert_one_line_error(cli("store", "inspect", str(store)), "consolidated metadata for 'values' differs")


# ---------------------------------------------------------------- issue 23: every input checked before any work

def _no_teacher_load(monkeypatch):
    """Loading a large teacher takes minutes (BEiTv2-B: ~76 s here): every input must be refused before it."""
    def loaded(*args, **kwargs):
        raise AssertionError("the teacher was loaded before every input was checked")

    monkeypatch.setattr("pipeline.teach.load_teacher", loaded)


@pytest.mark.parametrize("case", ["plan value", "teacher spec YAML", "values encoding", "device", "store root"])
def test_every_teach_input_is_checked_before_the_teacher_loads(base, tmp_path, monkeypatch, case):
    _, spec, shards = base
    _no_teacher_load(monkeypatch)
    extra = ()
    if case == "plan value":
        (tmp_path / "plan.yaml").write_text("size: abc\n")
        extra, words = ("--plan", str(tmp_path / "plan.yaml")), ("size",)
    elif case == "teacher spec YAML":
        (tmp_path / "bad.yaml").write_text("name: [x\n")
        spec, words = tmp_path / "bad.yaml", ("not valid YAML",)
    elif case == "values encoding":
        extra, words = ("--values", "logp-s5"), ("logp-s5",)
    elif case == "device":
        extra, words = ("--device", "tpu"), ("--device",)
    else:
        extra, words = ("--store-root", "s3://"), ("s3://", "bucket")
    assert_one_line_error(cli(*teach_args(spec, shards, tmp_path / "r", *extra)), *words)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("failure", ["missing bucket", "bad credentials", "unreachable endpoint"])
def test_object_store_errors_are_one_line_before_the_teacher_loads(base, tmp_path, monkeypatch, s3, failure):
    """s3fs raises FileNotFoundError / PermissionError and botocore an EndpointConnectionError (no OSError) deep in
    the first write, after the teacher loaded: each is one line naming the URL and the fix, before it loads."""
    import contextlib
    import socket

    import s3fs
    from moto.core.authorization import enable_iam_authentication

    from tests.conftest import S3_BUCKET

    _, spec, shards = base
    _no_teacher_load(monkeypatch)
    root, auth = f"s3://{S3_BUCKET}/stores", contextlib.nullcontext()
    if failure == "missing bucket":
        root, words = "s3://no-such-bucket/stores", ("bucket 'no-such-bucket' does not exist",)
    elif failure == "bad credentials":  # moto checks them only when asked to: the key "testing" is then unknown
        auth, words = enable_iam_authentication(), ("access denied", "credentials")
    else:
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore retries a refused connection for ~10 s
        words = ("cannot reach", "AWS_ENDPOINT_URL")
    args = teach_args(spec, shards, tmp_path / "r")
    args[args.index("--store-root") + 1] = root
    s3fs.S3FileSystem.clear_instance_cache()  # a cached filesystem keeps the endpoint it was made with
    try:
        with auth:
            result = cli(*args)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert_one_line_error(result, root, *words)


def test_store_list_lists_a_remote_root(base, s3):
    """`store list s3://bucket/prefix` lists through fsspec (it took the URL for a local path: "no store")."""
    import s3fs

    from tests.conftest import S3_BUCKET

    tmp, _, _ = base
    store = next((tmp / "ref").glob("tiny-*.zarr"))
    s3fs.S3FileSystem().put(str(store), f"{S3_BUCKET}/listed/{store.name}", recursive=True)
    result = cli("store", "list", f"s3://{S3_BUCKET}/listed", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [(r["teacher"], r["path"]) for r in rows] == [("tiny", f"s3://{S3_BUCKET}/listed/{store.name}")]


@pytest.mark.parametrize("case", ["interpolation foo", "bad pretrained tag", "--init bad tag",
                                  "min_input_size null at 8 px", "branch_bn_init 7"])
def test_student_inputs_are_checked_before_training(base, tmp_path, case):
    """A student spec, --init or size the model cannot take is one line, not timm's KeyError/RuntimeError or GhostNet's
    ValueError in the first step; branch_bn_init has the models' one range (pipeline.models.rep), as in a recipe."""
    _, _, shards = base
    spec, extra = {"model": "test_efficientnet"}, []
    if case == "interpolation foo":
        spec["interpolation"], words = "foo", ("interpolation", "bicubic")
    elif case == "bad pretrained tag":
        spec["model"], words = "test_efficientnet.nosuchtag", ("nosuchtag", "test_efficientnet.r160_in1k")
    elif case == "--init bad tag":
        extra, words = ["--init", "test_efficientnet.nosuchtag"], ("--init", "test_efficientnet.r160_in1k")
    elif case == "min_input_size null at 8 px":  # null: no limit of the spec's; the network still has its own
        spec, extra, words = {"model": "rep_ghostnetv3_050", "min_input_size": None}, ["--img-size", "8"], ("8 px",)
    else:
        spec, extra = {"model": "rep_ghostnetv3_050", "model_kwargs": {"branch_bn_init": 7}}, ["--img-size", "64"]
        words = ("branch_bn_init",)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    result = cli("student", "--student", str(tmp_path / "s.yaml"), "--recipe", "demo", "--shards", str(shards),
                 "--out", str(tmp_path / "s"), "--img-size", "48", "--epochs", "1", "--batch-size", "4",
                 "--alpha", "0", "--quiet", *extra)
    assert_one_line_error(result, *words)
    assert not (tmp_path / "s" / "model.safetensors").exists()


def test_a_null_in_params_is_refused(base, tmp_path):
    """click passes a null from params.yaml on as None, past the option's type and range."""
    _, spec, shards = base
    params = tmp_path / "params.yaml"
    params.write_text("teach:\n  num-views: null\n")
    result = cli("teach", "--teacher", str(spec), "--shards", str(shards), "--store-root", str(tmp_path / "r"),
                 "--device", "cpu", "--quiet", params=params)
    assert_one_line_error(result, "num-views", "null")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("edit", ["data_type a list", "codec name a mapping"])
def test_store_metadata_of_the_wrong_type_is_one_line(base, tmp_path, edit):
    _, store = copied_store(base, tmp_path / "root")
    node = store / "values" / "zarr.json"
    meta = json.loads(node.read_text())
    if edit == "data_type a list":
        meta["data_type"] = [meta["data_type"]]
    else:
        meta["codecs"][0]["name"] = {"name": meta["codecs"][0]["name"]}
    node.write_text(json.dumps(meta))
    assert_one_line_error(cli("store", "inspect", str(store)), "values/zarr.json")


def test_verify_shards_rehashes_what_the_hash_cache_trusts(base, tmp_path):
    """The cache trusts a shard whose size and mtime are unchanged (README: it guards against accidents);
    `teach --verify-shards` reads every byte again."""
    _, spec, shards = base
    root, _ = copied_store(base, tmp_path / "root")
    changed = tmp_path / "shards"
    shutil.copytree(shards, changed)
    assert cli(*teach_args(spec, changed, root)).exit_code == 0  # hashed once, into the cache
    tar = sorted(changed.glob("train-*.tar"))[0]
    stat = tar.stat()
    change_one_byte(tar)
    os.utime(tar, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cli(*teach_args(spec, changed, root)).exit_code == 0  # size and mtime as cached: trusted
    assert_one_line_error(cli(*teach_args(spec, changed, root, "--verify-shards")), "changed since")


@pytest.mark.parametrize("part", ["state", "a model tensor", "__items__"])
def test_a_checkpoint_missing_a_part_is_refused_on_resume(tmp_path, part):
    """The checkpoint's digest covers its tensors, not the JSON tree that places them: a tree without `state`,
    a state dict without a tensor, a mapping without its items is one line, not a KeyError or load_state_dict's."""
    from safetensors import safe_open
    from safetensors.torch import save

    from pipeline.checkpoint import save_checkpoint
    from pipeline.loop import CHECKPOINT, create_optimizer, fit
    from pipeline.recipes import load_recipe

    model, recipe = nn.Linear(3, 2), load_recipe("demo", {"epochs": 2})
    run_id = {"run": "this one"}
    parts = {"model": model.state_dict(), "optimizer": create_optimizer(model, recipe).state_dict(),
             "ema": model.state_dict(), "state": {"epoch": 1, "step": 1, "history": [], "run": run_id}}
    if part == "state":
        del parts["state"]
    elif part == "a model tensor":
        parts["model"] = {"weight": parts["model"]["weight"]}
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, parts)
    if part == "__items__":  # the tree is JSON in the file's metadata, outside the tensors' digest
        with safe_open(str(path), framework="pt") as f:
            metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
        metadata["tree"] = metadata["tree"].replace('"__items__"', '"__itemz__"', 1)
        path.write_bytes(save(tensors, metadata=metadata))
    with pytest.raises(UserError, match="checkpoint") as err:
        fit(model, recipe, None, None, 1, tmp_path, run_id, normalize=None, resume=True)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("field,value", [("top1", None), ("latency_ms", [1.0, 2.0])])
def test_metrics_of_the_wrong_type_are_one_line(tmp_path, field, value):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "s.json").write_text(json.dumps({**metrics("s", 90.0, 1.0), field: value}))
    assert_one_line_error(cli("report", "--metrics", str(tmp_path / "eval"), "--out", str(tmp_path / "r")), field)
    assert not (tmp_path / "r").exists()


def test_colliding_imagefolder_keys_are_refused(tmp_path):
    """`a.b.png` and `a_b.png` make one key (dots become '_'): refused, naming both, before anything is written."""
    src = tmp_path / "images"
    for c in ("cat", "dog"):
        (src / c).mkdir(parents=True)
        for i, name in enumerate(("a.b.png", "a_b.png", "c.png")):
            (src / c / name).write_bytes(png(40 * i + (c == "dog")))
    assert_one_line_error(cli(*shard_args(tmp_path / "o", "--source", f"imagefolder:{src}")), "a.b.png", "a_b.png")
    assert not (tmp_path / "o").exists()
