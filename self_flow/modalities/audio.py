"""Audio <-> log-mel features <-> tokens along time, and features back to a waveform.

The model generates a time-frequency picture of the sound: a log-mel spectrogram (frames, mels)
normalised with fixed constants to about [-1, 1] (the range the image and video signals use), cut
into tokens of `frames_per_token` consecutive frames with positions (time, 0, 0). To listen to a
sample, `mel_to_waveform` undoes the normalisation and the mel filterbank (non-negative least
squares) and recovers a phase with Griffin-Lim. Everything here is numpy: it runs on the host, in
data pipelines and when writing samples. The STFT is written out here (centred Hann frames,
reflect-padded) so that analysis and resynthesis share one exact definition and a clip of
CLIP_SAMPLES samples round-trips to the same length.

Round-trip error (waveform -> log-mel -> waveform), measured on 40 espeak-ng words (4 speakers)
and asserted in tests/test_audio.py: spectral convergence of STFT magnitudes 0.41-0.89 (mean
0.60; 32 mel bins cannot keep single harmonics, worst for high voices, and Griffin-Lim's phase
is not the original one) and mean absolute log-mel difference 0.021-0.059 normalised units
(mean 0.035, about 2 dB).
"""

import functools
import wave
from typing import BinaryIO

import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16_000  # Hz
N_FFT = 1024  # STFT window (64 ms): fine frequency resolution for the mel bank
HOP_LENGTH = 256  # 16 ms: 75% overlap, which Griffin-Lim needs to converge well
NUM_FRAMES = 64  # feature frames per clip
NUM_MELS = 32  # mel bins (HTK mel scale, 0 Hz to SAMPLE_RATE / 2)
CLIP_SAMPLES = HOP_LENGTH * (NUM_FRAMES - 1)  # 16128 samples, 1.008 s: frames are centred
# Normalisation, fixed so features mean the same in every run: dB = 10 log10(max(mel power,
# 10^(DB_FLOOR / 10))) of the unnormalised Hann-window STFT power, mapped affinely from
# [DB_FLOOR, DB_CEILING] to [-1, 1] and clipped. Peak-normalised (0.9) espeak-ng words reach
# +37 dB in a typical clip and +45.1 dB at most over the whole dataset, so nothing clips at the
# top; about half the values (silence around the word) sit at the floor.
DB_FLOOR = -60.0
DB_CEILING = 46.0
DB_CENTER = (DB_CEILING + DB_FLOOR) / 2  # -7 dB -> 0
DB_HALF_RANGE = (DB_CEILING - DB_FLOOR) / 2  # 53 dB per unit
GRIFFIN_LIM_ITERS = 32  # fast Griffin-Lim; more iterations barely change the error
GRIFFIN_LIM_MOMENTUM = 0.99
NNLS_ITERS = 100  # multiplicative updates of the mel-filterbank inverse
_NNLS_FLOOR = 1e-12  # linear power floor during the updates, 120 dB below full scale


def _window() -> np.ndarray:
  return np.hanning(N_FFT + 1)[:-1].astype(np.float32)  # periodic Hann


@functools.cache
def _mel_bands() -> tuple[np.ndarray, np.ndarray]:
  """Where each linear bin lies among the filter edges: (band int (bins,), position (bins,)).

  The NUM_MELS + 2 edges are evenly spaced on the HTK mel scale; filter m rises over band m
  (edges m to m + 1) and falls over band m + 1, and adjacent filters cross, so a bin at
  `position` r in band j weighs r in filter j and 1 - r in filter j - 1 (where they exist). At
  most two filters per bin lets `_to_mel` and `_from_mel` work in O(bins) per frame: tiny dense
  products go through a threaded BLAS, which thrashes on small shared machines (the 200 products
  of one `mel_to_linear` took seconds there instead of milliseconds).
  """
  to_mel = lambda hz: 2595.0 * np.log10(1.0 + hz / 700.0)
  to_hz = lambda mel: 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
  edges = to_hz(np.linspace(0.0, to_mel(SAMPLE_RATE / 2), NUM_MELS + 2))
  bins = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
  band = np.clip(np.searchsorted(edges, bins, side="right") - 1, 0, NUM_MELS)
  position = (bins - edges[band]) / (edges[band + 1] - edges[band])
  band.flags.writeable = position.flags.writeable = False  # cached: shared by every call
  return band, position


