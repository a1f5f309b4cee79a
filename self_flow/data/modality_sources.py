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

from self_flow.data import (captions, motion_captions, moving_sprites, pipeline, sources,
                            spoken_words)
from self_flow.data.latent_shards import caption_draw, layout, posterior, reader
from self_flow.modalities import audio, video
from self_flow.modalities import spec as spec_lib
from self_flow.text import embedding_cache, frozen_encoders, in_step_encoder

# modality -> its data section of the config.
SECTIONS = {"image": "data", "video": "video", "audio": "audio"}
LATENT_SHARDS = "latent_shards"  # The dataset name of pre-encoded latents, in every section.
# modality -> the values of its section's `dataset`: the embedded data, or latent shards.
DATASETS = {"image": (*sources.DATASETS, LATENT_SHARDS),
            "video": ("moving_sprites", LATENT_SHARDS),
            "audio": ("spoken_words", LATENT_SHARDS)}
# data.latent_sampling: train on the stored posterior mean, or draw from the stored posterior.
LATENT_SAMPLING = ("mean", "posterior")
# Signal shapes of the embedded datasets: (config keys, values the dataset produces).
_EMBEDDED_SHAPES = {
    "video": (("num_frames", "image_size", "image_size", "num_channels"),
              moving_sprites.CLIP_SHAPE),
    "audio": (("num_frames", "num_channels"), (audio.NUM_FRAMES, audio.NUM_MELS)),
}


def dataset_name(config: ml_collections.ConfigDict, modality: str) -> str:
  return config[SECTIONS[modality]].dataset


def uses_latent_shards(config: ml_collections.ConfigDict, modality: str) -> bool:
  return dataset_name(config, modality) == LATENT_SHARDS


def check_config(config: ml_collections.ConfigDict, modalities: Sequence[str]) -> None:
  """Raises ValueError when a trained modality's data cannot be opened as configured: a dataset
  name, a missing shard directory, an embedded dataset of another shape, or a text encoder that
  does not match what the data carries."""
  for name, allowed in DATASETS.items():  # every section: a typo is refused even if unused
    if dataset_name(config, name) not in allowed:
      raise ValueError(f"config.{SECTIONS[name]}.dataset={dataset_name(config, name)!r} is not "
                       f"allowed; choose one of {list(allowed)}.")
  for name in modalities:
    section = SECTIONS[name]
    if uses_latent_shards(config, name):
      if not config[section].data_dir:
        raise ValueError(f"config.{section}.data_dir is empty; with {section}.dataset="
                         "'latent_shards' it must name the shard directory "
                         f"(--config.{section}.data_dir=gs://.../shards).")
    elif name in _EMBEDDED_SHAPES:
      keys, expected = _EMBEDDED_SHAPES[name]
      got = tuple(config[section][k] for k in keys)
      if got != tuple(expected):
        raise ValueError(f"config.{section} ({', '.join(keys)})={got} must equal {expected}, "
                         f"the shape of the embedded {config[section].dataset!r} data.")
  _check_text_source(config, modalities)


def _check_text_source(config: ml_collections.ConfigDict, modalities: Sequence[str]) -> None:
  """Caption embeddings come with latent shards and tokens with embedded data: one per run."""
  if config.model.conditioning != "text":
    return
  sharded = {n: uses_latent_shards(config, n) for n in modalities}
  want = "precomputed" if any(sharded.values()) else "bytes"
  if len(set(sharded.values())) > 1:
    raise ValueError(f"config.modalities={tuple(modalities)} mix latent shards "
                     f"({[n for n, s in sharded.items() if s]}) with embedded data "
                     f"({[n for n, s in sharded.items() if not s]}); one model conditions on "
                     "either precomputed caption embeddings or byte tokens, so use one kind.")
  frozen = config.text.encoder in frozen_encoders.DIMS
  if frozen and want == "bytes":
    others = [n for n in modalities if n != "image"]
    if others:
      raise ValueError(f"config.text.encoder={config.text.encoder!r} embeds the image captions "
                       f"of the embedded data; {others} captions are not enumerated for it. Use "
                       "text.encoder='bytes', or latent shards written with this encoder.")
    return
  if config.text.encoder != want and not (want == "precomputed"
                                          and in_step_encoder.used(config)):
    carried = ("latent shards carry precomputed caption embeddings (or token ids for "
               "text.encoder='t5')" if want == "precomputed"
               else "embedded datasets carry byte tokens (or a frozen encoder's embeddings)")
    raise ValueError(f"config.text.encoder={config.text.encoder!r} does not match the data: "
                     f"{carried}, so set text.encoder={want!r}.")


