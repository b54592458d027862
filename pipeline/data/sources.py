"""Sources `pipeline shard` reads: an ImageFolder tree, existing webdataset shards, the digits demo,
and a synthetic generator. Each returns (dataset name, class names, {split: [Sample]}) in a fixed order
that depends only on the input, so the shards written from it are byte-identical run to run."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline.data.images import decode_image
from pipeline.data.shards import IMAGE_EXTS, MANIFEST, Sample, ShardManifest, index_tar, normalise_member, read_range
from pipeline.defaults import RENDERED_SIZE, SPEC_OPTIONS
from pipeline.errors import UserError

VAL_NAMES = re.compile(r"^(val|valid|validation|test)[-_.]")  # shard names of a held-out split
# Folder / file names that say nothing about the dataset: the display name is taken further up the path.
GENERIC_NAMES = {"data", "dataset", "datasets", "train", "training", "val", "valid", "test", "images", "imgs",
                 "shards", "imagefolder", "raw", "files", "input", ""}


def display_name(path: Path) -> str:
    """The first meaningful name on `path` going up (~/cifar10/train.tar -> cifar10), else the last one."""
    path = Path(path).resolve()
    for part in (path, *path.parents):
        name = part.name.split(".")[0]
        if name.lower() not in GENERIC_NAMES:
            return name
    return path.name.split(".")[0] or "dataset"


def _resized_read(read, size: int, ext: str, origin: str) -> bytes:
    """The image scaled (bicubic) so its shorter side is `size`, re-encoded in its own format (JPEG at q95)."""
    data = read()
    try:
        img = decode_image(data, origin)
    except UserError:
        return data  # the shard writer's check reports (or skips) it
    scale = size / min(img.size)
    if scale == 1:
        return data
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if ext.lower() in ("jpg", "jpeg") else "PNG" if ext.lower() == "png" else ext.upper(),
             quality=95)
    return buf.getvalue()


def resized(splits: dict[str, list[Sample]], size: int) -> dict[str, list[Sample]]:
    """Every sample rendered once at `size` px (shorter side): small datasets for models that need >= 64 px."""
    return {split: [dataclasses.replace(s, read=partial(_resized_read, s.read, size, s.ext, s.origin)) for s in samples]
            for split, samples in splits.items()}


def _rank(seed: int, key: str) -> bytes:
    return hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()


def _shuffled(samples: list[Sample], seed: int) -> list[Sample]:
    """A fixed pseudo-random order (by key hash): classes mix within shards, yet nothing is random."""
    return sorted(samples, key=lambda s: _rank(seed, s.key))


def stratified_split(samples: list[Sample], val_fraction: float, seed: int) -> dict[str, list[Sample]]:
    """Per class, the round(n * val_fraction) samples with the smallest key hash go to val."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must lie in [0, 1), got {val_fraction}")
    by_class: dict[int, list[Sample]] = {}
    for s in _shuffled(samples, seed + 1):
        by_class.setdefault(s.label, []).append(s)
    train, val = [], []
    for members in by_class.values():
        n_val = int(round(len(members) * val_fraction))
        val += members[:n_val]
        train += members[n_val:]
    if samples and not train:
        raise UserError(f"--val-fraction {val_fraction} leaves no sample to train on ({len(samples)} images); "
                        "use a smaller fraction")
    return {"train": _shuffled(train, seed), "val": _shuffled(val, seed)}


def _const(data: bytes) -> bytes:
    return data


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if fmt in ("jpg", "jpeg") else fmt.upper(), quality=90)
    return buf.getvalue()


def _tree(source: Path) -> tuple[set[str], dict[str, tuple[str, object]]]:
    """Folders and files (relative path -> (origin, read)) of a directory or of a tar holding one."""
    if source.is_dir():
        entries = sorted(source.rglob("*"))
        dirs = {p.relative_to(source).as_posix() for p in entries if p.is_dir()}
        files = {p.relative_to(source).as_posix(): (str(p), p.read_bytes) for p in entries if p.is_file()}
        return dirs, files
    if source.is_file() and tarfile.is_tarfile(source):
        dirs, files = set(), {}
        with tarfile.open(source, "r:") as tar:
            for m in tar:
                name = normalise_member(m.name, str(source))
                if not name:
                    continue
                dirs.update("/".join(name.split("/")[:k]) for k in range(1, name.count("/") + 1))
                if m.isdir():
                    dirs.add(name)
                elif m.isfile():
                    files[name] = (f"{source}:{name}", partial(read_range, source, m.offset_data, m.size))
        return dirs, files
    raise UserError(f"image folder {source} does not exist (expected a directory or a .tar of one)")


