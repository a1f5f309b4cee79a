"""Writes latent shards: encodes examples and stores them in the format `layout` defines.

This is the one-off encoding job (CLI `self_flow.tools.write_latent_shards`); the trainer only
reads, so it never imports this module. The output directory may be local or a Cloud Storage
URL. Each shard is written to a local temporary file, uploaded whole when complete, then
recorded in a per-shard manifest (`layout.MANIFEST_DIR`); a rerun after a preemption skips every
shard with a manifest of the same job and writes only the missing ones; `metadata.json` is
merged from the manifests last. Shards of another job (other encoders, scale, sizes) are never
deleted without `overwrite=True`.

Two ways to say what goes into the shards:

* `write_shards(examples, num_shards=n)`: a sequence of examples cut into n contiguous blocks
  (the built-in datasets, TFDS image folders);
* `write_units(units)`: one shard per input unit (a webdataset tar, a parquet file, a slice of a
  TFDS split), each a callable streaming its examples. Bad inputs arrive as `Skipped` markers;
  they are counted per reason in the shard's manifest and the split's metadata, never written.
  Host p of P encodes units p, p + P, ..., so no host reads another's input, and each host has
  one output shard open at a time (memory flat in the dataset size).
"""

from collections.abc import Callable, Iterable, Iterator, Sequence
import collections
import dataclasses
import itertools
import json
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
import ml_dtypes
import numpy as np

from self_flow import storage
from self_flow.data.captioned import Skipped
from self_flow.data.latent_shards import encoders, layout

_SPLIT_PATTERN = re.compile(r"[A-Za-z0-9_]+")
# Storage dtypes of caption embeddings: float16 (finer) or bfloat16 (float32's range).
TEXT_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
# Seconds between progress lines while a shard is being encoded.
_PROGRESS_EVERY_S = 60.0


# A callable streaming one unit's examples (dicts as `write_shards` takes, or `Skipped`).
Unit = Callable[[], Iterable[dict[str, Any] | Skipped]]


