"""The teacher logit store: one zarr v3 group per (dataset, view plan, teacher, K, encoding).

Arrays (row i = sample i of the split, column v = view v):
    values  f16 [N,V,K]   top-k log-probabilities log p = z - lse, sorted by class index
    indices i16/i32 [N,V,K]  their classes, ascending (int16 whenever the classes fit)
    lse     f32 [N,V]     logsumexp over ALL classes: logits z = values + lse; rest mass = 1 - sum(exp(values))
    lse_tau f16 [N,V,T]   per stored temperature tau (provenance "temperatures", 1 first): the offset
                          logsumexp(z / tau) - lse / tau over ALL classes (0 at tau = 1; in [0, (1 - 1/tau) log C]),
                          so tempered top-k probabilities exp(values / tau - offset) and the tempered rest are exact
    params  u16 [N,V,P]   the view parameters (pipeline.data.views), so a view replays from the store alone
    labels  i16/i32 [N]
    done    u8  [S]       one flag per shard of rows, set after that shard's arrays are written

Why this layout (the budget is <= 40 bytes per stored view at K=10 on 1000 classes):
- values are log-probabilities, not raw logits: f16 keeps ~3 significant digits of log p, which is
  where the KL lives (raw logits of 20-30 would lose precision in f16 for nothing).
- sorting each view's top-k by class index makes `indices` increasing, so a Delta filter + zstd
  stores about one byte per index instead of two; values are permuted alongside.
- the optional `f16-keepN` encoding zeroes all but N mantissa bits of log p (numcodecs BitRound):
  a relative error of 2^-(N+1) on log p. The default keep6 keeps the KD loss within 1e-3 (relative)
  of the exact coarsened KL at every stored tau, also for late students (bench_kd_fidelity); keep5
  saves ~1.2 B/view but misses that by up to 1.5x.
- lse_tau: 2 bytes per stored temperature (f16 offsets of at most (1 - 1/tau) log C, ~3e-3 absolute).
- rows are written one zarr shard at a time (sharding codec: few files, big compressed chunks), and
  a shard is the unit of resume and of work sharing between torchrun ranks: no two processes ever
  touch the same file, and zarr's LocalStore writes every file atomically (temp + rename).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import fsspec
import numcodecs
import numpy as np
import torch
import zarr
from zarr.codecs import BitRound, BloscCodec, BloscShuffle, Delta, TransposeCodec

from pipeline.errors import UserError
from pipeline.io import atomic_write_json, stable_hash


FORMAT = 2
ARRAYS = ("values", "indices", "lse", "lse_tau", "params", "labels")
DEFAULT_VALUES = "f16-keep6"  # bench_kd_fidelity: keep5 misses the 1e-3 KL target on late students
DEFAULT_TEMPERATURES = (1.0, 2.0, 4.0)
# What a store of ours may name: no pickle/object codec (numcodecs.pickle unpickles every chunk it reads).
SAFE_CODECS = {"bytes", "blosc", "zstd", "gzip", "crc32c", "sharding_indexed", "transpose", "numcodecs.delta",
               "numcodecs.bitround"}
SAFE_DTYPES = {"float16", "float32", "int16", "int32", "uint16", "uint8"}
STALE_PARTIAL_S = 60  # a zarr temp file (*.partial) this old belongs to no live writer: a killed run left it


@contextmanager
def numcodecs_quiet():
    """BitRound/Delta/Transpose are numcodecs codecs: zarr-python (what reads these stores) has them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")
        yield


def value_keepbits(encoding: str) -> int | None:
    """'f16' -> None (plain f16 log p); 'f16-keepN' -> N mantissa bits kept (1..10)."""
    if encoding == "f16":
        return None
    if encoding.startswith("f16-keep") and encoding[8:].isdigit() and 1 <= int(encoding[8:]) <= 10:
        return int(encoding[8:])
    raise UserError(f"value encoding '{encoding}' is not one of: f16, f16-keepN (N = 1..10 mantissa bits)")


def index_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.int16 if num_classes <= np.iinfo(np.int16).max + 1 else np.int32)


