"""Readers of users' captioned image datasets, for a multi-host job that encodes them once.

A text-to-image run at pod scale trains on latent shards (`self_flow.data.latent_shards`) that a
one-off job writes from the user's own images and captions. That job runs the same command on
every host, and each output shard is made from exactly one input *unit*; host p of P takes the
units p, p + P, ..., so no host ever reads another's unit and a preempted job can redo only the
shards it lacks. Every source here therefore offers:

* `units() -> list[str]`: the input units, in an order that is the same on every host;
* `read(unit) -> Iterator[RawExample | Skipped]`: that unit's records, streamed in order, with
  memory flat in the unit's size;
* `describe() -> dict`: a JSON-able description for the job's manifest; and a stable `repr`;
* `num_records() -> int`, where counting needs no pass over the data (parquet footers, TFDS
  info, a folder listing; not webdataset tars).

The modules, one job each:

* `inputs`: a user's input spec (globs, brace ranges, comma lists, directories) -> files.
* `webdataset`: tar shards of `key.jpg` + `key.txt` / `key.json` members (unit: one tar).
* `parquet`: an image column and caption columns (unit: one file), Hugging Face layouts too.
* `tfds_source`: a prepared TFDS dataset with image and text features (unit: a split slice).
* `folder`: images with sidecar `name.txt` / `name.json` captions (unit: a chunk of images).
* `sources`: `open_source(kind, inputs, **options)`, the one entry point of the job.
* `prepare`: one raw record -> decoded, checked, ADM center-cropped example, or why not.

Every path goes through `self_flow.storage` / `etils.epath`, so each source reads local files and
gs:// alike. A record that cannot be used is not an error: readers and `prepare` hand back a
`Skipped` with one of `SKIP_REASONS`, which the job counts and logs, and goes on.
"""

from collections.abc import Sequence
import dataclasses
import json

import numpy as np

# Why a record was left out; the job reports a count per reason.
SKIP_REASONS = ("undecodable_image", "missing_image", "missing_caption", "image_too_small",
                "unreadable_record")
# Encoded image files every source recognises (compared in lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# Keys of a JSON caption record (webdataset member, folder sidecar) that hold captions, the names
# img2dataset, LAION and COCO-style exports use; each a string or a list of strings.
DEFAULT_JSON_CAPTION_KEYS = ("caption", "captions", "text")


@dataclasses.dataclass(frozen=True)
class RawExample:
  """One record as a source read it, before any decoding or checking (see `prepare`)."""
  key: str  # Unique within the source, e.g. "<file>#<member key>" or "<split>[i]"; for messages.
  image: bytes | np.ndarray  # Encoded image bytes, or decoded uint8 (H, W, C).
  captions: tuple[str, ...]  # Every caption of the record (possibly none, possibly empty ones).
  label: int = -1


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A record left out of the output, and why."""
  key: str
  reason: str  # One of SKIP_REASONS.
  detail: str  # Human-readable, for the log.

  def __post_init__(self):
    if self.reason not in SKIP_REASONS:
      raise ValueError(f"Skipped reason {self.reason!r} is not one of {SKIP_REASONS}.")


def json_captions(data: bytes, keys: Sequence[str]) -> tuple[str, ...]:
  """The captions of a JSON object (UTF-8 `data`): the values of `keys` it has, in that order,
  each a string or a list of strings. Raises ValueError on anything else, so that a malformed
  record is reported rather than silently losing its captions."""
  try:
    record = json.loads(data.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"not UTF-8 JSON: {e}") from None
  if not isinstance(record, dict):
    raise ValueError(f"the JSON is a {type(record).__name__}, not an object")
  captions = []
  for key in keys:
    value = record.get(key)
    if value is None:
      continue
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
      raise ValueError(f"JSON key {key!r} holds {value!r}, not a string or a list of strings")
    captions.extend(values)
  return tuple(captions)


def text_captions(data: bytes, *, one_per_line: bool) -> tuple[str, ...]:
  """The captions of a UTF-8 text: the whole text, or each of its non-empty lines."""
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"not UTF-8 text: {e}") from None
  if one_per_line:
    return tuple(line.strip() for line in text.splitlines() if line.strip())
  return (text.strip(),)


def check_caption_keys(keys: Sequence[str]) -> tuple[str, ...]:
  """`keys` as a tuple, refused if it is a lone string or holds anything but strings."""
  if isinstance(keys, str) or not keys or not all(isinstance(k, str) and k for k in keys):
    raise ValueError(f"caption_keys={keys!r}: expected a non-empty sequence of JSON key names, "
                     f"e.g. {DEFAULT_JSON_CAPTION_KEYS}.")
  return tuple(keys)
