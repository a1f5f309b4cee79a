"""One description per modality of everything modality-specific the trainer needs.

The objective, the step and the sampler work on token sequences (B, N, C) with (time, height,
width) position ids; a `ModalitySpec` says how a modality's signal becomes those tokens and back,
and which batch size, mask ratio and time shifts it trains and samples with. Adding a modality
means adding a spec here, not touching the step.
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from self_flow.modalities import audio, image, video

MODALITIES = ("image", "video", "audio")


@dataclasses.dataclass(frozen=True)
class ModalitySpec:
  """A modality's token layout and per-modality training settings."""

  name: str
  signal_key: str  # Batch key of the generated signal on embedded data ("latent" for shards).
  signal_shape: tuple[int, ...]  # One example's signal, e.g. (H, W, C) or (T, H, W, C).
  token_dim: int  # Channels per token.
  position_fn: Callable[[], Any]  # () -> (N, 3) int32 (time, row, col) per token.
  tokenize: Callable[[Any], Any]  # (B, *signal_shape) -> (B, N, token_dim).
  detokenize: Callable[[Any], Any]  # Inverse of `tokenize`.
  global_batch_size: int
  mask_ratio: float
  train_shift: float
  sample_shift: float
  probability: float  # Renormalised over the run's modalities.
  loss_weight: float

  @functools.cached_property
  def position_ids(self) -> np.ndarray:
    """(N, 3) int32 host constant; computed on first use, eagerly even inside a trace."""
    with jax.ensure_compile_time_eval():
      return np.asarray(self.position_fn(), np.int32)

  @property
  def num_tokens(self) -> int:
    return int(self.position_ids.shape[0])

  def signal(self, batch: dict):
    """The array being generated from a batch: the modality's signal or pre-encoded latents."""
    return batch["latent"] if "latent" in batch else batch[self.signal_key]


def _image(config: ml_collections.ConfigDict, **mixture) -> ModalitySpec:
  size, channels, patch = config.data.image_size, config.data.num_channels, config.model.patch_size
  image.check_patchable(size, patch)
  return ModalitySpec(
      name="image", signal_key="image", signal_shape=(size, size, channels),
      token_dim=patch * patch * channels,
      position_fn=functools.partial(image.position_ids, size, size, patch),
      tokenize=functools.partial(image.patchify, patch_size=patch),
      detokenize=functools.partial(image.unpatchify, patch_size=patch, height=size, width=size),
      global_batch_size=config.data.global_batch_size, mask_ratio=config.objective.mask_ratio,
      train_shift=config.objective.train_shift, sample_shift=config.sampling.shift, **mixture)


def _video(config: ml_collections.ConfigDict, **mixture) -> ModalitySpec:
  v = config.video
  video.check_patchable(v.num_frames, v.image_size, v.patch_time, v.patch_size)
  return ModalitySpec(
      name="video", signal_key="video",
      signal_shape=(v.num_frames, v.image_size, v.image_size, v.num_channels),
      token_dim=v.patch_time * v.patch_size * v.patch_size * v.num_channels,
      position_fn=functools.partial(video.position_ids, v.num_frames, v.image_size,
                                    v.image_size, v.patch_time, v.patch_size),
      tokenize=functools.partial(video.patchify, patch_time=v.patch_time,
                                 patch_size=v.patch_size),
      detokenize=functools.partial(video.unpatchify, patch_time=v.patch_time,
                                   patch_size=v.patch_size, num_frames=v.num_frames,
                                   height=v.image_size, width=v.image_size),
      global_batch_size=v.global_batch_size, mask_ratio=v.mask_ratio,
      train_shift=v.train_shift, sample_shift=v.sample_shift, **mixture)


def _audio(config: ml_collections.ConfigDict, **mixture) -> ModalitySpec:
  a = config.audio
  audio.check_tokenizable(a.num_frames, a.frames_per_token)
  return ModalitySpec(
      name="audio", signal_key="audio", signal_shape=(a.num_frames, a.num_channels),
      token_dim=a.frames_per_token * a.num_channels,
      position_fn=functools.partial(audio.position_ids, a.num_frames, a.frames_per_token),
      tokenize=functools.partial(audio.tokenize, frames_per_token=a.frames_per_token),
      detokenize=functools.partial(audio.detokenize, frames_per_token=a.frames_per_token,
                                   num_mels=a.num_channels),
      global_batch_size=a.global_batch_size, mask_ratio=a.mask_ratio,
      train_shift=a.train_shift, sample_shift=a.sample_shift, **mixture)


_BUILDERS = {"image": _image, "video": _video, "audio": _audio}


def modality_specs(config: ml_collections.ConfigDict) -> dict[str, ModalitySpec]:
  """{name: spec} for `config.modalities`, in that order, with renormalised probabilities."""
  names = tuple(config.modalities)
  unknown = [n for n in names if n not in MODALITIES]
  if not names or unknown or len(set(names)) != len(names):
    raise ValueError(f"modalities={names!r} must be distinct names from {MODALITIES}.")
  weights = {n: float(config.mixture.probabilities[n]) for n in names}
  bad = {n: w for n, w in weights.items() if not w > 0}
  if bad:
    raise ValueError(f"mixture.probabilities {bad} must be > 0 for every trained modality.")
  total = sum(weights.values())
  return {n: _BUILDERS[n](config, probability=weights[n] / total,
                          loss_weight=float(config.mixture.loss_weights[n]))
          for n in names}
