"""Opens a dataset split as a random-access source, preparing it on first use.

Training reads records by index through grain, so every dataset is stored as TFDS ArrayRecord
files and opened with `tfds.data_source`. Fashion-MNIST can come from two places that hold the
same data: tfds' own `fashion_mnist` (needs internet once) or the Debian package
`dataset-fashion-mnist` (works offline). This module owns the choice between them, so the
trainer only names a dataset, a split and a data directory.
"""

import os
from collections.abc import Iterable, Sequence
from typing import Any

from absl import logging
import tensorflow_datasets as tfds

from self_flow.data import fashion_mnist_local

DATASETS = ("fashion_mnist",)
SOURCES = ("auto", "tfds", "debian")
SPLITS = ("train", "test")

# source -> TFDS dataset name holding Fashion-MNIST.
_TFDS_NAMES = {"tfds": "fashion_mnist", "debian": "fashion_mnist_local"}
_FIX_COMMAND = "apt-get install -y dataset-fashion-mnist"


class ImageSource:
  """A TFDS data source with a repr that is stable across processes and runs.

  grain's checkpoint validation compares `repr(data_source)`; this repr names only the dataset,
  split, backing TFDS dataset and size (no addresses, no data_dir), so it stays the same when
  a run resumes elsewhere. Records are dicts with `image` (uint8, HxWx1) and `label` (int),
  whichever source backs them.
  """

  def __init__(self, records: Sequence[Any], *, dataset: str, split: str, tfds_name: str):
    self._records = records
    self._description = (
        f"ImageSource(dataset={dataset!r}, split={split!r}, tfds_name={tfds_name!r}, "
        f"num_records={len(records)})"
    )

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._records[index]

  def __getitems__(self, indices: Iterable[int]) -> Sequence[dict[str, Any]]:
    """Reads many records in one call, which ArrayRecord serves far faster than one by one."""
    return self._records.__getitems__(list(indices))

  def __repr__(self) -> str:
    return self._description


def open_image_source(dataset: str, split: str, data_dir: str, source: str = "auto") -> ImageSource:
  """Returns `split` of `dataset` from `data_dir`, preparing the data there if needed.

  Args:
    dataset: Dataset name; one of `DATASETS`.
    split: One of `SPLITS`.
    data_dir: TFDS data directory; prepared datasets are reused from here.
    source: Where the data comes from. "tfds": tfds' `fashion_mnist`, downloaded if not yet
      prepared. "debian": built from the files of the Debian package `dataset-fashion-mnist`.
      "auto": an already prepared one of the two (Debian first, so repeated "auto" runs keep
      the same record order), else the Debian build if its files exist, else the tfds download.

  Raises:
    ValueError: `dataset`, `split` or `source` is not supported.
    FileNotFoundError: the requested data can neither be found nor built.
  """
  _check_choice("dataset", dataset, DATASETS)
  _check_choice("split", split, SPLITS)
  _check_choice("source", source, SOURCES)
  if source == "auto":
    builder = _auto_builder(data_dir)
  else:
    builder = _builder(source, data_dir)
    if source == "debian":
      _prepare_debian(builder)
    else:
      _prepare_tfds(builder)
  return ImageSource(
      builder.as_data_source(split=split), dataset=dataset, split=split, tfds_name=builder.name
  )


def _check_choice(what: str, value: str, allowed: Sequence[str]) -> None:
  if value not in allowed:
    raise ValueError(f"Unsupported {what} {value!r}; allowed: {', '.join(map(repr, allowed))}.")


def _builder(source: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """Returns the ArrayRecord builder for `source` ("tfds" or "debian") in `data_dir`."""
  name = _TFDS_NAMES[source]
  try:
    if source == "debian":
      return fashion_mnist_local.FashionMnistLocal(data_dir=data_dir, file_format="array_record")
    return tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except ValueError as e:
    # Typically a dataset prepared earlier as tfrecord (tfds' default), which cannot serve
    # random access; tfds refuses to reopen it as array_record.
    raise ValueError(
        f"Cannot open {name!r} in {data_dir!r} as array_record ({e}). If it was prepared in "
        f"another file format, remove {os.path.join(data_dir, name)!r} or use another data_dir."
    ) from e


def _auto_builder(data_dir: str) -> tfds.core.DatasetBuilder:
  """Picks and prepares a source as documented for `source="auto"` in `open_image_source`."""
  builders = {source: _builder(source, data_dir) for source in ("debian", "tfds")}
  for builder in builders.values():
    if builder.is_prepared():
      return builder
  missing = _missing_debian_files()
  if not missing:
    _prepare_debian(builders["debian"])
    return builders["debian"]
  # Offline, tfds' retries take about two minutes to give up; say why the wait happens.
  logging.warning(
      "Fashion-MNIST: no prepared data in %r and no Debian files; downloading tfds' "
      "'fashion_mnist' (needs internet). Offline fix: `%s`.",
      data_dir,
      _FIX_COMMAND,
  )
  try:
    _prepare_tfds(builders["tfds"])
  except RuntimeError as e:
    raise FileNotFoundError(
        f"Fashion-MNIST is not prepared in {data_dir!r}, the Debian files are missing "
        f"({', '.join(missing)}), and downloading tfds' 'fashion_mnist' failed ({e.__cause__!r})."
        f" Fix: `{_FIX_COMMAND}` (or run once with internet access so tfds can download "
        f"'fashion_mnist')."
    ) from e
  return builders["tfds"]


def _missing_debian_files() -> list[str]:
  return [path for path in fashion_mnist_local.debian_files() if not os.path.exists(path)]


def _prepare_debian(builder: tfds.core.DatasetBuilder) -> None:
  """Builds the Debian-backed dataset unless it is already prepared (then this is instant)."""
  if builder.is_prepared():
    return
  missing = _missing_debian_files()
  if missing:
    raise FileNotFoundError(
        f"Cannot build Fashion-MNIST from the Debian package: missing {', '.join(missing)}. "
        f"Fix: `{_FIX_COMMAND}`."
    )
  builder.download_and_prepare()


def _prepare_tfds(builder: tfds.core.DatasetBuilder) -> None:
  """Downloads and prepares tfds' dataset unless it is already prepared."""
  if builder.is_prepared():
    return
  try:
    builder.download_and_prepare()
  except Exception as e:  # Whatever broke the download, the fix offered is the same.
    raise RuntimeError(
        f"Downloading tfds' {builder.name!r} failed ({type(e).__name__}: {e}); it needs "
        f"internet access. Offline, use source='debian' after `{_FIX_COMMAND}`."
    ) from e