def write_shards(
    examples: Sequence[dict[str, Any]],
    *,
    num_shards: int,
    **options: Any,
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

  Args (the keyword arguments besides `num_shards` are `options`, the same for `write_units`):
    examples: Dicts with the signal of `modality` (one shape for all: `image` uint8 (H, W, C),
      `video` uint8 (T, H, W, C) or `waveform` int16 (samples,)), `caption` (str) or, with
      `captions_per_example`, `captions` (a sequence of str), and optionally `label` (int;
      -1 = none, the default).
    num_shards: Number of shard files (at most the number of examples).
    output_dir: Directory to write (local or gs://); created if missing.
    split: Split name (letters, digits, underscores).
    signal_encoder: (B, *signal shape) float32 in [-1, 1] -> (B, *latent shape) latents, of
      the rank `layout.MODALITIES[modality].latent_axes` names, or a (mean, std) pair of them for a
      Gaussian posterior (stored as `latent` and `latent_std`).
    text_encoder: list of B captions -> ((B, L, D) float embeddings, stored as
      `text_embedding`, or (B, L) integer token ids, stored as `text_tokens`; (B, L) bool mask).
    batch_size: Examples per encoder call. The last batch is padded to this size, so a jitted
      encoder compiles once.
    latent_scale: Stored latents are `(signal_encoder(signal) - latent_shift) * latent_scale`
      (default 1).
    latent_shift: See `latent_scale` (default 0).
    signal_encoder_name: Name of `signal_encoder`, recorded in the metadata.
    text_encoder_name: Name of `text_encoder`, recorded in the metadata.
    modality: "image" (default), "video" or "audio": what the examples hold (see
      `layout.MODALITIES`).
    captions_per_example: 0: one `caption` per example, text fields (L, ...). C > 0: up to C
      `captions` per example (more are dropped), text fields (C, L, ...) with unused rows
      masked out, `num_captions` and `captions` (a JSON list) stored; the trainer draws one per
      example per epoch.
    text_dtype: Storage dtype of caption embeddings, a key of `TEXT_DTYPES` (default float16).
    process_index: This process's index in [0, process_count) (default 0).
    process_count: Processes writing the split together (default 1).
    barrier: Blocks until every process has called it with the same name; required when
      `process_count > 1`.
    overwrite: Replace the split if `output_dir` holds it (or parts of it) from another job.

  Returns:
    The metadata written to `output_dir/metadata.json`.

  Raises:
    ValueError: a bad argument or example, shards of another job without `overwrite`, or
      metadata incompatible with the existing splits.
  """
  blocks = [layout.shard_range(i, num_shards, len(examples)) for i in range(num_shards)]
  units = [lambda block=block: examples[block.start:block.stop] for block in blocks]
  return _write_split(units, [len(block) for block in blocks], {"num_examples": len(examples)},
                      num_shards=num_shards, **options)


def write_units(
    units: Sequence[Unit],
    *,
    inputs: dict[str, Any],
    **options: Any,
) -> dict[str, Any]:
  """Writes shard i of `split` from `units[i]()`, the examples of one input unit.

  As `write_shards` (same `options`, same resumable, multi-process protocol), except that the
  shards are the units: `units[i]()` streams the examples of input unit i (a file, a slice) and
  may yield `Skipped` markers for inputs that could not be used; a shard holds the examples it
  got, in order, however many. `inputs` (JSON) describes the input units (source, files); it
  is part of the job, so a rerun on other inputs is refused unless `overwrite`.
  """
  return _write_split(units, None, {"inputs": inputs}, num_shards=len(units), **options)


def _write_split(units: Sequence[Unit], lengths: list[int] | None, source: dict[str, Any], *,
                 num_shards: int, output_dir: str, split: str,
                 signal_encoder: encoders.SignalEncoder, text_encoder: encoders.TextEncoder,
                 batch_size: int, signal_encoder_name: str, text_encoder_name: str,
                 latent_scale: float = 1.0, latent_shift: float = 0.0, modality: str = "image",
                 captions_per_example: int = 0, text_dtype: str = "float16",
                 process_index: int = 0, process_count: int = 1,
                 barrier: Callable[[str], None] | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
  """Writes the shards `units` describe (`lengths`: each one's example count, when known); the
  keyword arguments are `write_shards`'."""
  layout.check_modality(modality)
  _check_write_args(split, num_shards, batch_size, latent_scale, latent_shift,
                    signal_encoder_name, text_encoder_name, captions_per_example, text_dtype)
  _check_process_args(process_index, process_count, barrier)
  if lengths is not None and not sum(lengths):
    raise ValueError(f"No examples given for split {split!r}; nothing written.")
  if lengths is not None and 0 in lengths:
    raise ValueError(f"num_shards={num_shards} exceeds the {sum(lengths)} examples of split "
                     f"{split!r}; use at most one shard per example.")
  job = {"modality": modality, "latent_scale": float(latent_scale),
         "latent_shift": float(latent_shift), "signal_encoder": signal_encoder_name,
         "text_encoder": text_encoder_name, "captions_per_example": captions_per_example,
         "text_dtype": text_dtype, **source, "num_shards": num_shards}
  sync = barrier or (lambda name: None)
  other_splits = _other_splits_header(output_dir, split, job)
  if process_index == 0:
    _check_or_clear_split(output_dir, split, job, overwrite)
  sync(f"latent_shards {output_dir} {split}: old shards checked")
  encoding = _Encoding(layout.MODALITIES[modality], signal_encoder, text_encoder, batch_size,
                       latent_scale, latent_shift, captions_per_example, TEXT_DTYPES[text_dtype])
  mine = range(process_index, num_shards, process_count)
  progress = _Progress(output_dir, split, process_index, len(mine))
  for index in mine:
    if _finished(output_dir, split, index, job):
      logging.info("%s: shard %d of split %r is already written; skipped.", output_dir, index,
                   split)
      progress.shard_done(0)
      continue
    written = _write_shard(output_dir, split, index, job, encoding, units[index],
                           None if lengths is None else lengths[index], other_splits, progress)
    progress.shard_done(written)
  sync(f"latent_shards {output_dir} {split}: shards written")
  if process_index == 0:
    _merge_metadata(output_dir, split, job)
  sync(f"latent_shards {output_dir} {split}: metadata written")
  return layout.read_metadata(output_dir)


class _Progress:
  """The progress lines of one process: examples/s and the time left, from the shards done."""

  def __init__(self, output_dir: str, split: str, process_index: int, num_shards: int):
    self._where = f"{output_dir} split {split!r} process {process_index}"
    self._num_shards, self._done_shards = num_shards, 0
    self._examples, self._encoded_shards = 0, 0
    self._started = self._last_line = time.time()

  def examples_done(self, shard: int, count: int) -> None:
    """Called per encoded batch: a line every _PROGRESS_EVERY_S seconds within a long shard."""
    if time.time() - self._last_line >= _PROGRESS_EVERY_S:
      self._last_line = time.time()
      logging.info("%s: shard %d, %d examples so far (%.1f examples/s over this run).",
                   self._where, shard, count, (self._examples + count) / self._elapsed())

  def _elapsed(self) -> float:
    return max(time.time() - self._started, 1e-9)

  def shard_done(self, written: int) -> None:
    """Called per shard (written = 0 when it was already there): rate and ETA of this process."""
    self._done_shards += 1
    if written:
      self._examples += written
      self._encoded_shards += 1
    left = self._num_shards - self._done_shards
    eta = (self._elapsed() / max(self._encoded_shards, 1)) * left
    self._last_line = time.time()
    logging.info("%s: %d of %d shards done, %d examples encoded in %.0f s (%.1f examples/s); "
                 "ETA %.0f s.", self._where, self._done_shards, self._num_shards,
                 self._examples, self._elapsed(), self._examples / self._elapsed(), eta)


def _finished(output_dir: str, split: str, index: int, job: dict[str, Any]) -> bool:
  """Whether shard `index` has a manifest of this `job` (checked before anything is written:
  another job's manifest is an error or was cleared)."""
  path = layout.manifest_path(output_dir, split, index, job["num_shards"])
  return storage.exists(path) and storage.read_json(path)["job"] == job


# What every split of a directory shares (metadata.json holds it once), fields excepted, with
# the values of directories written before a key existed.
_SHARED_KEYS = {"modality": None, "latent_scale": None, "latent_shift": None,
                "signal_encoder": None, "text_encoder": None, "captions_per_example": 0,
                "text_dtype": "float16"}


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
    if existing is not None and existing.get(key, _SHARED_KEYS.get(key)) != value:
      raise ValueError(
          f"{output_dir!r} holds splits {others} written with {key}="
          f"{existing.get(key, _SHARED_KEYS.get(key))!r}; cannot "
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
                 encoding: "_Encoding", unit: Unit, expected: int | None,
                 other_splits: dict[str, Any] | None, progress: _Progress) -> int:
  """Writes one shard through a local temporary file, uploads it, then writes its manifest;
  returns its record count."""
  name = layout.shard_name(split, index, job["num_shards"])
  fields = None
  skipped = collections.Counter()
  with tempfile.TemporaryDirectory(prefix="self_flow_shard_") as directory:
    local = os.path.join(directory, name)
    writer = array_record_module.ArrayRecordWriter(local, layout.WRITER_OPTIONS)
    count = 0
    try:
      for record, record_fields in _encode_batches(unit(), encoding, skipped, name):
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
        progress.examples_done(index, count)
    finally:
      writer.close()
    if expected is not None and count != expected:
      raise ValueError(f"Shard {name} got {count} examples from examples[start:stop], not "
                       f"{expected}: the examples sequence must slice like a list.")
    storage.upload(local, storage.join(output_dir, name))
  if skipped:
    logging.warning("%s: shard %s kept %d examples and skipped %d (%s).", output_dir, name, count,
                    sum(skipped.values()), _counts_text(skipped))
  storage.write_json(layout.manifest_path(output_dir, split, index, job["num_shards"]), {
      "job": job, "shard": name, "num_records": count, "fields": fields,
      "skipped": dict(sorted(skipped.items())),
      "written_by": {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}})
  return count


def _skipped_total(manifests: list[dict[str, Any]]) -> collections.Counter:
  total = collections.Counter()
  for manifest in manifests:
    total.update(manifest.get("skipped", {}))
  return total


def _counts_text(counts: dict[str, int]) -> str:
  return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items())) or "none"


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
    # Splits merged before metadata recorded their job are compared by their sizes.
    sizes_differ = info["num_shards"] != job["num_shards"] or info["num_examples"] != job.get(
        "num_examples", info["num_examples"])
    if info.get("job", job) != job or sizes_differ:
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
  filled = [manifest for manifest in manifests if manifest["num_records"]]
  if not filled:
    raise ValueError(f"{output_dir!r}: every input of split {split!r} was skipped ("
                     f"{_counts_text(_skipped_total(manifests))}); nothing to train on. See the "
                     "warnings above for why.")
  fields = filled[0]["fields"]
  for manifest in manifests:
    if manifest["job"] != job or manifest["fields"] not in (fields, None):
      raise ValueError(f"{output_dir!r}: shard {manifest['shard']} has fields "
                       f"{manifest['fields']} from job {manifest['job']}, but shard "
                       f"{filled[0]['shard']} has {fields}; all examples must share one "
                       "shape.")
  header = {"format": layout.FORMAT, "version": layout.VERSION, "fields": fields,
            **{key: job[key] for key in _SHARED_KEYS}}
  _check_joins(output_dir, split, header)
  existing, others = _other_splits(output_dir, split)
  metadata = dict(header, splits={name: existing["splits"][name] for name in others})
  metadata_path = storage.join(output_dir, layout.METADATA_FILE)
  shard_lengths = [manifest["num_records"] for manifest in manifests]
  skipped = _skipped_total(manifests)
  metadata["splits"][split] = {"num_examples": sum(shard_lengths), "num_shards": num_shards,
                               "shard_lengths": shard_lengths,
                               "skipped": dict(sorted(skipped.items())), "job": job}
  storage.write_json(metadata_path, metadata)
  logging.info("%s: split %r done, %d examples kept in %d shards; skipped %d (%s).", output_dir,
               split, sum(shard_lengths), num_shards, sum(skipped.values()),
               _counts_text(skipped))


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
    captions_per_example: int,
    text_dtype: str,
) -> None:
  if not isinstance(captions_per_example, int) or captions_per_example < 0:
    raise ValueError(f"captions_per_example={captions_per_example!r} must be an int >= 0 (0: one "
                     "`caption` per example).")
  if text_dtype not in TEXT_DTYPES:
    raise ValueError(f"text_dtype={text_dtype!r}; allowed: {list(TEXT_DTYPES)}.")
  if not _SPLIT_PATTERN.fullmatch(split):
    raise ValueError(f"split={split!r} must be non-empty letters, digits and underscores.")
  if num_shards < 1:
    raise ValueError(f"num_shards={num_shards} must be >= 1 (one shard per input unit: no units "
                     "given?).")
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


