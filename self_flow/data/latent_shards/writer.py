"""Writes latent shards: encodes examples and stores them in the format `layout` defines.

This is the one-off encoding job (CLI `self_flow.tools.write_latent_shards`); the trainer only
reads, so it never imports this module. The output directory may be local or a Cloud Storage
URL. Each shard is written to a local temporary file, uploaded whole when complete, then
recorded in a per-shard manifest (`layout.MANIFEST_DIR`); a rerun after a preemption skips every
shard with a manifest of the same job and writes only the missing ones; `metadata.json` is
merged from the manifests last. Shards of another job (other encoders, scale, sizes) are never
deleted without `overwrite=True`.
"""

from collections.abc import Callable, Iterable, Iterator, Sequence
import itertools
import math
import os
import re
import socket
import tempfile
import time
from typing import Any

from absl import logging
from array_record.python import array_record_module
from flax import serialization
import numpy as np

from self_flow import storage
from self_flow.data.latent_shards import encoders, layout

_SPLIT_PATTERN = re.compile(r"[A-Za-z0-9_]+")


def write_shards(
    examples: Sequence[dict[str, Any]],
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
    overwrite: bool = False,
) -> dict[str, Any]:
  """Encodes `examples` and writes them as `split` of the latent-shard directory `output_dir`.

  Shard i holds examples `layout.shard_range(i, num_shards, len(examples))`, read as
  `examples[start:stop]`: a sequence whose slices load in parallel (threaded image decoding)
  speeds the job up, and nothing outside a shard's block is read for it.

  Other splits already in `output_dir` are kept; their metadata must agree (modality,
  encoders, latent scale and shift, field shapes). A shard whose manifest records this very job
  (same encoders, scale, shift, example count and shard count) is not written again, so an
  interrupted job is finished by rerunning it. A manifest of another job stops the job before
  anything is changed, unless `overwrite` (then the split's old shards, manifests and metadata
  entry are deleted first).

  Several processes (e.g. the hosts of a TPU pod, all writing `output_dir`) write one split
  together: each calls this with its `process_index` and the same `examples`, and writes the
  shards i = process_index, process_index + process_count, ... . Process 0 clears an old split
  (with `overwrite`) before anyone writes and merges the metadata after everyone has finished;
  `barrier(name)` (e.g. `multihost_utils.sync_global_devices`) orders these steps.

  Args:
    examples: Dicts with the signal of `modality` (one shape for all: `image` uint8 (H, W, C),
      `video` uint8 (T, H, W, C) or `waveform` int16 (samples,)), `caption` (str) and
      optionally `label` (int; -1 = none, the default).
    output_dir: Directory to write (local or gs://); created if missing.
    split: Split name (letters, digits, underscores).
    num_shards: Number of shard files (at most the number of examples).
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
    process_count: Processes writing the split together.
    barrier: Blocks until every process has called it with the same name; required when
      `process_count > 1`.
    overwrite: Replace the split if `output_dir` holds it (or parts of it) from another job.

  Returns:
    The metadata written to `output_dir/metadata.json`.

  Raises:
    ValueError: a bad argument or example, shards of another job without `overwrite`, or
      metadata incompatible with the existing splits.
  """
  layout.check_modality(modality)
  _check_write_args(split, num_shards, batch_size, latent_scale, latent_shift,
                    signal_encoder_name, text_encoder_name)
  _check_process_args(process_index, process_count, barrier)
  if not len(examples):  # pylint: disable=g-explicit-length-test  (a Sequence, maybe no bool)
    raise ValueError(f"No examples given for split {split!r}; nothing written.")
  if num_shards > len(examples):
    raise ValueError(f"num_shards={num_shards} exceeds the {len(examples)} examples of split "
                     f"{split!r}; use at most one shard per example.")
  job = {"modality": modality, "latent_scale": float(latent_scale),
         "latent_shift": float(latent_shift), "signal_encoder": signal_encoder_name,
         "text_encoder": text_encoder_name, "num_examples": len(examples),
         "num_shards": num_shards}
  sync = barrier or (lambda name: None)
  other_splits = _other_splits_header(output_dir, split, job)
  if process_index == 0:
    _check_or_clear_split(output_dir, split, job, overwrite)
  sync(f"latent_shards {output_dir} {split}: old shards checked")
  encode = lambda block, start: _encode_batches(  # noqa: E731
      block, layout.MODALITIES[modality], signal_encoder, text_encoder, batch_size, latent_scale,
      latent_shift, start)
  mine = range(process_index, num_shards, process_count)
  started, done = time.time(), 0
  for index in mine:
    shard = layout.shard_range(index, num_shards, len(examples))
    if _finished(output_dir, split, index, job):
      logging.info("%s: shard %d of split %r is already written; skipped.", output_dir, index,
                   split)
      continue
    _write_shard(output_dir, split, index, job, encode(examples[shard.start:shard.stop],
                                                       shard.start), other_splits)
    done += 1
    elapsed = time.time() - started
    logging.info("%s: process %d wrote shard %d of split %r (%d of its %d; %.1f examples/s).",
                 output_dir, process_index, index, split, done, len(mine),
                 len(shard) * done / max(elapsed, 1e-9) if done else 0.0)
  sync(f"latent_shards {output_dir} {split}: shards written")
  if process_index == 0:
    _merge_metadata(output_dir, split, job)
  sync(f"latent_shards {output_dir} {split}: metadata written")
  return layout.read_metadata(output_dir)


