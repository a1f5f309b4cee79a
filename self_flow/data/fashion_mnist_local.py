"""TFDS builder for Fashion-MNIST from the Debian `dataset-fashion-mnist` package.

Fashion-MNIST is the embedded default dataset, and training must work on machines without
internet access. Debian ships the original IDX files, so this builder turns them into a regular
TFDS dataset (`fashion_mnist_local`, ArrayRecord files) that `tfds.data_source` can read with
random access, exactly like tfds' own downloaded `fashion_mnist`.
"""

import gzip
import os

import numpy as np
import tensorflow_datasets as tfds

# Where `apt-get install dataset-fashion-mnist` puts the IDX files. Read at build time (not
# bound at import), so tests and callers can point it elsewhere.
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"

# Label names in label-id order, as published with Fashion-MNIST.
CLASS_NAMES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

# split name -> file prefix of the original release.
_SPLIT_PREFIXES = {"train": "train", "test": "t10k"}
_IMAGE_SHAPE = (28, 28, 1)


def idx_path(prefix: str, kind: str) -> str:
  return os.path.join(DEBIAN_DIR, f"{prefix}-{kind}-ubyte.gz")


def debian_files() -> list[str]:
  """Returns the four IDX file paths the builder reads, so callers can check they exist."""
  return [
      idx_path(prefix, kind)
      for prefix in _SPLIT_PREFIXES.values()
      for kind in ("images-idx3", "labels-idx1")
  ]


def read_idx(path: str) -> np.ndarray:
  """Reads a gzipped IDX file (the format of the original MNIST-style releases).

  Layout: two zero bytes, a type byte (0x08 = uint8, the only type these files use), the number
  of dimensions, one big-endian uint32 per dimension, then the data in C order.
  """
  with gzip.open(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
    raise ValueError(f"{path!r} is not a uint8 IDX file (header bytes {raw[:4]!r}).")
  ndim = raw[3]
  header_size = 4 + 4 * ndim
  shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
  data = np.frombuffer(raw, dtype=np.uint8, offset=header_size)
  if data.size != int(np.prod(shape)):
    raise ValueError(f"{path!r} holds {data.size} bytes of data but its header says {shape}.")
  return data.reshape(shape)


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST built from local IDX files instead of a download."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Built from the Debian dataset-fashion-mnist package."}

  def _info(self) -> tfds.core.DatasetInfo:
    # A raw uint8 Tensor (not an encoded Image) keeps building and reading free of image codecs.
    return tfds.core.DatasetInfo(
        builder=self,
        description="Fashion-MNIST (Zalando article images), from local IDX files.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=_IMAGE_SHAPE, dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the files are already on disk.
    return {
        split: self._generate_examples(prefix) for split, prefix in _SPLIT_PREFIXES.items()
    }

  def _generate_examples(self, prefix: str):
    images = read_idx(idx_path(prefix, "images-idx3"))
    labels = read_idx(idx_path(prefix, "labels-idx1"))
    if images.shape[1:] != _IMAGE_SHAPE[:2] or len(images) != len(labels):
      raise ValueError(
          f"IDX files for {prefix!r} hold images {images.shape} and labels {labels.shape}; "
          f"expected (n, 28, 28) images with n labels."
      )
    images = images[..., None]
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}
