"""Spoken words: an embedded text-to-audio dataset synthesised offline with espeak-ng.

Ten English words, each spoken by several espeak-ng voices at several speeds and pitches, with
the exact transcript as caption. The grid of (word, voice, speed, pitch) is fixed, so the
dataset is identical on every machine with the same espeak-ng; the test split holds out whole
(voice, speed, pitch) combinations (every word appears in both splits), so evaluation hears
speakers the model was not trained on. Built into a local TFDS dataset (ArrayRecord, random
access) like `fashion_mnist_local`; no download: 2520 training and 360 test clips of int16 PCM
at audio.SAMPLE_RATE, each word trimmed of silence and centred in audio.CLIP_SAMPLES samples,
built in about 8 s on 2 cores (35 MB).
"""

import concurrent.futures
import io
import itertools
import math
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from self_flow.data import sources
from self_flow.modalities import audio
from self_flow.text import tokenizer

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# espeak-ng voices; "+f2" etc. are its voice variants (`espeak-ng --voices=variant`), which change
# the formants and so the apparent speaker. espeak-ng silently ignores a variant it cannot apply
# (an unknown name, or any variant of "en-gb"), so tests check that every voice sounds different.
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-us+f2", "en+f4", "en-us+m3",
          "en-gb-x-rp+f1")
SPEEDS = (110, 135, 160, 185, 210, 235)  # words per minute
PITCHES = (20, 35, 50, 65, 80, 95)  # espeak-ng pitch, 0-99
SPLITS = ("train", "test")
PEAK = 0.9  # clips are peak-normalised to this amplitude
_SILENCE = 0.02  # fraction of the peak below which leading/trailing samples are trimmed
# One espeak-ng call speaks all words of a speaker, separated by pauses this long. Its start-up
# (loading voice data) costs about as much as speaking ten words, so this makes building ten
# times faster. A pause in a word (the closure before a stop) lasts under 0.1 s, so a quiet run
# longer than _MIN_GAP_S separates words unambiguously.
_PAUSE_MS = 800
_MIN_GAP_S = 0.3
_FIX_COMMAND = "apt-get install -y espeak-ng"
_WORKERS = 4  # threads waiting on espeak-ng processes; start-up I/O overlaps even on 2 cores


def transcript(label: int) -> str:
  """The exact words of class `label`, the caption a text-to-audio model conditions on."""
  if not isinstance(label, (int, np.integer)) or not 0 <= label < len(WORDS):
    raise ValueError(f"label={label!r} must be an integer word id in [0, {len(WORDS)}).")
  return WORDS[int(label)]


def is_heldout(voice: int, speed: int, pitch: int) -> bool:
  """Whether a (voice, speed, pitch) index combination belongs to the test split.

  1 combination in 8 (36 of 288), spread so every voice, speed and pitch occurs in both splits:
  the test split hears new speakers, not new kinds of speakers.
  """
  return (voice + 2 * speed + pitch) % 8 == 0


