"""A store that leaves the machine: teach into s3:// (a moto S3 server on localhost, no network) with
2 gloo ranks, kill a rank mid-way, resume, and get the local store's arrays and zarr shard objects;
a student trains from the remote store."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from pipeline.recipes import load_recipe  # noqa: E402
from pipeline.store import ARRAYS, open_pointer  # noqa: E402
from pipeline.train import train  # noqa: E402
from tests._data_helpers import synthetic_shards  # noqa: E402
from tests._student_helpers import STUDENT  # noqa: E402
from tests._teach_helpers import NUM_CLASSES, teach_args, tiny_teacher  # noqa: E402
from tests.conftest import EMPTY_PARAMS, S3_BUCKET as BUCKET  # noqa: E402

PIPELINE = str(Path(sys.executable).parent / "pipeline")
NO_PARAMS = ["--params", EMPTY_PARAMS]


def _torchrun(spec, shards, root, out):
    args = teach_args(spec, shards, Path("unused"))
    args[args.index("--store-root") + 1], args[args.index("--out") + 1] = root, str(out)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", PIPELINE,
            *NO_PARAMS, *args]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _objects(fs, url: str) -> dict:
    """Every data object (zarr shard/chunk) under a store, by key relative to the store."""
    root = url.removeprefix("s3://")
    return {p[len(root) + 1:]: fs.cat(p) for p in sorted(fs.find(root)) if p.count("/") - root.count("/") > 1}


@pytest.mark.slow
def test_two_ranks_into_s3_killed_and_resumed_equal_local_and_a_student_trains(s3, tmp_path):
    import s3fs

    # enough store shards (2 rows each) that a rank is still writing when the first done flag shows
    # (with the tiny set a loaded machine finished every shard before the kill landed)
    spec, shards = tiny_teacher(tmp_path), tmp_path / "shards"
    synthetic_shards(shards, num_classes=NUM_CLASSES, per_class=16, size=48, shard_size=16)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    local = subprocess.run([PIPELINE, *NO_PARAMS, *teach_args(spec, shards, tmp_path / "local")], env=env,
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-2000:]
    ref = open_pointer(tmp_path / "local" / "out" / "tiny.json")

    root = f"s3://{BUCKET}/stores"
    fs = s3fs.S3FileSystem()
    proc = subprocess.Popen(_torchrun(spec, shards, root, tmp_path / "out"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    killed, deadline = None, time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        fs.invalidate_cache()
        if fs.glob(f"{BUCKET}/stores/*.zarr/done/c/*"):  # mid-run: a shard is done, others are not
            ranks = _children(proc.pid)
            if ranks:
                killed = ranks[-1]
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.01)
    proc.wait(timeout=120)
    assert killed and proc.returncode != 0, proc.stderr.read().decode()[-2000:]
    fs.invalidate_cache()
    url = "s3://" + fs.glob(f"{BUCKET}/stores/*.zarr")[0]
    from pipeline.store import open_store

    assert not open_store(url, require_complete=False).complete

    resumed = subprocess.run(_torchrun(spec, shards, root, tmp_path / "out"), env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    remote = open_pointer(tmp_path / "out" / "tiny.json")
    assert str(remote.path) == url and remote.key == ref.key
    for name in (*ARRAYS, "done"):
        np.testing.assert_array_equal(remote.arrays[name][:], ref.arrays[name][:], err_msg=name)
    fs.invalidate_cache()
    local_files = {str(p.relative_to(ref.path)): p.read_bytes() for p in sorted(ref.path.rglob("*"))
                   if p.is_file() and p.parent != ref.path}
    assert _objects(fs, url) == local_files  # the zarr shard objects are the local files, byte for byte

    recipe = load_recipe("demo", {"epochs": 1, "batch_size": 8, "warmup_epochs": 0, "num_branches": None,
                                  "scale_branch": None, "img_size": 64})
    last = train(STUDENT, recipe, shards, tmp_path / "student", [remote], ["tiny"], quiet=True)
    assert last["epoch"] == 1 and (tmp_path / "student" / "model.safetensors").is_file()
