"""The teacher logit store on disk: one zarr v3 group per (dataset, view plan, teacher, K, encoding).

The arrays, their dtypes and how their numbers are encoded are pipeline.codec's; this module creates, opens,
writes and checks them (locally or on an object store through fsspec).

- rows are written one shard of rows at a time, and a shard is the unit of resume and of work sharing
  between torchrun ranks: no two processes ever touch the same file, and zarr's LocalStore writes every file
  atomically (temp + rename).
- each per-view array ([N, V, ...]) keeps one file per (shard of rows, view) (zarr sharding codec, shard shape
  [shard_rows, 1, ...]): a student epoch uses one view (loaders.epoch_view), so it reads 1/V of the store.
- `done` [S,W] u8 holds one record per shard of rows, written after that shard's files: a done flag, the
  digest of the store's metadata and the sha256 of each of its files (shard_files order).

What we write we can verify: the done record of a shard holds the sha256 of every file of it, as written, and the digest of the store's metadata (its provenance but the teacher's measured top-1, and every
array's zarr.json). `store inspect --verify` re-hashes every file; `read_views` (the student's epochs, the
audit) hashes each file it reads as it reads it, before using a number of it; and every open checks the
metadata digest: a changed byte anywhere, an edited plan or temperature list, a dtype changed in zarr.json or
in consolidated metadata, is one line naming it.

What a student reads: per epoch, the pairs (sample, that epoch's view) of its own samples (read_views): its
memory is O(N / world x K), flat in V. A rank's samples are spread over every shard, so an epoch reads that
view's target and params files of every shard: 1/V of the store (less `labels`), once per rank.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem
import numpy as np
import torch
import zarr
from zarr.buffer import default_buffer_prototype
from zarr.codecs import BitRound, BloscCodec, BloscShuffle, Delta, FixedScaleOffset, TransposeCodec
from zarr.storage import MemoryStore

from pipeline.codec import (LSE_KEEPBITS, RECORD, STORE_DTYPES, array_dtypes, check_temperatures, decode_logp,
                            fixed_point, tempered_lse, value_scale, value_steps)
from pipeline.errors import UserError
from pipeline.io import atomic_write_json, check_keys, read_json, stable_hash


FORMAT = 4  # 4: one file per (shard, view); 3: fixed-point values, the tempered rest per tau, checksummed records
ARRAYS = ("values", "indices", "lse", "rest", "params", "labels")
VIEW_ARRAYS = ARRAYS[:5]  # one entry per (sample, view)
TARGET_ARRAYS = ("values", "indices", "lse", "rest")  # what the KD targets are decoded from
READ_VIEWS = 1 << 18  # stored views LogitStore.read_views decodes at once (~5 MB of values at K = 10)
DIGEST = 32  # sha256 bytes
# provenance fields written after the shards (the teacher's measured top-1): outside the metadata digest
MEASURED = ("teacher_top1_views", "teacher_top1_clean_val")
# What a store of ours may name: no pickle/object codec (numcodecs.pickle unpickles every chunk it reads).
SAFE_CODECS = {"bytes", "blosc", "zstd", "gzip", "crc32c", "sharding_indexed", "transpose", "numcodecs.delta",
               "numcodecs.bitround", "numcodecs.fixedscaleoffset"}
STALE_PARTIAL_S = 60  # a zarr temp file (*.partial) this old belongs to no live writer: a killed run left it


@contextmanager
def numcodecs_quiet():
    """BitRound/Delta/Transpose are numcodecs codecs: zarr-python (what reads these stores) has them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")
        yield


def store_key(*, dataset_fingerprint: str, split: str, plan_hash: str, teacher: dict, weights_digest: str,
              k: int, num_views: int, values: str, amp: str, temperatures=(1.0,)) -> str:
    """Hash of every input that changes the stored numbers; it names the group on disk."""
    return stable_hash(dict(format=FORMAT, dataset_fingerprint=dataset_fingerprint, split=split, plan=plan_hash,
                            teacher=teacher, weights_digest=weights_digest, k=k, num_views=num_views,
                            values=values, amp=amp, temperatures=check_temperatures(temperatures)))


