"""Values that both the library and the commands' --help need, spelled once here.

This module imports nothing, so `stages/` can show them without loading torch, zarr or PIL (a fast --help,
tests/test_cli.py).
"""

STORE_ROOT = "outputs/stores"  # where dvc.yaml's teach stage keeps the stores
# the stored values' encoding (bench_kd_fidelity: s128 misses the 1e-2 gradient target on near students)
DEFAULT_VALUES = "logp-s181"
DEFAULT_TEMPERATURES = (1.0, 2.0, 4.0)  # the KD temperatures whose logsumexp a store keeps
CHECKPOINTS = ("best", "ema", "model")  # the student weights `pipeline fuse` may fold
RENDERED_SIZE = 64  # digits / synthetic images when --image-size is not given
# The `pipeline shard` options a manifests/datasets spec sets, unless given on the command line.
SPEC_OPTIONS = ("source", "name", "val_fraction", "image_size", "shard_size", "crop_pct")