def split_combinations(split: str) -> list[tuple[int, int, int]]:
  """(voice, speed, pitch) index triples of `split`, in a fixed order."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not supported; allowed: {', '.join(map(repr, SPLITS))}.")
  grid = itertools.product(range(len(VOICES)), range(len(SPEEDS)), range(len(PITCHES)))
  return [c for c in grid if is_heldout(*c) == (split == "test")]


def synthesize(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
  """espeak-ng speaking `word` alone, as int16 (CLIP_SAMPLES,); see `synthesize_words`."""
  return synthesize_words([word], voice, speed, pitch)[0]


def synthesize_words(words: Sequence[str], voice: str, speed: int, pitch: int) -> np.ndarray:
  """espeak-ng speaking each of `words` as its own sentence: int16 (len(words), CLIP_SAMPLES).

  Each clip is at SAMPLE_RATE, trimmed of silence, centred (or centre-cropped) in the clip and
  peak-normalised to PEAK. One espeak-ng call speaks all words (see `_PAUSE_MS`); if its pauses
  do not split it into exactly one part per word, each word is synthesised alone instead.
  """
  if isinstance(words, str) or not words or not all(
      isinstance(w, str) and w.strip() and w.replace(" ", "").isalpha() for w in words):
    raise ValueError(f"words={words!r} must be a non-empty sequence of alphabetic words.")
  if not isinstance(speed, (int, np.integer)) or not 80 <= speed <= 450:
    raise ValueError(f"speed={speed!r} must be an integer in [80, 450] (words per minute).")
  if not isinstance(pitch, (int, np.integer)) or not 0 <= pitch <= 99:
    raise ValueError(f"pitch={pitch!r} must be an integer in [0, 99].")
  speech = _espeak(words, voice, speed, pitch)
  parts = _split_on_pauses(speech)
  if len(parts) != len(words):
    parts = [_trim(_espeak([word], voice, speed, pitch), word, voice) for word in words]
  return np.stack([_to_clip(part) for part in parts])


def _espeak(words: Sequence[str], voice: str, speed: int, pitch: int) -> np.ndarray:
  """espeak-ng's speech of `words` as sentences with pauses between, float64 at SAMPLE_RATE."""
  if shutil.which("espeak-ng") is None:
    raise FileNotFoundError(f"espeak-ng is not on PATH; it synthesises the spoken-words "
                            f"dataset. Fix: `{_FIX_COMMAND}`.")
  ssml = "<speak>" + f'<break time="{_PAUSE_MS}ms"/>'.join(f"<s>{w}.</s>" for w in words)
  command = ["espeak-ng", "-m", "-v", voice, "-s", str(int(speed)), "-p", str(int(pitch)),
             "--stdout", ssml + "</speak>"]
  result = subprocess.run(command, capture_output=True, check=False)
  if result.returncode or not result.stdout:
    raise ValueError(f"espeak-ng failed for voice={voice!r} (see `espeak-ng --voices=en`): "
                     f"{result.stderr.decode(errors='replace').strip()}")
  pcm, rate = audio.read_wav(io.BytesIO(result.stdout))
  return resample(audio.from_int16(pcm).astype(np.float64), rate, audio.SAMPLE_RATE)


