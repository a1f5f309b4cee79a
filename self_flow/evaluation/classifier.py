"""A small CNN classifier whose penultimate layer is the feature space for a Fréchet distance.

Inception weights cannot be downloaded offline, so, as is usual for MNIST-like data, the project
trains its own classifier once per dataset and caches the weights on disk. Its penultimate
activations stand in for Inception features, and its logits score whether class-conditioned
samples show the requested class.
"""

import functools
import hashlib
import json
import os
import re
import time

from absl import logging
from flax import nnx
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from self_flow import storage
from self_flow.modalities import image as image_modality

# Architecture settings. They enter the cache file name, so changing one retrains the classifier;
# bump ARCHITECTURE_VERSION for a change these settings do not describe.
CONV_CHANNELS = (16, 32)
KERNEL_SIZE = 3
ARCHITECTURE_VERSION = 1
DEFAULT_FEATURE_DIM = 128
DEFAULT_NUM_CLASSES = 10

# Batch size for measuring held-out accuracy: inference only, so larger than a training batch.
_EVAL_BATCH_SIZE = 1000
# Name of the held-out accuracy entry in a cache file (parameter names never start with "__").
_ACCURACY_KEY = "__heldout_accuracy__"
_CACHE_KEY_PATTERN = re.compile(r"[A-Za-z0-9._-]+")