def _class_samples(dirs, files, prefix: str, classes: list[str], where: str) -> list[Sample]:
    """Images under `prefix`<class>/ (any depth), labelled by position in `classes`."""
    samples, counts = [], dict.fromkeys(classes, 0)
    index = {c: i for i, c in enumerate(classes)}
    for rel, (origin, read) in sorted(files.items()):
        if not rel.startswith(prefix) or "/" not in rel[len(prefix):]:
            continue
        inner = rel[len(prefix):]
        cls, ext = inner.split("/")[0], inner.rpartition(".")[2].lower()
        if cls not in index or ext not in IMAGE_EXTS or "." not in inner:
            continue
        counts[cls] += 1
        samples.append(Sample(inner.rpartition(".")[0].replace(".", "_"), index[cls], ext, origin, read))
    empty = [c for c, n in counts.items() if not n and f"{prefix}{c}" in dirs]
    if empty:
        raise UserError(f"class folder {where}/{prefix}{empty[0]} has no images ({', '.join(IMAGE_EXTS)}); "
                        "add images or remove the folder")
    return samples


def _subfolders(dirs: set[str], prefix: str) -> list[str]:
    return sorted(d[len(prefix):] for d in dirs
                  if d.startswith(prefix) and "/" not in d[len(prefix):] and not d[len(prefix):].startswith("."))


def imagefolder(source, val_fraction: float, seed: int):
    """DIR/train (+ DIR/val if present, else split off train by val_fraction), or class folders
    directly in DIR. DIR may also be a .tar holding such a tree (read in place, not extracted)."""
    root = Path(source)
    dirs, files = _tree(root)
    prefix = "train/" if "train" in dirs else ""
    classes = _subfolders(dirs, prefix)
    if not classes:
        raise UserError(f"{root}/{prefix} has no class sub-folders; expected DIR/<class>/<image> "
                        "or DIR/train/<class>/<image>")
    train = _class_samples(dirs, files, prefix, classes, str(root))
    if not (prefix and "val" in dirs):
        return display_name(root), classes, stratified_split(train, val_fraction, seed)
    extra = sorted(set(_subfolders(dirs, "val/")) - set(classes))
    if extra:
        raise UserError(f"{root}/val has classes missing from {root}/train: {', '.join(extra)}")
    val = _class_samples(dirs, files, "val/", classes, str(root))
    return display_name(root), classes, {"train": _shuffled(train, seed), "val": _shuffled(val, seed)}


def webdataset_shards(pattern: str, val_fraction: float, seed: int):
    """Existing shards; files named val*/test* form the val split, else it is split off train.
    Class names come from a manifest.json beside the shards, else they are the label numbers."""
    paths = [Path(p) for p in wds.shardlists.expand_urls(pattern)]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise UserError(f"webdataset pattern {pattern}: missing shard(s) {', '.join(missing[:3]) or pattern}")
    splits: dict[str, list[Sample]] = {"train": [], "val": []}
    for path in paths:
        split = "val" if VAL_NAMES.match(path.name) else "train"
        for key, members in index_tar(path):
            ext = next((e for e in members if e.lower() in IMAGE_EXTS), None)
            if ext is None or "cls" not in members:
                raise UserError(f"sample '{key}' in {path} lacks an image ({', '.join(IMAGE_EXTS)}) or a cls entry")
            try:
                label = int(read_range(path, *members["cls"]))
            except ValueError:
                raise UserError(f"sample '{key}' in {path}: cls is not an integer") from None
            read = partial(read_range, path, *members[ext])
            splits[split].append(Sample(key, label, ext, f"{path}:{key}.{ext}", read))
    num_classes = 1 + max((s.label for samples in splits.values() for s in samples), default=-1)
    classes = [str(c) for c in range(num_classes)]
    if (paths[0].parent / MANIFEST).is_file():  # shards we wrote before: keep their class names
        classes = ShardManifest.read(paths[0].parent).classes
    if not splits["val"]:
        splits = stratified_split(splits["train"], val_fraction, seed)
    return display_name(paths[0].parent), classes, splits