def batch_shapes(config: ml_collections.ConfigDict, spec: spec_lib.ModalitySpec
                 ) -> dict[str, tuple[tuple[int, ...], Any]]:
  """{key: (per-example shape, dtype)} of the training-batch arrays the step reads, as the
  processing of `train_processing` produces them (ahead-of-time compilation and benchmarks
  build batches from this, not from data). Latent shards' caption embeddings are float16, the
  writer's default storage (bfloat16 ones have the same bytes; the step widens either)."""
  signal = (tuple(spec.signal_shape), np.float32)
  length = config.text.max_length
  frozen = config.text.encoder in frozen_encoders.DIMS
  if uses_latent_shards(config, spec.name):
    text = (("text_tokens", ((length,), np.int32)) if in_step_encoder.used(config)
            else ("text_embedding", ((length, config.text.embedding_dim), np.float16)))
    return {"latent": signal, "label": ((), np.int32), text[0]: text[1],
            "text_mask": ((length,), np.bool_)}
  shapes = {spec.signal_key: signal, "label": ((), np.int32)}
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


def open_source(config: ml_collections.ConfigDict, spec: spec_lib.ModalitySpec, split: str):
  """The random-access source of `spec`'s modality's `split` (prepared on first use when
  embedded); latent shards must hold latents of `spec.signal_shape`."""
  modality = spec.name
  section = config[SECTIONS[modality]]
  if section.dataset == LATENT_SHARDS:
    return _open_latent_shards(config, spec, split)
  if modality == "image":
    return sources.open_image_source(section.dataset, split, section.data_dir, section.source)
  if modality == "video":
    return moving_sprites.open_video_source(split, section.data_dir)
  return spoken_words.open_audio_source(split, section.data_dir)


def _open_latent_shards(config: ml_collections.ConfigDict, spec: spec_lib.ModalitySpec,
                        split: str) -> reader.LatentShardSource:
  """Opens `spec`'s modality's shards, refusing ones of another modality or latent shape.

  Raises before any training state exists, naming the shard directory and the config keys to fix.
  """
  modality, want = spec.name, spec.signal_shape
  section_name = SECTIONS[modality]
  data_dir = config[section_name].data_dir
  source = reader.LatentShardSource(data_dir, split, bad_records=config.data.bad_records)
  if source.modality != modality:
    raise ValueError(f"config.{section_name}.data_dir={data_dir!r} holds {source.modality} "
                     f"latents; the {modality} stream needs {modality} latent shards.")
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
  if config.model.conditioning == "text":
    _check_caption_fields(config, source, data_dir)
  return source


def _check_caption_fields(config: ml_collections.ConfigDict, source: reader.LatentShardSource,
                          data_dir: str) -> None:
  """Refuses shards whose caption fields (embeddings of another width or length, or token ids)
  are not what `config.text` makes the model read."""
  field = source.metadata["fields"][source.text_field]
  shape = field["shape"][1:] if source.captions_per_example else field["shape"]
  tokens = source.text_field == "text_tokens"
  if tokens != in_step_encoder.used(config):
    holds = ("caption token ids (text_tokens), for a text encoder run in the train step" if tokens
             else "precomputed caption embeddings")
    fix = ("--config.text.encoder=t5 with --config.text.t5_path=<the encoder that tokenized "
           "them>" if tokens else "--config.text.encoder=precomputed, or re-encode with "
           "self_flow.tools.encode_captioned --text_output=tokens")
    raise ValueError(f"{data_dir!r} holds {holds}; config.text.encoder={config.text.encoder!r} "
                     f"does not read them: use {fix}.")
  # Token ids (L,) have no width: the in-step encoder's is checked against it when it is built.
  if not tokens and shape[-1] != config.text.embedding_dim:
    raise ValueError(f"config.text.embedding_dim={config.text.embedding_dim}, but the caption "
                     f"embeddings in {data_dir!r} have width {shape[-1]}; set "
                     f"--config.text.embedding_dim={shape[-1]}.")
  if shape[0] != config.text.max_length:
    raise ValueError(f"config.text.max_length={config.text.max_length}, but the caption "
                     f"embeddings in {data_dir!r} have {shape[0]} tokens; set "
                     f"--config.text.max_length={shape[0]}.")


def train_processing(config: ml_collections.ConfigDict, modality: str
                     ) -> tuple[Any, Sequence[grain.transforms.Map | grain.transforms.RandomMap]]:
  """(preprocess, transforms) for the training stream of `modality`.

  Embedded data gets its captions here (random phrasings per epoch for images and clips, the
  exact transcript for speech); latent shards carry precomputed caption embeddings.
  """
  if uses_latent_shards(config, modality):
    metadata = layout.read_metadata(config[SECTIONS[modality]].data_dir)
    draw = (caption_draw.DrawCaption(),) if metadata.get("captions_per_example") else ()
    if modality == "image" and config.data.latent_sampling == "posterior":
      return posterior.preprocess_posterior, (posterior.PosteriorSample(), *draw)
    return pipeline.preprocess_latents, draw
  text = config.model.conditioning == "text"
  max_length = config.text.max_length
  if modality == "image" and text and config.text.encoder in frozen_encoders.DIMS:
    return pipeline.preprocess, (captions.CaptionEmbedding(caption_table(config)),)
  if modality == "image":
    return pipeline.preprocess, ((captions.CaptionTokens(max_length),) if text else ())
  if modality == "video":
    return video.preprocess, (motion_captions.VideoCaptionTokens(max_length),)
  return audio.preprocess, (spoken_words.AudioCaptionTokens(max_length),)
