"""Atomic writers: output files and folders get the user's umask, like any file the user creates."""

import os
import stat

import pytest

from pipeline.io import atomic_write_bytes
from tests._data_helpers import synthetic_shards


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_follows_the_umask(umask, tmp_path):
    atomic_write_bytes(tmp_path / "a.json", b"{}")
    assert _mode(tmp_path / "a.json") == 0o666 & ~umask


def test_shard_folder_and_manifest_follow_the_umask(umask, tmp_path):
    out = tmp_path / "shards"
    synthetic_shards(out, num_classes=2, per_class=2, size=16)
    assert _mode(out) == 0o777 & ~umask
    assert _mode(out / "manifest.json") == 0o666 & ~umask