@dataclasses.dataclass(frozen=True)
class _Encoding:
  """How examples become records (the encoders and storage settings of one job)."""

  modality: layout.ModalityFormat
  signal_encoder: encoders.SignalEncoder
  text_encoder: encoders.TextEncoder
  batch_size: int
  latent_scale: float
  latent_shift: float
  captions_per_example: int  # 0: one `caption`, text fields (L, ...); C: (C, L, ...)
  text_dtype: Any  # storage dtype of caption embeddings


def _encode_batches(items: Iterable[Any], encoding: _Encoding, skipped: collections.Counter,
                    shard: str) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
  """Yields (record, field specs) per example of `items`, encoding `batch_size` examples per
  call; `Skipped` markers are counted in `skipped` (and logged), not written."""
  examples = _counting_skips(items, skipped, shard)
  position = 0
  while batch := list(itertools.islice(examples, encoding.batch_size)):
    yield from _encode_batch(batch, encoding, shard, position)
    position += len(batch)


def _counting_skips(items: Iterable[Any], skipped: collections.Counter, shard: str
                    ) -> Iterator[dict[str, Any]]:
  for item in items:
    if isinstance(item, Skipped):
      skipped[item.reason] += 1
      logging.warning("%s: skipped %s (%s): %s", shard, item.key, item.reason, item.detail)
    else:
      yield item


