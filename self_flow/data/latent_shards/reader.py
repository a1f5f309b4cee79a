"""Reads latent shards by index for grain, checking every record against the metadata.

This is the trainer's side of the format; it needs neither the writer nor the encoders.
"""

import bisect
from collections.abc import Sequence
import dataclasses
import itertools
import json
from typing import Any

from absl import logging
from array_record.python import array_record_data_source
from flax import serialization
import ml_dtypes
import numpy as np

from self_flow import storage
from self_flow.data.latent_shards import layout


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

  Index k is the k-th example written (in version 3 directories the shards hold consecutive
  blocks of examples; in version 2 ones record k // n of shard k % n). Records decode to
  `{"latent": float32 latent_shape, "text_embedding": (L, D) in its stored dtype (float16 or
  bfloat16), "text_mask": bool (L,),
  "label": int32 scalar, "caption": str}`, plus `"latent_std"` float32 latent_shape when the
  shards hold a posterior std. Shards of token ids hold `"text_tokens"` int32 (L,) instead of
  the embedding; shards of several captions per example hold text fields of (C, L, ...) and
  `"num_captions"` int32 (how many of the C rows are real) and `"captions"` (a tuple of str).
  The repr names only the split and its shapes and encoders (not the directory), so grain's
  checkpoint check passes when a run resumes from a copy of the data elsewhere.

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
    self.metadata = layout.read_metadata(directory)
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
          f"{storage.join(directory, layout.METADATA_FILE)!r}: split {split!r} has num_shards="
          f"{num_shards} and num_examples={info['num_examples']} but shard_lengths={lengths}."
      )
    expected = [layout.shard_name(split, i, num_shards) for i in range(num_shards)]
    found = layout.shard_files(directory, split)
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
    self._num_shards = num_shards
    self._round_robin = self.metadata["version"] == 2
    # Shards left empty (every input of their unit skipped) hold no record to read. (Version 2
    # directories have none: their n shards held n or more examples round robin.)
    kept = [(name, length) for name, length in zip(expected, lengths) if length]
    self._shard_names = [name for name, _ in kept]
    self._offsets = [0, *itertools.accumulate(length for _, length in kept)][:-1]
    self._records = array_record_data_source.ArrayRecordDataSource([
        _ShardInstruction(storage.join(directory, name), 0, length, length)
        for name, length in kept
    ])
    fields = self.metadata["fields"]
    self.modality = self.metadata["modality"]
    self.latent_shape = tuple(fields["latent"]["shape"])
    # "text_embedding" (precomputed caption embeddings) or "text_tokens" (token ids for a text
    # encoder run in the train step).
    self.text_field = "text_tokens" if "text_tokens" in fields else "text_embedding"
    # Captions stored per example: 0 for one caption (text fields (L, ...)), else C (C, L, ...).
    self.captions_per_example = int(self.metadata.get("captions_per_example", 0))
    self._description = (
        f"LatentShardSource(modality={self.modality!r}, split={split!r}, "
        f"num_examples={info['num_examples']}, num_shards={num_shards}, "
        f"latent_shape={self.latent_shape}, "
        f"{self.text_field}_shape={tuple(fields[self.text_field]['shape'])}, "
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
    if self._round_robin:
      return self._offsets[index % self._num_shards] + index // self._num_shards
    return index  # consecutive blocks: the concatenated shards are the written order

  def _location(self, index: int) -> tuple[str, int]:
    """(shard file name, record number in it) of example `index`."""
    key = self._key(index)
    shard = bisect.bisect_right(self._offsets, key) - 1
    return self._shard_names[shard], key - self._offsets[shard]

  def _checked(self, index: int, read) -> dict[str, Any]:
    """Decodes and checks record `index` (raw bytes from `read()`); BadRecordError names it."""
    try:
      record = _decode(read())
      for name, spec in self.metadata["fields"].items():
        if name in _SCALAR_FIELDS or name not in record:
          continue
        value = record[name]
        if tuple(value.shape) != tuple(spec["shape"]):
          raise ValueError(f"{name} has shape {tuple(value.shape)}, the metadata says "
                           f"{tuple(spec['shape'])}")
        floating = value.dtype.kind == "f" or value.dtype in _EXPONENT_BITS  # bfloat16: "V"
        if floating and not _all_finite(value):
          raise ValueError(f"{name} holds non-finite values")
      return record
    except Exception as err:  # pylint: disable=broad-except  (msgpack, I/O, shape: all bad data)
      shard, record = self._location(index)
      raise BadRecordError(f"latent shard {shard!r} record {record} "
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


# Fields without an array shape to check against the metadata.
_SCALAR_FIELDS = ("caption", "captions", "label", "num_captions")


# Exponent bits of the 16-bit storage dtypes: all set means inf or NaN. numpy has no float16
# or bfloat16 arithmetic, so np.isfinite on them converts first (about 1 ms per t2i caption
# embedding, measured); the bit test reads the stored integers.
_EXPONENT_BITS = {np.dtype(np.float16): 0x7C00, np.dtype(ml_dtypes.bfloat16): 0x7F80}


def _all_finite(value: np.ndarray) -> bool:
  exponent = _EXPONENT_BITS.get(value.dtype)
  if exponent is None:
    return bool(np.all(np.isfinite(value)))
  return value.size == 0 or int((value.view(np.uint16) & exponent).max()) != exponent


def _decode(raw: bytes) -> dict[str, Any]:
  record = serialization.msgpack_restore(raw)
  decoded = {
      "latent": record["latent"].astype(np.float32),
      "text_mask": record["text_mask"].astype(bool),
      "label": np.asarray(record["label"], np.int32),
      "caption": record["caption"].decode("utf-8"),
  }
  if "text_tokens" in record:
    decoded["text_tokens"] = record["text_tokens"].astype(np.int32)
  else:
    # Kept in its stored 16-bit dtype: the step widens it on the device (exactly), so the host
    # neither converts nor batches twice the bytes (1 MiB per t2i example stored, 2 in float32).
    decoded["text_embedding"] = record["text_embedding"]
  if "num_captions" in record:
    decoded["num_captions"] = np.asarray(record["num_captions"], np.int32)
    decoded["captions"] = tuple(json.loads(record["captions"].decode("utf-8")))
  if "latent_std" in record:
    decoded["latent_std"] = record["latent_std"].astype(np.float32)
  return decoded
