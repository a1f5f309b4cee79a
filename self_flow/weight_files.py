"""Reads PyTorch, NumPy and safetensors weight files into `dict[str, np.ndarray]` without torch.

Released diffusion checkpoints are mostly `torch.save` files: since PyTorch 1.6 a zip archive
holding `<dir>/data.pkl` (a pickle of the state dict in which each tensor is a call to
`torch._utils._rebuild_tensor_v2` on a storage named by a persistent id) and the raw
little-endian bytes of every storage in `<dir>/data/<key>`. A pickle can run any importable
callable, so the unpickler here resolves only the handful of globals a state dict needs
(OrderedDict, the tensor and parameter rebuilders, the typed storage classes) to local
numpy-only stand-ins and refuses everything else by name: loading never executes code from the
file. `.npz` and `.safetensors` (8-byte header length, JSON header, raw bytes) are read too.

Any file may be local or a URL (gs://...): it is streamed through `etils.epath`, seeking to what
is needed, so a multi-GB checkpoint costs its tensors' memory and no copy of the whole file.

  state_dict = load_state_dict("selfflow_imagenet256.pt")   # "ema", else "model", else "state_dict"
  state_dict = load_state_dict("train_ckpt.pt", entry="model")  # a named entry

As the authors' loader does, a nested checkpoint's weights are taken from its `ema` entry, else
`model`, else `state_dict` (the log says which), and a `module.` prefix on every name (weights
saved from a DistributedDataParallel wrapper) is stripped.
"""

import collections
import dataclasses
import io
import json
import os
import pickle
import struct
import zipfile

import numpy as np
from absl import logging
from etils import epath

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SUFFIXES = TORCH_SUFFIXES + (".npz", ".safetensors")
# Entries tried in order when none is named: training checkpoints keep the EMA weights (the ones
# to sample from) beside the live ones; other trainers save only `model` or `state_dict`.
DEFAULT_ENTRIES = ("ema", "model", "state_dict")
DATA_PARALLEL_PREFIX = "module."  # torch.nn.parallel.DistributedDataParallel's parameter names


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stand-in for a `torch.<Name>Storage` class: only its element type matters here."""

  name: str
  dtype: np.dtype


# torch storage class -> numpy element type. bfloat16 (no numpy dtype) is read as its raw 16 bits
# and widened exactly to float32 by `_widen_bfloat16`.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,
    "DoubleStorage": np.float64,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}

# safetensors dtype tag -> numpy element type (BF16 read as raw bits, then widened).
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def _widen_bfloat16(bits: np.ndarray) -> np.ndarray:
  """Raw bfloat16 bit patterns (uint16) -> the same values as float32 (exact)."""
  return (bits.astype(np.uint32) << 16).view(np.float32)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False,
                    backward_hooks=None, metadata=None):
  """numpy twin of `torch._utils._rebuild_tensor_v2`: a read-only strided view of `storage`.

  Views, not copies: a 2.7 GB SiT-XL file then costs its storages' memory once."""
  del requires_grad, backward_hooks, metadata  # Autograd bookkeeping, no data.
  array, storage_type = storage
  size, stride = tuple(size), tuple(stride)
  if len(size) != len(stride):
    raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in rank.")
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if any(n == 0 for n in size):
    values = np.zeros(size, array.dtype)
  elif storage_offset < 0 or min(stride, default=0) < 0 or last >= array.size:
    raise pickle.UnpicklingError(
        f"tensor (offset {storage_offset}, size {size}, stride {stride}) reads past its "
        f"{array.size}-element storage.")
  else:
    values = np.lib.stride_tricks.as_strided(
        array[storage_offset:], shape=size, strides=[s * array.itemsize for s in stride],
        writeable=False)
  return _widen_bfloat16(values) if storage_type.name == "BFloat16Storage" else values


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  """numpy twin of `torch._utils._rebuild_parameter`: an nn.Parameter is just its data."""
  del requires_grad, backward_hooks
  return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name, np.dtype(dtype))
       for name, dtype in _STORAGE_DTYPES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickles torch's `data.pkl`, resolving only `_ALLOWED_GLOBALS`; storages come from the zip."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str):
    super().__init__(io.BytesIO(data))
    self.archive = archive
    self.prefix = prefix
    self.byteorder = byteorder
    self.storages = {}

  def find_class(self, module, name):
    if (module, name) not in _ALLOWED_GLOBALS:
      raise pickle.UnpicklingError(
          f"refusing to load global {module}.{name}: a weights file may only hold tensors in "
          f"(nested) dicts, and loading never runs code from the file. Allowed globals: "
          f"{sorted(f'{m}.{n}' for m, n in _ALLOWED_GLOBALS)}. Re-save just the state dict "
          "(torch.save(model.state_dict(), path)).")
    return _ALLOWED_GLOBALS[(module, name)]

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(
          f"unsupported persistent id {pid!r}; expected ('storage', torch.<Type>Storage, key, "
          "location, numel).")
    _, storage_type, key, _, numel = pid
    if key not in self.storages:
      name = f"{self.prefix}data/{key}"
      try:
        raw = self.archive.read(name)
      except KeyError:
        raise pickle.UnpicklingError(f"storage {name!r} is missing from the archive.") from None
      dtype = storage_type.dtype.newbyteorder("<" if self.byteorder == "little" else ">")
      if len(raw) != numel * dtype.itemsize:
        raise pickle.UnpicklingError(
            f"storage {name!r} has {len(raw)} bytes; {storage_type.name} of {numel} elements "
            f"needs {numel * dtype.itemsize}.")
      array = np.frombuffer(raw, dtype)  # Read-only, shares the bytes read from the zip.
      self.storages[key] = (array if dtype.isnative else array.astype(dtype.newbyteorder("=")),
                            storage_type)
    return self.storages[key]


