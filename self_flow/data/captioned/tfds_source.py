"""A prepared TFDS dataset with an image feature and text features (unit: a split slice).

Any builder works, a registered one or one read back from its prepared files in `data_dir`
(a user's own dataset needs no code installed). The features are found by type unless named:
the image is the first `tfds.features.Image` outside a sequence, the captions every
`tfds.features.Text` (in sequences too, e.g. COCO's `captions/text`: several per example), the
label a top-level `label` feature when there is one. Nested features are named by their path,
`/`-joined. A uint8 (H, W, C) `Tensor` feature may be named as the image; it arrives decoded.

A unit is a slice of the split, `"train[0:1000]"`, of `examples_per_unit` examples, which TFDS
maps to the few files that hold it: ArrayRecord datasets are read with random access
(`as_data_source`), others (TFRecord) as a `tf.data` pipeline of only that slice, in order.
Image features are not decoded (`SkipDecoding`): records carry the stored JPEG/PNG bytes.
"""

from collections.abc import Iterator, Sequence
import re
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from self_flow.data.captioned import RawExample, Skipped

_UNIT = re.compile(r"^(?P<split>.+)\[(?P<start>\d+):(?P<stop>\d+)\]$")
# Records fetched per random-access call: enough to batch the reads, few enough for flat memory.
_READ_BATCH = 64

Path = tuple[str, ...]  # A feature's keys from the top-level FeaturesDict down.


class TfdsSource:
  """Examples of one split of a prepared TFDS dataset; see the module docstring."""

  kind = "tfds"

  def __init__(self, name: str, *, data_dir: str | None = None, split: str = "train",
               image_feature: str | None = None, caption_features: Sequence[str] | None = None,
               label_feature: str | None = None, examples_per_unit: int = 1000):
    """Opens the builder and resolves the features (no data is read).

    Args:
      name: the TFDS name, e.g. "coco_captions" or "my_dataset/config:1.0.0".
      data_dir: the TFDS data directory holding it, local or gs:// (None: TFDS's default).
      split: a split of the dataset, e.g. "train".
      image_feature: the image feature's path; None: the first Image feature.
      caption_features: the paths of the text features whose strings are the captions; None:
        every Text feature.
      label_feature: an integer feature's path; None: "label" where the dataset has an integer
        feature of that name, else every label is -1.
      examples_per_unit: examples per unit (the last unit holds the rest).
    """
    if isinstance(examples_per_unit, bool) or not isinstance(examples_per_unit, int) or (
        examples_per_unit < 1):
      raise ValueError(f"examples_per_unit={examples_per_unit!r}: expected a positive integer.")
    if caption_features is not None and (isinstance(caption_features, str)
                                         or not caption_features):
      raise ValueError(f"caption_features={caption_features!r}: expected a non-empty sequence "
                       "of feature names, or None for every Text feature.")
    self._name, self._data_dir, self._split = name, data_dir, split
    self._examples_per_unit = examples_per_unit
    self._builder = tfds.builder(name, data_dir=data_dir)
    info = self._builder.info
    if not info.splits:
      raise ValueError(f"TFDS {name!r} is not prepared in data_dir={data_dir!r} (it has no "
                       "splits); prepare it first, e.g. `tfds build`.")
    if split not in info.splits:
      raise ValueError(f"TFDS {name!r} has no split {split!r}; it has {sorted(info.splits)}.")
    self._num_examples = info.splits[split].num_examples
    leaves = _leaves(info.features)
    self._image = _image_feature(name, leaves, image_feature)
    self._captions = _caption_features(name, leaves, caption_features)
    self._label = _label_feature(name, leaves, label_feature)
    self._decoders = _skip_decoding(self._image) if isinstance(
        leaves[self._image][0], tfds.features.Image) else None
    self._units = [f"{split}[{start}:{min(start + examples_per_unit, self._num_examples)}]"
                   for start in range(0, self._num_examples, examples_per_unit)]

  def __repr__(self) -> str:
    captions = tuple("/".join(path) for path in self._captions)
    label = None if self._label is None else "/".join(self._label)
    return (f"TfdsSource(name={self._name!r}, data_dir={self._data_dir!r}, "
            f"split={self._split!r}, image_feature={'/'.join(self._image)!r}, "
            f"caption_features={captions!r}, label_feature={label!r}, "
            f"examples_per_unit={self._examples_per_unit})")

  def units(self) -> list[str]:
    """Slices of the split, `"<split>[start:stop]"`, in order."""
    return list(self._units)

  def num_records(self) -> int:
    """Examples of the split, from the dataset's info."""
    return self._num_examples

  def describe(self) -> dict[str, Any]:
    return {"kind": self.kind, "name": self._name, "data_dir": self._data_dir,
            "split": self._split, "num_examples": self._num_examples,
            "examples_per_unit": self._examples_per_unit, "num_units": len(self._units),
            "file_format": str(self._builder.info.file_format.value),
            "image_feature": "/".join(self._image),
            "caption_features": ["/".join(path) for path in self._captions],
            "label_feature": None if self._label is None else "/".join(self._label)}

  def read(self, unit: str) -> Iterator[RawExample | Skipped]:
    """The examples of slice `unit`, in order; keys `"<split>[<index in the split>]"`."""
    if unit not in self._units:
      raise ValueError(f"{unit!r} is not a unit of {self!r}; units are slices like "
                       f"{self._units[0]!r}.")
    first = int(_UNIT.match(unit)["start"])
    for offset, record in enumerate(self._records(unit)):
      yield self._example(f"{self._split}[{first + offset}]", record)

  def _records(self, unit: str) -> Iterator[dict[str, Any]]:
    if self._builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
      source = self._builder.as_data_source(split=unit, decoders=self._decoders)
      for start in range(0, len(source), _READ_BATCH):
        yield from source.__getitems__(range(start, min(start + _READ_BATCH, len(source))))
      return
    dataset = self._builder.as_dataset(
        split=unit, decoders=self._decoders, shuffle_files=False,
        read_config=tfds.ReadConfig(interleave_cycle_length=1))  # One file at a time: in order.
    yield from tfds.as_numpy(dataset)

  def _example(self, key: str, record: dict[str, Any]) -> RawExample | Skipped:
    captions = []
    for path in self._captions:
      value = _value(record, path)
      values = [value] if isinstance(value, (bytes, str)) else np.asarray(value).ravel().tolist()
      try:
        captions.extend(v.decode("utf-8") if isinstance(v, bytes) else v for v in values)
      except UnicodeDecodeError as e:
        return Skipped(key, "unreadable_record", f"feature {'/'.join(path)!r} is not UTF-8: {e}")
    image = _value(record, self._image)
    label = -1 if self._label is None else int(_value(record, self._label))
    return RawExample(key=key, image=image if isinstance(image, bytes) else np.asarray(image),
                      captions=tuple(captions), label=label)