def digits(size: int, val_fraction: float, seed: int):
    """scikit-learn's 8x8 handwritten digits (shipped with the package), upscaled to RGB PNGs."""
    from sklearn.datasets import load_digits

    data = load_digits()
    samples = []
    for i, (pixels, label) in enumerate(zip(data.images, data.target)):
        img = Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8), "L")
        img = img.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        samples.append(Sample(f"{i:05d}", int(label), "png", f"digits[{i}]", partial(_const, _encode(img, "png"))))
    return "digits", [str(c) for c in range(10)], stratified_split(samples, val_fraction, seed)


def synthetic(num_classes: int, per_class: int, size: int, fmt: str, val_fraction: float, seed: int):
    """Learnable toy images: class c is a colour and a stripe orientation, plus per-image noise."""
    if num_classes < 1 or per_class < 1:
        raise UserError("synthetic data needs --num-classes >= 1 and --per-class >= 1")
    yy, xx = np.mgrid[0:size, 0:size] / size
    samples = []
    for c in range(num_classes):
        angle = np.pi * c / num_classes
        colour = np.array([np.cos(2 * np.pi * (c / num_classes + k / 3)) for k in range(3)]) * 80 + 128
        for j in range(per_class):
            rng = np.random.default_rng([seed, c, j])
            stripes = np.sin(2 * np.pi * 4 * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
            pixels = colour * (0.75 + 0.25 * stripes[..., None]) + rng.normal(0, 12, (size, size, 3))
            img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
            key = f"c{c:03d}_{j:05d}"
            samples.append(Sample(key, c, fmt, f"synthetic[{key}]", partial(_const, _encode(img, fmt))))
    return "synthetic", [f"class{c}" for c in range(num_classes)], stratified_split(samples, val_fraction, seed)


def _read_files(read, arg, *, val_fraction, seed, image_size, **_):
    name, classes, splits = read(arg, val_fraction, seed)
    return name, classes, resized(splits, image_size) if image_size else splits


def _read_digits(arg, *, val_fraction, seed, image_size, **_):
    return digits(image_size or RENDERED_SIZE, val_fraction, seed)


def _read_synthetic(arg, *, val_fraction, seed, image_size, num_classes, per_class, image_format):
    return synthetic(num_classes, per_class, image_size or RENDERED_SIZE, image_format, val_fraction, seed)


# `--source KIND[:ARG]`: KIND -> (whether it takes ARG, reader). A new source is one entry here.
SOURCES = {"imagefolder": (True, partial(_read_files, imagefolder)),
           "webdataset": (True, partial(_read_files, webdataset_shards)),
           "digits": (False, _read_digits), "synthetic": (False, _read_synthetic)}


def read_source(source, *, val_fraction: float, seed: int, image_size: int | None, num_classes: int,
                per_class: int, image_format: str):
    """(dataset name, class names, {split: [Sample]}) of a `--source` string; image_size re-renders every
    image (default for the rendered sources: RENDERED_SIZE); the synthetic options apply to synthetic only."""
    kind, _, arg = (source or "").partition(":")
    takes_arg, read = SOURCES.get(kind, (None, None))
    if read is None or takes_arg != bool(arg):
        raise UserError(f"unknown --source '{source}'; use imagefolder:DIR, webdataset:PATTERN, digits or synthetic"
                        " (or --dataset NAME from manifests/datasets/)")
    return read(arg, val_fraction=val_fraction, seed=seed, image_size=image_size, num_classes=num_classes,
                per_class=per_class, image_format=image_format)


def source_paths(source) -> list[str]:
    """The files or folders a source reads, which the output must not overlap."""
    kind, _, arg = (source or "").partition(":")
    if kind == "imagefolder" and arg:
        return [arg]
    if kind == "webdataset" and arg:
        return list(wds.shardlists.expand_urls(arg))
    return []


def dataset_options(spec: dict, options: dict, given) -> dict:
    """`options` with a dataset spec's SPEC_OPTIONS filled in: an option the user gave (`given(name)`: on the
    command line or in params.yaml) wins over the spec, the spec over the option's default."""
    return {**options, **{key: spec[key] for key in SPEC_OPTIONS if key in spec and not given(key)}}


def check_num_classes(spec: dict, dataset: str, source: str, classes) -> None:
    """The source has the number of classes the dataset spec promises (when it gives one)."""
    expected = spec.get("num_classes")
    if expected is not None and len(classes) != expected:
        raise UserError(f"dataset {dataset} expects {expected} classes but {source} has "
                        f"{len(classes)}; check the source path or the spec's num_classes")