def _read_torch_zip(path: str):
  """The object `torch.save` wrote to `path` (zip format), with tensors as numpy arrays."""
  with epath.Path(path).open("rb") as f:
    if not zipfile.is_zipfile(f):
      raise ValueError(f"{path} is not a zip archive: only the zip format of torch.save (PyTorch "
                       ">= 1.6, the default) is supported, not the legacy tar/pickle format; "
                       "re-save it with a recent torch.save.")
    with zipfile.ZipFile(f) as archive:
      pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
      if len(pickles) != 1:
        raise ValueError(f"{path} is a zip but not a torch.save archive: expected one "
                         f"'<dir>/data.pkl', found {pickles}.")
      prefix = pickles[0][:-len("data.pkl")]
      byteorder_name = f"{prefix}byteorder"
      byteorder = (archive.read(byteorder_name).decode().strip()
                   if byteorder_name in archive.namelist() else "little")
      if byteorder not in ("little", "big"):
        raise ValueError(f"{path}: byteorder record {byteorder!r} is neither 'little' nor 'big'.")
      return _StateDictUnpickler(archive.read(pickles[0]), archive, prefix, byteorder).load()


def _select_entry(obj, entry: str | None, path: str) -> dict[str, np.ndarray]:
  """The flat name -> array dict inside a loaded torch object (see `load_state_dict`)."""
  if not isinstance(obj, dict):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a dict of tensors.")
  if entry is None:
    entry = next((e for e in DEFAULT_ENTRIES if isinstance(obj.get(e), dict)), None)
  if entry is not None:
    if entry not in obj:
      raise ValueError(f"entry={entry!r} is not in {path}; its top-level keys are "
                       f"{sorted(map(str, obj))}.")
    obj = obj[entry]
    if not isinstance(obj, dict):
      raise ValueError(f"entry {entry!r} of {path} is a {type(obj).__name__}, not a state dict.")
  others = sorted(str(k) for k, v in obj.items()
                  if not (isinstance(k, str) and isinstance(v, np.ndarray)))
  if others:
    nested = sorted(str(k) for k, v in obj.items() if isinstance(v, dict))
    raise ValueError(f"{path}{f' [{entry!r}]' if entry else ''} is not a flat state dict: keys "
                     f"{others[:10]} are not named tensors. Pick the entry that holds the "
                     f"weights with entry=... (dict-valued keys: {nested}).")
  logging.info("%s: read the weights of %s.", path,
               f"entry {entry!r}" if entry else "the top level")
  return dict(obj)


