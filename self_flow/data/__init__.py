"""Input data: dataset sources (TFDS) and the grain pipelines that batch them for training."""
