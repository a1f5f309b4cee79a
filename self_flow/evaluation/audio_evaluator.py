"""Offline evaluation of an audio model (EMA or live params) on spoken words.

A small spectrogram classifier (the image classifier's CNN on log-mel frames x mels, trained
once on the embedded words and cached) stands in for the paper's CLAP features:
`eval/audio/fd` is the Fréchet distance of generated vs held-out log-mels in its feature space,
and `eval/audio/text_faithfulness` its accuracy at the word of the transcript each sample was
generated from. Samples are also written as WAV files (Griffin-Lim), spectrogram PNGs and
TensorBoard audio, so they can be listened to.
"""

import io

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from self_flow import config_resolution
from self_flow.data import modality_sources, pipeline, spoken_words
from self_flow.evaluation import classifier as classifier_lib
from self_flow.evaluation import frechet, generation
from self_flow.modalities import audio, image


def as_image(features: np.ndarray) -> np.ndarray:
  """(n, frames, mels) log-mels -> (n, frames, mels, 1), the classifier's image layout."""
  return features[..., None]


def spectrogram_strip(features: np.ndarray) -> np.ndarray:
  """(n, frames, mels) in [-1, 1] -> uint8 (mels, n * (frames + 1) - 1, 1), low bins at the
  bottom, one spectrogram per word left to right."""
  pictures = image.to_uint8(features.transpose(0, 2, 1)[:, ::-1, :, None])
  return image.make_grid(pictures, columns=len(pictures))


class AudioEvaluator:
  """Evaluates params (EMA or live student) on audio; classifier, reference built on first use."""

  def __init__(self, config: ml_collections.ConfigDict,
               resolved: config_resolution.ResolvedConfig, graphdef: nnx.GraphDef, workdir: str,
               mesh: jax.sharding.Mesh):
    self.config = config
    self.workdir = workdir
    self.spec = resolved.spec("audio")
    self.generate = generation.Generator(config, graphdef, mesh, self.spec)
    self._classifier = None
    self._reference = None
    self.classifier_accuracy = None

  def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(log-mels (n, frames, mels) float32, word labels) of a split."""
    arrays = pipeline.load_split_fields(
        modality_sources.open_source(self.config, self.spec, split), ("waveform", "label"))
    return audio.log_mel(audio.from_int16(arrays["waveform"])), arrays["label"]

  def _prepare(self):
    ev = self.config.eval
    train_features, train_labels = self._load("train")
    test_features, test_labels = self._load("test")
    # The classifier trains on uint8 pictures (its input format); 1/127.5 quantisation of
    # features in [-1, 1] is far below what separates words.
    self._classifier, self.classifier_accuracy = classifier_lib.load_or_train_classifier(
        image.to_uint8(as_image(train_features)), train_labels, cache_dir=ev.cache_dir,
        cache_key=self.config.audio.dataset, num_steps=ev.classifier_steps,
        batch_size=ev.classifier_batch_size, seed=0,
        learning_rate=ev.classifier_learning_rate, num_classes=len(spoken_words.WORDS),
        eval_images=image.to_uint8(as_image(test_features)), eval_labels=test_labels)
    logging.info("Audio evaluation classifier: held-out accuracy %.4f.",
                 self.classifier_accuracy)
    self._reference = frechet.feature_statistics(
        self._features(test_features[:ev.num_samples]))

  def _features(self, features: np.ndarray) -> np.ndarray:
    return classifier_lib.extract_features(self._classifier, as_image(features),
                                           self.config.eval.batch_size)

  def conditions(self, count: int) -> tuple[np.ndarray, list[str]]:
    """(word labels, transcripts) cycling over the vocabulary."""
    labels = np.arange(count) % len(spoken_words.WORDS)
    return labels, [spoken_words.transcript(int(y)) for y in labels]

  def evaluate(self, ema_params, step: int, writer, final: bool = True) -> dict[str, float]:
    """`metrics` of the EMA weights, written as scalars, and WAVs of their samples."""
    results = self.metrics(ema_params, final)
    writer.write_scalars(step, results)
    self._write_samples(ema_params, step, writer)
    return results

  def metrics(self, params, final: bool = True) -> dict[str, float]:
    """FD and transcript faithfulness of `eval.num_samples` samples of the model with `params`;
    the same in every evaluation (`final` is the evaluator interface's: none is final-only)."""
    if self._classifier is None:
      self._prepare()
    ev = self.config.eval
    labels, transcripts = self.conditions(ev.num_samples)
    samples = self.generate(params, self.generate.text_condition(transcripts),
                            seed=self.config.seed + 1 + ev.seed_offset)
    stats = frechet.feature_statistics(self._features(samples))
    logits = classifier_lib.predict_logits(self._classifier, as_image(samples), ev.batch_size)
    results = {
        "eval/audio/fd": frechet.frechet_distance(*stats, *self._reference),
        "eval/audio/text_faithfulness": float(np.mean(logits.argmax(-1) == labels)),
        "eval/audio/classifier_heldout_accuracy": float(self.classifier_accuracy),
    }
    return results

  def _write_samples(self, ema_params, step: int, writer) -> None:
    """One sample per word: a spectrogram strip PNG, WAV files and TensorBoard audio."""
    _, transcripts = self.conditions(len(spoken_words.WORDS))
    samples = self.generate(ema_params, self.generate.text_condition(transcripts),
                            seed=self.config.seed + 2)
    strip = spectrogram_strip(samples)
    waveforms = audio.mel_to_waveform(samples)
    writer.write_images(step, {"samples/audio_spectrograms": strip[None]})
    writer.write_audios(step, {"samples/audio": waveforms[..., None]},
                        sample_rate=audio.SAMPLE_RATE)
    writer.write_texts(step, {"sample_prompts/audio": " | ".join(transcripts)})
    generation.write_png(self.workdir, f"step_{step:08d}_audio_spectrograms", strip,
                         transcripts)
    if jax.process_index() == 0:
      directory = generation.samples_dir(self.workdir)
      for word, waveform in zip(transcripts, waveforms):
        buffer = io.BytesIO()
        audio.write_wav(buffer, waveform, audio.SAMPLE_RATE)
        (directory / f"step_{step:08d}_audio_{word}.wav").write_bytes(buffer.getvalue())