def rows_per_chunk(shard_rows: int) -> int:
    """Inner chunk rows (one view each): the largest divisor of the shard <= 4096."""
    return max(d for d in range(1, min(shard_rows, 4096) + 1) if shard_rows % d == 0)


def shard_files(num_views: int) -> list[tuple[str, int | None]]:
    """The files of one shard of rows as (array, view), in done-record order: each per-view array's file of
    each view, then `labels`' (view None)."""
    return [(name, v) for name in VIEW_ARRAYS for v in range(num_views)] + [("labels", None)]


def record_width(num_views: int) -> int:
    """Bytes of a done record: flag, metadata digest, one sha256 per file of the shard."""
    return 1 + DIGEST * (1 + len(shard_files(num_views)))


def digest_slot(file: int | None) -> slice:
    """Where a done record holds a digest: the metadata's (file None), else that of shard_files()[file]."""
    at = 1 if file is None else 1 + DIGEST * (1 + file)
    return slice(at, at + DIGEST)


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


def check_root(root, reach: bool = False):
    """A store root as the user gave it (--store-root, `store list ROOT`), as store_location: a local folder, or a URL
    of a protocol fsspec knows that names a bucket (`s3://` alone would make a local folder `s3:`); else one line.
    `reach`: also list a remote root's bucket, so that wrong credentials, a missing bucket or an endpoint out of
    reach are one line naming the URL and the fix before any work, not a botocore traceback in the middle of it."""
    if not is_url(root):
        return Path(root)
    protocol, _, rest = str(root).partition("://")
    try:
        fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError) as err:  # an unknown protocol, or its package (s3fs, gcsfs) not installed
        raise UserError(f"store root {root}: {err}; give a local folder or a URL such as s3://BUCKET/prefix") from None
    if not rest.strip("/"):
        raise UserError(f"store root {root} names no bucket; give {protocol}://BUCKET/prefix or a local folder")
    fs, path = fsspec.core.url_to_fs(str(root))
    if reach and not isinstance(fs, LocalFileSystem):
        bucket = path.split("/")[0]
        try:
            fs.ls(bucket)
        except PermissionError as err:
            raise UserError(f"{root}: access denied ({err}); check the credentials (for s3: AWS_ACCESS_KEY_ID / "
                            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket's policy") from None
        except FileNotFoundError:
            raise UserError(f"{root}: bucket '{bucket}' does not exist; create it or fix the URL") from None
        except Exception as err:  # noqa: BLE001 - botocore's EndpointConnectionError is no OSError
            raise UserError(f"{root}: cannot reach the object store ({type(err).__name__}); check the "
                            "endpoint (for s3: AWS_ENDPOINT_URL) and the network") from None
    return store_location(root)


def zarr_store(path, read_only: bool = False):
    """What zarr opens for a store location: the local path, or an FsspecStore on the URL. Every zarr
    shard is one object written whole (a PUT on S3), so ranks writing different shards never collide."""
    if not is_url(path):
        return path
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(str(path), read_only=read_only)


def check_metadata(path) -> bytes:
    """Read the store's zarr.json files as plain JSON before zarr does: zarr v3 only, our arrays only,
    codecs and dtypes from SAFE_CODECS / codec's STORE_DTYPES (so opening the store can never unpickle), consolidated
    metadata (zarr never reads it here) saying the same. Returns the digest of the metadata (metadata_digest)."""
    fs, root = fsspec.core.url_to_fs(str(path))

    def codec_names(codecs):
        for codec in codecs if isinstance(codecs, list) else []:
            name = codec.get("name") if isinstance(codec, dict) else codec
            yield name
            config = codec.get("configuration") if isinstance(codec, dict) else None
            for inner in ("codecs", "index_codecs"):
                yield from codec_names((config or {}).get(inner))

    def ours(name, names) -> bool:  # a list or mapping where a name goes is not ours (nor hashable)
        return isinstance(name, str) and name in names

    metas = {}
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
        if not node:
            check_format(path, (meta.get("attributes") or {}).get("provenance"))
        if node:
            unsafe = sorted(str(n) for n in codec_names(meta.get("codecs")) if not ours(n, SAFE_CODECS))
            if unsafe or not ours(meta.get("data_type"), STORE_DTYPES) or meta.get("storage_transformers"):
                raise UserError(f"store array {meta_path} names codecs/dtype not written by `pipeline teach` "
                                f"({', '.join(unsafe) or meta.get('data_type')}); refused (reading it could run code)")
        metas[node] = meta
    consolidated = metas[""].get("consolidated_metadata")
    entries = consolidated.get("metadata") if isinstance(consolidated, dict) else consolidated
    if entries is not None:
        for node, meta in (entries.items() if isinstance(entries, dict) else [("?", entries)]):
            own = metas.get(node)
            if own is None or not isinstance(meta, dict) or any(meta.get(f) != own.get(f) for f in CONSOLIDATED_FIELDS):
                raise UserError(f"store metadata {path}/zarr.json: its consolidated metadata for '{node}' differs from "
                                f"{path}/{node}/zarr.json (dtype, shape or codecs); refused: re-run `pipeline teach` "
                                "into a fresh --store-root")
    return metadata_digest(metas)


def check_format(path, provenance) -> None:
    """A store of another format (an older pipeline's) is refused in one line: teach writes a new one."""
    if isinstance(provenance, dict) and provenance.get("format", 2) != FORMAT:
        raise UserError(f"teacher store {path} has store format {provenance.get('format', 2)}; this pipeline reads "
                        f"format {FORMAT} (one file per shard and view, checksummed): re-run "
                        "`pipeline teach` (the store key changed with the format: it writes a new store)")


CONSOLIDATED_FIELDS = ("data_type", "shape", "codecs", "chunk_grid", "chunk_key_encoding", "fill_value", "node_type")


def metadata_digest(metas: dict) -> bytes:
    """sha256 of what defines a store's numbers: its provenance (less the teacher's measured top-1, written
    after the shards) and every array's zarr.json. Parsed JSON, so zarr may rewrite a file in another order."""
    provenance = (metas[""].get("attributes") or {}).get("provenance")
    if isinstance(provenance, dict):
        provenance = {k: v for k, v in provenance.items() if k not in MEASURED}
    arrays = {node: meta for node, meta in metas.items() if node}
    text = json.dumps({"provenance": provenance, "arrays": arrays}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).digest()


def chunk_file(array, shard: int, view: int | None = None) -> str:
    """The file (relative to the store) holding rows of `shard` (at `view`, for a per-view array)."""
    coords = (shard,) + (() if view is None else (view,))
    coords += (0,) * (array.ndim - len(coords))
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


def consecutive_runs(items: list[int], limit: int) -> list[list[int]]:
    """Sorted integers cut into runs of consecutive ones, at most `limit` long."""
    runs = []
    for item in items:
        if runs and item == runs[-1][-1] + 1 and len(runs[-1]) < limit:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


class StoredViews:
    """The stored numbers of a set of (index, view) pairs, in memory (LogitStore.read_views): a student rank's
    epoch, served batch by batch. `arrays` are aligned with `codes` (index * num_views + view, ascending);
    `values` are int16 steps of 1/`step` (codec.value_steps; step 1: plain f16)."""

    def __init__(self, codes: np.ndarray, num_views: int, arrays: dict, step: int = 1, temperatures=(1.0,)):
        self.codes, self.num_views, self.arrays = codes, num_views, arrays
        self.step, self.temperatures = step, list(temperatures)

    def __len__(self) -> int:
        return len(self.codes)

    def rows(self, index, view) -> np.ndarray:
        """Where the (index, view) pairs are held; KeyError for a pair that was not read."""
        want = np.asarray(index, np.int64) * self.num_views + np.asarray(view, np.int64)
        at = np.searchsorted(self.codes, want)
        if (at >= len(self.codes)).any() or (self.codes[at] != want).any():
            raise KeyError("(index, view) pairs that were not read (another epoch's or rank's)")
        return at

    def _get(self, name: str, at: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.arrays[name][at])

    def log_probs(self, index, view):
        """(log p float64 [B,K] at tau 1 (decode_logp), classes int64 [B,K], rest codes [B,T], lse f64 [B])."""
        at = self.rows(index, view)
        rest = self._get("rest", at).int()
        logp = decode_logp(self._get("values", at).double() / self.step, rest[:, 0])
        return logp, self._get("indices", at).long(), rest, self._get("lse", at).double()

    def lookup(self, index, view):
        """(topk_logits f64 [B,K], topk_indices int64 [B,K], lse f64 [B]) for samples `index`, views `view`:
        logits - lse are the decoded log p (their probabilities sum to 1 - r_1 exactly)."""
        logp, classes, _, lse = self.log_probs(index, view)
        return logp + lse[:, None], classes, lse

    def lookup_tau(self, index, view, tau: float):
        """lookup() + logsumexp(z / tau) over all classes f64 [B], for a stored tau (LogitStore.require_tau)."""
        logp, classes, rest, lse = self.log_probs(index, view)
        offset = tempered_lse(logp, rest[:, self.temperatures.index(float(tau))], tau)
        return logp + lse[:, None], classes, lse, lse / tau + offset

    def params(self, index, view) -> np.ndarray:
        """uint16 [B, P]: the stored parameters of the views (what the student replays)."""
        return self.arrays["params"][self.rows(index, view)]


class LogitStore:
    """A store group, read side. `read_views` reads the numbers of given (index, view) pairs (a student rank's
    epoch), checked as they are read."""

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
        self._read_records = None  # records() as the read path last read them (read_records)

    @property
    def num_shards(self) -> int:
        return self.arrays["done"].shape[0]

    def done_mask(self) -> np.ndarray:
        return self.records()[:, 0] == 1

    def records(self) -> np.ndarray:
        """uint8 [S, record_width]: each shard's done record (flag, metadata digest, its files' digests)."""
        try:
            recs = np.asarray(self.arrays["done"][:], dtype=RECORD)
        except Exception as err:  # noqa: BLE001 - any codec/IO failure: the records cannot be trusted
            raise UserError(f"teacher store {self.path}: its done records (done/) are unreadable ({type(err).__name__}); "
                            "re-run `pipeline teach` into a fresh --store-root") from None
        width = record_width(self.num_views)
        if recs.shape != (self.num_shards, width):
            raise UserError(f"teacher store {self.path}: its done records have shape {list(recs.shape)}, not "
                            f"[{self.num_shards}, {width}]; re-run `pipeline teach` into a fresh --store-root")
        return recs

    def read_records(self, shards) -> np.ndarray:
        """records() for checking reads of `shards`, read once per open store (an epoch's reads then cost no
        O(S x V) digest read), again when one of `shards` was not done then. A done shard's record stays as
        it is until the shard is found damaged and rewritten: a cached one then refuses the new file."""
        if self._read_records is None or not (self._read_records[shards, 0] == 1).all():
            self._read_records = self.records()
        return self._read_records

    @property
    def complete(self) -> bool:
        return bool(self.done_mask().all())

    def check_metadata_digest(self, digest: bytes) -> None:
        """Every done shard was written under metadata with this digest (check_metadata's); else one line."""
        recs = self.records()
        for shard in map(int, np.flatnonzero(recs[:, 0] == 1)):
            if recs[shard, digest_slot(None)].tobytes() != digest:
                raise UserError(f"teacher store {self.path}: its metadata (zarr.json: provenance, plan, temperatures or an "
                                f"array's dtype/codecs) is not what shard {shard} was written under; refused: re-run "
                                "`pipeline teach` into a fresh --store-root")

    def damaged_shards(self, full: bool = False, names=ARRAYS) -> dict[int, str]:
        """Done shards whose data is gone or changed: {shard: why}. Cheap: every file of the shard exists.
        `full`: every file's sha256 is the one its done record holds (one read and one hash per file)."""
        bad = {}
        fs, root = fsspec.core.url_to_fs(str(self.path))
        recs = self.records()
        files = [(name, view) for name, view in shard_files(self.num_views) if name in names]
        for shard in map(int, np.flatnonzero(recs[:, 0] == 1)):
            for name, view in files:
                rel = chunk_file(self.arrays[name], shard, view)
                if full:
                    why = self._checked_file(fs, root, name, shard, view, recs[shard])[1]
                else:
                    why = None if fs.isfile(f"{root}/{rel}") else f"{rel} missing"
                if why:
                    bad[shard] = why
                    break
        return bad

    def _checked_file(self, fs, root, name: str, shard: int, view: int | None,
                      record: np.ndarray) -> tuple[bytes | None, str | None]:
        """(the bytes of array `name`'s file of (`shard`, `view`), None) when their sha256 is the one in the
        shard's done `record`, else (None, why)."""
        rel = chunk_file(self.arrays[name], shard, view)
        try:
            data = fs.cat_file(f"{root}/{rel}")
        except FileNotFoundError:
            return None, f"{rel} missing"
        at = digest_slot(shard_files(self.num_views).index((name, view)))
        if hashlib.sha256(data).digest() != record[at].tobytes():
            return None, f"{rel} is not the file written (its sha256 differs from the shard's done record)"
        return data, None

    def check_intact(self, full: bool = False, names=ARRAYS) -> None:
        """UserError naming the first damaged shard (see damaged_shards) and the fix."""
        bad = self.damaged_shards(full, names)
        if bad:
            self._refuse_damaged(bad)

    def _refuse_damaged(self, bad: dict[int, str]):
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

    def read_views(self, index, view, names=TARGET_ARRAYS) -> StoredViews:
        """The stored `names` (of VIEW_ARRAYS) of the (index, view) pairs, in memory: what a student rank holds
        for one epoch (its own samples, each at that epoch's view: ~60 bytes + 2 P a pair at K = 10).

        Only the files holding a pair are read (one per shard of rows and view: an epoch's single view is 1/V of
        the store), in runs of consecutive shards of at most READ_VIEWS stored views, a run decoded at once: peak
        memory is the pairs' numbers plus one array's run, whatever V.

        Integrity: each file is hashed as it is read and refused, in one line naming the shard, unless its sha256
        is the one its done record holds. So every number served was checked by the read that fetched it, at
        the cost of one sha256 per byte read (~1 GB/s a core) and no second read (a whole-store hash at start
        would read every file twice, and miss a file changed after it).
        """
        codes = np.unique(np.asarray(index, np.int64) * self.num_views + np.asarray(view, np.int64))
        rows, cols = np.divmod(codes, self.num_views)
        recs = self.read_records(np.unique(rows // self.shard_rows))
        out = {name: np.empty((len(codes), *self.arrays[name].shape[2:]), self.arrays[name].dtype) for name in names}
        for v in map(int, np.unique(cols)):
            at = np.flatnonzero(cols == v)  # this view's pairs, rows ascending
            shards, starts = np.unique(rows[at] // self.shard_rows, return_index=True)
            bounds = [*starts.tolist(), len(at)]
            done = 0  # shards read so far
            for run in consecutive_runs(shards.tolist(), max(1, READ_VIEWS // self.shard_rows)):
                a, b = bounds[done], bounds[done + len(run)]
                first, last = self.shard_rows_range(run[0]).start, self.shard_rows_range(run[-1]).stop
                for name in names:
                    out[name][at[a:b]] = self._checked_copy(name, v, run, recs)[first:last, v][rows[at[a:b]] - first]
                done += len(run)
        step = value_scale(self.provenance["values_encoding"])
        if "values" in out:
            out["values"] = value_steps(out["values"], step)
        return StoredViews(codes, self.num_views, out, step or 1, self.temperatures)

    def _checked_copy(self, name: str, view: int, shards: list[int], recs: np.ndarray) -> zarr.Array:
        """Per-view array `name` in memory, holding only its files of (`shards`, `view`) as read and checked
        against their done records `recs` (_checked_file): zarr decodes the very bytes that were hashed."""
        fs, root = fsspec.core.url_to_fs(str(self.path))
        array, prototype = self.arrays[name], default_buffer_prototype()
        files = array.metadata.to_buffer_dict(prototype)
        for shard in shards:
            data, why = self._checked_file(fs, root, name, shard, view, recs[shard])
            if why:
                self._refuse_damaged({shard: why})
            key = array.metadata.encode_chunk_key((shard, view) + (0,) * (array.ndim - 2))
            files[key] = prototype.buffer.from_bytes(data)
        with numcodecs_quiet():
            return zarr.open_array(MemoryStore(files), mode="r")

    def lookup(self, index, view):
        """StoredViews.lookup of these pairs, read for them (read_views: for a few pairs, as the audit's)."""
        return self.read_views(index, view).lookup(index, view)

    def require_tau(self, tau: float) -> None:
        """UserError naming the stored temperatures unless `tau` is one of them."""
        if float(tau) not in self.temperatures:
            raise UserError(f"tau={tau:g} is not stored in teacher store {self.path} (it keeps tau "
                            f"{', '.join(f'{t:g}' for t in self.temperatures)}); use one of them, re-run "
                            f"`pipeline teach --temperatures ...` with it, or pass --flat-tail for the flat-tail "
                            f"approximation")

    def lookup_tau(self, index, view, tau: float):
        """StoredViews.lookup_tau of these pairs, read for them; UserError for a tau the store does not keep."""
        self.require_tau(tau)
        return self.read_views(index, view).lookup_tau(index, view, tau)

    def params(self, index: int, view: int) -> np.ndarray:
        """The stored parameter vector of one view (for replaying it without recomputing)."""
        return self.arrays["params"][index, view]

    def bytes_per_view(self) -> float:
        return bytes_on_disk(self.path) / (self.num_samples * self.num_views)


def open_store(path, require_complete: bool = True) -> LogitStore:
    """Open a store read-only; UserError if it is missing, out of reach, not a store, or (by default) unfinished."""
    path = check_root(path, reach=True)
    digest = check_metadata(path)
    try:
        group = zarr.open_group(zarr_store(path, read_only=True), mode="r", use_consolidated=False)
        store = LogitStore(group, path)
    except (FileNotFoundError, KeyError, ValueError, TypeError, zarr.errors.GroupNotFoundError,
            zarr.errors.NodeTypeValidationError) as err:
        raise UserError(f"{path} is not a readable teacher logit store ({type(err).__name__}); run `pipeline teach` "
                        "to make one") from None
    store.check_metadata_digest(digest)
    if require_complete and not store.complete:
        done = int(store.done_mask().sum())
        raise UserError(f"teacher store {path} is incomplete ({done}/{store.num_shards} shards); "
                        "re-run the same `pipeline teach` command to finish it")
    if require_complete:
        store.check_intact()
    return store


POINTER_MARK = "pipeline teach pointer"  # a pointer file is ours by this field (its folder is shared with DVC)


@dataclasses.dataclass(frozen=True)
class TeachPointer:
    """{out}/{teacher}.json, written by `pipeline teach`: which store holds a teacher's logits, for the stages
    after it and for DVC to track (the store itself may live outside the repo)."""

    written_by: str                 # POINTER_MARK: the file is ours to replace
    store: str                      # a URL, or a path relative to the pointer's folder
    key: str
    teacher: str
    k: int
    num_views: int
    num_classes: int
    split: str
    dataset_fingerprint: str
    plan: dict
    plan_hash: str

    @classmethod
    def read(cls, pointer) -> "TeachPointer":
        """A pointer file; a missing, unreadable, older or edited one is one line naming the fix."""
        pointer = Path(pointer)
        if not pointer.is_file():
            raise UserError(f"no teacher pointer file {pointer}; run `pipeline teach --out {pointer.parent}` first")
        fix = f"re-run `pipeline teach --out {pointer.parent}` to rewrite it"
        data = read_json(pointer, fix)
        check_keys(cls, data, f"teacher pointer {pointer}", fix)
        if not all(isinstance(data[k], str) for k in ("store", "key", "teacher")):
            raise UserError(f"teacher pointer {pointer} is unreadable (store, key or teacher not a string); {fix}")
        return cls(**data)


def open_pointer(pointer) -> LogitStore:
    """Open the store named by a pointer file {out}/{teacher}.json written by `pipeline teach`."""
    pointer = Path(pointer)
    info = TeachPointer.read(pointer)
    if info.teacher != pointer.stem:
        raise UserError(f"pointer {pointer} names teacher '{info.teacher}', not '{pointer.stem}'; re-run "
                        f"`pipeline teach --out {pointer.parent}` for teacher '{pointer.stem}'")
    path = store_location(info.store)
    if not is_url(path) and not path.is_absolute():
        path = (pointer.parent / path).resolve()
    store = open_store(path)
    if store.key != info.key:
        raise UserError(f"pointer {pointer} names store key {info.key} but {path} holds {store.key}; "
                        "re-run `pipeline teach`")
    if store.provenance["teacher"].get("name") != info.teacher:
        raise UserError(f"pointer {pointer} is for teacher '{info.teacher}' but {path} holds the logits of teacher "
                        f"'{store.provenance['teacher'].get('name')}'; re-run `pipeline teach --out {pointer.parent}`")
    return store


def check_pointer_ours(pointer) -> None:
    """Refuse (one line, nothing changed) to overwrite a file at `pointer` that is not a pointer we wrote."""
    pointer = Path(pointer)
    if not pointer.exists():
        return
    try:
        ours = json.loads(pointer.read_text()).get("written_by") == POINTER_MARK
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        ours = False
    if not ours:
        raise UserError(f"--out {pointer.parent} holds {pointer.name}, which `pipeline teach` did not write; nothing was "
                        "changed: choose another --out, or move that file away")


def write_pointer(pointer, store: LogitStore) -> TeachPointer:
    p = store.provenance
    store_path = store.path if is_url(store.path) else os.path.relpath(store.path.resolve(), Path(pointer).parent.resolve())
    info = TeachPointer(written_by=POINTER_MARK, store=store_path, key=store.key, teacher=p["teacher"]["name"],
                        k=store.k, num_views=store.num_views, num_classes=store.num_classes, split=p["split"],
                        dataset_fingerprint=p["dataset_fingerprint"], plan=store.plan, plan_hash=p["plan_hash"])
    atomic_write_json(pointer, dataclasses.asdict(info))
    return info


class StoreWriter(LogitStore):
    """The write side: create the arrays once, then fill shard by shard (any order, any process)."""

    def __init__(self, group, path, digest: bytes):
        # every chunk file is written, even one equal to the fill value: a missing file then always means lost data
        with zarr.config.set({"array.write_empty_chunks": True}):
            super().__init__(group, path)
        self.digest = digest  # of the metadata every done record is written under (check_metadata)
        self.check_metadata_digest(digest)
        remove_stale_partials(path)

    def forget_shards(self, shards) -> None:
        """Mark damaged shards not done and drop their chunk files (zarr would read a corrupt one back
        before rewriting it), so that they are computed again."""
        fs, root = fsspec.core.url_to_fs(str(self.path))
        for shard in map(int, shards):
            self.arrays["done"][shard] = 0
            for name, view in shard_files(self.num_views):
                chunk = f"{root}/{chunk_file(self.arrays[name], shard, view)}"
                if fs.exists(chunk):
                    fs.rm_file(chunk)

    def write_shard(self, shard: int, values, indices, lse, params, labels, rest) -> None:
        """One shard's rows (encode_topk's values/indices/lse, encode_rest's rest codes), then its done record:
        the flag, the metadata digest and the sha256 of each array's shard file as written."""
        rows = self.shard_rows_range(shard)
        s = slice(rows.start, rows.stop)
        g = self.arrays
        for name, data in zip(ARRAYS, (values, indices, lse, rest, params, labels)):
            g[name][s] = data
        self.seal(shard)

    def seal(self, shard: int) -> None:
        """Write the done record of a shard whose files are written: flag, metadata digest, file digests."""
        g = self.arrays
        fs, root = fsspec.core.url_to_fs(str(self.path))
        record = np.zeros(record_width(self.num_views), RECORD)
        record[0] = 1
        record[digest_slot(None)] = np.frombuffer(self.digest, RECORD)
        for i, (name, view) in enumerate(shard_files(self.num_views)):
            data = fs.cat_file(f"{root}/{chunk_file(g[name], shard, view)}")
            record[digest_slot(i)] = np.frombuffer(hashlib.sha256(data).digest(), RECORD)
        g["done"][shard] = record  # last: a killed writer leaves the shard not done, to be written again

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
                return StoreWriter(group, path, check_metadata(path))
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
    dtypes = array_dtypes(values, num_classes)
    idx = dtypes["indices"]
    step = value_scale(values)
    chunk = rows_per_chunk(shard_rows)

    def blosc(typesize, bit=False):
        return [BloscCodec(cname="zstd", clevel=9, typesize=typesize,
                           shuffle=BloscShuffle.bitshuffle if bit else BloscShuffle.shuffle)]

    def array(name, shape, filters=(), compressors=None):  # per-view arrays: one file per (shard, view)
        per_file = shape[2:] if len(shape) > 1 else ()
        views = (1,) if len(shape) > 1 else ()
        group.create_array(name, shape=shape, dtype=dtypes[name], chunks=(chunk, *views, *per_file),
                           shards=(shard_rows, *views, *per_file), filters=list(filters), compressors=compressors,
                           fill_value=0)

    if step is None:
        array("values", (num_samples, num_views, k), [], blosc(2))
    else:
        array("values", (num_samples, num_views, k), [FixedScaleOffset(**fixed_point(step))], blosc(2, bit=True))
    array("indices", (num_samples, num_views, k), [Delta(dtype=str(idx))], blosc(idx.itemsize))
    array("lse", (num_samples, num_views), [BitRound(keepbits=LSE_KEEPBITS)], blosc(4, bit=True))
    array("rest", (num_samples, num_views, len(temperatures)), [TransposeCodec(order=(2, 0, 1))], blosc(2, bit=True))
    array("params", (num_samples, num_views, params_dim), [TransposeCodec(order=(2, 0, 1))], blosc(2))
    array("labels", (num_samples,), [], blosc(idx.itemsize))
    width = record_width(num_views)
    group.create_array("done", shape=(math.ceil(num_samples / shard_rows), width), dtype=dtypes["done"],
                       chunks=(1, width), compressors=None, fill_value=0)
    group.attrs["provenance"] = {**provenance, "format": FORMAT, "shard_rows": shard_rows, "num_classes": num_classes,
                                 "index_dtype": str(idx), "values_encoding": values, "temperatures": temperatures}
    return StoreWriter(group, path, check_metadata(path))