def _finished(output_dir: str, split: str, index: int, job: dict[str, Any]) -> bool:
  """Whether shard `index` has a manifest of this `job` (checked before anything is written:
  another job's manifest is an error or was cleared)."""
  path = layout.manifest_path(output_dir, split, index, job["num_shards"])
  return storage.exists(path) and storage.read_json(path)["job"] == job


# What every split of a directory shares (metadata.json holds it once), fields excepted.
_SHARED_KEYS = ("modality", "latent_scale", "latent_shift", "signal_encoder", "text_encoder")


def _other_splits(output_dir: str, split: str) -> tuple[dict[str, Any] | None, list[str]]:
  """(metadata, names) of the splits of `output_dir` other than `split`; (None, []) if none."""
  if not storage.exists(storage.join(output_dir, layout.METADATA_FILE)):
    return None, []
  existing = layout.read_metadata(output_dir)
  others = sorted(set(existing["splits"]) - {split})
  return (existing, others) if others else (None, [])


def _check_joins(output_dir: str, split: str, values: dict[str, Any]) -> None:
  """Raises ValueError if another split of `output_dir` was written with other `values`."""
  existing, others = _other_splits(output_dir, split)
  for key, value in values.items():
    if existing is not None and existing[key] != value:
      raise ValueError(
          f"{output_dir!r} holds splits {others} written with {key}={existing[key]!r}; cannot "
          f"add split {split!r} with {key}={value!r}. Use another output_dir or matching "
          "settings.")


def _other_splits_header(output_dir: str, split: str, job: dict[str, Any]
                         ) -> dict[str, Any] | None:
  """The metadata of the other splits in `output_dir` (None if there are none), after checking
  that this job may join them; their `fields` are checked against each shard's first batch,
  before the shard is uploaded."""
  _check_joins(output_dir, split, {key: job[key] for key in _SHARED_KEYS})
  existing, _ = _other_splits(output_dir, split)
  return existing


def _write_shard(output_dir: str, split: str, index: int, job: dict[str, Any],
                 encoded: Iterator[tuple[dict[str, Any], dict[str, Any]]],
                 other_splits: dict[str, Any] | None) -> None:
  """Writes one shard through a local temporary file, uploads it, then writes its manifest."""
  name = layout.shard_name(split, index, job["num_shards"])
  expected = len(layout.shard_range(index, job["num_shards"], job["num_examples"]))
  fields = None
  with tempfile.TemporaryDirectory(prefix="self_flow_shard_") as directory:
    local = os.path.join(directory, name)
    writer = array_record_module.ArrayRecordWriter(local, layout.WRITER_OPTIONS)
    count = 0
    try:
      for record, record_fields in encoded:
        if fields is None:
          fields = record_fields
          if other_splits is not None:
            _check_joins(output_dir, split, {"fields": fields})
        elif record_fields != fields:
          raise ValueError(
              f"Shard {name}: example {count} has fields {record_fields}, but earlier examples "
              f"have {fields}; all examples must share one shape.")
        writer.write(serialization.msgpack_serialize(record))
        count += 1
    finally:
      writer.close()
    if count != expected:
      raise ValueError(f"Shard {name} got {count} examples from examples[start:stop], not "
                       f"{expected}: the examples sequence must slice like a list.")
    storage.upload(local, storage.join(output_dir, name))
  storage.write_json(layout.manifest_path(output_dir, split, index, job["num_shards"]), {
      "job": job, "shard": name, "num_records": count, "fields": fields,
      "written_by": {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}})


