"""Tests of the offline evaluation: Fréchet distance, feature classifier, and its disk cache.

The classifier is trained on a synthetic 10-class dataset (a bright square at a class-specific
position on noise), which a working CNN learns in about a hundred tiny steps.
"""

import os

import flax
import jax
import numpy as np
import pytest
from scipy import linalg

from self_flow.evaluation import classifier as classifier_lib
from self_flow.evaluation import frechet
from equivalence import assert_equivalent, assert_fault_detected, rounding_bound

flax.config.update("flax_always_shard_variable", False)

NUM_CLASSES = 10
FEATURE_DIM = 32
# Quick trainings share these settings and SMALL_N images, so they share one compilation.
SMALL_N = 32
SMALL = dict(num_steps=2, batch_size=8, seed=0, learning_rate=1e-3, feature_dim=8)


def synthetic_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """uint8 (n, 28, 28, 1) noise with a bright 4x4 square whose position encodes the label."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, NUM_CLASSES, n)
  images = rng.integers(0, 80, (n, 28, 28, 1)).astype(np.uint8)
  for image, label in zip(images, labels):
    row, col = 4 + 12 * (label // 5), 1 + 5 * (label % 5)
    image[row:row + 4, col:col + 4] = rng.integers(200, 256, (4, 4, 1))
  return images, labels


def to_float(images: np.ndarray) -> np.ndarray:
  return images.astype(np.float32) / 127.5 - 1.0


@pytest.fixture(scope="module")
def trained():
  images, labels = synthetic_images(600, seed=0)
  return classifier_lib.train_classifier(images, labels, num_steps=150, batch_size=16, seed=0,
                                         learning_rate=3e-3, feature_dim=FEATURE_DIM)


# Fréchet distance.


def random_covariance(rng: np.random.Generator, dim: int) -> np.ndarray:
  a = rng.normal(size=(dim, dim))
  return a @ a.T / dim + 0.1 * np.eye(dim)


def test_frechet_distance_of_identical_statistics_is_zero():
  features = np.random.default_rng(0).normal(size=(300, 16))
  mu, cov = frechet.feature_statistics(features)
  assert mu.dtype == cov.dtype == np.float64 and cov.shape == (16, 16)
  assert abs(frechet.frechet_distance(mu, cov, mu, cov)) < 1e-8


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
  a, b = rng.uniform(0.1, 3.0, 8), rng.uniform(0.1, 3.0, 8)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_distance_matches_general_matrix_square_root():
  rng = np.random.default_rng(2)
  mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
  cov1, cov2 = random_covariance(rng, 12), random_covariance(rng, 12)
  expected = (np.sum((mu1 - mu2) ** 2)
              + np.trace(cov1 + cov2 - 2 * np.real(linalg.sqrtm(cov1 @ cov2))))
  np.testing.assert_allclose(frechet.frechet_distance(mu1, cov1, mu2, cov2), expected,
                             rtol=1e-8)


def test_frechet_distance_is_symmetric():
  rng = np.random.default_rng(3)
  mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
  cov1, cov2 = random_covariance(rng, 10), random_covariance(rng, 10)
  np.testing.assert_allclose(frechet.frechet_distance(mu1, cov1, mu2, cov2),
                             frechet.frechet_distance(mu2, cov2, mu1, cov1), rtol=1e-10)


def test_frechet_distance_grows_with_a_shift():
  features = np.random.default_rng(4).normal(size=(400, 6))
  mu, cov = frechet.feature_statistics(features)
  distances = []
  for shift in (0.5, 1.0, 2.0):
    shifted_mu, shifted_cov = frechet.feature_statistics(features + shift)
    distances.append(frechet.frechet_distance(mu, cov, shifted_mu, shifted_cov))
  np.testing.assert_allclose(distances, [6 * s**2 for s in (0.5, 1.0, 2.0)], rtol=1e-8)


def test_frechet_distance_handles_singular_covariances():
  rng = np.random.default_rng(5)
  few = rng.normal(size=(20, 50))  # fewer samples than features: rank-deficient covariances
  distance = frechet.frechet_distance(*frechet.feature_statistics(few),
                                      *frechet.feature_statistics(few))
  assert np.isfinite(distance) and abs(distance) < 1e-5


def test_frechet_distance_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match=r"mu1 \(3,\).*mu2 \(4,\)"):
    frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match=r"cov1 \(3, 2\)"):
    frechet.frechet_distance(np.zeros(3), np.zeros((3, 2)), np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match=r"\(n >= 2, F >= 1\).*\(5,\)"):
    frechet.feature_statistics(np.zeros(5))


# Classifier.


def test_classifier_learns_synthetic_classes(trained):
  images, labels = synthetic_images(300, seed=1)
  logits = classifier_lib.predict_logits(trained, to_float(images), batch_size=64)
  assert logits.shape == (300, NUM_CLASSES)
  assert np.mean(logits.argmax(-1) == labels) > 0.9


def test_features_have_feature_dim_and_do_not_depend_on_batching(trained):
  images = to_float(synthetic_images(50, seed=2)[0])
  features = classifier_lib.extract_features(trained, images, batch_size=64)
  assert features.shape == (50, FEATURE_DIM)
  # Other batching, same per-image math: equal up to the convnet's rounding (a bound of a few
  # thousand float32 roundings; measured 0 to 1e-7 of the scale).
  bound = rounding_bound(4096)
  assert_equivalent(classifier_lib.extract_features(trained, images, batch_size=7), features,
                    bound=bound)
  assert_fault_detected(features[1:], features[:-1], bound=bound,
                        fault="features one image off across batches")
  logits = classifier_lib.predict_logits(trained, images, batch_size=64)
  assert_equivalent(logits, np.asarray(trained(images)), bound=bound)


def test_frechet_distance_in_feature_space_separates_distributions(trained):
  def stats(images):
    return frechet.feature_statistics(
        classifier_lib.extract_features(trained, images, batch_size=256))

  reference = stats(to_float(synthetic_images(500, seed=3)[0]))
  same = stats(to_float(synthetic_images(500, seed=4)[0]))
  pixels = to_float(synthetic_images(500, seed=5)[0])
  rng = np.random.default_rng(6)
  shuffled = rng.permuted(pixels.reshape(500, -1), axis=1).reshape(pixels.shape)
  noise = rng.uniform(-1, 1, pixels.shape).astype(np.float32)
  fd_same = frechet.frechet_distance(*reference, *same)
  assert fd_same < frechet.frechet_distance(*reference, *stats(shuffled)) / 10
  assert fd_same < frechet.frechet_distance(*reference, *stats(noise)) / 10


def test_training_is_deterministic_for_a_seed():
  images, labels = synthetic_images(SMALL_N, seed=7)

  def params(seed):
    model = classifier_lib.train_classifier(images, labels, **(SMALL | dict(seed=seed)))
    return jax.tree.leaves(flax.nnx.state(model))

  first, again, other = params(0), params(0), params(1)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=1000), "batch_size must be <= the number of images"),
    (dict(num_steps=0), "num_steps must be an integer >= 1; got 0"),
    (dict(learning_rate=-1.0), "learning_rate must be a finite float > 0; got -1.0"),
    (dict(num_classes=5), r"labels must lie in \[0, 5\)"),
])
def test_train_classifier_rejects_bad_settings(kwargs, message):
  images, labels = synthetic_images(SMALL_N, seed=8)
  settings = dict(num_steps=1, batch_size=8, seed=0, learning_rate=1e-3) | kwargs
  with pytest.raises(ValueError, match=message):
    classifier_lib.train_classifier(images, labels, **settings)


def test_bad_images_are_rejected(trained):
  images, labels = synthetic_images(8, seed=9)
  with pytest.raises(ValueError, match="images must be a uint8 numpy array"):
    classifier_lib.train_classifier(to_float(images), labels, num_steps=1, batch_size=4, seed=0,
                                    learning_rate=1e-3)
  unscaled = images.astype(np.float32)  # pixels in [0, 255] rather than [-1, 1]
  unscaled[0, 0, 0, 0], unscaled[0, 0, 1, 0] = 0.0, 255.0
  with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]; got values in \[0.0, 255.0\]"):
    classifier_lib.predict_logits(trained, unscaled, batch_size=4)
  with pytest.raises(ValueError, match=r"shape \(n >= 1, \*\(28, 28, 1\)\)"):
    classifier_lib.extract_features(trained, np.zeros((2, 32, 32, 1), np.float32), 4)


# Cache.


def cache_files(directory) -> list[str]:
  return sorted(os.listdir(directory))


def test_cache_round_trip_loads_without_retraining(tmp_path, monkeypatch):
  images, labels = synthetic_images(SMALL_N, seed=10)
  eval_images, eval_labels = synthetic_images(40, seed=11)
  settings = dict(cache_dir=str(tmp_path), cache_key="synthetic", **SMALL)
  model, accuracy = classifier_lib.load_or_train_classifier(
      images, labels, eval_images=eval_images, eval_labels=eval_labels, **settings)
  files = cache_files(tmp_path)
  assert len(files) == 1 and files[0].startswith("synthetic-") and files[0].endswith(".npz")
  assert 0.0 <= accuracy <= 1.0

  def no_training(*args, **kwargs):
    raise AssertionError("the cached classifier should have been loaded, not retrained")

  monkeypatch.setattr(classifier_lib, "train_classifier", no_training)
  loaded, loaded_accuracy = classifier_lib.load_or_train_classifier(images, labels, **settings)
  assert loaded_accuracy == accuracy  # stored in the cache, though no eval data was given
  x = to_float(eval_images)
  np.testing.assert_array_equal(classifier_lib.predict_logits(loaded, x, 16),
                                classifier_lib.predict_logits(model, x, 16))
  assert cache_files(tmp_path) == files


def test_changed_settings_or_data_use_a_new_cache_file(tmp_path):
  images, labels = synthetic_images(SMALL_N, seed=12)
  settings = dict(cache_dir=str(tmp_path), cache_key="synthetic", **SMALL)
  _, accuracy = classifier_lib.load_or_train_classifier(images, labels, **settings)
  assert accuracy is None
  classifier_lib.load_or_train_classifier(images, labels, **(settings | dict(learning_rate=2e-3)))
  model, _ = classifier_lib.load_or_train_classifier(images, labels,
                                                     **(settings | dict(feature_dim=4)))
  assert model.feature_dim == 4
  classifier_lib.load_or_train_classifier(images[::-1].copy(), labels[::-1].copy(), **settings)
  files = cache_files(tmp_path)
  assert len(files) == 4 and all(f.startswith("synthetic-") for f in files), files


def test_load_or_train_rejects_bad_cache_key_and_lone_eval_data(tmp_path):
  images, labels = synthetic_images(16, seed=13)
  settings = dict(cache_dir=str(tmp_path), num_steps=1, batch_size=8, seed=0,
                  learning_rate=1e-3)
  with pytest.raises(ValueError, match=r"cache_key must be .*got '../escape'"):
    classifier_lib.load_or_train_classifier(images, labels, cache_key="../escape", **settings)
  with pytest.raises(ValueError, match="got only eval_images"):
    classifier_lib.load_or_train_classifier(images, labels, cache_key="k", eval_images=images,
                                            **settings)