class FeatureClassifier(nnx.Module):
  """conv-relu-maxpool x2, dense(feature_dim)-relu, dense(num_classes) on images in [-1, 1]."""

  def __init__(self, num_classes: int, image_shape: tuple[int, int, int], feature_dim: int, *,
               rngs: nnx.Rngs):
    _check_positive_int("num_classes", num_classes, minimum=2)
    _check_positive_int("feature_dim", feature_dim)
    image_shape = tuple(image_shape)
    if (len(image_shape) != 3 or not all(isinstance(d, (int, np.integer)) for d in image_shape)
        or min(image_shape[:2], default=0) < 4 or image_shape[2] < 1):
      raise ValueError(f"image_shape must be (H, W, C) integers with H, W >= 4 (two 2x2 "
                       f"poolings) and C >= 1; got {image_shape}.")
    height, width, channels = (int(d) for d in image_shape)
    self.num_classes = num_classes
    self.image_shape = (height, width, channels)
    self.feature_dim = feature_dim
    kernel = (KERNEL_SIZE, KERNEL_SIZE)
    self.conv1 = nnx.Conv(channels, CONV_CHANNELS[0], kernel, rngs=rngs)
    self.conv2 = nnx.Conv(CONV_CHANNELS[0], CONV_CHANNELS[1], kernel, rngs=rngs)
    self.dense = nnx.Linear((height // 4) * (width // 4) * CONV_CHANNELS[1], feature_dim,
                            rngs=rngs)
    self.head = nnx.Linear(feature_dim, num_classes, rngs=rngs)

  def features(self, images: jax.Array) -> jax.Array:
    """(n, H, W, C) images in [-1, 1] -> (n, feature_dim) penultimate activations."""
    if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
      raise ValueError(f"images must have shape (n, *{self.image_shape}); got {images.shape}.")
    x = nnx.max_pool(jax.nn.relu(self.conv1(images)), (2, 2), strides=(2, 2))
    x = nnx.max_pool(jax.nn.relu(self.conv2(x)), (2, 2), strides=(2, 2))
    return jax.nn.relu(self.dense(x.reshape(x.shape[0], -1)))

  def __call__(self, images: jax.Array) -> jax.Array:
    """(n, H, W, C) images in [-1, 1] -> (n, num_classes) logits."""
    return self.head(self.features(images))


def train_classifier(images: np.ndarray, labels: np.ndarray, *, num_steps: int, batch_size: int,
                     seed: int, learning_rate: float, num_classes: int = DEFAULT_NUM_CLASSES,
                     feature_dim: int = DEFAULT_FEATURE_DIM) -> FeatureClassifier:
  """Trains a FeatureClassifier with AdamW on uint8 (n, H, W, C) images; deterministic per seed.

  The learning rate decays from `learning_rate` to 0 along a cosine over `num_steps`, since a
  short fixed-budget run ends more accurate with an annealed rate. Batches are drawn without
  replacement from a seeded shuffle, reshuffled each epoch.
  """
  _check_labelled_images("images", images, "labels", labels, num_classes)
  _check_training_settings(num_steps, batch_size, seed, learning_rate, len(images))
  learning_rate = float(learning_rate)  # a static jit argument: one hashable type
  model = FeatureClassifier(num_classes, images.shape[1:], feature_dim, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  opt_state = _optimizer(learning_rate, num_steps).init(params)
  # The whole uint8 dataset lives on the device once (47 MB for 60k 28x28 images); each step
  # only sends its batch indices.
  all_images = jnp.asarray(images)
  all_labels = jnp.asarray(labels, jnp.int32)
  rng = np.random.default_rng(seed)
  order, position = rng.permutation(len(images)), 0
  start = time.perf_counter()
  for _ in range(num_steps):
    if position + batch_size > len(order):
      order, position = rng.permutation(len(images)), 0
    indices = order[position:position + batch_size]
    position += batch_size
    params, opt_state, loss = _train_step(params, opt_state, all_images, all_labels, indices,
                                          graphdef=graphdef, learning_rate=learning_rate,
                                          num_steps=num_steps)
  logging.info("Trained the evaluation classifier: %d steps of %d in %.1f s, last loss %.4f.",
               num_steps, batch_size, time.perf_counter() - start, float(loss))
  return nnx.merge(graphdef, params)


def predict_logits(classifier: FeatureClassifier, images_float: np.ndarray,
                   batch_size: int) -> np.ndarray:
  """(n, num_classes) logits of float images in [-1, 1], in fixed-size jitted batches."""
  return _batched_apply(classifier, images_float, batch_size, "logits")


def extract_features(classifier: FeatureClassifier, images_float: np.ndarray,
                     batch_size: int) -> np.ndarray:
  """(n, feature_dim) penultimate features of float images in [-1, 1], in jitted batches."""
  return _batched_apply(classifier, images_float, batch_size, "features")


def load_or_train_classifier(
    images: np.ndarray, labels: np.ndarray, *, cache_dir: str | os.PathLike, cache_key: str,
    num_steps: int, batch_size: int, seed: int, learning_rate: float,
    num_classes: int = DEFAULT_NUM_CLASSES, feature_dim: int = DEFAULT_FEATURE_DIM,
    eval_images: np.ndarray | None = None, eval_labels: np.ndarray | None = None,
) -> tuple[FeatureClassifier, float | None]:
  """The cached classifier for these data and settings; trains and caches it when missing.

  The cache file is `<cache_dir>/<cache_key>-<hash>.npz` (`cache_dir` local or a URL,
  gs://...), where the hash covers the training settings, the architecture settings and a
  fingerprint of the training data, so changing any of them retrains rather than silently
  reusing stale weights. The file is written atomically (`storage.save_npz`), so an interrupted
  run never leaves a truncated cache.

  Returns (classifier, held-out accuracy). The accuracy is measured on (eval_images,
  eval_labels) when the classifier is trained and stored with it, so a later load returns the
  stored value; it is None when neither the cache nor this call has evaluation data.
  """
  if not isinstance(cache_key, str) or not _CACHE_KEY_PATTERN.fullmatch(cache_key):
    raise ValueError(f"cache_key must be a non-empty file-name-safe string of letters, digits, "
                     f"'.', '_' or '-'; got {cache_key!r}.")
  _check_labelled_images("images", images, "labels", labels, num_classes)
  if (eval_images is None) != (eval_labels is None):
    raise ValueError("eval_images and eval_labels must be given together; got only "
                     f"{'eval_images' if eval_labels is None else 'eval_labels'}.")
  if eval_images is not None:
    _check_labelled_images("eval_images", eval_images, "eval_labels", eval_labels, num_classes)
    if eval_images.shape[1:] != images.shape[1:]:
      raise ValueError(f"eval_images must have the training images' shape {images.shape[1:]} "
                       f"per image; got {eval_images.shape[1:]}.")

  _check_training_settings(num_steps, batch_size, seed, learning_rate, len(images))
  _check_positive_int("feature_dim", feature_dim)
  settings = {
      "architecture": {"version": ARCHITECTURE_VERSION, "conv_channels": list(CONV_CHANNELS),
                       "kernel_size": KERNEL_SIZE, "feature_dim": int(feature_dim),
                       "num_classes": int(num_classes), "image_shape": list(images.shape[1:])},
      "training": {"num_steps": int(num_steps), "batch_size": int(batch_size), "seed": int(seed),
                   "learning_rate": float(learning_rate)},
  }
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
  digest.update(np.ascontiguousarray(images).tobytes())
  digest.update(np.ascontiguousarray(labels, np.int64).tobytes())
  path = storage.join(cache_dir, f"{cache_key}-{digest.hexdigest()[:16]}.npz")

  if storage.exists(path):
    classifier, accuracy = _load(path, num_classes, images.shape[1:], feature_dim)
    logging.info("Loaded the evaluation classifier from %s.", path)
    if accuracy is None and eval_images is not None:
      accuracy = _accuracy(classifier, eval_images, eval_labels)
    return classifier, accuracy

  logging.info("Training the evaluation classifier (%d steps); it will be cached at %s.",
               num_steps, path)
  classifier = train_classifier(images, labels, num_steps=num_steps, batch_size=batch_size,
                                seed=seed, learning_rate=learning_rate, num_classes=num_classes,
                                feature_dim=feature_dim)
  accuracy = None
  if eval_images is not None:
    accuracy = _accuracy(classifier, eval_images, eval_labels)
  _save(path, classifier, accuracy)
  return classifier, accuracy


def _optimizer(learning_rate: float, num_steps: int) -> optax.GradientTransformation:
  """AdamW with a cosine decay to 0; rebuilt from the static settings inside the jitted step."""
  return optax.adamw(optax.cosine_decay_schedule(learning_rate, num_steps))


# Module-level with static settings (not a closure per call), so repeated trainings with the
# same settings and data shapes reuse one compilation.
@functools.partial(jax.jit, static_argnames=("graphdef", "learning_rate", "num_steps"))
def _train_step(params: nnx.State, opt_state: optax.OptState, all_images: jax.Array,
                all_labels: jax.Array, indices: jax.Array, *, graphdef: nnx.GraphDef,
                learning_rate: float, num_steps: int):
  """One AdamW step on the batch `indices` of the device-resident uint8 dataset."""
  x = image_modality.from_uint8(all_images[indices])
  y = all_labels[indices]

  def loss_fn(p):
    logits = nnx.merge(graphdef, p)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = _optimizer(learning_rate, num_steps).update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(graphdef: nnx.GraphDef, output: str, state: nnx.State, images: jax.Array):
  """Logits or features of one batch; module-level so every call reuses one compilation."""
  model = nnx.merge(graphdef, state)
  return model(images) if output == "logits" else model.features(images)


def _batched_apply(classifier: FeatureClassifier, images_float: np.ndarray, batch_size: int,
                   output: str) -> np.ndarray:
  """Runs `output` over images in batches, padding the last so every batch has one shape."""
  _check_positive_int("batch_size", batch_size)
  images_float = np.asarray(images_float)
  expected = classifier.image_shape
  if images_float.ndim != 4 or images_float.shape[1:] != expected or not len(images_float):
    raise ValueError(f"images_float must have shape (n >= 1, *{expected}); "
                     f"got {images_float.shape}.")
  if not np.issubdtype(images_float.dtype, np.floating):
    raise ValueError(f"images_float must be floats in [-1, 1]; got dtype {images_float.dtype} "
                     "(convert uint8 pixels with x / 127.5 - 1).")
  low, high = float(images_float.min()), float(images_float.max())
  if not (np.isfinite(low) and np.isfinite(high) and low >= -1.001 and high <= 1.001):
    raise ValueError(f"images_float must lie in [-1, 1]; got values in [{low}, {high}].")
  graphdef, state = nnx.split(classifier)
  batch_size = min(batch_size, len(images_float))  # small inputs need no padding to a big batch
  outputs = []
  for start in range(0, len(images_float), batch_size):
    chunk = images_float[start:start + batch_size].astype(np.float32)
    padded = np.pad(chunk, [(0, batch_size - len(chunk)), (0, 0), (0, 0), (0, 0)])
    outputs.append(np.asarray(_apply(graphdef, output, state, padded))[:len(chunk)])
  return np.concatenate(outputs)


def _accuracy(classifier: FeatureClassifier, images: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 accuracy on uint8 images, to report how trustworthy the feature space is."""
  logits = predict_logits(classifier, image_modality.from_uint8(images), _EVAL_BATCH_SIZE)
  return float(np.mean(logits.argmax(-1) == labels))


def _save(path: str, classifier: FeatureClassifier, accuracy: float | None) -> None:
  """Writes the flattened parameters (and accuracy) to `path` atomically."""
  arrays = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(classifier)), sep="/")
  arrays = {name: np.asarray(value) for name, value in arrays.items()}
  if accuracy is not None:
    arrays[_ACCURACY_KEY] = np.asarray(accuracy, np.float64)
  storage.save_npz(path, arrays)


def _load(path: str, num_classes: int, image_shape: tuple[int, ...],
          feature_dim: int) -> tuple[FeatureClassifier, float | None]:
  """Rebuilds the classifier stored at `path`, checking every parameter's name and shape."""
  abstract = nnx.eval_shape(
      lambda: FeatureClassifier(num_classes, image_shape, feature_dim, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  expected = traverse_util.flatten_dict(nnx.to_pure_dict(abstract_state), sep="/")
  arrays = storage.load_npz(path)
  accuracy = arrays.pop(_ACCURACY_KEY, None)
  found = {name: value.shape for name, value in arrays.items()}
  wanted = {name: tuple(value.shape) for name, value in expected.items()}
  if found != wanted:
    raise ValueError(f"cache file {path} holds parameters {found}, but the classifier needs "
                     f"{wanted}; delete the file to retrain.")
  pure = traverse_util.unflatten_dict(
      {name: jnp.asarray(value, expected[name].dtype) for name, value in arrays.items()},
      sep="/")
  return nnx.merge(graphdef, pure), None if accuracy is None else float(accuracy)


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")


def _check_training_settings(num_steps, batch_size, seed, learning_rate,
                             num_images: int) -> None:
  _check_positive_int("num_steps", num_steps)
  _check_positive_int("batch_size", batch_size)
  if batch_size > num_images:
    raise ValueError(f"batch_size must be <= the number of images ({num_images}); "
                     f"got {batch_size}.")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be an integer >= 0; got {seed!r}.")
  if (isinstance(learning_rate, bool)
      or not isinstance(learning_rate, (int, float, np.integer, np.floating))
      or not 0 < learning_rate < float("inf")):
    raise ValueError(f"learning_rate must be a finite float > 0; got {learning_rate!r}.")


def _check_labelled_images(images_name: str, images, labels_name: str, labels,
                           num_classes: int) -> None:
  """uint8 (n >= 1, H, W, C) images with n integer labels in [0, num_classes)."""
  _check_positive_int("num_classes", num_classes, minimum=2)
  if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"{images_name} must be a uint8 numpy array (n, H, W, C); got "
                     f"{getattr(images, 'dtype', type(images))} of shape "
                     f"{getattr(images, 'shape', None)}.")
  if (not isinstance(labels, np.ndarray) or not np.issubdtype(labels.dtype, np.integer)
      or labels.shape != images.shape[:1] or not len(labels)):
    raise ValueError(f"{labels_name} must be a non-empty integer numpy array of shape "
                     f"{images.shape[:1]} (one per image); got "
                     f"{getattr(labels, 'dtype', type(labels))} of shape "
                     f"{getattr(labels, 'shape', None)}.")
  low, high = int(labels.min()), int(labels.max())
  if low < 0 or high >= num_classes:
    raise ValueError(f"{labels_name} must lie in [0, {num_classes}) (num_classes="
                     f"{num_classes}); got values in [{low}, {high}].")