def resample(x: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
  """Band-limited resampling of a 1-D signal by zero-padding or truncating its spectrum.

  Exact for signals that start and end in silence (the FFT treats them as periodic), which
  speech with pauses around it does; numpy only, so building needs no signal library. The
  signal is zero-padded to a multiple of rate / gcd so both lengths are whole and smooth.
  """
  for name, value in (("rate", rate), ("new_rate", new_rate)):
    if not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"{name}={value!r} must be a positive integer (Hz).")
  step = rate // math.gcd(rate, new_rate)
  padded = np.pad(x, (0, -len(x) % (64 * step)))
  new_length = len(padded) * new_rate // rate
  spectrum = np.fft.rfft(padded)[:new_length // 2 + 1]
  y = np.fft.irfft(spectrum, new_length) * (new_length / len(padded))
  return y[:int(math.ceil(len(x) * new_rate / rate))]


def _trim(speech: np.ndarray, word: str, voice: str) -> np.ndarray:
  """`speech` from its first to its last loud sample (pauses inside the word kept)."""
  loud = np.flatnonzero(np.abs(speech) > _SILENCE * np.abs(speech).max(initial=0.0))
  if not loud.size:
    raise ValueError(f"espeak-ng produced silence for word={word!r}, voice={voice!r}.")
  return speech[loud[0]:loud[-1] + 1]


def _split_on_pauses(speech: np.ndarray) -> list[np.ndarray]:
  """The loud stretches of `speech` separated by quiet runs longer than _MIN_GAP_S."""
  loud = np.flatnonzero(np.abs(speech) > _SILENCE * np.abs(speech).max(initial=0.0))
  if not loud.size:
    return []
  cuts = np.flatnonzero(np.diff(loud) > _MIN_GAP_S * audio.SAMPLE_RATE)
  return [speech[part[0]:part[-1] + 1] for part in np.split(loud, cuts + 1)]


def _to_clip(speech: np.ndarray) -> np.ndarray:
  """Trimmed speech centred (or centre-cropped) in CLIP_SAMPLES, peak-normalised, as int16."""
  clip = np.zeros(audio.CLIP_SAMPLES)
  if len(speech) > audio.CLIP_SAMPLES:
    start = (len(speech) - audio.CLIP_SAMPLES) // 2
    clip[:] = speech[start:start + audio.CLIP_SAMPLES]
  else:
    start = (audio.CLIP_SAMPLES - len(speech)) // 2
    clip[start:start + len(speech)] = speech
  clip *= PEAK / np.abs(clip).max()
  return np.round(clip * 32767).astype(np.int16)


class SpokenWords(tfds.core.GeneratorBasedBuilder):
  """Ten words x 8 voices x 6 speeds x 6 pitches, synthesised by espeak-ng.

  2520 training and 360 test clips; built in about 8 s (one espeak-ng call per speaker).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "16 kHz, 1.008 s clips; test holds out 1 in 8 voice/speed/pitch."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Spoken English words synthesised offline with espeak-ng.",
        features=tfds.features.FeaturesDict({
            "waveform": tfds.features.Tensor(shape=(audio.CLIP_SAMPLES,), dtype=np.int16,
                                             encoding=tfds.features.Encoding.ZLIB),
            "label": tfds.features.ClassLabel(names=list(WORDS)),
            "transcript": tfds.features.Text(),
            "voice": tfds.features.Text(),
            "speed": tfds.features.Scalar(dtype=np.int32),
            "pitch": tfds.features.Scalar(dtype=np.int32),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    combinations = split_combinations(split)

    def speak(combination):
      voice, speed, pitch = combination
      return synthesize_words(WORDS, VOICES[voice], SPEEDS[speed], PITCHES[pitch])

    # espeak-ng runs as separate processes, so threads synthesise in parallel; map keeps the
    # order, so keys and records are the same on every build.
    with concurrent.futures.ThreadPoolExecutor(max_workers=_WORKERS) as pool:
      for c, (combination, clips) in enumerate(zip(combinations, pool.map(speak, combinations))):
        voice, speed, pitch = combination
        for label, clip in enumerate(clips):
          yield c * len(WORDS) + label, {
              "waveform": clip, "label": label, "transcript": WORDS[label],
              "voice": VOICES[voice], "speed": SPEEDS[speed], "pitch": PITCHES[pitch]}


def open_audio_source(split: str, data_dir: str) -> sources.ImageSource:
  """`split` of the spoken words in `data_dir`, synthesised there on first use.

  Records are dicts with `waveform` int16 (CLIP_SAMPLES,), `label`, `transcript`, `voice`,
  `speed` and `pitch`.
  """
  split_combinations(split)  # validates the name
  builder = SpokenWords(data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    if shutil.which("espeak-ng") is None:
      raise FileNotFoundError(f"Cannot build spoken_words: espeak-ng is not on PATH. "
                              f"Fix: `{_FIX_COMMAND}`.")
    builder.download_and_prepare()
  return sources.ImageSource(builder.as_data_source(split=split), dataset="spoken_words",
                             split=split, tfds_name=builder.name)


class AudioCaptionTokens(grain.transforms.Map):
  """Adds `text_tokens` int32 (L,) and `text_mask` bool (L,) of the exact transcript."""

  def __init__(self, max_length: int):
    if not isinstance(max_length, (int, np.integer)) or max_length < 1:
      raise ValueError(f"max_length={max_length!r} must be an integer >= 1.")
    self.max_length = int(max_length)

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    tokens, mask = tokenizer.tokenize([transcript(int(element["label"]))], self.max_length)
    return {**element, "text_tokens": tokens[0], "text_mask": mask[0]}
