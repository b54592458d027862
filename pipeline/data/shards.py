"""Webdataset shards + manifest.json: writing them reproducibly and reading them by sample index.

A split's samples are numbered 0..N-1 in manifest order (shard order, then order inside a shard);
that index is the row of every teacher store, so the reader gives random access by index through an
in-memory index of tar member offsets instead of streaming. `shard` writes that index next to each
shard (`{shard}.idx.json`, its sha256 in the manifest), so opening a split reads one small file per
shard (O(shards)) instead of every tar header (O(samples)); shards without one are scanned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline import __version__
from pipeline.data.images import Source, decode_image
from pipeline.errors import UserError
from pipeline.io import (MARKER, atomic_write_bytes, atomic_write_json, check_keys, is_ours, mark_ours, read_json,
                         sha256_file, stable_hash, umask_mode)
from pipeline.progress import progress

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
MANIFEST, MANIFEST_FORMAT = "manifest.json", 2  # format 2: the fingerprint covers each shard index (keys, labels)
SHARD_MTIME = 0  # fixed tar member times: the same input gives byte-identical shards
INDEX_SUFFIX, INDEX_FORMAT = ".idx.json", 1  # per-shard index: key, image offset/size, label
OUR_FILES = re.compile(rf"{re.escape(MANIFEST)}|[A-Za-z0-9_-]+-\d{{6}}(\.tar|{re.escape(INDEX_SUFFIX)})")  # what shard writes


@dataclasses.dataclass(frozen=True)
class Sample:
    """One image to shard: `read()` gives its original bytes; `origin` names it in error messages."""

    key: str
    label: int
    ext: str
    origin: str
    read: Callable[[], bytes]


def split_member(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is everything before the first dot of the basename."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def index_tar(path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {ext: (data offset, size)})] in tar order, reading headers only."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.isfile():
                    key, ext = split_member(member.name)
                    samples.setdefault(key, {})[ext] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError) as err:
        raise UserError(f"cannot read shard {path}: {err}; re-run `pipeline shard` to rewrite it") from None
    return list(samples.items())


def scan_shard(path) -> dict:
    """One shard's image locations and labels in tar order: {keys, offsets, sizes, labels}."""
    entries = {"keys": [], "offsets": [], "sizes": [], "labels": []}
    with open(path, "rb") as f:
        for key, members in index_tar(path):
            image_ext = next((e for e in members if e.lower() in IMAGE_EXTS), None)
            if image_ext is None or "cls" not in members:
                raise UserError(f"sample '{key}' in {path} lacks an image or a cls entry")
            f.seek(members["cls"][0])
            entries["keys"].append(key)
            entries["offsets"].append(members[image_ext][0])
            entries["sizes"].append(members[image_ext][1])
            entries["labels"].append(int(f.read(members["cls"][1])))
    return entries


def write_shard_index(tar_path) -> dict:
    """Write `{shard}.idx.json` next to a shard (what `scan_shard` finds), so opening a split reads
    one small file per shard instead of every tar header; returns its manifest fields."""
    tar_path = Path(tar_path)
    index = tar_path.with_name(tar_path.name.removesuffix(".tar") + INDEX_SUFFIX)
    data = (json.dumps({"format": INDEX_FORMAT, **scan_shard(tar_path)}, separators=(",", ":")) + "\n").encode()
    atomic_write_bytes(index, data)
    return {"index": index.name, "index_sha256": hashlib.sha256(data).hexdigest()}


def read_shard_index(shard_dir, shard: dict) -> dict:
    """The index a manifest shard entry names, verified by its sha256 and count."""
    path = Path(shard_dir) / shard["index"]
    fix = "re-run `pipeline shard` to rewrite it"
    try:
        data = path.read_bytes()
    except OSError:
        raise UserError(f"shard index {path} listed in the manifest is missing; {fix}") from None
    if hashlib.sha256(data).hexdigest() != shard["index_sha256"]:
        raise UserError(f"shard index {path} does not match its sha256 in the manifest (changed or corrupt); {fix}")
    entries = json.loads(data)
    if entries.get("format") != INDEX_FORMAT or len(entries["keys"]) != shard["count"]:
        raise UserError(f"shard index {path} (format {entries.get('format')}) does not describe "
                        f"{shard['name']}; {fix}")
    return entries


