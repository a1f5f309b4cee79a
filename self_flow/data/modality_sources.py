"""Where each modality's data comes from, and how its records become model inputs.

The trainer and the evaluators ask this module for a modality's source and per-example
processing, so the choice between the embedded datasets (Fashion-MNIST images, moving-sprite
clips, spoken words) and pre-encoded latent shards is made in one place.
"""

from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from self_flow.data import (captions, latent_shards, motion_captions, moving_sprites, pipeline,
                            sources, spoken_words)
from self_flow.modalities import audio, video
from self_flow.modalities import spec as spec_lib
from self_flow.text import embedding_cache, frozen_encoders

# modality -> its data section of the config.
SECTIONS = {"image": "data", "video": "video", "audio": "audio"}


def dataset_name(config: ml_collections.ConfigDict, modality: str) -> str:
  return config[SECTIONS[modality]].dataset


def uses_latent_shards(config: ml_collections.ConfigDict, modality: str) -> bool:
  return dataset_name(config, modality) == "latent_shards"


def batch_shapes(config: ml_collections.ConfigDict, modality: str, signal_key: str,
                 signal_shape: Sequence[int]) -> dict[str, tuple[tuple[int, ...], Any]]:
  """{key: (per-example shape, dtype)} of the training-batch arrays the step reads, as the
  processing of `train_processing` produces them (ahead-of-time compilation and benchmarks
  build batches from this, not from data)."""
  signal = (tuple(signal_shape), np.float32)
  length = config.text.max_length
  frozen = config.text.encoder in frozen_encoders.DIMS
  if uses_latent_shards(config, modality):
    return {"latent": signal, "label": ((), np.int32),
            "text_embedding": ((length, config.text.embedding_dim), np.float32),
            "text_mask": ((length,), np.bool_)}
  shapes = {signal_key: signal, "label": ((), np.int32)}
  if config.model.conditioning == "text" and frozen:  # one pooled token per caption
    tokens, dim = frozen_encoders.caption_condition_shape(config.text)
    shapes.update(text_embedding=((tokens, dim), np.float32), text_mask=((tokens,), np.bool_))
  elif config.model.conditioning == "text":
    shapes.update(text_tokens=((length,), np.int32), text_mask=((length,), np.bool_))
  return shapes


def caption_table(config: ml_collections.ConfigDict) -> embedding_cache.CaptionTable:
  """The frozen text encoder's embeddings of every image caption a run can draw (training and
  held-out phrasings, and `eval.prompts`), from the cache in `text.cache_dir`."""
  return embedding_cache.CaptionTable(
      config.text.encoder, captions.all_captions() + list(config.eval.prompts),
      config.text.cache_dir)


def open_source(config: ml_collections.ConfigDict, modality: str, split: str):
  """The random-access source of `modality`'s `split` (prepared on first use when embedded)."""
  section = config[SECTIONS[modality]]
  if section.dataset == "latent_shards":
    return _open_latent_shards(config, modality, split)
  if modality == "image":
    return sources.open_image_source(section.dataset, split, section.data_dir, section.source)
  if modality == "video":
    return moving_sprites.open_video_source(split, section.data_dir)
  return spoken_words.open_audio_source(split, section.data_dir)


def _open_latent_shards(config: ml_collections.ConfigDict, modality: str, split: str
                        ) -> latent_shards.LatentShardSource:
  """Opens `modality`'s shards, refusing ones of another modality or latent shape.

  Raises before any training state exists, naming the shard directory and the config keys to fix.
  """
  section_name = SECTIONS[modality]
  data_dir = config[section_name].data_dir
  source = latent_shards.LatentShardSource(data_dir, split, bad_records=config.data.bad_records)
  if source.modality != modality:
    raise ValueError(f"config.{section_name}.data_dir={data_dir!r} holds {source.modality} "
                     f"latents; the {modality} stream needs {modality} latent shards.")
  want = spec_lib.modality_specs(config)[modality].signal_shape
  if source.latent_shape != tuple(want):
    raise ValueError(f"config.{section_name} describes {modality} latents of shape "
                     f"{tuple(want)}, but {data_dir!r} holds latents of shape "
                     f"{source.latent_shape}; set its shape keys to match the shards.")
  if (modality == "image" and config.data.latent_sampling == "posterior"
      and "latent_std" not in source.metadata["fields"]):
    raise ValueError(f"config.data.latent_sampling='posterior' needs shards with a posterior "
                     f"std (field latent_std), but {data_dir!r} holds only latents; set "
                     "--config.data.latent_sampling=mean or re-encode with "
                     "self_flow.tools.encode_latents.")
  embedding_dim = source.metadata["fields"]["text_embedding"]["shape"][-1]
  if config.model.conditioning == "text" and embedding_dim != config.text.embedding_dim:
    raise ValueError(f"config.text.embedding_dim={config.text.embedding_dim}, but the caption "
                     f"embeddings in {data_dir!r} have width {embedding_dim}; set "
                     f"--config.text.embedding_dim={embedding_dim}.")
  return source


def train_processing(config: ml_collections.ConfigDict, modality: str
                     ) -> tuple[Any, Sequence[grain.transforms.Map | grain.transforms.RandomMap]]:
  """(preprocess, transforms) for the training stream of `modality`.

  Embedded data gets its captions here (random phrasings per epoch for images and clips, the
  exact transcript for speech); latent shards carry precomputed caption embeddings.
  """
  if uses_latent_shards(config, modality):
    if modality == "image" and config.data.latent_sampling == "posterior":
      return latent_shards.preprocess_posterior, (latent_shards.PosteriorSample(),)
    return pipeline.preprocess_latents, ()
  text = config.model.conditioning == "text"
  max_length = config.text.max_length
  if modality == "image" and text and config.text.encoder in frozen_encoders.DIMS:
    return pipeline.preprocess, (captions.CaptionEmbedding(caption_table(config)),)
  if modality == "image":
    return pipeline.preprocess, ((captions.CaptionTokens(max_length),) if text else ())
  if modality == "video":
    return video.preprocess, (motion_captions.VideoCaptionTokens(max_length),)
  return audio.preprocess, (spoken_words.AudioCaptionTokens(max_length),)
