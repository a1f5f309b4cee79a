"""One-off command-line jobs run outside training, such as pre-encoding a dataset to shards."""
