"""The latent-shard on-disk format: file names, metadata.json and the per-modality table.

Both the writer and the reader import their constants and checks from here, so the two cannot
drift apart, and neither depends on the other (the reader needs none of the encoders). Every
directory may be local or a Cloud Storage URL (`self_flow.storage`).
"""

from collections.abc import Callable
import dataclasses
import json
import re
from typing import Any

import numpy as np

from self_flow import storage
from self_flow.modalities import audio as audio_modality
from self_flow.modalities import image as image_modality

FORMAT = "self_flow.latent_shards"
# Version 3: shard i holds the contiguous examples `shard_range(i, n, N)`. Version 2 (still read)
# put example k in shard k % n (round robin).
VERSION = 3
READABLE_VERSIONS = (2, 3)
METADATA_FILE = "metadata.json"
# Per-shard records of finished shards, `MANIFEST_DIR/{shard name}.json`: what makes a shard
# count as written, so that a rerun after a preemption writes only the missing ones.
MANIFEST_DIR = "manifests"
# group_size:1 puts every record in its own chunk: reading one record decodes only that record.
WRITER_OPTIONS = "group_size:1"


@dataclasses.dataclass(frozen=True)
class ModalityFormat:
  """What one modality's examples look like in this format."""

  example_key: str  # Key of the raw signal in the examples given to `writer.write_shards`.
  dtype: type  # Its numpy dtype.
  axes: tuple[str, ...]  # Its axes.
  latent_axes: tuple[str, ...]  # The axes of its latents, which the trainer tokenizes.
  to_float: Callable[[np.ndarray], np.ndarray]  # Raw signal -> float32 in [-1, 1].


MODALITIES = {
    "image": ModalityFormat("image", np.uint8, ("H", "W", "C"), ("h", "w", "c"),
                             image_modality.from_uint8),
    "video": ModalityFormat("video", np.uint8, ("T", "H", "W", "C"), ("t", "h", "w", "c"),
                             image_modality.from_uint8),
    "audio": ModalityFormat("waveform", np.int16, ("samples",), ("frames", "channels"),
                             audio_modality.from_int16),
}


def shard_name(split: str, index: int, num_shards: int) -> str:
  """Returns the file name of shard `index` of `num_shards` of `split`."""
  return f"{split}-{index:05d}-of-{num_shards:05d}.array_record"


def shard_range(index: int, num_shards: int, num_examples: int) -> range:
  """The examples of shard `index` of `num_shards` (version 3): a contiguous block, the blocks
  differing in size by at most one."""
  return range(index * num_examples // num_shards, (index + 1) * num_examples // num_shards)


def manifest_path(directory: str, split: str, index: int, num_shards: int) -> str:
  """The manifest of shard `index` of `split`, written once the shard is complete."""
  return storage.join(directory, MANIFEST_DIR, shard_name(split, index, num_shards) + ".json")


def shard_files(directory: str, split: str) -> list[str]:
  """Returns the sorted names of all shard files of `split` in `directory`, whatever their n."""
  pattern = re.compile(re.escape(split) + r"-\d{5}-of-\d{5}\.array_record")
  return [name for name in storage.list_names(directory) if pattern.fullmatch(name)]


def read_metadata(directory: str) -> dict[str, Any]:
  """Returns the parsed `metadata.json` of a latent-shard directory, after checking it.

  Raises:
    FileNotFoundError: `directory` or its `metadata.json` does not exist.
    ValueError: the file is not latent-shard metadata of a known version.
  """
  path = storage.join(directory, METADATA_FILE)
  if not storage.exists(path):
    if not storage.is_dir(directory):
      raise FileNotFoundError(f"Latent-shard directory {directory!r} does not exist.")
    raise FileNotFoundError(
        f"{directory!r} has no {METADATA_FILE}: it is not a latent-shard directory, or its "
        "writer did not finish (the metadata is written last). Rerun write_shards."
    )
  metadata = json.loads(storage.read_text(path))
  if metadata.get("format") != FORMAT or metadata.get("version") not in READABLE_VERSIONS:
    raise ValueError(
        f"{path!r} has format={metadata.get('format')!r}, version={metadata.get('version')!r};"
        f" this reader knows only format={FORMAT!r}, versions {READABLE_VERSIONS}. Rewrite the "
        "shards with python -m self_flow.tools.write_latent_shards."
    )
  return metadata


def check_modality(modality: str) -> None:
  """Raises ValueError unless `modality` is one of `MODALITIES`."""
  if modality not in MODALITIES:
    raise ValueError(f"Unknown modality {modality!r}; allowed: {', '.join(map(repr, MODALITIES))}.")