def _encode_batch(batch: list[dict[str, Any]], encoding: _Encoding, shard: str, position: int
                  ) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
  """The records of one batch (padded to `batch_size` for the encoders); its first example is
  example `position` of `shard` (for error messages)."""
  size, per_example = encoding.batch_size, max(encoding.captions_per_example, 1)
  where = f"example {position} of shard {shard}"
  signals, captions, labels = _batch_inputs(batch, shard, position, encoding)
  count = len(batch)
  # Pad to a constant batch size so a jitted encoder is compiled once.
  signals = np.pad(signals, [(0, size - count)] + [(0, 0)] * (signals.ndim - 1))
  rows = [list(c[:per_example]) + [""] * (per_example - len(c[:per_example])) for c in captions]
  rows += [[""] * per_example] * (size - count)
  encoded = encoding.signal_encoder(encoding.modality.to_float(signals))
  # A (mean, std) pair is a Gaussian posterior; its std is stored as `latent_std`.
  latents, stds = encoded if isinstance(encoded, tuple) else (encoded, None)
  latents = np.asarray(latents, np.float32)
  text, mask = encoding.text_encoder([caption for row in rows for caption in row])
  text, mask = np.asarray(text), np.asarray(mask).astype(bool)
  _check_encoder_outputs(latents, text, mask, size * per_example, size, encoding.modality)
  text_field = "text_tokens" if text.ndim == 2 else "text_embedding"
  if text_field == "text_tokens":
    if text.dtype.kind not in "iu":
      raise ValueError(f"text_encoder returned (B, L) values of dtype {text.dtype}; token ids "
                       "must be integers ((B, L, D) for embeddings).")
    text = text.astype(np.int32)
  else:
    text = _to_storage(text.astype(np.float32), encoding.text_dtype, "text_embedding", where)
  numbers = np.array([min(len(c), per_example) for c in captions] + [0] * (size - count))
  if encoding.captions_per_example:
    text = text.reshape(size, per_example, *text.shape[1:])
    mask = mask.reshape(size, per_example, -1) & (np.arange(per_example)[None, :, None]
                                                   < numbers[:, None, None])
  if stds is not None:
    stds = np.asarray(stds, np.float32)
    if stds.shape != latents.shape:
      raise ValueError(f"signal_encoder returned a posterior std of shape {stds.shape} for "
                       f"means of shape {latents.shape}; they must match.")
    stds = _to_storage(stds * abs(encoding.latent_scale), np.float16, "latent_std", where)
  latents = _to_storage((latents - encoding.latent_shift) * encoding.latent_scale, np.float16,
                        "latent", where)
  fields = {
      "latent": {"shape": list(latents.shape[1:]), "dtype": "float16"},
      text_field: {"shape": list(text.shape[1:]), "dtype": np.dtype(text.dtype).name},
      "text_mask": {"shape": list(mask.shape[1:]), "dtype": "bool"},
      "caption": {"shape": [], "dtype": "utf-8 bytes"},
      "label": {"shape": [], "dtype": "int32"},
  }
  if encoding.captions_per_example:
    fields["num_captions"] = {"shape": [], "dtype": "int32"}
    fields["captions"] = {"shape": [], "dtype": "utf-8 JSON list"}
  if stds is not None:
    fields["latent_std"] = {"shape": list(stds.shape[1:]), "dtype": "float16"}
  for row in range(count):
    record = {
        "latent": latents[row],
        text_field: text[row],
        "text_mask": mask[row],
        "caption": rows[row][0].encode("utf-8"),
        "label": np.asarray(labels[row], np.int32),
    }
    if encoding.captions_per_example:
      record["num_captions"] = np.asarray(numbers[row], np.int32)
      record["captions"] = json.dumps(rows[row][:numbers[row]]).encode("utf-8")
    if stds is not None:
      record["latent_std"] = stds[row]
    yield record, fields