def _check_or_clear_split(output_dir: str, split: str, job: dict[str, Any],
                          overwrite: bool) -> None:
  """Refuses (or, with `overwrite`, deletes) shards and manifests of `split` from another job.

  Runs on process 0 before anything is written, so a refusal changes nothing."""
  manifests = [name for name in storage.list_names(storage.join(output_dir, layout.MANIFEST_DIR))
               if name.startswith(f"{split}-")]
  others = [name for name in manifests if storage.read_json(storage.join(
      output_dir, layout.MANIFEST_DIR, name))["job"] != job]
  recorded = storage.exists(storage.join(output_dir, layout.METADATA_FILE)) and split in (
      layout.read_metadata(output_dir)["splits"])
  if recorded and not others:
    info = layout.read_metadata(output_dir)["splits"][split]
    if (info["num_examples"], info["num_shards"]) != (job["num_examples"], job["num_shards"]):
      others = [layout.METADATA_FILE]
  if not others:
    return
  if not overwrite:
    raise ValueError(
        f"{output_dir!r} already holds split {split!r} (or part of it) written by another job "
        f"({others[0]}{' and more' if len(others) > 1 else ''} differs from this one: "
        f"{_job_text(job)}). Its shards are kept; pass overwrite=True (--overwrite) to replace "
        "them, or write to another directory.")
  logging.warning("%s: deleting split %r of another job (overwrite requested).", output_dir, split)
  if recorded:
    metadata = layout.read_metadata(output_dir)
    del metadata["splits"][split]
    storage.write_json(storage.join(output_dir, layout.METADATA_FILE), metadata)
  for name in manifests:
    storage.remove(storage.join(output_dir, layout.MANIFEST_DIR, name))
  for name in layout.shard_files(output_dir, split):
    storage.remove(storage.join(output_dir, name))


def _job_text(job: dict[str, Any]) -> str:
  return ", ".join(f"{key}={value!r}" for key, value in job.items())


def _merge_metadata(output_dir: str, split: str, job: dict[str, Any]) -> None:
  """Adds `split`, as its manifests describe it, to metadata.json (written last, atomically)."""
  num_shards = job["num_shards"]
  manifests = []
  for index in range(num_shards):
    path = layout.manifest_path(output_dir, split, index, num_shards)
    if not storage.exists(path):
      raise ValueError(f"{output_dir!r}: shard {index} of split {split!r} has no manifest after "
                       "every process finished; a writer failed. Rerun the job to write the "
                       "missing shards.")
    manifests.append(storage.read_json(path))
  fields = manifests[0]["fields"]
  for manifest in manifests:
    if manifest["job"] != job or manifest["fields"] != fields:
      raise ValueError(f"{output_dir!r}: shard {manifest['shard']} has fields "
                       f"{manifest['fields']} from job {manifest['job']}, but shard "
                       f"{manifests[0]['shard']} has {fields}; all examples must share one "
                       "shape.")
  header = {"format": layout.FORMAT, "version": layout.VERSION, "fields": fields,
            **{key: job[key] for key in _SHARED_KEYS}}
  _check_joins(output_dir, split, header)
  existing, others = _other_splits(output_dir, split)
  metadata = dict(header, splits={name: existing["splits"][name] for name in others})
  metadata_path = storage.join(output_dir, layout.METADATA_FILE)
  shard_lengths = [manifest["num_records"] for manifest in manifests]
  metadata["splits"][split] = {"num_examples": sum(shard_lengths), "num_shards": num_shards,
                               "shard_lengths": shard_lengths}
  storage.write_json(metadata_path, metadata)
  logging.info("%s: split %r done, %d examples in %d shards.", output_dir, split,
               sum(shard_lengths), num_shards)


def _check_process_args(process_index: int, process_count: int,
                        barrier: Callable[[str], None] | None) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index}, process_count={process_count}: need "
                     "process_count >= 1 and 0 <= process_index < process_count.")
  if process_count > 1 and barrier is None:
    raise ValueError(f"process_count={process_count} needs a barrier (e.g. "
                     "jax.experimental.multihost_utils.sync_global_devices).")


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


def _encode_batches(
    examples: Iterable[dict[str, Any]],
    modality: layout.ModalityFormat,
    signal_encoder: encoders.SignalEncoder,
    text_encoder: encoders.TextEncoder,
    batch_size: int,
    latent_scale: float,
    latent_shift: float,
    start: int = 0,
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
  """Yields (record, field specs) per example, encoding `batch_size` examples per call; the
  first example is example `start` of the split (for error messages)."""
  iterator = iter(examples)
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
