"""Offline evaluation of a video model (EMA or live params) on moving-sprite clips.

Two small classifiers, trained once on the embedded clips and cached, stand in for the paper's
framewise Inception FID and VideoMAE FVD:
  * a frame classifier (object class of single frames): `eval/video/fd_frames` is the Fréchet
    distance of generated vs held-out frames in its feature space;
  * a clip classifier on the frames stacked as channels, predicting (object, motion) jointly,
    so its features see motion: `eval/video/fd` is the clip-level Fréchet distance.
Caption faithfulness (`eval/video/text_faithfulness`) is the clip classifier's accuracy at the
(object, motion) named by held-out caption phrasings; `eval/video/object_accuracy` asks only for
the object, by the frame classifier's mean logits over frames.
"""

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from self_flow import config_resolution
from self_flow.data import modality_sources, motion_captions, pipeline
from self_flow.evaluation import classifier as classifier_lib
from self_flow.evaluation import frechet, generation
from self_flow.modalities import image, video


def frames_of(clips: np.ndarray) -> np.ndarray:
  """(n, T, H, W, C) -> (n * T, H, W, C)."""
  return clips.reshape(-1, *clips.shape[2:])


def stacked_frames(clips: np.ndarray) -> np.ndarray:
  """(n, T, H, W, C) -> (n, H, W, T * C): a clip as one image whose channels run over time."""
  n, t, h, w, c = clips.shape
  return clips.transpose(0, 2, 3, 1, 4).reshape(n, h, w, t * c)


class VideoEvaluator:
  """Evaluates params (EMA or student) on video; classifiers and references built on first use."""

  def __init__(self, config: ml_collections.ConfigDict,
               resolved: config_resolution.ResolvedConfig, graphdef: nnx.GraphDef, workdir: str,
               mesh: jax.sharding.Mesh):
    self.config = config
    self.workdir = workdir
    self.spec = resolved.spec("video")
    self.generate = generation.Generator(config, graphdef, mesh, self.spec)
    self._frame_classifier = self._clip_classifier = None
    self._reference = {}
    self._heldout_accuracy = {}

  def _train_classifier(self, name, inputs, labels, num_classes, eval_inputs, eval_labels):
    ev = self.config.eval
    classifier, accuracy = classifier_lib.load_or_train_classifier(
        inputs, labels, cache_dir=ev.cache_dir, cache_key=f"{self.config.video.dataset}_{name}",
        num_steps=ev.classifier_steps, batch_size=ev.classifier_batch_size, seed=0,
        learning_rate=ev.classifier_learning_rate, num_classes=num_classes,
        eval_images=eval_inputs, eval_labels=eval_labels)
    logging.info("Video %s classifier: held-out accuracy %.4f.", name, accuracy)
    self._heldout_accuracy[name] = float(accuracy)
    return classifier

  def _prepare(self):
    fields = ("video", "label", "motion")
    train = pipeline.load_split_fields(
        modality_sources.open_source(self.config, self.spec, "train"), fields)
    test = pipeline.load_split_fields(
        modality_sources.open_source(self.config, self.spec, "test"), fields)
    frames_per_clip = train["video"].shape[1]
    self._frame_classifier = self._train_classifier(
        "frames", frames_of(train["video"]), np.repeat(train["label"], frames_per_clip),
        len(motion_captions.NAMES), frames_of(test["video"]),
        np.repeat(test["label"], frames_per_clip))
    joint = lambda d: motion_captions.motion_class(d["label"], d["motion"])
    self._clip_classifier = self._train_classifier(
        "clips", stacked_frames(train["video"]), joint(train), self.num_joint_classes,
        stacked_frames(test["video"]), joint(test))
    held_out = image.from_uint8(test["video"][:self.config.eval.num_samples])
    self._reference = self._statistics(held_out)

  @property
  def num_joint_classes(self) -> int:
    return len(motion_captions.NAMES) * len(motion_captions.MOTIONS)

  def _statistics(self, clips: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    batch = self.config.eval.batch_size
    return {
        "frames": frechet.feature_statistics(classifier_lib.extract_features(
            self._frame_classifier, frames_of(clips), batch)),
        "clips": frechet.feature_statistics(classifier_lib.extract_features(
            self._clip_classifier, stacked_frames(clips), batch)),
    }

  def conditions(self, count: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(objects, motions, held-out captions) cycling over every (object, motion) pair."""
    joint = np.arange(count) % self.num_joint_classes
    objects, motions = joint // len(motion_captions.MOTIONS), joint % len(motion_captions.MOTIONS)
    captions = [motion_captions.heldout_caption(int(o), int(m), i)
                for i, (o, m) in enumerate(zip(objects, motions))]
    return objects, motions, captions

  def evaluate(self, ema_params, step: int, writer, final: bool = True) -> dict[str, float]:
    """`metrics` of the EMA weights, written as scalars, and strips of their samples."""
    results = self.metrics(ema_params, final)
    writer.write_scalars(step, results)
    self._write_strips(ema_params, step, writer)
    return results

  def metrics(self, params, final: bool = True) -> dict[str, float]:
    """Clip and frame FD, caption faithfulness and object accuracy of the model with `params`;
    the same in every evaluation (`final` is the evaluator interface's: none is final-only)."""
    if self._clip_classifier is None:
      self._prepare()
    ev = self.config.eval
    objects, motions, captions = self.conditions(ev.num_samples)
    samples = self.generate(params, self.generate.text_condition(captions),
                            seed=self.config.seed + 1 + ev.seed_offset)
    stats = self._statistics(samples)
    clip_logits = classifier_lib.predict_logits(self._clip_classifier, stacked_frames(samples),
                                                ev.batch_size)
    frame_logits = classifier_lib.predict_logits(self._frame_classifier, frames_of(samples),
                                                 ev.batch_size)
    frame_logits = frame_logits.reshape(len(samples), -1, frame_logits.shape[-1]).mean(1)
    results = {
        "eval/video/fd": frechet.frechet_distance(*stats["clips"], *self._reference["clips"]),
        "eval/video/fd_frames": frechet.frechet_distance(*stats["frames"],
                                                         *self._reference["frames"]),
        "eval/video/text_faithfulness": float(np.mean(
            clip_logits.argmax(-1) == motion_captions.motion_class(objects, motions))),
        "eval/video/object_accuracy": float(np.mean(frame_logits.argmax(-1) == objects)),
        "eval/video/clip_classifier_heldout_accuracy": self._heldout_accuracy["clips"],
        "eval/video/frame_classifier_heldout_accuracy": self._heldout_accuracy["frames"],
    }
    return results

  def _write_strips(self, ema_params, step: int, writer) -> None:
    """One strip (frames left to right) per clip, for the first `eval.grid_rows` x 4 held-out
    (object, motion) conditions; each row's caption goes to the PNG text chunk and a .txt."""
    count = self.config.eval.grid_rows * len(motion_captions.MOTIONS)
    _, _, captions = self.conditions(count)
    samples = self.generate(ema_params, self.generate.text_condition(captions),
                            seed=self.config.seed + 2)
    strips = video.to_strips(image.to_uint8(samples))
    writer.write_images(step, {"samples/video": strips[None]})
    writer.write_texts(step, {"sample_prompts/video": " | ".join(captions)})
    generation.write_png(self.workdir, f"step_{step:08d}_video_strips", strips, captions,
                         prompt_axis="row")
