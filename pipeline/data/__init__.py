"""Data: webdataset shards, replayable augmented views and the loaders built on them."""
