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
from PIL import Image, PngImagePlugin

from self_flow import conditioning, sampling, sharding, train_state
from self_flow.data import captions as caption_lib
from self_flow.data import pipeline, sources
from self_flow.evaluation import classifier as classifier_lib
from self_flow.evaluation import frechet
from self_flow.modalities import image
from self_flow.text import tokenizer


def make_image_sampler(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                       mesh: jax.sharding.Mesh):
  """sample(ema_params, cond, rng) -> images (B, H, W, C) in [-1, 1], jitted.

  `cond` is the model's conditioning pytree (labels (B,) or a text dict); it (hence the samples)
  is split over the mesh's batch axes, and the images come back replicated so every process can
  read them.
  """
  size, patch = config.data.image_size, config.model.patch_size
  pos = image.position_ids(size, size, patch)
  token_dim = patch * patch * config.data.num_channels
  s = config.sampling

  def sample(params, cond, rng):
    model = train_state.merge(graphdef, params)
    key_noise, key_sde = jax.random.split(rng)
    batch = jax.tree.leaves(cond)[0].shape[0]

    def velocity_fn(x, t, c):
      b, n, _ = x.shape
      velocity, _ = model(x, jnp.broadcast_to(pos, (b, n, 3)), t[:, None],
                          jnp.zeros((b, n), jnp.int32), c)
      return velocity

    guided = sampling.guided_velocity_fn(
        velocity_fn, cfg_scale=s.cfg_scale,
        null_cond=conditioning.null_like(cond, config.data.num_classes),
        guidance_interval=(s.guidance_low, s.guidance_high))
    x1 = jax.random.normal(key_noise, (batch, pos.shape[0], token_dim))
    tokens = sampling.sample(guided, x1, cond, key_sde, method=s.method,
                             num_steps=s.num_steps, shift=s.shift)
    return jnp.clip(image.unpatchify(tokens, patch, size, size), -1.0, 1.0)

  return jax.jit(sample, in_shardings=(None, sharding.batch_sharding(mesh),
                                       sharding.replicated(mesh)),
                 out_shardings=sharding.replicated(mesh))


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
    self._batch_sharding = sharding.batch_sharding(mesh)
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
    held_out = image.from_uint8(test_images[:ev.num_samples])
    self._reference = frechet.feature_statistics(self._features(held_out))

  def _features(self, images: np.ndarray) -> np.ndarray:
    return classifier_lib.extract_features(self._classifier, images, self.config.eval.batch_size)

  def condition(self, labels: np.ndarray, captions: list[str] | None = None):
    """Host conditioning for `labels`: the labels, or tokenized captions (held-out phrasings of
    the labels' classes unless `captions` are given)."""
    if self.config.model.conditioning == "class":
      return labels
    if captions is None:
      captions = [caption_lib.heldout_caption(int(y), i) for i, y in enumerate(labels)]
    tokens, mask = tokenizer.tokenize(captions, self.config.text.max_length)
    return {"tokens": tokens, "mask": mask}

  def generate(self, ema_params, cond, seed: int) -> np.ndarray:
    """Samples in [-1, 1] for a host conditioning pytree, in `eval.batch_size` chunks."""
    chunk = self.config.eval.batch_size
    total = jax.tree.leaves(cond)[0].shape[0]
    outputs = []
    for i, start in enumerate(range(0, total, chunk)):
      part = jax.tree.map(lambda a, s=start: a[s:s + chunk], cond)
      count = jax.tree.leaves(part)[0].shape[0]
      # One compiled shape for every chunk: pad the last one.
      padded = jax.tree.map(
          lambda a, c=count: np.pad(a, [(0, chunk - c)] + [(0, 0)] * (a.ndim - 1)), part)
      # Every process holds the same values; each contributes the shards its devices own.
      global_cond = jax.tree.map(
          lambda a: jax.make_array_from_callback(a.shape, self._batch_sharding,
                                                 lambda index, a=a: a[index]), padded)
      rng = jax.random.fold_in(jax.random.PRNGKey(seed), i)
      outputs.append(np.asarray(self._sample(ema_params, global_cond, rng))[:count])
    return np.concatenate(outputs)

  def evaluate(self, ema_params, step: int, writer) -> dict[str, float]:
    """FD and class accuracy of `eval.num_samples` samples; writes a grid PNG and scalars."""
    if self._classifier is None:
      self._prepare()
    ev, num_classes = self.config.eval, self.config.data.num_classes
    labels = np.arange(ev.num_samples) % num_classes
    accuracy_name = ("eval/class_accuracy" if self.config.model.conditioning == "class"
                     else "eval/text_faithfulness")
    samples = self.generate(ema_params, self.condition(labels), seed=self.config.seed + 1)
    stats = frechet.feature_statistics(self._features(samples))
    logits = classifier_lib.predict_logits(self._classifier, samples, ev.batch_size)
    results = {
        "eval/fd": frechet.frechet_distance(*stats, *self._reference),
        # Class accuracy of class-conditioned samples, or text faithfulness: the accuracy of
        # samples generated from held-out caption phrasings.
        accuracy_name: float(np.mean(logits.argmax(-1) == labels)),
        "eval/classifier_heldout_accuracy": float(self.classifier_accuracy),
    }
    writer.write_scalars(step, results)
    self._write_grid(ema_params, step, writer)
    return results

  def _write_grid(self, ema_params, step: int, writer) -> None:
    """A grid of samples for fixed conditions: one column per class, or per prompt of
    `eval.prompts` (text); the prompts go into the PNG's text chunk and a .txt beside it."""
    ev = self.config.eval
    if self.config.model.conditioning == "text" and ev.prompts:
      prompts = list(ev.prompts)
      columns = len(prompts)
      cond = self.condition(np.zeros(columns * ev.grid_rows, np.int32), prompts * ev.grid_rows)
      name = f"step_{step:08d}_prompts"
    else:
      columns = min(ev.grid_classes_per_row, self.config.data.num_classes)
      labels = np.tile(np.arange(columns), ev.grid_rows)
      cond = self.condition(labels)
      prompts = None
      name = f"step_{step:08d}_classes_0-{columns - 1}_per_column"
    samples = self.generate(ema_params, cond, seed=self.config.seed + 2)
    grid = make_grid(image.to_uint8(samples), columns)
    writer.write_images(step, {"samples": grid[None]})
    if prompts:
      writer.write_texts(step, {"sample_prompts": " | ".join(prompts)})
    if jax.process_index() == 0:
      directory = self.workdir / "samples"
      directory.mkdir(parents=True, exist_ok=True)
      info = PngImagePlugin.PngInfo()
      if prompts:
        info.add_text("prompts", "\n".join(prompts))
        (directory / f"{name}.txt").write_text(
            "".join(f"column {i}: {p}\n" for i, p in enumerate(prompts)))
      buffer = io.BytesIO()
      Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(
          buffer, "PNG", pnginfo=info)
      (directory / f"{name}.png").write_bytes(buffer.getvalue())
