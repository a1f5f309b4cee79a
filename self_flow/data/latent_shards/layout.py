"""The latent-shard on-disk format: file names, metadata.json and the per-modality table.

Both the writer and the reader import their constants and checks from here, so the two cannot
drift apart, and neither depends on the other (the reader needs none of the encoders).
"""

from collections.abc import Callable
import dataclasses
import json
import os
import re
from typing import Any

import numpy as np

from self_flow.modalities import audio as audio_modality
from self_flow.modalities import image as image_modality

FORMAT = "self_flow.latent_shards"
VERSION = 2
METADATA_FILE = "metadata.json"
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


def shard_files(directory: str, split: str) -> list[str]:
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


def check_modality(modality: str) -> None:
  """Raises ValueError unless `modality` is one of `MODALITIES`."""
  if modality not in MODALITIES:
    raise ValueError(f"Unknown modality {modality!r}; allowed: {', '.join(map(repr, MODALITIES))}.")
