"""webdataset tar shards: members that share a key form one record (unit: one tar file).

The layout img2dataset and most LAION/CC exports write: `00042.jpg`, `00042.txt`, `00042.json`
(and optionally `00042.cls`) next to each other in a tar. As in webdataset, a member's key is
its name up to the first dot of its base name, directory included (`a/b.c.jpg` -> key `a/b`,
extension `c.jpg`), and a record is a run of consecutive members with the same key. A record
needs exactly one image member (`.jpg .jpeg .png .webp`, any letter case); its captions are the
whole stripped text of `.txt` and/or the caption keys of `.json` (a string or a list of
strings each), its label the integer in `.cls` (-1 without). Other members are ignored.

A tar is streamed (`tarfile` mode `r|*`, plain or compressed), holding one record at a time. A
member that cannot be parsed skips its record (`unreadable_record`) and reading goes on; a tar
whose structure is broken (truncated, a corrupt header) cannot be resynchronised in a stream, so
it raises a ValueError naming the file and the last good record, for the user to repair it or
leave it out.
"""

from collections.abc import Iterator, Sequence
import gzip
import re
import tarfile
from typing import Any
import zlib

from etils import epath

from self_flow.data.captioned import (DEFAULT_JSON_CAPTION_KEYS, IMAGE_EXTENSIONS, RawExample,
                                      Skipped, check_caption_keys, json_captions, text_captions)
from self_flow.data.captioned import inputs as inputs_lib

# Tar files the input spec's directories and globs yield (any letter case).
TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
_IMAGE_MEMBERS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
# webdataset's own split of a member name into (key, extension).
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# What a broken tar stream raises while it is read.
_STREAM_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


def split_member_name(name: str) -> tuple[str, str] | None:
  """(key, lower-case extension) of a tar member name, or None for a name without extension."""
  match = _KEY_AND_EXTENSION.match(name)
  return (match[1], match[2].lower()) if match else None


class WebDatasetSource:
  """Records of webdataset tar shards; see the module docstring."""

  kind = "webdataset"

  def __init__(self, inputs: str, *, caption_keys: Sequence[str] = DEFAULT_JSON_CAPTION_KEYS):
    """Lists the tar files of the input spec `inputs` (`inputs.expand_inputs`).

    Args:
      inputs: globs, brace ranges, directories or comma-separated tar files, local or gs://.
      caption_keys: keys of the `.json` members that hold captions, in the order they are taken.
    """
    self._inputs = inputs
    self._caption_keys = check_caption_keys(caption_keys)
    self._files = inputs_lib.expand_inputs(inputs, TAR_EXTENSIONS)

  def __repr__(self) -> str:
    return f"WebDatasetSource(inputs={self._inputs!r}, caption_keys={self._caption_keys!r})"

  def units(self) -> list[str]:
    """The tar files, sorted: one unit each."""
    return list(self._files)

  def describe(self) -> dict[str, Any]:
    return {"kind": self.kind, "inputs": self._inputs, "num_units": len(self._files),
            "image_members": list(_IMAGE_MEMBERS), "caption_members": ["txt", "json"],
            "caption_keys": list(self._caption_keys), "label_member": "cls"}

  def read(self, unit: str) -> Iterator[RawExample | Skipped]:
    """The records of tar file `unit`, in member order, streamed."""
    if unit not in self._files:
      raise ValueError(f"{unit!r} is not a unit of {self!r}; units are its tar files.")
    key, members, count = None, [], 0
    try:
      with epath.Path(unit).open("rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
          if not member.isfile():  # Directories, links: no record data.
            continue
          name = split_member_name(member.name)
          if name is None:  # No extension: not part of any record.
            continue
          if name[0] != key:  # The previous record is complete.
            if key is not None:
              yield self._record(unit, key, members)
              count += 1
            key, members = name[0], []
          members.append((name[1], tar.extractfile(member).read()))
        _check_stream_end(tar)
    except _STREAM_ERRORS as e:
      last = (f"after {count} whole records, at or after the key {key!r}" if key is not None
              else "before its first record")
      raise ValueError(f"The tar file {unit!r} is corrupt or truncated {last}: {e}. Repair it "
                       "or leave it out of the inputs.") from e
    if key is not None:
      yield self._record(unit, key, members)

  def _record(self, unit: str, key: str, members: list[tuple[str, bytes]]) -> RawExample | Skipped:
    """The record of the members with key `key`, or why it is skipped."""
    record_key = f"{unit}#{key}"
    extensions = [extension for extension, _ in members]
    repeated = sorted({e for e in extensions if extensions.count(e) > 1})
    if repeated:
      return Skipped(record_key, "unreadable_record",
                     f"members {repeated} appear more than once in the record")
    images = [(extension, data) for extension, data in members if extension in _IMAGE_MEMBERS]
    if not images:
      return Skipped(record_key, "missing_image",
                     f"no {'/'.join(_IMAGE_MEMBERS)} member among {extensions}")
    if len(images) > 1:
      return Skipped(record_key, "unreadable_record",
                     f"several image members {[e for e, _ in images]}: which one is meant is "
                     "ambiguous")
    captions, label = [], -1
    for extension, data in members:
      try:
        if extension == "txt":
          captions.extend(text_captions(data, one_per_line=False))
        elif extension == "json":
          captions.extend(json_captions(data, self._caption_keys))
        elif extension == "cls":
          label = int(data.decode("utf-8").strip())
      except ValueError as e:  # UnicodeDecodeError is one too.
        return Skipped(record_key, "unreadable_record", f"{key}.{extension}: {e}")
    return RawExample(key=record_key, image=images[0][1], captions=tuple(captions), label=label)


def _check_stream_end(tar: tarfile.TarFile) -> None:
  """Raises tarfile.ReadError where the stream stopped early rather than at its end.

  In stream mode `tarfile` ends the member list silently at a truncated or corrupt header, which
  would drop the rest of the file unnoticed. A tar really ends with zero blocks (or at the end
  of the data), so whatever follows the header that ended the list must be zeros.
  """
  header_bytes = tar.fileobj.tell() - tar.offset  # Read for the header that ended the list.
  if 0 < header_bytes < tarfile.BLOCKSIZE:
    raise tarfile.ReadError(f"the file ends within a header at byte {tar.offset}")
  while chunk := tar.fileobj.read(1 << 16):
    if chunk.strip(b"\0"):
      raise tarfile.ReadError(f"a corrupt member header at byte {tar.offset}: data follows it "
                              "that the stream cannot resynchronise to")
