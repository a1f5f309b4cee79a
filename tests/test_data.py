"""Tests for the data package: the Debian-built dataset, source selection and grain pipelines."""

import hashlib
import os
import time

from absl import flags
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
import pytest
import tensorflow_datasets as tfds

from self_flow.data import fashion_mnist_local, pipeline, sources



class _ArraySource:
  """In-memory stand-in for `ImageSource`: every image is unique, so hashes identify records."""

  def __init__(self, size: int):
    self._images = np.zeros((size, 28, 28, 1), np.uint8)
    self._images[:, 0, 0, 0] = np.arange(size) % 256
    self._images[:, 0, 1, 0] = np.arange(size) // 256
    self._images[:, 1:, :, 0] = 200
    self._size = size

  def __len__(self):
    return self._size

  def __getitem__(self, index):
    return {"image": self._images[index], "label": index % 10}

  def __repr__(self):
    return f"_ArraySource(size={self._size})"


def _record_hashes(batch):
  """Hashes of (image bytes, label) per example; works on raw and preprocessed batches."""
  return [
      hashlib.sha1(np.ascontiguousarray(image).tobytes() + int(label).to_bytes(4, "little"))
      .hexdigest()
      for image, label in zip(batch["image"], batch["label"])
  ]


def _take(iterator, num_batches):
  return [next(iterator) for _ in range(num_batches)]


def _assert_batches_equal(actual, expected):
  assert len(actual) == len(expected)
  for got, want in zip(actual, expected):
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def _iterator(source, **overrides):
  kwargs = dict(
      global_batch_size=16, seed=0, process_index=0, process_count=1, worker_count=0
  )
  kwargs.update(overrides)
  return pipeline.make_train_iterator(source, **kwargs)


@pytest.fixture(scope="module")
def data_dir(fashion_mnist_dir):
  """The session's Debian-built dataset (conftest), shared by every test that reads it."""
  return fashion_mnist_dir


@pytest.fixture(scope="module")
def train_source(data_dir):
  return sources.open_image_source("fashion_mnist", "train", data_dir, source="debian")


def test_debian_build_has_both_splits_with_raw_records(data_dir, train_source):
  test_source = sources.open_image_source("fashion_mnist", "test", data_dir, source="debian")
  assert (len(train_source), len(test_source)) == (60000, 10000)
  for record in (train_source[0], test_source[123]):
    assert record["image"].dtype == np.uint8 and record["image"].shape == (28, 28, 1)
    assert isinstance(record["label"], int) and 0 <= record["label"] <= 9
  images, labels = pipeline.load_split_arrays(test_source)
  # The published test split has exactly 1000 images per class.
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), [1000] * 10)
  # Same records as the IDX files, up to the order TFDS stores them in.
  idx_images = fashion_mnist_local.read_idx(
      os.path.join(fashion_mnist_local.DEBIAN_DIR, "t10k-images-idx3-ubyte.gz")
  )
  idx_labels = fashion_mnist_local.read_idx(
      os.path.join(fashion_mnist_local.DEBIAN_DIR, "t10k-labels-idx1-ubyte.gz")
  )
  assert sorted(_record_hashes({"image": images, "label": labels})) == sorted(
      _record_hashes({"image": idx_images[..., None], "label": idx_labels})
  )


def test_prepared_dataset_is_reused_quickly(data_dir):
  start = time.perf_counter()
  debian = sources.open_image_source("fashion_mnist", "train", data_dir, source="debian")
  auto = sources.open_image_source("fashion_mnist", "train", data_dir)
  assert time.perf_counter() - start < 5.0
  assert repr(auto) == repr(debian)
  assert repr(debian) == (
      "ImageSource(dataset='fashion_mnist', split='train', tfds_name='fashion_mnist_local', "
      "num_records=60000)"
  )


@pytest.mark.parametrize(
    "kwargs, bad_value",
    [
        (dict(dataset="mnist", split="train"), "'mnist'"),
        (dict(dataset="fashion_mnist", split="validation"), "'validation'"),
        (dict(dataset="fashion_mnist", split="train", source="s3"), "'s3'"),
    ],
)
def test_unsupported_choices_name_the_bad_value(tmp_path, kwargs, bad_value):
  with pytest.raises(ValueError, match=bad_value) as error:
    sources.open_image_source(data_dir=str(tmp_path), **kwargs)
  assert "allowed" in str(error.value)


def _fail_download(*args, **kwargs):
  del args, kwargs
  raise ConnectionError("no network in tests")


def test_auto_without_any_data_says_how_to_fix(tmp_path, monkeypatch):
  monkeypatch.setattr(fashion_mnist_local, "DEBIAN_DIR", str(tmp_path / "no-debian-files"))
  monkeypatch.setattr(tfds.builder_cls("fashion_mnist"), "download_and_prepare", _fail_download)
  with pytest.raises(FileNotFoundError) as error:
    sources.open_image_source("fashion_mnist", "train", str(tmp_path / "tfds"))
  message = str(error.value)
  assert "apt-get install -y dataset-fashion-mnist" in message
  assert "no-debian-files" in message and "no network in tests" in message


