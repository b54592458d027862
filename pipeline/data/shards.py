"""Webdataset shards + manifest.json: writing them reproducibly and reading them by sample index.

A split's samples are numbered 0..N-1 in manifest order (shard order, then order inside a shard);
that index is the row of every teacher store, so the reader gives random access by index through an
in-memory index of tar member offsets instead of streaming.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipeline import __version__
from pipeline.errors import UserError
from pipeline.io import atomic_write_json, sha256_file, stable_hash

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
MANIFEST = "manifest.json"
SHARD_MTIME = 0  # fixed tar member times: the same input gives byte-identical shards


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


def read_range(path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def decode_image(data: bytes, origin: str) -> Image.Image:
    """Fully decoded RGB image; a corrupt or truncated file raises UserError naming `origin`."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img if img.mode == "RGB" else img.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise UserError(f"corrupt or unreadable image {origin}: {err}; fix or remove it, "
                        "or pass --on-bad-image skip") from None


def read_manifest(shard_dir) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"no {MANIFEST} in {shard_dir}; create the shards with `pipeline shard --out {shard_dir}`")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{path} is corrupt ({err}); re-run `pipeline shard` to rewrite it") from None
    missing = [k for k in ("classes", "splits", "fingerprint") if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise UserError(f"{path} is corrupt (no {', '.join(missing)}); re-run `pipeline shard` to rewrite it")
    return manifest


def write_shards(splits: dict[str, list[Sample]], out_dir, dataset: str, classes: list[str],
                 source: str, maxcount: int = 10000, on_bad_image: str = "error",
                 quiet: bool = False) -> dict:
    """Write every split as `{split}-NNNNNN.tar` + manifest.json into `out_dir`, atomically."""
    if not any(splits.values()):
        raise UserError(f"source {source} has zero images; check the path and the image extensions "
                        f"({', '.join(IMAGE_EXTS)})")
    for split, samples in splits.items():
        seen: dict[str, str] = {}
        for s in samples:
            if s.key in seen:
                raise UserError(f"duplicate key '{s.key}' in split {split}: {seen[s.key]} and {s.origin}; "
                                "rename one of them (keys are paths without extension, dots replaced)")
            seen[s.key] = s.origin
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        manifest = {"dataset": dataset, "classes": list(classes), "num_classes": len(classes),
                    "source": source, "tool_version": __version__, "splits": {}}
        total = sum(len(s) for s in splits.values())
        with tqdm(total=total, desc="shard", unit="img", disable=quiet) as bar:
            for split, samples in splits.items():
                if samples:
                    manifest["splits"][split] = _write_split(tmp, split, samples, maxcount, on_bad_image, bar)
        manifest["fingerprint"] = stable_hash(
            {"classes": manifest["classes"],
             "splits": {k: [v["fingerprint"], [s["sha256"] for s in v["shards"]]]
                        for k, v in manifest["splits"].items()}})
        atomic_write_json(tmp / MANIFEST, manifest)
        os.chmod(tmp / MANIFEST, 0o644)
        os.chmod(tmp, 0o755)
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _write_split(tmp: Path, split: str, samples: list[Sample], maxcount: int, on_bad_image: str, bar) -> dict:
    keys, labels, skipped = [], [], []
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
            bar.update()
    if not keys:
        raise UserError(f"split {split} has no readable image left; check the source")
    shards = []
    for path in sorted(tmp.glob(f"{split}-*.tar")):
        count = len(index_tar(path))
        if count:
            shards.append({"name": path.name, "count": count, "sha256": sha256_file(path)})
        else:
            path.unlink()  # ShardWriter opens its next tar before it knows whether a sample follows
    return {"count": len(keys), "fingerprint": stable_hash({"keys": keys, "labels": labels}),
            "shards": shards, "skipped": skipped}


def _replace_dir(new: Path, dest: Path) -> None:
    """Swap `new` into place; an older `dest` is removed only after the new one is in place."""
    if dest.exists():
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-"))
        os.replace(dest, old / dest.name)
        os.replace(new, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, dest)


class ShardReader:
    """Random access to one split by sample index: key, label, original bytes, decoded image."""

    def __init__(self, shard_dir, split: str):
        self.shard_dir = Path(shard_dir)
        manifest = read_manifest(shard_dir)
        if split not in manifest["splits"]:
            raise UserError(f"split '{split}' not in {self.shard_dir / MANIFEST} "
                            f"(has: {', '.join(manifest['splits'])})")
        self.manifest, self.split = manifest, split
        self.paths: list[Path] = []
        keys, loc, labels = [], [], []
        for shard in manifest["splits"][split]["shards"]:
            path = self.shard_dir / shard["name"]
            if not path.is_file():
                raise UserError(f"shard {path} listed in the manifest is missing; re-run `pipeline shard`")
            self.paths.append(path)
            with open(path, "rb") as f:
                for key, members in index_tar(path):
                    image_ext = next((e for e in members if e.lower() in IMAGE_EXTS), None)
                    if image_ext is None or "cls" not in members:
                        raise UserError(f"sample '{key}' in {path} lacks an image or a cls entry")
                    keys.append(key)
                    loc.append((len(self.paths) - 1, *members[image_ext]))
                    f.seek(members["cls"][0])
                    labels.append(int(f.read(members["cls"][1])))
        if len(keys) != manifest["splits"][split]["count"]:
            raise UserError(f"{self.shard_dir}: split {split} holds {len(keys)} samples but the manifest "
                            f"says {manifest['splits'][split]['count']}; re-run `pipeline shard`")
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
        return decode_image(self.image_bytes(i), f"{self.paths[self._loc[i][0]]}:{self.keys[i]}")