def read_range(path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


@dataclasses.dataclass(frozen=True)
class ShardManifest:
    """What `pipeline shard` wrote into manifest.json, the one description of the shards every stage reads;
    its fields are the file's keys (written sorted, so the file and its fingerprint stay as they were)."""

    format: int
    dataset: str
    classes: list
    num_classes: int
    source: str
    crop_pct: float                 # the dataset's evaluation centre crop, for the students' validation
    tool_version: str
    splits: dict                    # split -> {count, fingerprint, shards: [{name, count, sha256, index, ...}], skipped}
    fingerprint: str                # dataset_fingerprint of classes and splits

    @classmethod
    def read(cls, shard_dir) -> "ShardManifest":
        """The manifest of `shard_dir`; a missing, older, corrupt or edited one is one line naming the fix."""
        path = Path(shard_dir) / MANIFEST
        if not path.is_file():
            raise UserError(f"no {MANIFEST} in {shard_dir}; create the shards with `pipeline shard --out {shard_dir}`")
        fix = "re-run `pipeline shard` to rewrite it"
        data = read_json(path, fix)
        if isinstance(data, dict) and data.get("format", 1) != MANIFEST_FORMAT:
            raise UserError(f"{path} is of format {data.get('format', 1)}, written by an older `pipeline shard` "
                            f"(this one reads format {MANIFEST_FORMAT}); {fix}")
        check_keys(cls, data, str(path), fix)
        if not isinstance(data["classes"], list) or data["num_classes"] != len(data["classes"]):
            raise UserError(f"{path} was edited: num_classes {data['num_classes']!r} is not the number of its "
                            f"classes; {fix}")
        return cls(**data)


def dataset_fingerprint(classes: list, splits: dict) -> str:
    """Hash of the classes, each split's keys + labels, every shard's sha256 and its index's (the keys and
    labels readers use): the dataset's content."""
    return stable_hash({"classes": classes,
                        "splits": {k: [v["fingerprint"], [[s["sha256"], s.get("index_sha256")] for s in v["shards"]]]
                                   for k, v in splits.items()}})


def _hash_cache_path() -> Path:
    root = os.environ.get("PIPELINE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pipeline"
    return Path(root) / "shard-sha256.json"


def _read_hash_cache() -> dict:
    try:
        cache = json.loads(_hash_cache_path().read_text())
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember_hashes(entries: dict) -> None:
    """Add {resolved path: [size, mtime_ns, sha256]}; a cache that cannot be written only costs speed."""
    if not entries:
        return
    try:
        from pipeline.io import atomic_write_json

        atomic_write_json(_hash_cache_path(), {**_read_hash_cache(), **entries})
    except OSError:
        pass


def _stat_key(path: Path) -> tuple[str, list]:
    st = path.stat()
    return str(path.resolve()), [st.st_size, st.st_mtime_ns]


def verified_manifest(shard_dir, full: bool = False) -> ShardManifest:
    """The manifest, after checking that every shard still has the sha256 it records and that the
    fingerprint is the one of that content. Fast path: a shard whose size and mtime match a cached
    hash is not read again (`full`: every shard is); any other is hashed in full (and cached)."""
    manifest = ShardManifest.read(shard_dir)
    cache, fresh = _read_hash_cache(), {}
    for split in manifest.splits.values():
        for shard in split["shards"]:
            path = Path(shard_dir) / shard["name"]
            if not path.is_file():
                raise UserError(f"shard {path} listed in the manifest is missing; re-run `pipeline shard`")
            key, stat = _stat_key(path)
            cached = cache.get(key)
            if not full and isinstance(cached, list) and cached[:2] == stat:
                digest = cached[2]
            else:
                digest = sha256_file(path)
                fresh[key] = [*stat, digest]
            if digest != shard["sha256"]:
                raise UserError(f"shard {path} changed since `pipeline shard` wrote it (sha256 {digest[:12]}, manifest "
                                f"says {shard['sha256'][:12]}); re-run `pipeline shard` to rewrite the shards")
    _remember_hashes(fresh)
    if dataset_fingerprint(manifest.classes, manifest.splits) != manifest.fingerprint:
        raise UserError(f"{Path(shard_dir) / MANIFEST} was edited: its fingerprint does not match its shards; "
                        "re-run `pipeline shard` to rewrite it")
    return manifest


def check_sample(sample: "Sample", num_classes: int) -> None:
    """A key becomes a tar member name and a label indexes the classes: refuse what would escape either."""
    parts = sample.key.split("/")
    if not sample.key or sample.key.startswith("/") or ".." in parts or "" in parts or "\\" in sample.key:
        raise UserError(f"sample {sample.origin}: key {sample.key!r} is not a plain relative name (absolute, empty "
                        "or with '..'); rename it in the source")
    if not 0 <= sample.label < num_classes:
        raise UserError(f"sample {sample.origin}: label {sample.label} is outside 0..{num_classes - 1} "
                        f"({num_classes} classes); fix its cls entry or the class list")


def normalise_member(name: str, where: str) -> str:
    """A tar member name as a relative path ('./a', '/a' -> 'a'); one that climbs out with '..' is refused."""
    norm = posixpath.normpath("/" + name.lstrip("/")).lstrip("/")
    if ".." in name.split("/"):
        raise UserError(f"{where}: member {name!r} climbs out of the archive with '..'; refused, fix the archive")
    return norm


def check_out_dir(out_dir, inputs=()) -> None:
    """--out may be replaced only if it is absent, empty, or a shard directory of ours; never the current
    directory (or one above it), a source, a folder inside a source, or a folder holding a source."""
    out = Path(out_dir).resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise UserError(f"--out {out_dir} is the current directory or one above it, which would be replaced; "
                        "give a new sub-directory such as data/shards")
    for src in inputs:
        src = Path(src).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise UserError(f"--out {out_dir} overlaps the source {src} (same, inside or around it); write the "
                            "shards to a separate directory")
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a directory path")
    foreign = sorted(p.name for p in out.iterdir() if not OUR_FILES.fullmatch(p.name) and p.name != MARKER)
    if foreign or (any(out.iterdir()) and not is_ours(out)):
        what = f"holds {foreign[0]!r}" if foreign else f"has no {MARKER} marker"
        raise UserError(f"--out {out_dir} exists and is not a shard directory of `pipeline shard` (it {what}); "
                        "nothing was changed: choose a new or empty directory, or remove it yourself")


def recover_out_dir(out_dir) -> None:
    """Finish what a killed run left: put back an old output swapped aside, drop temp directories. Only folders
    carrying our marker are touched: a user's `.{out}.old-*` or `.{out}.tmp-*` is left alone."""
    out = Path(out_dir)
    for aside in sorted(out.parent.glob(f".{out.name}.old-*")):
        if not is_ours(aside):
            continue
        if not out.exists() and (aside / out.name).is_dir():
            os.replace(aside / out.name, out)
        shutil.rmtree(aside, ignore_errors=True)
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        if is_ours(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def write_shards(splits: dict[str, list[Sample]], out_dir, dataset: str, classes: list[str],
                 source: str, maxcount: int = 10000, on_bad_image: str = "error",
                 quiet: bool = False, crop_pct: float = 1.0, inputs=()) -> ShardManifest:
    """Write every split as `{split}-NNNNNN.tar` + manifest.json into `out_dir`, atomically.

    crop_pct: the dataset's evaluation centre crop (1.0: whole image, right for small or object-centred
    images; 0.875: timm's ImageNet convention), recorded for the students' validation.
    `inputs`: the source's paths, which `out_dir` must not overlap (see check_out_dir)."""
    out_dir = Path(out_dir)
    recover_out_dir(out_dir)
    check_out_dir(out_dir, inputs)
    if not any(splits.values()):
        raise UserError(f"source {source} has zero images; check the path and the image extensions "
                        f"({', '.join(IMAGE_EXTS)})")
    for split, samples in splits.items():
        seen: dict[str, str] = {}
        for s in samples:
            check_sample(s, len(classes))
            if s.key in seen:
                raise UserError(f"duplicate key '{s.key}' in split {split}: {seen[s.key]} and {s.origin}; "
                                "rename one of them (keys are paths without extension, dots replaced)")
            seen[s.key] = s.origin
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        mark_ours(tmp)  # a killed run's temp folder is recognised by it, and the output carries it
        written = {}
        total = sum(len(s) for s in splits.values())
        with progress(total=total, desc="shard", unit="img", disable=quiet) as bar:
            for split, samples in splits.items():
                if samples:
                    written[split] = _write_split(tmp, split, samples, maxcount, on_bad_image, bar)
        manifest = ShardManifest(format=MANIFEST_FORMAT, dataset=dataset, classes=list(classes),
                                 num_classes=len(classes), source=source, crop_pct=float(crop_pct),
                                 tool_version=__version__, splits=written,
                                 fingerprint=dataset_fingerprint(list(classes), written))
        atomic_write_json(tmp / MANIFEST, dataclasses.asdict(manifest))
        os.chmod(tmp, umask_mode(directory=True))
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _remember_hashes({key: [*stat, shard["sha256"]] for split in manifest.splits.values()
                      for shard in split["shards"] for key, stat in [_stat_key(out_dir / shard["name"])]})
    return manifest


def _write_split(tmp: Path, split: str, samples: list[Sample], maxcount: int, on_bad_image: str, bar) -> dict:
    keys, labels, digests, skipped = [], [], [], []
    with wds.ShardWriter(str(tmp / f"{split}-%06d.tar"), maxcount=maxcount, maxsize=float("inf"),
                         verbose=0, mtime=SHARD_MTIME, user="", group="") as sink:
        for s in samples:
            data = s.read()
            try:
                decode_image(data, s.origin)
            except UserError as err:
                if on_bad_image != "skip":
                    raise
                skipped.append({"key": s.key, "origin": s.origin, "error": str(err)})
                bar.update()
                continue
            sink.write({"__key__": s.key, s.ext: data, "cls": str(s.label)})
            keys.append(s.key)
            labels.append(s.label)
            digests.append(hashlib.sha256(data).hexdigest())
            bar.update()
    if not keys:
        raise UserError(f"split {split} has no readable image left; check the source")
    shards = []
    for path in sorted(tmp.glob(f"{split}-*.tar")):
        count = len(index_tar(path))
        if count:
            shards.append({"name": path.name, "count": count, "sha256": sha256_file(path), **write_shard_index(path)})
        else:
            path.unlink()  # ShardWriter opens its next tar before it knows whether a sample follows
    fingerprint = stable_hash({"split": split, "keys": keys, "labels": labels, "sha256": digests})
    return {"count": len(keys), "fingerprint": fingerprint,
            "shards": shards, "skipped": skipped}


def _replace_dir(new: Path, dest: Path) -> None:
    """Swap `new` into place; an older `dest` is removed only after the new one is in place.

    Between the two renames the old output waits in `.{dest}.old-*/`: if the second rename fails it
    is put back at once, and a run killed right there gets it back from recover_out_dir."""
    if dest.exists():
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-"))
        mark_ours(old)
        os.replace(dest, old / dest.name)
        try:
            os.replace(new, dest)
        except BaseException:
            os.replace(old / dest.name, dest)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, dest)


class ShardReader:
    """Random access to one split by sample index: key, label, original bytes, decoded image."""

    def __init__(self, shard_dir, split: str):
        self.shard_dir = Path(shard_dir)
        manifest = verified_manifest(shard_dir)
        if split not in manifest.splits:
            raise UserError(f"split '{split}' not in {self.shard_dir / MANIFEST} "
                            f"(has: {', '.join(manifest.splits)})")
        self.manifest, self.split = manifest, split
        self.paths: list[Path] = []
        keys, loc, labels = [], [], []
        for shard in manifest.splits[split]["shards"]:
            path = self.shard_dir / shard["name"]
            if not path.is_file():
                raise UserError(f"shard {path} listed in the manifest is missing; re-run `pipeline shard`")
            self.paths.append(path)
            entries = read_shard_index(self.shard_dir, shard) if "index" in shard else scan_shard(path)
            keys += entries["keys"]
            labels += entries["labels"]
            loc += [(len(self.paths) - 1, o, n) for o, n in zip(entries["offsets"], entries["sizes"])]
        if len(keys) != manifest.splits[split]["count"]:
            raise UserError(f"{self.shard_dir}: split {split} holds {len(keys)} samples but the manifest "
                            f"says {manifest.splits[split]['count']}; re-run `pipeline shard`")
        self.keys = keys
        self._loc = np.asarray(loc, dtype=np.int64).reshape(-1, 3)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, i: int) -> str:
        return self.keys[i]

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def image_bytes(self, i: int) -> bytes:
        shard, offset, size = self._loc[i]
        return read_range(self.paths[shard], int(offset), int(size))

    def image(self, i: int) -> Image.Image:
        return decode_image(self.image_bytes(i), self._origin(i))

    def source(self, i: int) -> Source:
        """Sample i's bytes, decoded by the renderer at the size it needs (see views.render)."""
        return Source(self.image_bytes(i), self._origin(i))

    def _origin(self, i: int) -> str:
        return f"{self.paths[self._loc[i][0]]}:{self.keys[i]}"