def store_key(*, dataset_fingerprint: str, split: str, plan_hash: str, teacher: dict, weights_digest: str,
              k: int, num_views: int, values: str, amp: str, temperatures=(1.0,)) -> str:
    """Hash of every input that changes the stored numbers; it names the group on disk."""
    return stable_hash(dict(format=FORMAT, dataset_fingerprint=dataset_fingerprint, split=split, plan=plan_hash,
                            teacher=teacher, weights_digest=weights_digest, k=k, num_views=num_views,
                            values=values, amp=amp, temperatures=check_temperatures(temperatures)))


def check_temperatures(temperatures) -> list[float]:
    """The stored temperatures: 1 first (lse is always kept), then the others ascending, no repeats."""
    taus = sorted({float(t) for t in temperatures} | {1.0})
    if taus[0] <= 0:
        raise UserError(f"temperatures must be > 0, got {', '.join(f'{t:g}' for t in taus)} (e.g. --temperatures 1,2,4)")
    return [1.0] + [t for t in taus if t != 1.0]


def encode_lse_tau(logits: torch.Tensor, temperatures) -> np.ndarray:
    """[B,C] logits -> f16 [B,T] offsets logsumexp(z / tau) - logsumexp(z) / tau, as stored."""
    z = logits.double()
    lse = torch.logsumexp(z, 1)
    offsets = [torch.logsumexp(z / tau, 1) - lse / tau for tau in check_temperatures(temperatures)]
    return torch.stack(offsets, 1).cpu().numpy().astype(np.float16)


def encode_topk(logits: torch.Tensor, k: int, encoding: str = "f16") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[B,C] logits -> (log p f16 [B,K], classes [B,K] ascending, lse f32 [B]) as stored."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=1)
    top, idx = logits.topk(k, dim=1)
    idx, order = idx.sort(dim=1)
    logp = (top.gather(1, order) - lse[:, None]).cpu().numpy().astype(np.float16)
    keep = value_keepbits(encoding)
    if keep is not None:  # what the BitRound filter will store; applied here too so callers see the stored values
        logp = numcodecs.BitRound(keepbits=keep).encode(logp).view(np.float16).reshape(logp.shape)
    return logp, idx.cpu().numpy(), lse.cpu().numpy()


