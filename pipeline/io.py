"""Small file helpers shared by every stage: atomic writes, digests (of files, objects and state dicts), and the
reading of a record's JSON file that refuses a missing or an unknown key."""

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

from pipeline.errors import UserError


def umask_mode(directory: bool = False) -> int:
    """The mode open() / mkdir() give a new file / folder under the user's umask (mkstemp/mkdtemp give 0600/0700)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temps(path) -> None:
    """Drop the temp files atomic_write_bytes left for `path` when a run was killed mid-write.

    Only for files a single process writes (a checkpoint): another writer's temp file would go too."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)


# A file each stage writes into the folders it owns (an --out folder, its temp and set-aside folders): a folder
# is "ours", and its files ours to replace, only when it carries this marker, never because of its file names.
MARKER = ".written-by-pipeline"
MARKER_TEXT = b"written by the kd-pipeline; its next run may replace the files it writes here\n"


def is_ours(folder) -> bool:
    marker = Path(folder) / MARKER
    return marker.is_file() and marker.read_bytes() == MARKER_TEXT


def mark_ours(folder) -> None:
    atomic_write_bytes(Path(folder) / MARKER, MARKER_TEXT)


def claim_out_dir(out, names, command: str) -> None:
    """Before `command` writes the files `names` into `out`: a folder without our marker receives only new
    files (a user's file of the same name is refused in one line, nothing changed); then `out` is marked ours."""
    from pipeline.errors import UserError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    taken = [name for name in names if (out / name).exists()] if not is_ours(out) else []
    if taken:
        raise UserError(f"--out {out} holds {taken[0]}, which `pipeline {command}` did not write (the folder has no "
                        f"{MARKER} marker); nothing was changed: choose another --out, or move that file away")
    mark_ours(out)


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def sha256_file(path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def state_digest(state: dict) -> str:
    """sha256 over the tensors of a state dict (names, dtypes, shapes, bytes), in name order."""
    import torch  # here, not at the top: the commands' --help imports this module without torch

    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def stable_hash(obj, length: int = 16) -> str:
    """Short sha256 of a JSON-serialisable object, independent of dict order."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def significant(obj, digits: int = 4):
    """Floats rounded to `digits` significant digits, recursively: metrics files stay readable and keep
    small numbers (a fused max |diff| of 1.2e-06 stays 1.2e-06, where fixed decimals would give 0.0)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: significant(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [significant(v, digits) for v in obj]
    return obj


def read_json(path, fix: str):
    """A JSON file's value; an unreadable or malformed file is one UserError line ending in `fix`."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is unreadable ({type(err).__name__}); {fix}") from None


def finite_number(value) -> bool:
    """A real number a record or spec may hold: an int or float, finite (bool, NaN and inf are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_keys(cls, data, where: str, fix: str, spell=lambda name: (name,)) -> None:
    """`data` holds a key for every required field of the dataclass `cls` and no other key, or one UserError line
    saying what is missing or unknown and ending in `fix` (a file of an older version, or edited by hand).
    `spell`: the keys a field is written as in the file (one, its name, unless the record says otherwise)."""
    if not isinstance(data, dict):
        raise UserError(f"{where} is not a mapping of {cls.__name__} keys; {fix}")
    fields = dataclasses.fields(cls)
    names = [key for f in fields for key in spell(f.name)]
    required = [key for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                for key in spell(f.name)]
    unknown, missing = sorted(set(data) - set(names)), [k for k in required if k not in data]
    if unknown or missing:
        parts = ([f"unknown keys {unknown}"] if unknown else []) + ([f"no {', '.join(missing)}"] if missing else [])
        raise UserError(f"{where}: {' and '.join(parts)} (allowed: {', '.join(names)}); {fix}")