def _safetensors_header(f, path: str) -> tuple[dict, int, int]:
  """(JSON header, offset of the data, size of the data) of the open .safetensors file `f`."""
  f.seek(0, io.SEEK_END)
  size = f.tell()
  f.seek(0)
  if size < 8:
    raise ValueError(f"{path} is too short to be a safetensors file.")
  (header_len,) = struct.unpack("<Q", f.read(8))
  if 8 + header_len > size:
    raise ValueError(f"{path}: header length {header_len} exceeds the file size {size}.")
  return json.loads(f.read(header_len)), 8 + header_len, size - 8 - header_len


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A .safetensors file: u64 header length, JSON header of dtype/shape/offsets, raw bytes.

  Tensors are read one at a time in file order (sequential reads from Cloud Storage), so the
  file is never in memory whole."""
  with epath.Path(path).open("rb") as f:
    header, data_start, data_size = _safetensors_header(f, path)
    names = sorted((name for name in header if name != "__metadata__"),
                   key=lambda name: header[name]["data_offsets"][0])
    arrays = {}
    for name in names:
      info = header[name]
      if info["dtype"] not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']!r}; supported: "
                         f"{sorted(_SAFETENSORS_DTYPES)}.")
      dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
      begin, end = info["data_offsets"]
      shape = tuple(info["shape"])
      if end - begin != int(np.prod(shape)) * dtype.itemsize or end > data_size:
        raise ValueError(f"{path}: tensor {name!r} of shape {shape} and dtype {info['dtype']} "
                         f"does not fit its byte range [{begin}, {end}).")
      f.seek(data_start + begin)
      values = np.frombuffer(f.read(end - begin), dtype).reshape(shape)
      values = values.astype(dtype.newbyteorder("="))
      arrays[name] = _widen_bfloat16(values) if info["dtype"] == "BF16" else values
  return {name: arrays[name] for name in header if name in arrays}  # in the header's order


def _with_prefix(arrays: dict[str, np.ndarray], entry: str | None, path: str):
  """Flat files name nested entries by prefix ("ema.blocks.0..."): keep and strip `entry.`."""
  if entry is None:
    return arrays
  prefix = f"{entry}."
  picked = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
  if not picked:
    raise ValueError(f"entry={entry!r}: no tensor of {path} is named '{prefix}...'; first names: "
                     f"{sorted(arrays)[:5]}.")
  return picked


def load_state_dict(path: str, entry: str | None = None) -> dict[str, np.ndarray]:
  """The weights in `path` as {name: numpy array} (bfloat16 widened to float32; torch tensors
  are read-only views of their storages).

  Args:
    path: a `torch.save` zip (.pt, .pth, .bin), a .npz or a .safetensors file.
    entry: which entry of a nested checkpoint ({"model": ..., "ema": ...}) holds the weights;
      default the first of DEFAULT_ENTRIES the file has, else the top level. For the flat .npz and
      .safetensors formats, the tensors named "<entry>.<name>" (prefix stripped).
  """
  suffix = os.path.splitext(path)[1].lower()
  if suffix in TORCH_SUFFIXES:
    arrays = _select_entry(_read_torch_zip(path), entry, path)
  elif suffix == ".npz":
    with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as npz:
      arrays = _with_prefix({name: npz[name] for name in npz.files}, entry, path)
  elif suffix == ".safetensors":
    arrays = _with_prefix(_read_safetensors(path), entry, path)
  else:
    raise ValueError(f"{path}: unknown weights format {suffix!r}; supported: {list(SUFFIXES)}.")
  return _without_data_parallel_prefix(arrays)


def _without_data_parallel_prefix(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Names without the `module.` that DistributedDataParallel puts before every one."""
  if arrays and all(name.startswith(DATA_PARALLEL_PREFIX) for name in arrays):
    return {name[len(DATA_PARALLEL_PREFIX):]: v for name, v in arrays.items()}
  return arrays