def rows_per_chunk(shard_rows: int, num_views: int) -> int:
    """Inner chunk rows: the largest divisor of the shard giving <= ~4096 views per chunk."""
    limit = max(1, 4096 // num_views)
    return max(d for d in range(1, min(shard_rows, limit) + 1) if shard_rows % d == 0)


def bytes_on_disk(path) -> int:
    if is_url(path):
        fs, root = fsspec.core.url_to_fs(str(path))
        return int(fs.du(root))
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def is_url(path) -> bool:
    return "://" in str(path)


def store_location(path):
    """A store's place: a local Path, or an fsspec URL kept as a string (s3://bucket/prefix/x.zarr,
    gs://..., file://...; credentials and endpoint come from the environment, as s3fs/gcsfs read them)."""
    return str(path).rstrip("/") if is_url(path) else Path(path)


def store_path(root, name: str):
    """{root}/{name} for a local root or an fsspec URL root."""
    return f"{store_location(root)}/{name}" if is_url(root) else Path(root) / name


def zarr_store(path, read_only: bool = False):
    """What zarr opens for a store location: the local path, or an FsspecStore on the URL. Every zarr
    shard is one object written whole (a PUT on S3), so ranks writing different shards never collide."""
    if not is_url(path):
        return path
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(str(path), read_only=read_only)


def check_metadata(path) -> None:
    """Read the store's zarr.json files as plain JSON before zarr does: zarr v3 only, our arrays only,
    codecs and dtypes from SAFE_CODECS / SAFE_DTYPES (so opening the store can never unpickle)."""
    fs, root = fsspec.core.url_to_fs(str(path))

    def codec_names(codecs):
        for codec in codecs if isinstance(codecs, list) else []:
            name = codec.get("name") if isinstance(codec, dict) else codec
            yield name
            config = codec.get("configuration") if isinstance(codec, dict) else None
            for inner in ("codecs", "index_codecs"):
                yield from codec_names((config or {}).get(inner))

    for node in ("", *ARRAYS, "done"):
        meta_path = f"{path}/{node}/zarr.json" if node else f"{path}/zarr.json"
        try:
            meta = json.loads(fs.cat_file(f"{root}/{node}/zarr.json" if node else f"{root}/zarr.json"))
        except FileNotFoundError:
            raise UserError(f"{path} is not a teacher logit store ({meta_path} missing); run `pipeline teach` "
                            "to make one") from None
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise UserError(f"store metadata {meta_path} is unreadable ({type(err).__name__}); re-run `pipeline teach` "
                            "with a fresh --store-root") from None
        if not isinstance(meta, dict) or meta.get("zarr_format") != 3:
            raise UserError(f"store metadata {meta_path} is not zarr v3 metadata; re-run `pipeline teach`")
        if node:
            unsafe = sorted(str(n) for n in codec_names(meta.get("codecs")) if n not in SAFE_CODECS)
            if unsafe or meta.get("data_type") not in SAFE_DTYPES or meta.get("storage_transformers"):
                raise UserError(f"store array {meta_path} names codecs/dtype not written by `pipeline teach` "
                                f"({', '.join(unsafe) or meta.get('data_type')}); refused (reading it could run code)")


def chunk_file(array, shard: int) -> str:
    """The file (relative to the store) holding rows of `shard` of a sharded zarr array."""
    coords = (shard,) + (0,) * (array.ndim - 1)
    return f"{array.path}/{array.metadata.encode_chunk_key(coords)}"


def remove_stale_partials(path) -> None:
    """zarr writes chunk files as *.partial then renames them: a killed writer leaves its temp files."""
    cutoff = time.time() - STALE_PARTIAL_S
    if is_url(path):
        return  # object stores have no temp files: a PUT is whole or absent
    for tmp in Path(path).rglob("*.partial"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
        except FileNotFoundError:
            pass


class LogitStore:
    """A store group, read side. `lookup` serves the student's batches from memory."""

    def __init__(self, group: zarr.Group, path):
        self.group, self.path = group, store_location(path)
        self.provenance = dict(group.attrs["provenance"])
        with numcodecs_quiet():
            self.arrays = {name: group[name] for name in (*ARRAYS, "done")}
        self.num_samples, self.num_views, self.k = self.arrays["values"].shape
        self.num_classes = self.provenance["num_classes"]
        self.plan = self.provenance["plan"]
        self.key = self.provenance["key"]
        self.shard_rows = self.provenance["shard_rows"]
        self.temperatures = list(self.provenance.get("temperatures", [1.0]))
        self._targets = None

    @property
    def num_shards(self) -> int:
        return self.arrays["done"].shape[0]

    def done_mask(self) -> np.ndarray:
        return self.arrays["done"][:].astype(bool)

    @property
    def complete(self) -> bool:
        return bool(self.done_mask().all())

    def damaged_shards(self, full: bool = False) -> dict[int, str]:
        """Done shards whose data is gone: {shard: why}. Cheap: every array's chunk file exists. `full`:
        also read every array of the shard and check the logsumexp is finite."""
        bad = {}
        fs, root = fsspec.core.url_to_fs(str(self.path))
        # lse_tau may be left unwritten when tau = 1 is all that is kept (see write_shard)
        names = [n for n in ARRAYS if n != "lse_tau" or len(self.temperatures) > 1]
        for shard in map(int, np.flatnonzero(self.done_mask())):
            for name in names:
                rel = chunk_file(self.arrays[name], shard)
                if not fs.isfile(f"{root}/{rel}"):
                    bad[shard] = f"{rel} missing"
                    break
            if full and shard not in bad:
                rows = self.shard_rows_range(shard)
                try:
                    data = {name: self.arrays[name][rows.start:rows.stop] for name in ARRAYS}
                except Exception as err:  # noqa: BLE001 - any codec/IO failure means the chunk is unreadable
                    bad[shard] = f"unreadable ({type(err).__name__})"
                    continue
                if not np.isfinite(data["lse"]).all() or not np.isfinite(data["values"]).all():
                    bad[shard] = "holds non-finite values"
        return bad

    def check_intact(self, full: bool = False) -> None:
        """UserError naming the first damaged shard (see damaged_shards) and the fix."""
        bad = self.damaged_shards(full)
        if bad:
            shard, why = next(iter(bad.items()))
            raise UserError(f"teacher store {self.path}: {len(bad)} shard(s) marked done have lost data (shard "
                            f"{shard}: {why}); re-run the same `pipeline teach` command to recompute them")

    def shard_rows_range(self, shard: int) -> range:
        return range(shard * self.shard_rows, min((shard + 1) * self.shard_rows, self.num_samples))

    def check_compatible(self, dataset_fingerprint: str, plan_hash: str) -> None:
        """Refuse to serve targets for another dataset or view plan than the store was made for."""
        p = self.provenance
        if p["dataset_fingerprint"] != dataset_fingerprint:
            raise UserError(f"teacher store {self.path} was made for dataset fingerprint {p['dataset_fingerprint']} "
                            f"({p['dataset']}/{p['split']}) but these shards have {dataset_fingerprint}; "
                            "re-run `pipeline teach` on these shards")
        if p["plan_hash"] != plan_hash:
            raise UserError(f"teacher store {self.path} was made for view plan {p['plan_hash']} but plan {plan_hash} "
                            "was asked for; use the store's plan (LogitStore.plan) or re-run `pipeline teach`")

    def targets(self) -> dict[str, torch.Tensor]:
        """Every stored target in memory (values f16, indices, lse, labels): ~5 bytes per top-k entry."""
        if self._targets is None:
            g = self.arrays
            self._targets = {name: torch.from_numpy(np.ascontiguousarray(g[name][:]))
                             for name in ("values", "indices", "lse", "lse_tau", "labels")}
        return self._targets

    def lookup(self, index: torch.Tensor, view: torch.Tensor):
        """(topk_logits f32 [B,K], topk_indices int64 [B,K], lse f32 [B]) for samples `index`, views `view`."""
        t = self.targets()
        index, view = index.long().cpu(), view.long().cpu()
        lse = t["lse"][index, view]
        return t["values"][index, view].float() + lse[:, None], t["indices"][index, view].long(), lse

    def require_tau(self, tau: float) -> None:
        """UserError naming the stored temperatures unless `tau` is one of them."""
        if float(tau) not in self.temperatures:
            raise UserError(f"tau={tau:g} is not stored in teacher store {self.path} (it keeps tau "
                            f"{', '.join(f'{t:g}' for t in self.temperatures)}); use one of them, re-run "
                            f"`pipeline teach --temperatures ...` with it, or pass --flat-tail for the flat-tail "
                            f"approximation")

    def lookup_tau(self, index: torch.Tensor, view: torch.Tensor, tau: float):
        """lookup() + logsumexp(z / tau) over all classes f64 [B], for a stored tau (UserError otherwise)."""
        self.require_tau(tau)
        z, classes, lse = self.lookup(index, view)
        offset = self.targets()["lse_tau"][index.long().cpu(), view.long().cpu(), self.temperatures.index(float(tau))]
        return z, classes, lse, lse.double() / tau + offset.double()

    def params(self, index: int, view: int) -> np.ndarray:
        """The stored parameter vector of one view (for replaying it without recomputing)."""
        return self.arrays["params"][index, view]

    def all_params(self) -> np.ndarray:
        """Every stored view's parameters, uint16 [N, V, P] in memory: what the student replays."""
        return np.ascontiguousarray(self.arrays["params"][:])

    def bytes_per_view(self) -> float:
        return bytes_on_disk(self.path) / (self.num_samples * self.num_views)


def open_store(path, require_complete: bool = True) -> LogitStore:
    """Open a store read-only; UserError if it is missing, not a store, or (by default) unfinished."""
    path = store_location(path)
    check_metadata(path)
    try:
        group = zarr.open_group(zarr_store(path, read_only=True), mode="r")
        store = LogitStore(group, path)
    except (FileNotFoundError, KeyError, ValueError, TypeError, zarr.errors.GroupNotFoundError,
            zarr.errors.NodeTypeValidationError) as err:
        raise UserError(f"{path} is not a readable teacher logit store ({type(err).__name__}); run `pipeline teach` "
                        "to make one") from None
    if require_complete and not store.complete:
        done = int(store.done_mask().sum())
        raise UserError(f"teacher store {path} is incomplete ({done}/{store.num_shards} shards); "
                        "re-run the same `pipeline teach` command to finish it")
    if require_complete:
        store.check_intact()
    return store


def open_pointer(pointer) -> LogitStore:
    """Open the store named by a pointer file {out}/{teacher}.json written by `pipeline teach`."""
    pointer = Path(pointer)
    if not pointer.is_file():
        raise UserError(f"no teacher pointer file {pointer}; run `pipeline teach --out {pointer.parent}` first")
    try:
        info = json.loads(pointer.read_text())
        if not all(isinstance(info.get(k), str) for k in ("store", "key", "teacher")):
            raise ValueError("no store/key/teacher")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError) as err:
        raise UserError(f"teacher pointer {pointer} is unreadable ({type(err).__name__}); re-run "
                        f"`pipeline teach --out {pointer.parent}` to rewrite it") from None
    if info["teacher"] != pointer.stem:
        raise UserError(f"pointer {pointer} names teacher '{info['teacher']}', not '{pointer.stem}'; re-run "
                        f"`pipeline teach --out {pointer.parent}` for teacher '{pointer.stem}'")
    path = store_location(info["store"])
    if not is_url(path) and not path.is_absolute():
        path = (pointer.parent / path).resolve()
    store = open_store(path)
    if store.key != info["key"]:
        raise UserError(f"pointer {pointer} names store key {info['key']} but {path} holds {store.key}; "
                        "re-run `pipeline teach`")
    if store.provenance["teacher"].get("name") != info["teacher"]:
        raise UserError(f"pointer {pointer} is for teacher '{info['teacher']}' but {path} holds the logits of teacher "
                        f"'{store.provenance['teacher'].get('name')}'; re-run `pipeline teach --out {pointer.parent}`")
    return store


def write_pointer(pointer, store: LogitStore) -> dict:
    p = store.provenance
    store_path = store.path if is_url(store.path) else os.path.relpath(store.path.resolve(), Path(pointer).parent.resolve())
    info = {"store": store_path, "key": store.key, "teacher": p["teacher"]["name"], "k": store.k,
            "num_views": store.num_views, "num_classes": store.num_classes, "split": p["split"],
            "dataset_fingerprint": p["dataset_fingerprint"], "plan": store.plan, "plan_hash": p["plan_hash"]}
    atomic_write_json(pointer, info)
    return info


class StoreWriter(LogitStore):
    """The write side: create the arrays once, then fill shard by shard (any order, any process)."""

    def __init__(self, group, path):
        # every chunk file is written, even one equal to the fill value: a missing file then always means lost data
        with zarr.config.set({"array.write_empty_chunks": True}):
            super().__init__(group, path)
        remove_stale_partials(path)

    def forget_shards(self, shards) -> None:
        """Mark damaged shards not done and drop their chunk files (zarr would read a corrupt one back
        before rewriting it), so that they are computed again."""
        fs, root = fsspec.core.url_to_fs(str(self.path))
        for shard in map(int, shards):
            self.arrays["done"][shard] = 0
            for name in ARRAYS:
                chunk = f"{root}/{chunk_file(self.arrays[name], shard)}"
                if fs.exists(chunk):
                    fs.rm_file(chunk)

    def write_shard(self, shard: int, values, indices, lse, params, labels, lse_tau=None) -> None:
        """One shard's rows; `lse_tau` (encode_lse_tau) may be left out only when tau = 1 is all that is kept."""
        rows = self.shard_rows_range(shard)
        s = slice(rows.start, rows.stop)
        g = self.arrays
        if lse_tau is None and len(self.temperatures) > 1:
            raise ValueError(f"store {self.path} keeps temperatures {self.temperatures}: write_shard needs lse_tau")
        g["values"][s] = values
        g["indices"][s] = indices
        g["lse"][s] = lse
        if lse_tau is not None:
            g["lse_tau"][s] = lse_tau
        g["params"][s] = params
        g["labels"][s] = labels
        g["done"][shard] = 1  # last: a killed writer leaves the shard not done, to be written again

    def finish(self, run: dict) -> None:
        self.group.attrs["run"] = run

    def record_quality(self, quality: dict) -> None:
        """Add the teacher's measured top-1 (on the stored views, on clean val) to the provenance."""
        self.provenance = {**self.provenance, **quality}
        self.group.attrs["provenance"] = self.provenance


def create_or_open(path, provenance: dict, *, num_samples: int, num_views: int, k: int, params_dim: int,
                   num_classes: int, shard_rows: int, values: str, temperatures=(1.0,)) -> StoreWriter:
    """Open the store at `path` if it was made from the same inputs, else create it.

    The provenance is written last, so a group without it is a creation that was cut off: it is
    recreated. A group whose key differs from `provenance["key"]` is refused, never mixed into.
    """
    path = store_location(path)
    with creation_lock(path):  # a second process waits here while the first creates, then opens what it made
        if _exists(path):
            group = zarr.open_group(zarr_store(path), mode="r+")
            old = group.attrs.get("provenance")
            if old is not None:
                if old.get("key") != provenance["key"]:
                    raise UserError(f"{path} holds teacher logits for other inputs (key {old.get('key')}, not "
                                    f"{provenance['key']}); remove it or choose another --store-root")
                check_metadata(path)
                return StoreWriter(group, path)
        with numcodecs_quiet():
            return _create(path, provenance, num_samples=num_samples, num_views=num_views, k=k, params_dim=params_dim,
                           num_classes=num_classes, shard_rows=shard_rows, values=values,
                           temperatures=check_temperatures(temperatures))


@contextmanager
def creation_lock(path):
    """An exclusive lock on `.{store}.lock` beside a local store (released when the process dies). On an
    object store there is no lock: there, ranks of one torchrun job create through rank 0 only."""
    if is_url(path):
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _exists(path) -> bool:
    if is_url(path):
        fs, root = fsspec.core.url_to_fs(f"{path}/zarr.json")
        return fs.exists(root)
    return (path / "zarr.json").is_file()


def _create(path, provenance, *, num_samples, num_views, k, params_dim, num_classes, shard_rows, values,
            temperatures):
    group = zarr.open_group(zarr_store(path), mode="w")
    idx = index_dtype(num_classes)
    keep = value_keepbits(values)
    chunk = rows_per_chunk(shard_rows, num_views)

    def blosc(typesize, bit=False):
        return [BloscCodec(cname="zstd", clevel=9, typesize=typesize,
                           shuffle=BloscShuffle.bitshuffle if bit else BloscShuffle.shuffle)]

    def array(name, shape, dtype, filters=(), compressors=None):
        group.create_array(name, shape=shape, dtype=dtype, chunks=(chunk,) + shape[1:],
                           shards=(shard_rows,) + shape[1:], filters=list(filters), compressors=compressors,
                           fill_value=0)

    array("values", (num_samples, num_views, k), np.float16,
          [BitRound(keepbits=keep)] if keep is not None else [], blosc(2, bit=keep is not None))
    array("indices", (num_samples, num_views, k), idx, [Delta(dtype=str(idx))], blosc(idx.itemsize))
    array("lse", (num_samples, num_views), np.float32, [], blosc(4))
    array("lse_tau", (num_samples, num_views, len(temperatures)), np.float16, [], blosc(2))
    array("params", (num_samples, num_views, params_dim), np.uint16, [TransposeCodec(order=(2, 0, 1))], blosc(2))
    array("labels", (num_samples,), idx, [], blosc(idx.itemsize))
    group.create_array("done", shape=(math.ceil(num_samples / shard_rows),), dtype=np.uint8, chunks=(1,),
                       compressors=None, fill_value=0)
    group.attrs["provenance"] = {**provenance, "shard_rows": shard_rows, "num_classes": num_classes,
                                 "index_dtype": str(idx), "values_encoding": values, "temperatures": temperatures}
    return StoreWriter(group, path)


def summarize(store: LogitStore) -> dict:
    """What `pipeline store inspect` prints: shape, size, completeness, top-k mass, teacher top-1."""
    p, done = store.provenance, store.done_mask()
    rows = np.concatenate([np.arange(r.start, r.stop) for r in map(store.shard_rows_range, np.flatnonzero(done))]
                          ) if done.any() else np.zeros(0, np.int64)
    info = {"path": str(store.path), "key": store.key, "teacher": p["teacher"]["name"], "model": p["teacher"]["model"],
            "weights_digest": p["weights_digest"][:16], "dataset": p["dataset"], "split": p["split"],
            "dataset_fingerprint": p["dataset_fingerprint"], "plan_hash": p["plan_hash"],
            "shape": [store.num_samples, store.num_views, store.k], "num_classes": store.num_classes,
            "values_encoding": p["values_encoding"], "index_dtype": p["index_dtype"],
            "complete": bool(done.all()), "shards_done": f"{int(done.sum())}/{len(done)}",
            "bytes_on_disk": bytes_on_disk(store.path), "bytes_per_view": round(store.bytes_per_view(), 2),
            "versions": p.get("versions"), "run": dict(store.group.attrs.get("run") or {})}
    info["temperatures"] = store.temperatures
    # teacher top-1 in percent: teach's figures (whole split), else (unfinished store) over the done shards
    info["teacher_top1_views"] = p.get("teacher_top1_views")
    info["teacher_top1_clean_val"] = p.get("teacher_top1_clean_val")
    if len(rows):
        values = store.arrays["values"].get_orthogonal_selection((rows,)).astype(np.float32)
        info["mean_topk_mass"] = round(float(np.exp(values).sum(-1).mean()), 4)
        if info["teacher_top1_views"] is None:
            info["teacher_top1_views"] = top1_vs_labels(store, rows)
        if info["mean_topk_mass"] > 1 + MASS_SLACK:
            info["problems"] = [f"mean top-k mass {info['mean_topk_mass']} > 1: the stored values are not "
                                "log-probabilities; re-run `pipeline teach` into a new --store-root"]
    return info


def top1_vs_labels(store: LogitStore, rows=None) -> float:
    """Top-1 (%) of the stored targets against the labels, over `rows` (default: all) and every view;
    read one store shard of rows at a time (a whole ImageNet store would not fit in memory)."""
    g = store.arrays
    rows = np.arange(store.num_samples) if rows is None else np.asarray(rows)
    hits = 0
    for start in range(0, len(rows), store.shard_rows):
        part = (rows[start:start + store.shard_rows],)
        values, indices = g["values"].get_orthogonal_selection(part), g["indices"].get_orthogonal_selection(part)
        top1 = np.take_along_axis(indices, values.argmax(-1)[..., None], -1)[..., 0]
        hits += int((top1 == g["labels"].get_orthogonal_selection(part)[:, None]).sum())
    return round(100.0 * hits / max(len(rows) * store.num_views, 1), 2)


# f16 log-probabilities round by at most ~1e-3 relative: a top-k mass beyond this is a broken store.
MASS_SLACK = 2e-3


def find_stores(root) -> list[Path]:
    """Every store (a zarr group with provenance) under `root`, sorted; `root` itself may be one."""
    import json

    found = []
    for meta in sorted(Path(root).rglob("zarr.json")):
        if any(parent in found for parent in meta.parents):
            continue  # an array inside a store already found
        try:
            attrs = json.loads(meta.read_text()).get("attributes") or {}
        except (OSError, ValueError):
            continue
        if "provenance" in attrs:
            found.append(meta.parent)
    return found


def list_row(store: LogitStore) -> dict:
    """One line of `pipeline store list`: what made the store, its shape, completeness and size."""
    p, done = store.provenance, store.done_mask()
    return {"teacher": p["teacher"]["name"], "dataset": f"{p['dataset']}/{p['split']}", "plan": p["plan_hash"][:8],
            "K": store.k, "V": store.num_views, "samples": store.num_samples,
            "complete": f"{int(done.sum())}/{len(done)}" + ("" if done.all() else " (unfinished)"),
            "MB": round(bytes_on_disk(store.path) / 1e6, 2), "path": str(store.path)}