def test_debian_without_files_says_how_to_fix(tmp_path, monkeypatch):
  monkeypatch.setattr(fashion_mnist_local, "DEBIAN_DIR", str(tmp_path / "no-debian-files"))
  with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
    sources.open_image_source("fashion_mnist", "train", str(tmp_path / "tfds"), source="debian")


def test_batches_from_real_source_have_model_layout(train_source):
  batch = next(_iterator(train_source, global_batch_size=32, process_count=2))
  assert batch["image"].shape == (16, 28, 28, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  assert -1.0 <= batch["image"].min() < batch["image"].max() <= 1.0
  assert np.all((0 <= batch["label"]) & (batch["label"] <= 9))


def test_process_shards_are_disjoint_and_cover_an_epoch():
  source = _ArraySource(64)
  hashes = []
  for process_index in range(2):
    iterator = _iterator(source, global_batch_size=8, process_index=process_index, process_count=2)
    # 32 examples per process per epoch, 4 per batch.
    hashes.append([h for batch in _take(iterator, 8) for h in _record_hashes(batch)])
  assert not set(hashes[0]) & set(hashes[1])
  everything = [pipeline.preprocess(source[i]) for i in range(len(source))]
  assert set(hashes[0]) | set(hashes[1]) == set(
      _record_hashes({key: [r[key] for r in everything] for key in ("image", "label")})
  )


def _epoch_orders(seed, num_epochs=2):
  """Labels are not unique, so order is read from the two index pixels of each image."""
  source = _ArraySource(64)
  batches = _take(_iterator(source, seed=seed), 4 * num_epochs)
  pixels = np.concatenate([(b["image"][:, 0, :2, 0] + 1.0) * 127.5 for b in batches])
  indices = np.rint(pixels[:, 0] + 256 * pixels[:, 1]).astype(int)
  return indices.reshape(num_epochs, 64)


def test_order_depends_on_seed_and_epoch():
  orders = _epoch_orders(seed=0)
  np.testing.assert_array_equal(np.sort(orders, axis=1), [np.arange(64)] * 2)
  assert not np.array_equal(orders[0], orders[1])
  np.testing.assert_array_equal(_epoch_orders(seed=0), orders)
  assert not np.array_equal(_epoch_orders(seed=1), orders)


def test_resume_from_state_repeats_the_same_batches():
  source = _ArraySource(64)
  iterator = _iterator(source)
  _take(iterator, 3)
  state = iterator.get_state()
  expected = _take(iterator, 3)  # Crosses the epoch boundary at batch 4.
  resumed = _iterator(source)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 3), expected)


def test_resume_with_worker_processes(train_source):
  flags.FLAGS.mark_as_parsed()
  kwargs = dict(global_batch_size=8, worker_count=1)
  iterator = _iterator(train_source, **kwargs)
  _take(iterator, 2)
  state = iterator.get_state()
  expected = _take(iterator, 3)
  iterator.close()
  resumed = _iterator(train_source, **kwargs)
  resumed.set_state(state)
  try:
    _assert_batches_equal(_take(resumed, 3), expected)
  finally:
    resumed.close()


@pytest.mark.parametrize(
    "overrides, bad_value",
    [
        (dict(global_batch_size=10, process_count=4), "global_batch_size=10"),
        (dict(process_index=2, process_count=2), "process_index=2"),
        (dict(seed=-1), "seed=-1"),
        (dict(worker_count=-1), "worker_count=-1"),
    ],
)
def test_bad_iterator_arguments_are_rejected(overrides, bad_value):
  with pytest.raises(ValueError, match=bad_value):
    _iterator(_ArraySource(64), **overrides)


def test_make_global_batch_shards_the_batch_dim():
  devices = jax.devices()
  fsdp = 2 if len(devices) % 2 == 0 else 1
  mesh = Mesh(np.array(devices).reshape(-1, fsdp), ("data", "fsdp"))
  sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  size = 2 * len(devices)
  local = {
      "image": np.random.default_rng(0).standard_normal((size, 28, 28, 1), np.float32),
      "label": np.arange(size, dtype=np.int32),
  }
  batch = pipeline.make_global_batch(local, sharding)
  for key, value in local.items():
    assert batch[key].shape == value.shape  # One process: local batch == global batch.
    assert batch[key].sharding.is_equivalent_to(sharding, value.ndim)
    np.testing.assert_array_equal(np.asarray(batch[key]), value)
  assert len(batch["image"].addressable_shards) == len(devices)


def test_load_split_arrays_returns_requested_count(train_source):
  images, labels = pipeline.load_split_arrays(train_source, 5000)
  assert images.shape == (5000, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (5000,) and labels.dtype == np.int32
  small_images, _ = pipeline.load_split_arrays(_ArraySource(64), 100)
  assert small_images.shape == (64, 28, 28, 1)  # Capped at the source size.
