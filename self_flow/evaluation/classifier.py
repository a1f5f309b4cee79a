"""A small CNN classifier whose penultimate layer is the feature space of our Fréchet distance.

Offline there are no Inception weights, so (as is usual for MNIST-like data) the project trains
its own classifier once per dataset and caches it; the same network then scores whether
class-conditioned samples show the requested class.
"""

import hashlib
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx

ARCHITECTURE_VERSION = "cnn32-64-v1"  # Bump when the network changes, to invalidate caches.


class FeatureClassifier(nnx.Module):
  """conv(32)-pool-conv(64)-pool-dense(feature_dim)-dense(classes) on images in [-1, 1]."""

  def __init__(self, *, num_classes: int, image_shape: tuple[int, int, int], feature_dim: int,
               rngs: nnx.Rngs):
    height, width, channels = image_shape
    self.conv1 = nnx.Conv(channels, 32, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
    self.dense = nnx.Linear((height // 4) * (width // 4) * 64, feature_dim, rngs=rngs)
    self.head = nnx.Linear(feature_dim, num_classes, rngs=rngs)

  def features(self, images: jax.Array) -> jax.Array:
    x = nnx.avg_pool(jax.nn.relu(self.conv1(images)), (2, 2), strides=(2, 2))
    x = nnx.avg_pool(jax.nn.relu(self.conv2(x)), (2, 2), strides=(2, 2))
    return jax.nn.relu(self.dense(x.reshape(x.shape[0], -1)))

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.head(self.features(images))


def _to_float(images_uint8: np.ndarray) -> np.ndarray:
  return images_uint8.astype(np.float32) / 127.5 - 1.0


def train_classifier(images: np.ndarray, labels: np.ndarray, *, num_steps: int, batch_size: int,
                     seed: int, learning_rate: float, feature_dim: int = 128,
                     num_classes: int | None = None) -> FeatureClassifier:
  """AdamW training on uint8 images; deterministic for a seed."""
  if len(images) != len(labels) or len(images) < batch_size:
    raise ValueError(f"need as many labels as images and at least batch_size={batch_size} of "
                     f"them; got {len(images)} images, {len(labels)} labels.")
  num_classes = num_classes or int(labels.max()) + 1
  model = FeatureClassifier(num_classes=num_classes, image_shape=images.shape[1:],
                            feature_dim=feature_dim, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.adamw(learning_rate)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = nnx.merge(graphdef, p)(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  order = rng.permutation(len(images))
  position = 0
  for _ in range(num_steps):
    if position + batch_size > len(order):
      order, position = rng.permutation(len(images)), 0
    idx = order[position:position + batch_size]
    position += batch_size
    params, opt_state, _ = step(params, opt_state, _to_float(images[idx]), labels[idx])
  return nnx.merge(graphdef, params)


def _batched(fn, classifier, images_float, batch_size):
  graphdef, params = nnx.split(classifier)
  apply = jax.jit(lambda p, x: fn(nnx.merge(graphdef, p), x))
  outputs = []
  for start in range(0, len(images_float), batch_size):
    chunk = np.asarray(images_float[start:start + batch_size], np.float32)
    padded = np.pad(chunk, [(0, batch_size - len(chunk))] + [(0, 0)] * (chunk.ndim - 1))
    outputs.append(np.asarray(apply(params, padded))[:len(chunk)])
  return np.concatenate(outputs)


def predict_logits(classifier: FeatureClassifier, images_float, batch_size: int) -> np.ndarray:
  """Logits for float images in [-1, 1], in fixed-size jitted batches."""
  return _batched(lambda m, x: m(x), classifier, images_float, batch_size)


def extract_features(classifier: FeatureClassifier, images_float, batch_size: int) -> np.ndarray:
  """Penultimate-layer features for float images in [-1, 1]."""
  return _batched(lambda m, x: m.features(x), classifier, images_float, batch_size)


def load_or_train_classifier(images, labels, *, cache_dir: str, cache_key: str, num_steps: int,
                             batch_size: int, seed: int, learning_rate: float,
                             feature_dim: int = 128, eval_images=None, eval_labels=None
                             ) -> tuple[FeatureClassifier, float | None]:
  """The cached classifier for these data and settings, training (and caching) it if missing.

  The cache file name hashes the settings, the architecture version and a fingerprint of the
  data, so changing any of them retrains. Returns (classifier, held-out accuracy or None).
  """
  num_classes = int(labels.max()) + 1
  settings = dict(architecture=ARCHITECTURE_VERSION, num_steps=num_steps, batch_size=batch_size,
                  seed=seed, learning_rate=learning_rate, feature_dim=feature_dim,
                  image_shape=list(images.shape[1:]), num_classes=num_classes)
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
  digest.update(np.ascontiguousarray(images[:1000]).tobytes())
  digest.update(str(len(images)).encode())
  path = epath.Path(cache_dir) / f"{cache_key}-{digest.hexdigest()[:16]}.npz"
  template = FeatureClassifier(num_classes=num_classes, image_shape=images.shape[1:],
                               feature_dim=feature_dim, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(template, nnx.Param)
  flat_keys = [jax.tree_util.keystr(k) for k, _ in
               jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]]
  if path.exists():
    with path.open("rb") as f:
      stored = np.load(io.BytesIO(f.read()))
      leaves = [stored[k] for k in flat_keys]
      accuracy = float(stored["__accuracy__"]) if "__accuracy__" in stored else None
    treedef = jax.tree.structure(nnx.to_pure_dict(params))
    logging.info("Loaded the evaluation classifier from %s.", path)
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves)), accuracy

  logging.info("Training the evaluation classifier (%d steps); cached at %s.", num_steps, path)
  classifier = train_classifier(images, labels, num_steps=num_steps, batch_size=batch_size,
                                seed=seed, learning_rate=learning_rate, feature_dim=feature_dim,
                                num_classes=num_classes)
  accuracy = None
  arrays = dict(zip(flat_keys, jax.tree.leaves(
      nnx.to_pure_dict(nnx.state(classifier, nnx.Param)))))
  if eval_images is not None:
    logits = predict_logits(classifier, _to_float(eval_images), 500)
    accuracy = float(np.mean(logits.argmax(-1) == eval_labels))
    arrays["__accuracy__"] = np.asarray(accuracy)
  path.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_bytes(buffer.getvalue())
  tmp.rename(path)  # atomic: a crash never leaves a half-written cache file
  return classifier, accuracy
