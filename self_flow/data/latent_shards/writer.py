"""Writes latent shards: encodes examples and stores them in the format `layout` defines.

This is the one-off encoding job (CLI `self_flow.tools.write_latent_shards`); the trainer only
reads, so it never imports this module.
"""

from collections.abc import Callable, Iterable, Iterator
import itertools
import json
import math
import os
import re
from typing import Any

from absl import logging
from array_record.python import array_record_module
from flax import serialization
import numpy as np

from self_flow.data.latent_shards import encoders, layout

_SPLIT_PATTERN = re.compile(r"[A-Za-z0-9_]+")
_LOG_EVERY = 10_000


def write_shards(
    examples: Iterable[dict[str, Any]],
    *,
    output_dir: str,
    split: str,
    num_shards: int,
    signal_encoder: encoders.SignalEncoder,
    text_encoder: encoders.TextEncoder,
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
      the rank `layout.MODALITIES[modality].latent_axes` names, or a (mean, std) pair of them for a
      Gaussian posterior (stored as `latent` and `latent_std`).
    text_encoder: list of B captions -> ((B, L, D) embeddings, (B, L) bool mask).
    batch_size: Examples per encoder call. The last batch is padded to this size, so a jitted
      encoder compiles once.
    latent_scale: Stored latents are `(signal_encoder(signal) - latent_shift) * latent_scale`.
    latent_shift: See `latent_scale`.
    signal_encoder_name: Name of `signal_encoder`, recorded in the metadata.
    text_encoder_name: Name of `text_encoder`, recorded in the metadata.
    modality: "image", "video" or "audio": what the examples hold (see `layout.MODALITIES`).
    process_index: This process's index in [0, process_count).
    process_count: Processes writing the split together; must divide `num_shards`.
    barrier: Blocks until every process has called it with the same name; required when
      `process_count > 1`.

  Returns:
    The metadata written to `output_dir/metadata.json`.

  Raises:
    ValueError: a bad argument or example, or metadata incompatible with the existing splits.
  """
  layout.check_modality(modality)
  _check_write_args(split, num_shards, batch_size, latent_scale, latent_shift,
                    signal_encoder_name, text_encoder_name)
  _check_process_args(num_shards, process_index, process_count, barrier)
  encoded = _encode_batches(
      examples, layout.MODALITIES[modality], signal_encoder, text_encoder, batch_size, latent_scale,
      latent_shift
  )
  # The first batch gives the field shapes, which are checked before the directory is touched.
  first = next(encoded, None)
  if first is None:
    raise ValueError(f"No examples given for split {split!r} (process {process_index} of "
                     f"{process_count}); nothing written.")
  header = {
      "format": layout.FORMAT,
      "version": layout.VERSION,
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
          os.path.join(output_dir, layout.shard_name(split, i, num_shards)), layout.WRITER_OPTIONS)
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
  return layout.read_metadata(output_dir)


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
        os.path.join(output_dir, layout.shard_name(split, i, num_shards)))
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
  if os.path.exists(os.path.join(output_dir, layout.METADATA_FILE)):
    existing = layout.read_metadata(output_dir)
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
  for name in layout.shard_files(output_dir, split):
    os.remove(os.path.join(output_dir, name))
  return dict(header, splits=splits)


def _write_metadata(output_dir: str, metadata: dict[str, Any]) -> None:
  """Writes metadata.json atomically, so readers never see a half-written file."""
  path = os.path.join(output_dir, layout.METADATA_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(metadata, f, indent=2)
  os.replace(path + ".tmp", path)


def _encode_batches(
    examples: Iterable[dict[str, Any]],
    modality: layout.ModalityFormat,
    signal_encoder: encoders.SignalEncoder,
    text_encoder: encoders.TextEncoder,
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


def _batch_inputs(batch: list[dict[str, Any]], start: int, modality: layout.ModalityFormat
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
                           modality: layout.ModalityFormat) -> None:
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
