"""Offline evaluation of the EMA image model: samples, Fréchet distance, class accuracy, grids.

No Inception weights are available offline, so the feature space is a small classifier trained
once on the embedded dataset and cached (`classifier.load_or_train_classifier`); the same
classifier scores whether class- or caption-conditioned samples show the requested class.
Metrics are named `eval/image/...`; video and audio have their own evaluators beside this one.
"""

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from self_flow.data import captions as caption_lib
from self_flow.data import modality_sources, pipeline
from self_flow.evaluation import classifier as classifier_lib
from self_flow.evaluation import frechet, generation
from self_flow.modalities import image
from self_flow.modalities import spec as spec_lib


class ImageEvaluator:
  """Evaluates EMA params; the classifier and reference statistics are built on first use."""

  def __init__(self, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, workdir: str,
               mesh: jax.sharding.Mesh):
    self.config = config
    self.workdir = workdir
    self.generate = generation.Generator(config, graphdef, mesh,
                                         spec_lib.modality_specs(config)["image"])
    self._classifier = None
    self._reference = None
    self.classifier_accuracy = None

  def _prepare(self):
    data, ev = self.config.data, self.config.eval
    train = modality_sources.open_source(self.config, "image", "train")
    test = modality_sources.open_source(self.config, "image", "test")
    train_images, train_labels = pipeline.load_split_arrays(train)
    test_images, test_labels = pipeline.load_split_arrays(test)
    self._classifier, self.classifier_accuracy = classifier_lib.load_or_train_classifier(
        train_images, train_labels, cache_dir=ev.cache_dir, cache_key=f"{data.dataset}",
        num_steps=ev.classifier_steps, batch_size=ev.classifier_batch_size, seed=0,
        learning_rate=ev.classifier_learning_rate, num_classes=data.num_classes,
        eval_images=test_images, eval_labels=test_labels)
    logging.info("Image evaluation classifier: held-out accuracy %.4f.", self.classifier_accuracy)
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
    return self.generate.text_condition(captions)

  def evaluate(self, ema_params, step: int, writer) -> dict[str, float]:
    """FD and class accuracy of `eval.num_samples` samples; writes a grid PNG and scalars."""
    if self._classifier is None:
      self._prepare()
    ev, num_classes = self.config.eval, self.config.data.num_classes
    labels = np.arange(ev.num_samples) % num_classes
    accuracy_name = ("eval/image/class_accuracy" if self.config.model.conditioning == "class"
                     else "eval/image/text_faithfulness")
    samples = self.generate(ema_params, self.condition(labels), seed=self.config.seed + 1)
    stats = frechet.feature_statistics(self._features(samples))
    logits = classifier_lib.predict_logits(self._classifier, samples, ev.batch_size)
    results = {
        "eval/image/fd": frechet.frechet_distance(*stats, *self._reference),
        # Class accuracy of class-conditioned samples, or text faithfulness: the accuracy of
        # samples generated from held-out caption phrasings.
        accuracy_name: float(np.mean(logits.argmax(-1) == labels)),
        "eval/image/classifier_heldout_accuracy": float(self.classifier_accuracy),
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
    grid = image.make_grid(image.to_uint8(samples), columns)
    writer.write_images(step, {"samples/image": grid[None]})
    if prompts:
      writer.write_texts(step, {"sample_prompts/image": " | ".join(prompts)})
    generation.write_png(self.workdir, name, grid, prompts)
