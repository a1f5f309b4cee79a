"""A directory of images with sidecar captions (unit: a chunk of images).

Two layouts, as in `self_flow.tools.encode_latents`: images directly in the directory (label
-1), or one level of class folders `class_name/image.jpg` (label: the index of the class name in
sorted order). An image `name.jpg` (`.jpg .jpeg .png .webp`, any letter case) takes its captions
from the files beside it with the same stem: `name.txt`, one caption per non-empty line, and/or
`name.json`, whose caption keys hold a string or a list of strings. Other files are ignored.

Listing a directory of a million images on Cloud Storage takes many requests, so it happens
once, in `units()`, and each unit is a JSON list of its images (`[[relative image name, label,
[relative sidecar names]], ...]`): `read` needs nothing more, on any host, than the unit string.
"""

from collections.abc import Iterator, Sequence
import json
from typing import Any

from self_flow import storage
from self_flow.data.captioned import (DEFAULT_JSON_CAPTION_KEYS, IMAGE_EXTENSIONS, RawExample,
                                      Skipped, check_caption_keys, json_captions, text_captions)

SIDECAR_EXTENSIONS = (".txt", ".json")


class FolderSource:
  """Images and sidecar captions of a directory, local or gs://; see the module docstring."""

  kind = "folder"

  def __init__(self, directory: str, *,
               caption_keys: Sequence[str] = DEFAULT_JSON_CAPTION_KEYS,
               examples_per_unit: int = 1000):
    """Checks that `directory` is one; lists nothing until `units()`.

    Args:
      directory: the image directory, local or gs://.
      caption_keys: keys of the `.json` sidecars that hold captions, in the order they are taken.
      examples_per_unit: images per unit (the last unit holds the rest).
    """
    if isinstance(examples_per_unit, bool) or not isinstance(examples_per_unit, int) or (
        examples_per_unit < 1):
      raise ValueError(f"examples_per_unit={examples_per_unit!r}: expected a positive integer.")
    self._caption_keys = check_caption_keys(caption_keys)
    if not storage.is_dir(directory):
      raise FileNotFoundError(f"The image folder {directory!r} is not a directory.")
    self._directory = directory
    self._examples_per_unit = examples_per_unit
    self._units: list[str] | None = None
    self._class_names: list[str] = []

  def __repr__(self) -> str:
    return (f"FolderSource(directory={self._directory!r}, caption_keys={self._caption_keys!r}, "
            f"examples_per_unit={self._examples_per_unit})")

  def units(self) -> list[str]:
    """Chunks of `examples_per_unit` images in sorted order, each a JSON list (see the module
    docstring). The directory is listed on the first call only."""
    if self._units is None:
      items = self._list()
      size = self._examples_per_unit
      self._units = [json.dumps(items[start:start + size], separators=(",", ":"))
                     for start in range(0, len(items), size)]
    return list(self._units)

  def num_records(self) -> int:
    """Images of the folder, from its listing."""
    return sum(len(json.loads(unit)) for unit in self.units())

  def describe(self) -> dict[str, Any]:
    units = self.units()
    return {"kind": self.kind, "inputs": self._directory, "num_units": len(units),
            "examples_per_unit": self._examples_per_unit, "class_names": self._class_names,
            "caption_sidecars": [e.lstrip(".") for e in SIDECAR_EXTENSIONS],
            "caption_keys": list(self._caption_keys)}

  def read(self, unit: str) -> Iterator[RawExample | Skipped]:
    """The images of `unit` with their captions, in order; keys are the relative image names."""
    for name, label, sidecars in _parse_unit(unit, self):
      captions = []
      try:
        for sidecar in sidecars:
          data = storage.read_bytes(storage.join(self._directory, sidecar))
          if sidecar.lower().endswith(".txt"):
            captions.extend(text_captions(data, one_per_line=True))
          else:
            captions.extend(json_captions(data, self._caption_keys))
      except ValueError as e:  # UnicodeDecodeError is one too.
        yield Skipped(name, "unreadable_record", f"{sidecar}: {e}")
        continue
      image = storage.read_bytes(storage.join(self._directory, name))
      yield RawExample(key=name, image=image, captions=tuple(captions), label=label)

  def _list(self) -> list[list[Any]]:
    """[relative image name, label, [relative sidecar names]] of every image, sorted."""
    entries = storage.list_names(self._directory)
    images = [e for e in entries if e.lower().endswith(IMAGE_EXTENSIONS)]
    # Only names that are neither images nor sidecars can be class folders: one request each.
    others = [e for e in entries if not e.lower().endswith(IMAGE_EXTENSIONS + SIDECAR_EXTENSIONS)]
    classes = [e for e in others if storage.is_dir(storage.join(self._directory, e))]
    if classes and images:
      raise ValueError(f"{self._directory!r} holds both class folders ({classes[:3]}) and images "
                       f"({images[:3]}); use one layout: class_name/image.jpg or a flat folder.")
    self._class_names = classes
    if not classes:
      items = [[name, -1, sidecars] for name, sidecars in _with_sidecars(entries)]
    else:
      items = [[f"{folder}/{name}", label, [f"{folder}/{s}" for s in sidecars]]
               for label, folder in enumerate(classes)
               for name, sidecars in _with_sidecars(
                   storage.list_names(storage.join(self._directory, folder)))]
    if not items:
      raise ValueError(f"{self._directory!r} holds no {'/'.join(IMAGE_EXTENSIONS)} images, "
                       "directly or in class folders.")
    return items


def _with_sidecars(names: list[str]) -> Iterator[tuple[str, list[str]]]:
  """(image, [its sidecars]) for each image among the sorted file `names` of one directory."""
  sidecars: dict[str, list[str]] = {}
  for name in names:
    stem, dot, extension = name.rpartition(".")
    if dot and f".{extension.lower()}" in SIDECAR_EXTENSIONS:
      sidecars.setdefault(stem, []).append(name)
  for name in names:
    if name.lower().endswith(IMAGE_EXTENSIONS):
      yield name, sidecars.get(name.rpartition(".")[0], [])


def _parse_unit(unit: str, source: FolderSource) -> list[list[Any]]:
  """The items of a unit string, refused with a clear error if it is not one of `units()`'."""
  try:
    items = json.loads(unit)
  except (TypeError, ValueError):  # json.JSONDecodeError is a ValueError.
    items = None
  if not (isinstance(items, list) and all(_is_item(item) for item in items)):
    raise ValueError(f"{str(unit)[:80]!r} is not a unit of {source!r}: units are the JSON lists "
                     "its units() returns.")
  return items


def _is_item(item: Any) -> bool:
  """Whether `item` is [relative image name, label, [relative sidecar names]]."""
  return (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
          and type(item[1]) is int and isinstance(item[2], list)
          and all(isinstance(name, str) for name in item[2]))