def _leaves(features: tfds.features.FeaturesDict) -> dict[Path, tuple[Any, bool]]:
  """Every non-dict feature by path, with whether it is inside a Sequence (several values)."""
  leaves = {}

  def visit(feature, path: Path, in_sequence: bool) -> None:
    if isinstance(feature, tfds.features.FeaturesDict):
      for key, child in feature.items():
        visit(child, (*path, key), in_sequence)
    elif isinstance(feature, tfds.features.Sequence):
      visit(feature.feature, path, True)
    else:
      leaves[path] = (feature, in_sequence)

  visit(features, (), False)
  return leaves


def _named(dataset: str, leaves: dict[Path, tuple[Any, bool]], name: str, role: str) -> Path:
  for path in leaves:
    if "/".join(path) == name:
      return path
  raise ValueError(f"TFDS {dataset!r} has no {role} feature {name!r}; its features are "
                   f"{_describe_leaves(leaves)}.")


def _describe_leaves(leaves: dict[Path, tuple[Any, bool]]) -> list[str]:
  return [f"{'/'.join(path)}: {type(feature).__name__}" for path, (feature, _) in leaves.items()]


def _image_feature(dataset: str, leaves, name: str | None) -> Path:
  if name is None:
    for path, (feature, in_sequence) in leaves.items():
      if isinstance(feature, tfds.features.Image) and not in_sequence:
        return path
    raise ValueError(f"TFDS {dataset!r} has no Image feature (outside a sequence); its features "
                     f"are {_describe_leaves(leaves)}. Name a uint8 (H, W, C) Tensor feature "
                     "as image_feature if the images are stored decoded.")
  path = _named(dataset, leaves, name, "image")
  feature, in_sequence = leaves[path]
  decoded = (type(feature) is tfds.features.Tensor and feature.np_dtype == np.uint8
             and len(feature.shape) == 3)
  if in_sequence or not (isinstance(feature, tfds.features.Image) or decoded):
    raise ValueError(f"The image feature {name!r} of TFDS {dataset!r} is {feature!r}"
                     f"{' in a sequence' if in_sequence else ''}; expected one Image, or one "
                     "uint8 (H, W, C) Tensor, per example.")
  return path


def _caption_features(dataset: str, leaves, names: Sequence[str] | None) -> list[Path]:
  if names is None:
    paths = [path for path, (feature, _) in leaves.items()
             if isinstance(feature, tfds.features.Text)]
    if not paths:
      raise ValueError(f"TFDS {dataset!r} has no Text feature to take captions from; its "
                       f"features are {_describe_leaves(leaves)}. Name the string features "
                       "that hold captions (caption_features=).")
    return paths
  paths = [_named(dataset, leaves, name, "caption") for name in names]
  for name, path in zip(names, paths):
    feature = leaves[path][0]
    if not (isinstance(feature, tfds.features.Tensor) and feature.np_dtype == np.object_):
      raise ValueError(f"The caption feature {name!r} of TFDS {dataset!r} is {feature!r}; "
                       "expected a Text (string) feature.")
  return paths


def _label_feature(dataset: str, leaves, name: str | None) -> Path | None:
  if name is None:
    return ("label",) if ("label",) in leaves and _is_label(*leaves[("label",)]) else None
  path = _named(dataset, leaves, name, "label")
  if not _is_label(*leaves[path]):
    raise ValueError(f"The label feature {name!r} of TFDS {dataset!r} is {leaves[path][0]!r}; "
                     "expected one integer (e.g. a ClassLabel) per example.")
  return path


def _is_label(feature, in_sequence: bool) -> bool:
  return (not in_sequence and isinstance(feature, tfds.features.Tensor) and feature.shape == ()
          and np.issubdtype(feature.np_dtype, np.integer))


def _skip_decoding(path: Path) -> dict[str, Any]:
  """TFDS decoders (a nested dict like the features) that leave the image at `path` encoded."""
  decoders: Any = tfds.decode.SkipDecoding()
  for key in reversed(path):
    decoders = {key: decoders}
  return decoders


def _value(record: dict[str, Any], path: Path) -> Any:
  for key in path:
    record = record[key]
  return record
