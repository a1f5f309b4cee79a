"""Offline evaluation of an image model (EMA or live params): samples, FD, class accuracy, grids.

No Inception weights are available offline, so the feature space is a small classifier trained
once on the embedded dataset and cached (`classifier.load_or_train_classifier`); the same
classifier scores whether class- or caption-conditioned samples show the requested class.
Optional, by config: a linear probe of the model's hidden states per block and noise level
(`eval.probe_examples` > 0, `linear_probe.py`) and the held-out flow loss per timestep bin
(`eval.loss_bins` > 0, `stratified_loss.py`).
Metrics are named `eval/image/...`; video and audio have their own evaluators beside this one.
"""

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from self_flow import conditioning, config_resolution, sharding
from self_flow.data import captions as caption_lib
from self_flow.data import modality_sources, pipeline
from self_flow.evaluation import classifier as classifier_lib
from self_flow.evaluation import (captioned_grid, chunking, frechet, generation,
                                  linear_probe, stratified_loss)
from self_flow.modalities import image


class ImageEvaluator:
  """Evaluates params (EMA or live student); classifier and reference built on first use."""

  def __init__(self, config: ml_collections.ConfigDict,
               resolved: config_resolution.ResolvedConfig, graphdef: nnx.GraphDef, workdir: str,
               mesh: jax.sharding.Mesh):
    self.config = config
    self.workdir = workdir
    self.spec = resolved.spec("image")
    self.generate = generation.Generator(config, graphdef, mesh, self.spec)
    self._classifier = None
    self._reference = None
    self.classifier_accuracy = None
    self._batch_sharding = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)
    ev = config.eval
    self.probe_layers = linear_probe.resolve_layers(ev.probe_layers, resolved.dims.depth)
    self.student_layer = resolved.student_layer  # the tap the reference cosine reads
    self._feature_layers = tuple(sorted({*self.probe_layers, self.student_layer}))
    self._probe_features = jax.jit(
        linear_probe.make_features_fn(graphdef, self.spec, self._feature_layers),
        out_shardings=replicated)
    self._example_loss = jax.jit(stratified_loss.make_loss_fn(graphdef, self.spec),
                                 out_shardings=replicated)
    # (train images, train labels, test images, test labels), uint8, and the evaluation
    # classifier's features of the train and test images.
    self._probe_data = None
    self._probe_reference = None
    self._held_out = None  # (test images uint8, labels): the FD reference and loss examples

  def _prepare(self):
    data, ev = self.config.data, self.config.eval
    train = modality_sources.open_source(self.config, self.spec, "train")
    test = modality_sources.open_source(self.config, self.spec, "test")
    train_images, train_labels = pipeline.load_split_arrays(train)
    test_images, test_labels = pipeline.load_split_arrays(test)
    self._classifier, self.classifier_accuracy = classifier_lib.load_or_train_classifier(
        train_images, train_labels, cache_dir=ev.cache_dir, cache_key=f"{data.dataset}",
        num_steps=ev.classifier_steps, batch_size=ev.classifier_batch_size, seed=0,
        learning_rate=ev.classifier_learning_rate, num_classes=data.num_classes,
        eval_images=test_images, eval_labels=test_labels)
    logging.info("Image evaluation classifier: held-out accuracy %.4f.", self.classifier_accuracy)
    # Copies, so the full splits can be freed.
    self._held_out = (test_images[:ev.num_samples].copy(), test_labels[:ev.num_samples].copy())
    self._reference = frechet.feature_statistics(
        self._features(image.from_uint8(self._held_out[0])))
    n = ev.probe_examples
    if n:
      self._probe_data = tuple(a[:n].copy() for a in (train_images, train_labels, test_images,
                                                      test_labels))
      self._probe_reference = tuple(self._features(image.from_uint8(a))
                                    for a in self._probe_data[::2])

  def _features(self, images: np.ndarray) -> np.ndarray:
    return classifier_lib.extract_features(self._classifier, images, self.config.eval.batch_size)

  def condition(self, labels: np.ndarray, captions: list[str] | None = None):
    """Host conditioning for `labels`: the labels, the null label 0 of an unconditional model,
    or tokenized captions (held-out phrasings of the labels' classes unless `captions` are
    given)."""
    if self.config.model.conditioning == "class":
      return labels
    if self.config.model.conditioning == "none":
      return np.zeros(len(labels), np.int32)
    if captions is None:
      captions = [caption_lib.heldout_caption(int(y), i) for i, y in enumerate(labels)]
    return self.generate.text_condition(captions)

  def evaluate(self, ema_params, step: int, writer, final: bool = True) -> dict[str, float]:
    """`metrics` of the EMA weights, written as scalars, and a grid PNG of their samples."""
    results = self.metrics(ema_params, final)
    writer.write_scalars(step, results)
    self._write_grid(ema_params, step, writer)
    return results

  def metrics(self, params, final: bool = True) -> dict[str, float]:
    """FD and (conditional models) class accuracy of `eval.num_samples` samples of the model
    with `params`, and the stratified loss and the probe when configured (the probe only in the
    run's `final` evaluation unless eval.probe_every_evaluation)."""
    if self._classifier is None:
      self._prepare()
    ev, num_classes = self.config.eval, self.config.data.num_classes
    labels = np.arange(ev.num_samples) % num_classes
    samples = self.generate(params, self.condition(labels),
                            seed=self.config.seed + 1 + ev.seed_offset)
    stats = frechet.feature_statistics(self._features(samples))
    results = {
        "eval/image/fd": frechet.frechet_distance(*stats, *self._reference),
        "eval/image/classifier_heldout_accuracy": float(self.classifier_accuracy),
    }
    kind = self.config.model.conditioning
    if kind != "none":  # an unconditional model was asked for no class
      logits = classifier_lib.predict_logits(self._classifier, samples, ev.batch_size)
      # Class accuracy of class-conditioned samples, or text faithfulness: the accuracy of
      # samples generated from held-out caption phrasings.
      name = "class_accuracy" if kind == "class" else "text_faithfulness"
      results[f"eval/image/{name}"] = float(np.mean(logits.argmax(-1) == labels))
    if ev.loss_bins:
      results.update(self.stratified_loss(params))
    if ev.probe_examples and (final or ev.probe_every_evaluation):
      results.update(self.linear_probe(params))
    return results

  def _tokens(self, images: np.ndarray) -> np.ndarray:
    """uint8 images (n, H, W, C) -> float32 tokens (n, N, C_token) in the model's range."""
    return np.asarray(self.spec.tokenize(image.from_uint8(images)))

  def _map(self, fn, ema_params, *arrays) -> np.ndarray:
    return chunking.map_in_chunks(lambda _, *rows: fn(ema_params, *rows), arrays,
                                  self.config.eval.batch_size, self._batch_sharding)

  def linear_probe(self, ema_params) -> dict[str, float]:
    """Top-1 of a closed-form linear probe on each probed block's pooled hidden state at each
    of `eval.probe_timesteps`, and the student tap's cosine to the evaluation classifier's
    features (`linear_probe.py`), fed the null condition so that only the image can carry the
    class."""
    if self._classifier is None:
      self._prepare()
    ev, num_classes = self.config.eval, self.config.data.num_classes
    train_images, train_labels, test_images, test_labels = self._probe_data
    train_reference, test_reference = self._probe_reference
    probed = [self._feature_layers.index(k) for k in self.probe_layers]
    tap = self._feature_layers.index(self.student_layer)

    def features(images, t):  # (layers, n, D)
      null = conditioning.null_like(self.condition(np.zeros(len(images), np.int32)),
                                    conditioning.model_classes(self.config))
      noise = linear_probe.probe_noise(len(images), self.spec, ev.seed_offset)
      t = np.full((), t, np.float32)
      return self._map(lambda params, *rows: self._probe_features(params, *rows, t), ema_params,
                       self._tokens(images), noise,
                       jax.tree.map(np.asarray, null)).transpose(1, 0, 2)

    results = {}
    for t in ev.probe_timesteps:
      train, test = features(train_images, t), features(test_images, t)
      accuracy = linear_probe.fit_and_score(train[probed], train_labels, test[probed],
                                            test_labels, num_classes=num_classes,
                                            ridge=ev.probe_ridge)
      results.update(zip(linear_probe.metric_names("image", t, self.probe_layers),
                         map(float, accuracy)))
      cosine, = linear_probe.reference_cosine(train[tap:tap + 1], train_reference,
                                              test[tap:tap + 1], test_reference,
                                              ridge=ev.probe_ridge)
      results[linear_probe.reference_metric_name("image", t)] = float(cosine)
    return results

  def stratified_loss(self, ema_params) -> dict[str, float]:
    """Held-out flow loss in each of `eval.loss_bins` timestep bins and their mean
    (`stratified_loss.py`), conditioned on the held-out labels (or caption phrasings)."""
    if self._classifier is None:
      self._prepare()
    images, labels = self._held_out
    tokens, cond = self._tokens(images), self.condition(labels)
    timesteps, noise = stratified_loss.draw(len(tokens), self.config.eval.loss_bins, self.spec,
                                            self.config.eval.seed_offset)
    losses = [float(np.mean(self._map(self._example_loss, ema_params, tokens, noise, t, cond)))
              for t in timesteps]
    names = stratified_loss.metric_names("image", self.config.eval.loss_bins)
    return {**dict(zip(names, losses)), "eval/image/loss": float(np.mean(losses))}

  def _write_grid(self, ema_params, step: int, writer) -> None:
    """A grid of samples for fixed conditions: one column per class, or per prompt of
    `eval.prompts` (text); the PNG shows each prompt under its column, and the prompts also go
    into its text chunk and a .txt beside it."""
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
      name = (f"step_{step:08d}_unconditional" if self.config.model.conditioning == "none"
              else f"step_{step:08d}_classes_0-{columns - 1}_per_column")
    samples = self.generate(ema_params, cond, seed=self.config.seed + 2)
    grid = image.make_grid(image.to_uint8(samples), columns)
    writer.write_images(step, {"samples/image": grid[None]})
    if prompts:
      writer.write_texts(step, {"sample_prompts/image": " | ".join(prompts)})
      grid = captioned_grid.captioned_grid(grid, prompts)  # the file shows its prompts
    generation.write_png(self.workdir, name, grid, prompts)
