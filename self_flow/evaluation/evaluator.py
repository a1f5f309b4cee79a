"""Offline evaluation of the EMA model: samples, Fréchet distance, class accuracy, sample grids.

No Inception weights are available offline, so the feature space is a small classifier trained
once on the embedded dataset and cached (`classifier.load_or_train_classifier`); the same
classifier scores whether class-conditioned samples show the requested class.
"""

import io

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from PIL import Image

from self_flow import sampling, sharding, train_state
from self_flow.data import pipeline, sources
from self_flow.evaluation import classifier as classifier_lib
from self_flow.evaluation import frechet
from self_flow.modalities import image


def make_image_sampler(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                       mesh: jax.sharding.Mesh):
  """sample(ema_params, labels (B,), rng) -> images (B, H, W, C) in [-1, 1], jitted.

  Labels (hence samples) are split over the mesh's batch axes; the images come back replicated
  so every process can read them.
  """
  size, patch = config.data.image_size, config.model.patch_size
  pos = image.position_ids(size, size, patch)
  token_dim = patch * patch * config.data.num_channels
  s = config.sampling

  def sample(params, labels, rng):
    model = train_state.merge(graphdef, params)
    key_noise, key_sde = jax.random.split(rng)

    def velocity_fn(x, t, cond):
      b, n, _ = x.shape
      velocity, _ = model(x, jnp.broadcast_to(pos, (b, n, 3)), t[:, None],
                          jnp.zeros((b, n), jnp.int32), cond)
      return velocity

    guided = sampling.guided_velocity_fn(
        velocity_fn, cfg_scale=s.cfg_scale, null_cond=jnp.full_like(labels, model.null_class),
        guidance_interval=(s.guidance_low, s.guidance_high))
    x1 = jax.random.normal(key_noise, (labels.shape[0], pos.shape[0], token_dim))
    tokens = sampling.sample(guided, x1, labels, key_sde, method=s.method,
                             num_steps=s.num_steps, shift=s.shift)
    return jnp.clip(image.unpatchify(tokens, patch, size, size), -1.0, 1.0)

  return jax.jit(sample, in_shardings=(None, sharding.batch_sharding(mesh),
                                       sharding.replicated(mesh)),
                 out_shardings=sharding.replicated(mesh))


def to_uint8(images: np.ndarray) -> np.ndarray:
  return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, columns: int) -> np.ndarray:
  """(N, H, W, C) uint8 -> one (rows*H, columns*W, C) mosaic with 1-pixel gaps."""
  n, h, w, c = images.shape
  rows = -(-n // columns)
  grid = np.zeros((rows * (h + 1) - 1, columns * (w + 1) - 1, c), np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, columns)
    grid[r * (h + 1):r * (h + 1) + h, col * (w + 1):col * (w + 1) + w] = img
  return grid


class ImageEvaluator:
  """Evaluates EMA params; the classifier and reference statistics are built on first use."""

  def __init__(self, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, workdir: str,
               mesh: jax.sharding.Mesh):
    self.config = config
    self.workdir = epath.Path(workdir)
    self._sample = make_image_sampler(config, graphdef, mesh)
    self._label_sharding = sharding.batch_sharding(mesh)
    self._classifier = None
    self._reference = None
    self.classifier_accuracy = None

  def _prepare(self):
    data, ev = self.config.data, self.config.eval
    train = sources.open_image_source(data.dataset, "train", data.data_dir, data.source)
    test = sources.open_image_source(data.dataset, "test", data.data_dir, data.source)
    train_images, train_labels = pipeline.load_split_arrays(train)
    test_images, test_labels = pipeline.load_split_arrays(test)
    self._classifier, self.classifier_accuracy = classifier_lib.load_or_train_classifier(
        train_images, train_labels, cache_dir=ev.cache_dir, cache_key=f"{data.dataset}",
        num_steps=ev.classifier_steps, batch_size=ev.classifier_batch_size, seed=0,
        learning_rate=ev.classifier_learning_rate, num_classes=data.num_classes,
        eval_images=test_images,
        eval_labels=test_labels)
    logging.info("Evaluation classifier: held-out accuracy %.4f.", self.classifier_accuracy)
    held_out = test_images[:ev.num_samples].astype(np.float32) / 127.5 - 1.0
    self._reference = frechet.feature_statistics(self._features(held_out))

  def _features(self, images: np.ndarray) -> np.ndarray:
    return classifier_lib.extract_features(self._classifier, images, self.config.eval.batch_size)

  def generate(self, ema_params, labels: np.ndarray, seed: int) -> np.ndarray:
    """Class-conditional samples in [-1, 1], generated in `eval.batch_size` chunks."""
    chunk = self.config.eval.batch_size
    outputs = []
    for i, start in enumerate(range(0, len(labels), chunk)):
      part = labels[start:start + chunk]
      padded = np.pad(part, (0, chunk - len(part)))  # one compiled shape for every chunk
      rng = jax.random.fold_in(jax.random.PRNGKey(seed), i)
      # Every process holds the same labels; each contributes the shards its devices own.
      global_labels = jax.make_array_from_callback(padded.shape, self._label_sharding,
                                                   lambda index, p=padded: p[index])
      outputs.append(np.asarray(self._sample(ema_params, global_labels, rng))[:len(part)])
    return np.concatenate(outputs)

  def evaluate(self, ema_params, step: int, writer) -> dict[str, float]:
    """FD and class accuracy of `eval.num_samples` samples; writes a grid PNG and scalars."""
    if self._classifier is None:
      self._prepare()
    ev, num_classes = self.config.eval, self.config.data.num_classes
    labels = np.arange(ev.num_samples) % num_classes
    samples = self.generate(ema_params, labels, seed=self.config.seed + 1)
    stats = frechet.feature_statistics(self._features(samples))
    logits = classifier_lib.predict_logits(self._classifier, samples, ev.batch_size)
    results = {
        "eval/fd": frechet.frechet_distance(*stats, *self._reference),
        "eval/class_accuracy": float(np.mean(logits.argmax(-1) == labels)),
        "eval/classifier_heldout_accuracy": float(self.classifier_accuracy),
    }
    writer.write_scalars(step, results)
    self._write_grid(ema_params, step, writer)
    return results

  def _write_grid(self, ema_params, step: int, writer) -> None:
    ev = self.config.eval
    columns = min(ev.grid_classes_per_row, self.config.data.num_classes)
    labels = np.tile(np.arange(columns), ev.grid_rows)
    grid = make_grid(to_uint8(self.generate(ema_params, labels, seed=self.config.seed + 2)),
                     columns)
    writer.write_images(step, {"samples": grid[None]})
    if jax.process_index() == 0:
      directory = self.workdir / "samples"
      directory.mkdir(parents=True, exist_ok=True)
      buffer = io.BytesIO()
      Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(buffer, "PNG")
      (directory / f"step_{step:08d}_classes_0-{columns - 1}_per_column.png").write_bytes(
          buffer.getvalue())
