"""Parquet files of images and captions (unit: one file), Hugging Face `datasets` layouts too.

Each row is a record: an image column holding the encoded bytes (a binary column, or the struct
`{"bytes": ..., "path": ...}` that a `datasets` Image feature is stored as), one or more caption
columns (each a string or a list of strings; all of a row's captions are collected), and an
optional integer label column. A file is read one row group at a time, so memory stays flat
however large the file; a row group that cannot be decoded skips its rows
(`unreadable_record`) and reading goes on with the next.

Column names are checked against the first file when the source is made (one footer read,
however many files) and against each file again when it is read, each time naming the file, the
column and the columns it has.
"""

from collections.abc import Iterator, Sequence
import io
from typing import Any

from etils import epath
import pyarrow as pa
import pyarrow.parquet as pq

from self_flow.data.captioned import RawExample, Skipped
from self_flow.data.captioned import inputs as inputs_lib

PARQUET_EXTENSIONS = (".parquet",)
# Image columns tried in order when none is named: the `datasets` Image feature's usual name,
# then the names webdataset-to-parquet conversions keep.
DEFAULT_IMAGE_COLUMNS = ("image", "jpg", "png")
DEFAULT_CAPTION_COLUMNS = ("caption",)


class ParquetSource:
  """Records of Parquet files; see the module docstring."""

  kind = "parquet"

  def __init__(self, inputs: str, *, image_column: str | None = None,
               caption_columns: Sequence[str] = DEFAULT_CAPTION_COLUMNS,
               label_column: str | None = None):
    """Lists the files of the input spec `inputs` and checks the columns against the first.

    Args:
      inputs: globs, brace ranges, directories or comma-separated .parquet files, local or gs://.
      image_column: the column of encoded images; None: the first of DEFAULT_IMAGE_COLUMNS that
        the first file has.
      caption_columns: the columns whose strings (or lists of strings) are the captions.
      label_column: an integer column of labels; None: every label is -1.
    """
    if isinstance(caption_columns, str) or not caption_columns:
      raise ValueError(f"caption_columns={caption_columns!r}: expected a non-empty sequence of "
                       "column names, e.g. ('caption',).")
    self._inputs = inputs
    self._caption_columns = tuple(caption_columns)
    self._label_column = label_column
    self._files = inputs_lib.expand_inputs(inputs, PARQUET_EXTENSIONS)
    first = self._files[0]
    with _open(first) as f:
      schema = pq.ParquetFile(f).schema_arrow
    if image_column is None:
      image_column = next((c for c in DEFAULT_IMAGE_COLUMNS if c in schema.names), None)
      if image_column is None:
        raise ValueError(f"{first!r} has none of the image columns {DEFAULT_IMAGE_COLUMNS}; its "
                         f"columns are {schema.names}. Name the image column (image_column=).")
    self._image_column = image_column
    self._check_schema(first, schema)

  def __repr__(self) -> str:
    return (f"ParquetSource(inputs={self._inputs!r}, image_column={self._image_column!r}, "
            f"caption_columns={self._caption_columns!r}, label_column={self._label_column!r})")

  def units(self) -> list[str]:
    """The Parquet files, sorted: one unit each."""
    return list(self._files)

  def num_records(self) -> int:
    """Rows of all files, from their footers (no data is read)."""
    total = 0
    for path in self._files:
      with _open(path) as f:
        total += pq.ParquetFile(f).metadata.num_rows
    return total

  def describe(self) -> dict[str, Any]:
    return {"kind": self.kind, "inputs": self._inputs, "num_units": len(self._files),
            "image_column": self._image_column, "caption_columns": list(self._caption_columns),
            "label_column": self._label_column}

  def read(self, unit: str) -> Iterator[RawExample | Skipped]:
    """The rows of Parquet file `unit`, in order, one row group in memory at a time."""
    if unit not in self._files:
      raise ValueError(f"{unit!r} is not a unit of {self!r}; units are its Parquet files.")
    columns = [self._image_column, *self._caption_columns]
    if self._label_column is not None:
      columns.append(self._label_column)
    with _open(unit) as f:
      parquet_file = pq.ParquetFile(f)
      self._check_schema(unit, parquet_file.schema_arrow)
      first_row = 0
      for group in range(parquet_file.num_row_groups):
        num_rows = parquet_file.metadata.row_group(group).num_rows
        try:
          table = parquet_file.read_row_group(group, columns=columns)
        except (OSError, pa.ArrowInvalid) as e:  # Corrupt pages, bad compression.
          for row in range(first_row, first_row + num_rows):
            yield Skipped(f"{unit}#{row}", "unreadable_record",
                          f"row group {group} of {unit!r} cannot be read: {e}")
        else:
          values = {name: table.column(name).to_pylist() for name in set(columns)}
          for i in range(num_rows):
            yield self._row(f"{unit}#{first_row + i}", {k: v[i] for k, v in values.items()})
        first_row += num_rows

  def _row(self, key: str, row: dict[str, Any]) -> RawExample | Skipped:
    image = row[self._image_column]
    if isinstance(image, dict):  # A `datasets` Image: {"bytes": ..., "path": ...}.
      if image.get("bytes") is None:
        return Skipped(key, "missing_image", f"column {self._image_column!r} has no bytes, only "
                       f"the path {image.get('path')!r} (an image `datasets` did not embed)")
      image = image["bytes"]
    if image is None:
      return Skipped(key, "missing_image", f"column {self._image_column!r} is null")
    captions = []
    for column in self._caption_columns:
      value = row[column]
      captions.extend(v for v in ([value] if isinstance(value, str) else value or ())
                      if v is not None)
    label = -1 if self._label_column is None else row[self._label_column]
    return RawExample(key=key, image=image, captions=tuple(captions),
                      label=-1 if label is None else int(label))

  def _check_schema(self, path: str, schema: pa.Schema) -> None:
    """Raises ValueError naming `path`, the column and the file's columns where a configured
    column is missing or holds values of the wrong type."""
    wanted = [(self._image_column, "image", _is_image),
              *((c, "caption", _is_caption) for c in self._caption_columns)]
    if self._label_column is not None:
      wanted.append((self._label_column, "label", pa.types.is_integer))
    for column, role, accepts in wanted:
      if column not in schema.names:
        raise ValueError(f"{path!r} has no {role} column {column!r}; its columns are "
                         f"{schema.names}.")
      if not accepts(schema.field(column).type):
        raise ValueError(f"The {role} column {column!r} of {path!r} has type "
                         f"{schema.field(column).type}; expected {_EXPECTED[role]}.")


