"""`pipeline shard`: sources, reproducible shards, manifest, and the errors a user can cause."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from _data_helpers import synthetic_shards
from pipeline.data import sources
from pipeline.data.shards import ShardManifest, ShardReader, write_shards
from pipeline.errors import UserError
from pipeline.io import sha256_file
from stages.cli import main
from tests.conftest import EMPTY_PARAMS

CIFAR_TAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "train.tar"


def _png(colour, size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root: Path, layout: dict) -> Path:
    """layout: {relative path: bytes}."""
    for rel, data in layout.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _shard(args, params=None):
    return CliRunner().invoke(main, ["--params", str(params or EMPTY_PARAMS), "shard", *args])


def test_same_input_gives_byte_identical_shards(tmp_path):
    a = synthetic_shards(tmp_path / "a", fmt="jpg")
    b = synthetic_shards(tmp_path / "b", fmt="jpg")
    assert a == b
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_manifest_describes_the_shards(tmp_path):
    m = synthetic_shards(tmp_path / "s", num_classes=3, per_class=8, shard_size=5)
    assert m == ShardManifest.read(tmp_path / "s")
    assert m.classes == ["class0", "class1", "class2"] and m.num_classes == 3 and m.tool_version
    assert {k: v["count"] for k, v in m.splits.items()} == {"train": 18, "val": 6}
    for split in m.splits.values():
        assert sum(s["count"] for s in split["shards"]) == split["count"]
        for s in split["shards"]:
            assert sha256_file(tmp_path / "s" / s["name"]) == s["sha256"]
    with tarfile.open(tmp_path / "s" / "train-000000.tar") as tar:
        member = tar.getmembers()[0]
        assert member.mtime == 0 and member.name.endswith((".cls", ".png"))
    assert synthetic_shards(tmp_path / "t", per_class=9).fingerprint != m.fingerprint


@pytest.mark.parametrize("edit", ["missing key", "unknown key"])
def test_manifest_with_a_missing_or_unknown_key_is_refused(tmp_path, edit):
    """An edited or foreign manifest.json is one line naming the file, the key and the fix, before any stage uses it."""
    synthetic_shards(tmp_path / "s", per_class=2)
    path = tmp_path / "s" / "manifest.json"
    data = json.loads(path.read_text())
    if edit == "missing key":
        del data["source"]
    else:
        data["labels_file"] = "labels.txt"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError) as err:
        ShardManifest.read(tmp_path / "s")
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "pipeline shard" in message
    assert ("no source" if edit == "missing key" else "unknown keys ['labels_file']") in message


def test_imagefolder_with_train_and_val(tmp_path):
    src = _folder(tmp_path / "src", {
        "train/cat/a.png": _png("red"), "train/cat/b.v2.png": _png("red"), "train/dog/c.png": _png("blue"),
        "val/dog/d.png": _png("blue"), "train/dog/notes.txt": b"skip me"})
    result = _shard(["--source", f"imagefolder:{src}", "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 0, result.output
    m = ShardManifest.read(tmp_path / "o")
    assert m.classes == ["cat", "dog"] and m.dataset == "src"
    reader = ShardReader(tmp_path / "o", "train")
    assert sorted(reader.keys) == ["cat/a", "cat/b_v2", "dog/c"]
    assert reader.image_bytes(reader.keys.index("dog/c")) == _png("blue")
    val = ShardReader(tmp_path / "o", "val")
    assert val.keys == ["dog/d"] and val.label(0) == 1


def test_imagefolder_inside_a_tar_is_read_in_place(tmp_path):
    src = _folder(tmp_path / "src", {f"train/{c}/{i}.png": _png(c) for c in ("red", "blue") for i in range(5)})
    with tarfile.open(tmp_path / "src.tar", "w") as tar:
        tar.add(src / "train", arcname="train")
    from_dir = sources.imagefolder(src, 0.2, seed=0)
    from_tar = sources.imagefolder(tmp_path / "src.tar", 0.2, seed=0)
    assert from_tar[:2] == from_dir[:2] == ("src", ["blue", "red"])
    for split in ("train", "val"):
        assert [(s.key, s.label, s.read()) for s in from_tar[2][split]] == \
            [(s.key, s.label, s.read()) for s in from_dir[2][split]]
    assert len(from_tar[2]["val"]) == 2


def test_imagefolder_stratified_split(tmp_path):
    src = _folder(tmp_path / "src", {f"{c}/{i}.png": _png(c) for c in ("red", "blue") for i in range(10)})
    name, classes, splits = sources.imagefolder(src, 0.3, seed=0)
    assert [s.label for s in splits["val"]].count(0) == 3 and len(splits["val"]) == 6
    again = sources.imagefolder(src, 0.3, seed=0)[2]
    assert [s.key for s in again["val"]] == [s.key for s in splits["val"]]
    assert {s.key for s in splits["train"]}.isdisjoint(s.key for s in splits["val"])


def test_corrupt_image_errors_or_is_skipped(tmp_path):
    src = _folder(tmp_path / "src", {"a/ok.png": _png("red"), "a/bad.png": _png("red")[:40],
                                     "b/ok.png": _png("blue")})
    result = _shard(["--source", f"imagefolder:{src}", "--out", str(tmp_path / "o"), "--val-fraction", "0"])
    assert result.exit_code == 2 and "bad.png" in result.output and "--on-bad-image skip" in result.output
    assert not (tmp_path / "o").exists()
    previous = synthetic_shards(tmp_path / "prev")
    _shard(["--source", f"imagefolder:{src}", "--out", str(tmp_path / "prev"), "--val-fraction", "0"])
    assert ShardManifest.read(tmp_path / "prev") == previous  # a failed run leaves the old output intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prev", "src"]  # and no temp dirs
    result = _shard(["--source", f"imagefolder:{src}", "--out", str(tmp_path / "o"), "--val-fraction", "0",
                     "--on-bad-image", "skip", "--quiet"])
    assert result.exit_code == 0, result.output
    m = ShardManifest.read(tmp_path / "o")
    assert m.splits["train"]["count"] == 2
    assert [s["key"] for s in m.splits["train"]["skipped"]] == ["a/bad"]


@pytest.mark.parametrize("layout, message", [
    ({"a/x.png": _png("red"), "b/.keep": b""}, "class folder .* has no images"),
    ({"x.txt": b""}, "no class sub-folders"),
    ({"a/x.png": _png("red"), "a/x.jpg": _png("red")}, "duplicate key 'a/x'"),
])
def test_bad_folders_are_user_errors(tmp_path, layout, message):
    src = _folder(tmp_path / "src", layout)
    result = _shard(["--source", f"imagefolder:{src}", "--out", str(tmp_path / "o"), "--val-fraction", "0"])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    with pytest.raises(UserError, match=message):
        write_shards(sources.imagefolder(src, 0.0, 0)[2], tmp_path / "o", "x", ["a"], "test")


def test_zero_images_and_unknown_source(tmp_path):
    with pytest.raises(UserError, match="zero images"):
        write_shards({"train": []}, tmp_path / "o", "x", [], "test")
    result = _shard(["--source", "nosuch:thing", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "unknown --source" in result.output


def test_webdataset_source_verifies_and_reshards(tmp_path):
    first = synthetic_shards(tmp_path / "a", shard_size=5).splits["train"]
    pattern = f"{tmp_path}/a/train-{{000000..{len(first['shards']) - 1:06d}}}.tar"
    result = _shard(["--source", f"webdataset:{pattern}", "--out", str(tmp_path / "b"), "--quiet",
                     "--val-fraction", "0", "--shard-size", "5"])
    assert result.exit_code == 0, result.output
    again = ShardManifest.read(tmp_path / "b").splits["train"]
    assert again["shards"] == first["shards"] and again["fingerprint"] == first["fingerprint"]
    assert ShardManifest.read(tmp_path / "b").classes == ["class0", "class1", "class2"]
    _, _, splits = sources.webdataset_shards(f"{tmp_path}/a/{{train,val}}-000000.tar", 0.5, 0)
    assert [len(splits["train"]), len(splits["val"])] == [5, 5]  # val-*.tar is the val split, not a split-off
    result = _shard(["--source", f"webdataset:{tmp_path}/a/train-{{000000..000009}}.tar", "--out",
                     str(tmp_path / "c")])
    assert result.exit_code == 2 and "missing shard" in result.output


def test_digits_demo_source(tmp_path):
    name, classes, splits = sources.digits(64, 0.2, seed=0)
    assert name == "digits" and classes == [str(c) for c in range(10)]
    assert len(splits["train"]) + len(splits["val"]) == 1797 and 340 < len(splits["val"]) < 380
    image = Image.open(io.BytesIO(splits["train"][0].read()))
    assert image.size == (64, 64) and image.mode == "RGB" and np.asarray(image).std() > 20


def test_help_explains_options():
    result = CliRunner().invoke(main, ["shard", "--help"])
    assert result.exit_code == 0
    for text in ("imagefolder:DIR", "webdataset:PATTERN", "pixels", "--quiet", "default: 10000"):
        assert text in result.output


@pytest.mark.skipif(not CIFAR_TAR.is_file(), reason="CIFAR-10 tar not present")
def test_real_cifar10_subset(tmp_path):
    src = tmp_path / "cifar"
    counts = {}
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            cls = member.name.split("/")[-2] if member.isfile() else None
            if cls and counts.get(cls, 0) < 20:
                counts[cls] = counts.get(cls, 0) + 1
                tar.extract(member, src, filter="data")
    result = _shard(["--source", f"imagefolder:{src}", "--out", str(tmp_path / "o"), "--quiet",
                     "--shard-size", "64", "--val-fraction", "0.1"])
    assert result.exit_code == 0, result.output
    m = ShardManifest.read(tmp_path / "o")
    assert len(m.classes) == 10 and "airplane" in m.classes
    assert m.splits["train"]["count"] == 180 and len(m.splits["train"]["shards"]) == 3
    assert m.splits["val"]["count"] == 20
    reader = ShardReader(tmp_path / "o", "train")
    assert reader.image(0).size == (32, 32) and reader.image_bytes(0)[:2] == b"\xff\xd8"


def test_dataset_spec_sets_defaults_and_checks_classes(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text("source: synthetic\nimage_size: 32\nval_fraction: 0.5\nnum_classes: 4\n")
    result = _shard(["--dataset", str(spec), "--out", str(tmp_path / "o"), "--per-class", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    m = ShardManifest.read(tmp_path / "o")
    assert m.splits["val"]["count"] == 8 and ShardReader(tmp_path / "o", "val").image(0).size == (32, 32)
    result = _shard(["--dataset", str(spec), "--out", str(tmp_path / "p"), "--num-classes", "3"])
    assert result.exit_code == 2 and "expects 4 classes" in result.output
    result = _shard(["--dataset", "nosuch", "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "digits" in result.output  # lists the known specs


def test_shard_writes_a_verified_index_and_the_reader_opens_from_it(tmp_path, monkeypatch):
    """Opening a split reads one index per shard (O(shards)), not every tar header (O(samples))."""
    from pipeline.data import shards as shards_module

    m = synthetic_shards(tmp_path / "s", num_classes=3, per_class=8, shard_size=5, fmt="jpg")
    scanned = ShardReader(tmp_path / "s", "train")  # reference: what the tar headers say
    for split in m.splits.values():
        for s in split["shards"]:
            index = tmp_path / "s" / s["index"]
            assert index.is_file() and sha256_file(index) == s["index_sha256"]

    def no_scan(path):
        raise AssertionError(f"tar {path} scanned although its index is in the manifest")

    monkeypatch.setattr(shards_module, "index_tar", no_scan)
    reader = ShardReader(tmp_path / "s", "train")
    assert reader.keys == scanned.keys and np.array_equal(reader.labels, scanned.labels)
    assert all(reader.image_bytes(i) == scanned.image_bytes(i) for i in range(len(reader)))


def test_a_changed_or_missing_index_is_a_user_error(tmp_path):
    m = synthetic_shards(tmp_path / "s", shard_size=5)
    index = tmp_path / "s" / m.splits["train"]["shards"][0]["index"]
    index.write_bytes(index.read_bytes().replace(b'"labels":[0', b'"labels":[1'))
    with pytest.raises(UserError, match="does not match its sha256"):
        ShardReader(tmp_path / "s", "train")
    index.unlink()
    with pytest.raises(UserError, match="missing"):
        ShardReader(tmp_path / "s", "train")


def _jpg(colour, size=32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG")
    return buf.getvalue()


def test_image_size_renders_every_source_larger_once(tmp_path):
    """--image-size applies to imagefolder (a tar here) too: a 32-px dataset is stored at 64 px."""
    src = _folder(tmp_path / "mydata" / "src", {f"train/{c}/{i}.jpg": _jpg(c) for c in ("red", "blue") for i in range(3)})
    with tarfile.open(tmp_path / "mydata" / "train.tar", "w") as tar:
        tar.add(src / "train", arcname="train")
    result = _shard(["--source", f"imagefolder:{tmp_path / 'mydata' / 'train.tar'}", "--out", str(tmp_path / "o"),
                     "--quiet", "--image-size", "64", "--val-fraction", "0.34"])
    assert result.exit_code == 0, result.output
    m = ShardManifest.read(tmp_path / "o")
    reader = ShardReader(tmp_path / "o", "train")
    assert reader.image(0).size == (64, 64) and reader.image_bytes(0)[:2] == b"\xff\xd8"  # still a JPEG
    assert m.dataset == "mydata" and m.crop_pct == 1.0  # not "train": the first meaningful name
    plain = _shard(["--source", f"imagefolder:{src}", "--out", str(tmp_path / "p"), "--quiet", "--crop-pct", "0.875"])
    assert plain.exit_code == 0, plain.output
    assert ShardReader(tmp_path / "p", "train").image(0).size == (32, 32)  # no --image-size: original bytes
    assert ShardManifest.read(tmp_path / "p").crop_pct == 0.875


def test_display_name_skips_generic_folder_names(tmp_path):
    assert sources.display_name(tmp_path / "defects" / "data") == "defects"
    assert sources.display_name(tmp_path / "cifar10" / "train.tar") == "cifar10"
    assert sources.display_name(tmp_path / "crops") == "crops"


def test_split_fingerprints_hash_split_name_and_content(tmp_path):
    """Same file names in train and val (cls/0000.png) no longer give the same split fingerprint."""
    same = _folder(tmp_path / "same", {"train/a/0.png": _png("red"), "val/a/0.png": _png("red")})
    other = _folder(tmp_path / "other", {"train/a/0.png": _png("red"), "val/a/0.png": _png("blue")})
    for src in (same, other):
        assert _shard(["--source", f"imagefolder:{src}", "--out", str(tmp_path / f"{src.name}-o"), "--quiet"]).exit_code == 0
    a, b = ShardManifest.read(tmp_path / "same-o"), ShardManifest.read(tmp_path / "other-o")  # --out inside a source is refused
    assert a.splits["train"]["fingerprint"] != a.splits["val"]["fingerprint"]  # split name
    assert a.splits["val"]["fingerprint"] != b.splits["val"]["fingerprint"]  # content
