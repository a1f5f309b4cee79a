"""File access for every path a user gives: a local path or a URL (gs://bucket/...).

A pod run reads its data from and writes its workdir to Cloud Storage, where `os`, `open` and
`shutil` would silently act on a local directory named `gs:`. Everything here goes through
`etils.epath` (tf.io.gfile for gs://), so one code path serves both, and writes are all-or-
nothing: a local file is written beside its target and renamed over it; a Cloud Storage object
becomes visible only once its upload has completed. Readers therefore never see half a file,
whatever kills the writer.
"""

from collections.abc import Iterator, Mapping
import contextlib
import io
import json
import os
import shutil
import tempfile
from typing import Any

from etils import epath
import numpy as np


def is_url(path: str | os.PathLike) -> bool:
  """Whether `path` names remote storage (gs://..., s3://...) rather than a local file."""
  return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> str:
  """`path` as an absolute local path, or the URL unchanged (orbax refuses relative paths)."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(path)


def join(directory: str | os.PathLike, *names: str) -> str:
  """`directory/name/...` for a local directory or a URL."""
  return os.fspath(epath.Path(directory).joinpath(*names))


def exists(path: str | os.PathLike) -> bool:
  return epath.Path(path).exists()


def is_dir(path: str | os.PathLike) -> bool:
  return epath.Path(path).is_dir()


def list_names(directory: str | os.PathLike) -> list[str]:
  """The sorted names of the entries of `directory` (empty if it does not exist)."""
  path = epath.Path(directory)
  if not path.exists():
    return []
  return sorted(entry.name for entry in path.iterdir())


def remove(path: str | os.PathLike) -> None:
  """Deletes the file `path` if it exists."""
  path = epath.Path(path)
  if path.exists():
    path.unlink()


def read_bytes(path: str | os.PathLike) -> bytes:
  return epath.Path(path).read_bytes()


def read_text(path: str | os.PathLike) -> str:
  return epath.Path(path).read_text()


def read_json(path: str | os.PathLike) -> Any:
  return json.loads(read_text(path))


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


# The mode a file created by open() gets (0666 less the umask), read once at import (os.umask
# can only be read by setting it).
_FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def local_output(path: str | os.PathLike) -> Iterator[str]:
  """A local file name to write `path` through, for writers that only take local files or
  stream more than fits in memory (zipfile, a child process's output). It becomes `path`, all at
  once, when the block ends normally, and is deleted if the block raises.

  A local `path` is written beside itself and renamed over (no copy of a large file); a URL is
  uploaded from a temporary directory (a Cloud Storage object appears whole, or not at all)."""
  if is_url(path):
    with tempfile.TemporaryDirectory(prefix="self_flow_upload_") as directory:
      local = os.path.join(directory, epath.Path(path).name)
      yield local
      upload(local, path)
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, local = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
  os.close(fd)
  try:
    yield local
    os.chmod(local, _FILE_MODE)  # mkstemp's 0600 -> what open() would have created
    os.replace(local, path)
  finally:
    if os.path.exists(local):
      os.remove(local)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` all at once: readers see the old file or the whole new one."""
  with local_output(path) as local, open(local, "wb") as f:
    f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
  """`write_bytes` of UTF-8 text."""
  write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, value: Any) -> None:
  """`write_bytes` of `value` as indented JSON."""
  write_text(path, json.dumps(value, indent=2) + "\n")


def upload(local_file: str, path: str | os.PathLike) -> None:
  """Copies the finished local file `local_file` to `path`, all at once (as `write_bytes`)."""
  if is_url(path):
    epath.Path(local_file).copy(path, overwrite=True)
    return
  with local_output(path) as local:
    shutil.copyfile(local_file, local)


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every array of the .npz file `path`, read into memory (no pickles)."""
  with np.load(io.BytesIO(read_bytes(path)), allow_pickle=False) as npz:
    return {name: npz[name] for name in npz.files}


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes `arrays` as an uncompressed .npz file, all at once (as `write_bytes`)."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes(path, buffer.getvalue())