_EXPECTED = {"image": "binary, or a struct with a binary 'bytes' field",
             "caption": "string or list<string>", "label": "an integer type"}


def _is_binary(arrow_type: pa.DataType) -> bool:
  return pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)


def _is_string(arrow_type: pa.DataType) -> bool:
  return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _is_image(arrow_type: pa.DataType) -> bool:
  if pa.types.is_struct(arrow_type):
    index = arrow_type.get_field_index("bytes")
    return index >= 0 and _is_binary(arrow_type.field(index).type)
  return _is_binary(arrow_type)


def _is_caption(arrow_type: pa.DataType) -> bool:
  if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
    return _is_string(arrow_type.value_type)
  return _is_string(arrow_type)


def _open(path: str) -> io.RawIOBase:
  """`path` (local or gs://) opened for pyarrow's random access.

  pyarrow needs a `closed` attribute that tf.io.gfile's files (epath's gs:// backend) lack, so
  the epath file is wrapped in a standard raw reader that has one."""
  return _RandomAccessFile(epath.Path(path).open("rb"))


class _RandomAccessFile(io.RawIOBase):
  """A binary file object that has read, seek and tell, as a standard `io` reader."""

  def __init__(self, f):
    super().__init__()
    self._f = f

  def readable(self) -> bool:
    return True

  def seekable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    data = self._f.read(len(buffer))
    buffer[:len(data)] = data
    return len(data)

  def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
    self._f.seek(offset, whence)
    return self._f.tell()

  def tell(self) -> int:
    return self._f.tell()

  def close(self) -> None:
    if not self.closed:
      self._f.close()
    super().close()
