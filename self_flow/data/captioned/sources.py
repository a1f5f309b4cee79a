"""`open_source(kind, inputs, **options)`: the one way the encoding job opens a user's dataset."""

import inspect
from typing import Any

from self_flow.data.captioned import folder, parquet, tfds_source, webdataset

# kind -> (source class, what its `inputs` are).
_KINDS = {
    "webdataset": (webdataset.WebDatasetSource,
                   "tar files: a glob, a brace range, a directory or a comma list"),
    "parquet": (parquet.ParquetSource,
                "Parquet files: a glob, a brace range, a directory or a comma list"),
    "tfds": (tfds_source.TfdsSource, "a TFDS dataset name"),
    "folder": (folder.FolderSource, "an image directory"),
}
KINDS = tuple(_KINDS)


def options_of(kind: str) -> tuple[str, ...]:
  """The keyword options the source of `kind` takes (its constructor's keyword-only arguments)."""
  parameters = inspect.signature(_KINDS[kind][0]).parameters.values()
  return tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


def open_source(kind: str, inputs: str, **options: Any):
  """The source of `kind` ("webdataset", "parquet", "tfds", "folder") reading `inputs`.

  `options` are the source's own keyword arguments (`options_of(kind)`), e.g. `caption_keys`
  (webdataset, folder), `image_column` / `caption_columns` (parquet), `data_dir` / `split`
  (tfds), `examples_per_unit` (tfds, folder).

  Raises:
    ValueError: an unknown kind or option, or inputs that name nothing.
  """
  if kind not in _KINDS:
    raise ValueError(f"Unknown captioned source kind {kind!r}; expected one of {KINDS}.")
  source_class, what = _KINDS[kind]
  unknown = sorted(set(options) - set(options_of(kind)))
  if unknown:
    raise ValueError(f"The {kind} source takes no option {', '.join(unknown)}; its options are "
                     f"{options_of(kind)}.")
  if not isinstance(inputs, str) or not inputs.strip():
    raise ValueError(f"The {kind} source needs inputs ({what}); got {inputs!r}.")
  return source_class(inputs, **options)