def mel_filterbank() -> np.ndarray:
  """(NUM_MELS, N_FFT // 2 + 1) triangular filters (peak 1), evenly spaced on the mel scale."""
  band, position = _mel_bands()
  bank = np.zeros((NUM_MELS + 1, N_FFT // 2 + 1))
  columns = np.arange(N_FFT // 2 + 1)
  bank[band, columns] += position  # rising edge of filter `band`
  bank[band - 1, columns] += np.where(band > 0, 1.0 - position, 0.0)  # falling edge
  return bank[:NUM_MELS].astype(np.float32)


def _to_mel(linear: np.ndarray) -> np.ndarray:
  """`linear @ mel_filterbank().T` (..., bins) -> (..., NUM_MELS), computed band by band."""
  band, position = _mel_bands()
  limits = np.searchsorted(band, np.arange(NUM_MELS + 2))  # bins of band j: limits[j:j + 2]

  def band_sums(values):
    totals = np.concatenate([np.zeros(values.shape[:-1] + (1,)), np.cumsum(values, -1)], -1)
    return np.diff(totals[..., limits], axis=-1)  # (..., NUM_MELS + 1)

  linear = np.asarray(linear, np.float64)
  return (band_sums(linear * position)[..., :NUM_MELS]
          + band_sums(linear * (1.0 - position))[..., 1:])


def _from_mel(mel: np.ndarray) -> np.ndarray:
  """`mel @ mel_filterbank()` (..., NUM_MELS) -> (..., bins): the transpose of `_to_mel`."""
  band, position = _mel_bands()
  padded = np.pad(np.asarray(mel, np.float64), [(0, 0)] * (np.ndim(mel) - 1) + [(1, 1)])
  return position * padded[..., band + 1] + (1.0 - position) * padded[..., band]


def stft(waveform: np.ndarray) -> np.ndarray:
  """(..., CLIP_SAMPLES) -> complex (..., NUM_FRAMES, N_FFT // 2 + 1), centred frames."""
  _check_samples(waveform)
  pad = N_FFT // 2
  padded = np.pad(waveform, [(0, 0)] * (waveform.ndim - 1) + [(pad, pad)], mode="reflect")
  starts = np.arange(NUM_FRAMES) * HOP_LENGTH
  frames = padded[..., starts[:, None] + np.arange(N_FFT)]
  return np.fft.rfft(frames * _window(), axis=-1)


def istft(spectrum: np.ndarray) -> np.ndarray:
  """Inverse of `stft` by windowed overlap-add: (..., NUM_FRAMES, bins) -> (..., CLIP_SAMPLES).

  For a spectrum that is no exact STFT (Griffin-Lim's iterates), this is the waveform whose STFT
  is nearest in the least-squares sense (Griffin & Lim, 1984), which Griffin-Lim relies on.
  """
  spectrum = np.asarray(spectrum)
  if spectrum.ndim < 2 or spectrum.shape[-2:] != (NUM_FRAMES, N_FFT // 2 + 1):
    raise ValueError(f"spectrum must have shape (..., {NUM_FRAMES}, {N_FFT // 2 + 1}) = (..., "
                     f"NUM_FRAMES, N_FFT // 2 + 1); got {spectrum.shape}.")
  window = _window()
  frames = np.fft.irfft(spectrum, n=N_FFT, axis=-1) * window
  length = CLIP_SAMPLES + N_FFT
  out = np.zeros(frames.shape[:-2] + (length,), np.float64)
  norm = np.zeros(length, np.float64)
  for f in range(NUM_FRAMES):
    start = f * HOP_LENGTH
    out[..., start:start + N_FFT] += frames[..., f, :]
    norm[start:start + N_FFT] += window ** 2
  pad = N_FFT // 2
  return (out / np.maximum(norm, 1e-8))[..., pad:pad + CLIP_SAMPLES].astype(np.float32)


def log_mel(waveform: np.ndarray) -> np.ndarray:
  """(..., CLIP_SAMPLES) float in [-1, 1] -> (..., NUM_FRAMES, NUM_MELS) float32 in [-1, 1]."""
  power = np.abs(stft(np.asarray(waveform, np.float32))) ** 2
  mel = _to_mel(power)
  db = 10.0 * np.log10(np.maximum(mel, 10.0 ** (DB_FLOOR / 10.0)))
  return np.clip((db - DB_CENTER) / DB_HALF_RANGE, -1.0, 1.0).astype(np.float32)


def mel_to_waveform(features: np.ndarray, num_iters: int = GRIFFIN_LIM_ITERS,
                    seed: int = 0) -> np.ndarray:
  """(..., NUM_FRAMES, NUM_MELS) features -> (..., CLIP_SAMPLES) waveforms in [-1, 1].

  Undoes the normalisation exactly, then the mel filterbank by non-negative least squares
  (`mel_to_linear`), then recovers a phase with fast Griffin-Lim (Perraudin et al., 2013:
  Griffin-Lim with momentum `GRIFFIN_LIM_MOMENTUM`, which converges in far fewer iterations).
  The initial phase is drawn from `seed`, so the same features always give the same waveform.
  """
  features = np.asarray(features, np.float64)
  if features.ndim < 2 or features.shape[-2:] != (NUM_FRAMES, NUM_MELS):
    raise ValueError(f"features must have shape (..., {NUM_FRAMES}, {NUM_MELS}) = (..., "
                     f"NUM_FRAMES, NUM_MELS); got {features.shape}.")
  if not isinstance(num_iters, (int, np.integer)) or num_iters < 1:
    raise ValueError(f"num_iters={num_iters!r} must be an integer >= 1.")
  db = np.clip(features, -1.0, 1.0) * DB_HALF_RANGE + DB_CENTER
  magnitude = np.sqrt(mel_to_linear(10.0 ** (db / 10.0)))
  phase = np.exp(2j * np.pi * np.random.default_rng(seed).random(magnitude.shape))
  previous = None
  for _ in range(num_iters):
    rebuilt = stft(istft(magnitude * phase))
    target = rebuilt if previous is None else rebuilt + GRIFFIN_LIM_MOMENTUM * (rebuilt - previous)
    previous = rebuilt
    phase = np.exp(1j * np.angle(target))
  return np.clip(istft(magnitude * phase), -1.0, 1.0)


def mel_to_linear(mel_power: np.ndarray, num_iters: int = NNLS_ITERS) -> np.ndarray:
  """(..., NUM_MELS) mel power -> (..., N_FFT // 2 + 1) non-negative linear power.

  The filterbank has more bins than mels, so many spectra map to the same mel power; this picks
  a non-negative least-squares one with Lee-Seung multiplicative updates, started from the
  pseudo-inverse clipped at 0. Clipping alone leaves the negative lobes of the pseudo-inverse
  missing, so re-computed mel power comes out too high in quiet bins: on spoken words the
  log-mel round-trip error halves with the updates (see tests/test_audio.py).
  """
  if not isinstance(num_iters, (int, np.integer)) or num_iters < 0:
    raise ValueError(f"num_iters={num_iters!r} must be an integer >= 0.")
  mel_power = np.asarray(mel_power, np.float64)
  if mel_power.ndim < 1 or mel_power.shape[-1] != NUM_MELS:
    raise ValueError(f"mel_power must have NUM_MELS={NUM_MELS} values on the last axis; got "
                     f"shape {mel_power.shape}.")
  inverse = np.linalg.pinv(mel_filterbank().astype(np.float64))  # (bins, NUM_MELS)
  linear = np.maximum(np.einsum("...m,bm->...b", mel_power, inverse), 0.0) + _NNLS_FLOOR
  numerator = _from_mel(mel_power)
  for _ in range(num_iters):
    # The floor keeps every bin positive (a zero never recovers) and far from denormals.
    linear = np.maximum(linear * numerator / np.maximum(_from_mel(_to_mel(linear)), 1e-30),
                        _NNLS_FLOOR)
  return linear


def from_int16(samples: np.ndarray) -> np.ndarray:
  """int16 PCM -> float32 in [-1, 1)."""
  return np.asarray(samples, np.float32) / 32768.0


def check_tokenizable(num_frames: int, frames_per_token: int) -> None:
  """Raises ValueError unless whole tokens of `frames_per_token` frames tile the clip."""
  if (not isinstance(frames_per_token, (int, np.integer)) or frames_per_token <= 0
      or num_frames % frames_per_token):
    raise ValueError(f"audio.frames_per_token={frames_per_token!r} must be a positive divisor "
                     f"of audio.num_frames={num_frames}.")


def tokenize(features, frames_per_token: int):
  """(B, F, M) -> (B, F / k, k * M): k consecutive frames per token, in time order.

  Works on numpy and JAX arrays alike (a reshape), so the model and the host share it.
  """
  b, f, m = features.shape
  check_tokenizable(f, frames_per_token)
  return features.reshape(b, f // frames_per_token, frames_per_token * m)


def detokenize(tokens, frames_per_token: int, num_mels: int):
  """Inverse of `tokenize`: (B, N, k * M) -> (B, N * k, M)."""
  b, n, d = tokens.shape
  if (not isinstance(frames_per_token, (int, np.integer)) or frames_per_token <= 0
      or d != frames_per_token * num_mels):
    raise ValueError(f"tokens of width {d} cannot hold audio.frames_per_token="
                     f"{frames_per_token!r} frames of num_mels={num_mels!r} mels each.")
  return tokens.reshape(b, n * frames_per_token, num_mels)


def position_ids(num_frames: int, frames_per_token: int) -> jnp.ndarray:
  """(time, 0, 0) of every token, (N, 3) int32: audio tokens vary along time only."""
  check_tokenizable(num_frames, frames_per_token)
  n = num_frames // frames_per_token
  ids = np.zeros((n, 3), np.int32)
  ids[:, 0] = np.arange(n)
  return jnp.asarray(ids)


def preprocess(record: dict) -> dict[str, np.ndarray]:
  """A spoken-words record as model inputs: log-mel float32 (NUM_FRAMES, NUM_MELS) and label.

  Module-level so grain's worker processes can import it by name.
  """
  return {"audio": log_mel(from_int16(record["waveform"])),
          "label": np.asarray(record["label"], np.int32)}


def write_wav(target: str | BinaryIO, waveform: np.ndarray, sample_rate: int = SAMPLE_RATE):
  """Writes mono 16-bit PCM (values clipped to [-1, 1]) to a path or binary file object.

  The stdlib `wave` module keeps sample writing free of audio-library dependencies.
  """
  waveform = np.asarray(waveform)
  if waveform.ndim != 1:
    raise ValueError(f"waveform must be mono, shape (samples,); got shape {waveform.shape}.")
  if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
    raise ValueError(f"sample_rate={sample_rate!r} must be a positive integer (Hz).")
  pcm = np.round(np.clip(np.asarray(waveform, np.float32), -1.0, 1.0) * 32767).astype("<i2")
  with wave.open(target, "wb") as out:
    out.setnchannels(1)
    out.setsampwidth(2)
    out.setframerate(int(sample_rate))
    out.writeframes(pcm.tobytes())


def read_wav(source: str | BinaryIO) -> tuple[np.ndarray, int]:
  """(int16 samples of the first channel, sample rate) of a 16-bit PCM WAV file."""
  with wave.open(source, "rb") as f:
    if f.getsampwidth() != 2:
      raise ValueError(f"only 16-bit PCM WAV is supported; got {8 * f.getsampwidth()}-bit.")
    raw = np.frombuffer(f.readframes(f.getnframes()), "<i2")
    return raw.reshape(-1, f.getnchannels())[:, 0].copy(), f.getframerate()


def _check_samples(waveform: np.ndarray) -> None:
  if waveform.ndim < 1 or waveform.shape[-1] != CLIP_SAMPLES:
    raise ValueError(f"waveforms must have CLIP_SAMPLES={CLIP_SAMPLES} samples on the last axis;"
                     f" got shape {waveform.shape}.")