def _batch_inputs(batch: list[dict[str, Any]], shard: str, position: int, encoding: _Encoding
                  ) -> tuple[np.ndarray, list[tuple[str, ...]], list]:
  """Checks the examples of one batch and returns (raw signals, captions, labels)."""
  modality = encoding.modality
  key = modality.example_key
  caption_key = "captions" if encoding.captions_per_example else "caption"
  signals, captions, labels = [], [], []
  for offset, example in enumerate(batch):
    name = f"Example {position + offset} of shard {shard}"
    missing = {key, caption_key} - set(example)
    if missing:
      raise ValueError(f"{name} lacks {sorted(missing)}; it has keys {sorted(example)}.")
    signal = np.asarray(example[key])
    if signal.dtype != modality.dtype or signal.ndim != len(modality.axes):
      raise ValueError(
          f"{name}: {key} has dtype {signal.dtype} and shape {signal.shape}; need "
          f"{np.dtype(modality.dtype).name} {_axes(modality.axes)}."
      )
    if signals and signal.shape != signals[0].shape:
      raise ValueError(
          f"{name}: {key} shape {signal.shape} differs from {signals[0].shape}; all examples "
          "of a split must share one shape."
      )
    texts = ((example["caption"],) if caption_key == "caption"
             else tuple(example["captions"]) if not isinstance(example["captions"], str)
             else None)
    if not texts or not all(isinstance(text, str) for text in texts):
      raise ValueError(f"{name}: {caption_key} {example[caption_key]!r} must be "
                       f"{'a str' if caption_key == 'caption' else 'a non-empty list of str'}.")
    label = example.get("label", -1)
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not (
        -1 <= label <= np.iinfo(np.int32).max):
      raise ValueError(f"{name}: label {label!r} must be an int32 >= 0, or -1 for none.")
    signals.append(signal)
    captions.append(texts)
    labels.append(int(label))
  return np.stack(signals), captions, labels


