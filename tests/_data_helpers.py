"""Tiny shard sets for tests of the data area (and of anyone who needs shards)."""

from pipeline.data import shards, sources


def synthetic_shards(out_dir, num_classes=3, per_class=8, size=64, shard_size=10, fmt="png", val_fraction=0.25):
    """Write a small synthetic dataset as shards into `out_dir`; returns the manifest."""
    name, classes, splits = sources.synthetic(num_classes, per_class, size, fmt, val_fraction, seed=0)
    return shards.write_shards(splits, out_dir, name, classes, "synthetic", maxcount=shard_size, quiet=True)