def _axes(names: tuple[str, ...]) -> str:
  """Axis names as a shape in error messages, e.g. "(samples,)"."""
  return "(" + ", ".join(names) + ("," if len(names) == 1 else "") + ")"


def _check_encoder_outputs(latents, text, mask, num_captions: int, batch_size: int,
                           modality: layout.ModalityFormat) -> None:
  if latents.ndim != 1 + len(modality.latent_axes) or latents.shape[0] != batch_size:
    raise ValueError(
        f"signal_encoder returned shape {latents.shape} for {batch_size} examples of "
        f"{modality.example_key}; need {_axes(('B', *modality.latent_axes))}."
    )
  if text.ndim not in (2, 3) or text.shape[0] != num_captions:
    raise ValueError(
        f"text_encoder returned shape {text.shape} for {num_captions} captions; need (B, L, D) "
        "embeddings or (B, L) token ids."
    )
  if mask.shape != text.shape[:2]:
    raise ValueError(
        f"text_encoder returned a mask of shape {mask.shape} for text of shape {text.shape}; "
        "need (B, L)."
    )


def _to_storage(values: np.ndarray, dtype, field: str, where: str) -> np.ndarray:
  """Casts to the storage dtype, refusing values it cannot hold (they would silently become
  inf)."""
  with np.errstate(over="ignore"):  # Overflow is reported below, with the field and the fix.
    stored = values.astype(dtype)
  if not np.isfinite(stored.astype(np.float32)).all():
    raise ValueError(
        f"{field} of the batch starting at {where} has values beyond {np.dtype(dtype).name} "
        f"(max |x| = {np.abs(values).max()}, largest finite: {float(np.finfo(dtype).max)}); "
        "rescale with latent_scale or fix the encoder."
    )
  return stored
