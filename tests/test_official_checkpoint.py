"""Importing the authors' released checkpoint: torch-file reader, converter, model conventions.

A random state dict in the official PyTorch layout is converted, and our JAX model is compared
against `official_reference` (an independent numpy forward of the official model) layer by
layer, with per-token dual timesteps and every adaLN / head weight non-zero.
"""

import dataclasses
import json
import struct
import zipfile
from unittest import mock

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import t2i
from self_flow import config_validation, train_state
from self_flow.modalities import image
from self_flow.models import factory, presets
from self_flow.tools import convert_official_checkpoint as convert
from self_flow import weight_files
import official_reference as reference

HIDDEN, HEADS, DEPTH, CHANNELS, LATENT, PATCH, CLASSES = 64, 4, 4, 4, 8, 2, 10
TOLERANCE = 1e-4  # Relative (norm) error allowed between float32 JAX and the float64 reference.


def official_state_dict(*, hidden=HIDDEN, depth=DEPTH, classes=CLASSES, latent=LATENT,
                        conv_patch_embed=False, make=None):
  """A state dict in the official layout; `make(shape, fan_in)` gives each array (default: random
  with std 1/sqrt(fan_in), adaLN and head included so every path matters)."""
  rng = np.random.default_rng(0)
  make = make or (lambda shape, fan_in: (rng.standard_normal(shape) / np.sqrt(fan_in)
                                         ).astype(np.float32))
  d, p, c, mlp = hidden, PATCH, CHANNELS, 4 * hidden
  linears = {"t_embedder.mlp.0": (d, 256), "t_embedder.mlp.2": (d, d),
             "final_layer.adaLN_modulation.1": (2 * d, d), "final_layer.linear": (p * p * 2 * c, d),
             "projector.linear1": (2 * d, d), "projector.linear2": (d, 2 * d)}
  for i in range(depth):
    linears.update({f"blocks.{i}.attn.qkv": (3 * d, d), f"blocks.{i}.attn.proj": (d, d),
                    f"blocks.{i}.mlp.fc1": (mlp, d), f"blocks.{i}.mlp.fc2": (d, mlp),
                    f"blocks.{i}.adaLN_modulation.1": (6 * d, d)})
  sd = {}
  for name, shape in linears.items():
    sd[f"{name}.weight"] = make(shape, shape[1])
    sd[f"{name}.bias"] = make(shape[:1], shape[1])
  sd["x_embedder.proj.weight"] = make((d, c, p, p) if conv_patch_embed else (d, c * p * p),
                                      c * p * p)
  sd["x_embedder.proj.bias"] = make((d,), c * p * p)
  sd["y_embedder.embedding_table.weight"] = make((classes + 1, d), 1)
  sd["pos_embed"] = reference.position_table(d, latent // p)[None].astype(np.float32)
  return sd


def relative_error(ours, ref) -> float:
  return float(np.linalg.norm(np.asarray(ours, np.float64) - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def converted():
  sd = official_state_dict()
  config = convert.official_config(sd, num_heads=HEADS)
  return sd, config, convert.convert_state_dict(sd, config)


def model_of(config, params):
  return train_state.merge(train_state.model_graphdef(config), jax.tree.map(jnp.asarray, params))


def dual_timestep_inputs(seed: int, batch: int = 3):
  """NHWC latents, a (B, 2) timestep table, per-token rows into it, labels (one null)."""
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((batch, LATENT, LATENT, CHANNELS)).astype(np.float32)
  t_table = rng.uniform(0.05, 0.95, (batch, 2)).astype(np.float32)
  t_index = (rng.uniform(size=(batch, (LATENT // PATCH) ** 2)) < 0.25).astype(np.int32)
  labels = rng.integers(0, CLASSES, batch).astype(np.int32)
  labels[-1] = CLASSES  # The null class (row 10 of the 11-row table).
  return latents, t_table, t_index, labels


def test_config_detected_from_shapes(converted):
  _, config, _ = converted
  m = config.model
  assert (m.preset, m.hidden_size, m.depth, m.num_heads) == ("custom", HIDDEN, DEPTH, HEADS)
  assert (m.mlp_ratio, m.patch_size, m.projector_hidden_mult) == (4.0, PATCH, 2)
  assert (config.data.image_size, config.data.num_channels, config.data.num_classes) == (
      LATENT, CHANNELS, CLASSES)
  assert (m.timestep_input, m.position_embedding_order) == ("one_minus_t", "width_height")


@pytest.mark.parametrize("seed", [0, 1])
def test_forward_matches_the_official_reference(converted, seed):
  sd, config, params = converted
  model = model_of(config, params)
  latents, t_table, t_index, labels = dual_timestep_inputs(seed)
  assert len(np.unique(t_index)) == 2  # Both timesteps are in use.
  tokens = image.patchify(jnp.asarray(latents), PATCH)
  pos_ids = jnp.broadcast_to(image.position_ids(LATENT, LATENT, PATCH), (len(labels),) +
                             image.position_ids(LATENT, LATENT, PATCH).shape)
  student, teacher = presets.feature_layers(DEPTH)
  ref = reference.forward(sd, latents.transpose(0, 3, 1, 2),
                          np.take_along_axis(t_table, t_index, axis=1), labels,
                          num_heads=HEADS, student_layer=student)

  cond = model.condition(jnp.asarray(t_table), jnp.asarray(labels))
  h = model.embed_tokens(tokens, pos_ids)
  for layer in range(DEPTH):
    h = model.run_blocks(h, cond, jnp.asarray(t_index), layer, layer + 1)
    assert relative_error(h, ref["hidden"][layer]) <= TOLERANCE, f"block {layer}"
  velocity, features = model(tokens, pos_ids, jnp.asarray(t_table), jnp.asarray(t_index),
                             jnp.asarray(labels))
  ours = np.asarray(image.unpatchify(velocity, PATCH, LATENT, LATENT)).transpose(0, 3, 1, 2)
  assert relative_error(ours, ref["velocity"]) <= TOLERANCE
  assert relative_error(features, ref["features"]) <= TOLERANCE
  raw = model.teacher_features(tokens, pos_ids, jnp.asarray(t_table), jnp.asarray(t_index),
                               jnp.asarray(labels))
  assert relative_error(raw, ref["hidden"][teacher - 1]) <= TOLERANCE


def test_inference_timestep_and_conv_patch_embed():
  """One timestep broadcast per sample (K = 1) and a Conv2d-shaped x_embedder weight."""
  sd = official_state_dict(conv_patch_embed=True)
  config = convert.official_config(sd, num_heads=HEADS)
  model = model_of(config, convert.convert_state_dict(sd, config))
  latents, t_table, _, labels = dual_timestep_inputs(2)
  t_scalar = t_table[:, :1]
  tokens = image.patchify(jnp.asarray(latents), PATCH)
  pos_ids = jnp.broadcast_to(image.position_ids(LATENT, LATENT, PATCH), tokens.shape[:2] + (3,))
  velocity, _ = model(tokens, pos_ids, jnp.asarray(t_scalar),
                      jnp.zeros(tokens.shape[:2], jnp.int32), jnp.asarray(labels))
  ref = reference.forward(sd, latents.transpose(0, 3, 1, 2),
                          np.broadcast_to(t_scalar, tokens.shape[:2]), labels, num_heads=HEADS,
                          student_layer=1)
  ours = np.asarray(image.unpatchify(velocity, PATCH, LATENT, LATENT)).transpose(0, 3, 1, 2)
  assert relative_error(ours, ref["velocity"]) <= TOLERANCE


@pytest.mark.parametrize("key, value", [("timestep_input", "t"),
                                        ("position_embedding_order", "height_width")])
def test_each_convention_switch_matters(converted, key, value):
  """Our default conventions give a clearly different output: the switches are needed."""
  sd, config, params = converted
  config = config.copy_and_resolve_references()
  config.model[key] = value
  model = model_of(config, params)
  latents, t_table, t_index, labels = dual_timestep_inputs(0)
  tokens = image.patchify(jnp.asarray(latents), PATCH)
  pos_ids = jnp.broadcast_to(image.position_ids(LATENT, LATENT, PATCH), tokens.shape[:2] + (3,))
  velocity, _ = model(tokens, pos_ids, jnp.asarray(t_table), jnp.asarray(t_index),
                      jnp.asarray(labels))
  ref = reference.forward(sd, latents.transpose(0, 3, 1, 2),
                          np.take_along_axis(t_table, t_index, axis=1), labels, num_heads=HEADS,
                          student_layer=1)
  ours = np.asarray(image.unpatchify(velocity, PATCH, LATENT, LATENT)).transpose(0, 3, 1, 2)
  assert relative_error(ours, ref["velocity"]) > 1e-2


def test_xl_checkpoint_is_detected_from_shapes():
  """SiT-XL/2 shapes (zero-stride arrays, no memory) -> the XL preset and the paper's layers."""
  sd = official_state_dict(hidden=1152, depth=28, classes=1000, latent=32,
                           make=lambda shape, _: np.broadcast_to(np.float32(0), shape))
  assert len(sd) == 296  # The released file's tensor count.
  config = convert.official_config(sd)
  m = config.model
  dims = presets.resolve_dims(m.preset, m.hidden_size, m.depth, m.num_heads)
  assert (m.preset, dims.hidden_size, dims.depth, dims.num_heads) == ("XL", 1152, 28, 16)
  assert presets.feature_layers(dims.depth, m.student_layer, m.teacher_layer) == (8, 20)
  assert (config.data.image_size, config.data.num_channels, config.data.num_classes) == (
      32, 4, 1000)
  assert (m.patch_size, m.mlp_ratio, m.projector_hidden_mult) == (2, 4.0, 2)
  assert (m.timestep_input, m.position_embedding_order) == ("one_minus_t", "width_height")
  convert.check_state_dict(sd, config)  # Shapes only: nothing is materialised.
  config.data.data_dir = "/latents"  # Latent shards need a directory to validate.
  config_validation.validate(config, num_devices=1)


def test_bad_state_dict_names_every_bad_key(converted):
  sd, config, _ = converted
  bad = dict(sd)
  del bad["blocks.2.mlp.fc1.bias"]
  bad["blocks.1.attn.qkv.weight"] = np.zeros((5, HIDDEN), np.float32)
  bad["blocks.0.norm1.weight"] = np.zeros((HIDDEN,), np.float32)
  with pytest.raises(ValueError) as error:
    convert.convert_state_dict(bad, config)
  for name in ("blocks.2.mlp.fc1.bias", "blocks.1.attn.qkv.weight", "blocks.0.norm1.weight"):
    assert name in str(error.value)
  scrambled = dict(sd, pos_embed=sd["pos_embed"][:, ::-1])
  with pytest.raises(ValueError, match="pos_embed"):
    convert.official_config(scrambled, num_heads=HEADS)
  with pytest.raises(ValueError, match="num_heads"):
    convert.official_config(sd)  # Width 64 is no SiT preset: the heads must be given.


def test_save_load_round_trip(converted, tmp_path):
  _, config, params = converted
  convert.save_converted(str(tmp_path / "out"), config, params)
  loaded_config, loaded = convert.load_converted(str(tmp_path / "out"))
  assert loaded_config.to_dict() == config.to_dict()
  assert isinstance(loaded_config.modalities, tuple)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="already holds"):
    convert.save_converted(str(tmp_path / "out"), config, params)


# --- A numpy writer of torch.save's zip format (the test machine has no torch). ---

@dataclasses.dataclass
class FakeTensor:
  """What torch pickles for a tensor: a view (offset, size, stride) of a named storage."""

  storage: str
  offset: int
  size: tuple
  stride: tuple
  storage_type: str = "FloatStorage"
  parameter: bool = False  # Pickled through torch._utils._rebuild_parameter.


class TorchPickle:
  """Emits the protocol-2 opcodes and GLOBALs torch.save writes for dicts of tensors."""

  def __init__(self):
    self.out = bytearray(b"\x80\x02")  # PROTO 2

  def global_(self, module: str, name: str):
    self.out += b"c" + f"{module}\n{name}\n".encode()  # GLOBAL

  def ordered_dict(self, items):
    self.global_("collections", "OrderedDict")
    self.out += b")R"  # EMPTY_TUPLE, REDUCE: OrderedDict()
    if items:
      self.out += b"("  # MARK
      for key, value in items.items():
        self.save(key)
        self.save(value)
      self.out += b"u"  # SETITEMS

  def tuple_(self, items):
    self.out += b"("
    for item in items:
      self.save(item)
    self.out += b"t"  # TUPLE

  def tensor(self, t: FakeTensor):
    if t.parameter:
      self.global_("torch._utils", "_rebuild_parameter")
      self.out += b"("
      self.tensor(dataclasses.replace(t, parameter=False))
      self.out += b"\x89"  # NEWFALSE (requires_grad)
      self.ordered_dict({})
      self.out += b"tR"
      return
    self.global_("torch._utils", "_rebuild_tensor_v2")
    self.out += b"("
    self.out += b"("  # The persistent id ('storage', storage_type, key, location, numel).
    self.save("storage")
    self.global_("torch", t.storage_type)
    self.save(t.storage)
    self.save("cpu")
    self.save(STORAGES[t.storage].size)
    self.out += b"tQ"  # TUPLE, BINPERSID
    self.save(t.offset)
    self.tuple_(t.size)
    self.tuple_(t.stride)
    self.out += b"\x89"
    self.ordered_dict({})
    self.out += b"tR"

  def save(self, obj):
    if isinstance(obj, FakeTensor):
      self.tensor(obj)
    elif isinstance(obj, dict):
      self.ordered_dict(obj)
    elif isinstance(obj, str):
      data = obj.encode()
      self.out += b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE
    elif isinstance(obj, int):
      self.out += b"J" + struct.pack("<i", obj)  # BININT
    else:
      raise TypeError(obj)


STORAGES = {}  # storage key -> numpy array of its elements (bfloat16 as raw uint16 bits)


def write_torch_zip(path, obj, pickle_bytes=None):
  if pickle_bytes is None:
    writer = TorchPickle()
    writer.save(obj)
    pickle_bytes = bytes(writer.out) + b"."  # STOP
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
    archive.writestr("model/data.pkl", pickle_bytes)
    archive.writestr("model/byteorder", "little")
    archive.writestr("model/version", "3\n")
    for key, values in STORAGES.items():
      archive.writestr(f"model/data/{key}", values.astype(values.dtype.newbyteorder("<"))
                       .tobytes())


def test_torch_zip_reader(tmp_path):
  rng = np.random.default_rng(0)
  matrix = rng.standard_normal((3, 5)).astype(np.float32)
  half = rng.standard_normal(4).astype(np.float16)
  bf16 = rng.standard_normal(6).astype(np.float32)
  bf16_bits = (bf16.view(np.uint32) >> 16).astype(np.uint16)  # Truncated to bfloat16.
  STORAGES.clear()
  STORAGES.update({"0": matrix.reshape(-1), "1": half, "2": bf16_bits,
                   "3": np.arange(10, dtype=np.float32)})
  ema = {"w": FakeTensor("0", 0, (3, 5), (5, 1)),
         "w_t": FakeTensor("0", 0, (5, 3), (1, 5)),  # Transposed view of the same storage.
         "half": FakeTensor("1", 0, (4,), (1,), "HalfStorage"),
         "bf16": FakeTensor("2", 0, (2, 3), (3, 1), "BFloat16Storage"),
         "tail": FakeTensor("3", 4, (2, 3), (3, 1), parameter=True),  # Offset into a storage.
         "scalar": FakeTensor("3", 7, (), ())}
  write_torch_zip(tmp_path / "ckpt.pt", {"model": {"w": FakeTensor("3", 0, (2,), (1,))},
                                         "ema": ema, "step": 7})
  loaded = weight_files.load_state_dict(str(tmp_path / "ckpt.pt"))  # Default: "ema".
  np.testing.assert_array_equal(loaded["w"], matrix)
  np.testing.assert_array_equal(loaded["w_t"], matrix.T)
  np.testing.assert_array_equal(loaded["half"], half)
  np.testing.assert_array_equal(loaded["bf16"],
                                (bf16_bits.astype(np.uint32) << 16).view(np.float32).reshape(2, 3))
  np.testing.assert_array_equal(loaded["tail"], np.arange(4, 10, dtype=np.float32).reshape(2, 3))
  assert loaded["scalar"].shape == () and loaded["scalar"] == 7
  model = weight_files.load_state_dict(str(tmp_path / "ckpt.pt"), entry="model")
  np.testing.assert_array_equal(model["w"], [0, 1])
  with pytest.raises(ValueError, match="'nope'.*'ema', 'model', 'step'"):
    weight_files.load_state_dict(str(tmp_path / "ckpt.pt"), entry="nope")
  with pytest.raises(ValueError, match="'step'.* not a state dict"):
    weight_files.load_state_dict(str(tmp_path / "ckpt.pt"), entry="step")
  # Without "ema", "model" and then "state_dict" are taken, as the authors' loader does; a
  # DistributedDataParallel "module." prefix is stripped.
  for entries, taken in ([("model", "w"), ("state_dict", "v")], "model"), (
      [("state_dict", "module.w")], "state_dict"):
    write_torch_zip(tmp_path / "no_ema.pt", {
        **{name: {key: FakeTensor("3", 0, (2,), (1,))} for name, key in entries}, "step": 7})
    with mock.patch.object(weight_files.logging, "info") as info:
      loaded = weight_files.load_state_dict(str(tmp_path / "no_ema.pt"))
    assert list(loaded) == ["w"] and info.call_args[0][2] == f"entry {taken!r}"
    np.testing.assert_array_equal(loaded["w"], [0, 1])
  write_torch_zip(tmp_path / "other.pt", {"weights": {"w": FakeTensor("3", 0, (2,), (1,))},
                                          "step": 7})
  with pytest.raises(ValueError, match=r"not a flat state dict.*entry=.*\['weights'\]"):
    weight_files.load_state_dict(str(tmp_path / "other.pt"))


def test_torch_reader_refuses_code(tmp_path):
  """A pickle calling os.system is refused by name and nothing runs."""
  marker = tmp_path / "ran"
  command = f"touch {marker}".encode()
  payload = (b"\x80\x02cos\nsystem\n(X" + struct.pack("<I", len(command)) + command + b"tR.")
  STORAGES.clear()
  write_torch_zip(tmp_path / "evil.pt", None, pickle_bytes=payload)
  with pytest.raises(Exception, match="os.system"):
    weight_files.load_state_dict(str(tmp_path / "evil.pt"))
  assert not marker.exists()


def test_npz_and_safetensors_reader(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {"ema.a": rng.standard_normal((2, 3)).astype(np.float32),
            "ema.b": rng.standard_normal(4).astype(np.float16), "step": np.int64(3)}
  np.savez(tmp_path / "w.npz", **arrays)
  loaded = weight_files.load_state_dict(str(tmp_path / "w.npz"), entry="ema")
  assert sorted(loaded) == ["a", "b"]
  np.testing.assert_array_equal(loaded["a"], arrays["ema.a"])

  bf16 = np.array([1.5, -2.0, 0.25], np.float32)
  blobs = {"a": ("F32", arrays["ema.a"].tobytes(), [2, 3]),
           "b": ("F16", arrays["ema.b"].tobytes(), [4]),
           "c": ("BF16", (bf16.view(np.uint32) >> 16).astype("<u2").tobytes(), [3])}
  header, data = {"__metadata__": {"format": "pt"}}, b""
  for name, (dtype, raw, shape) in blobs.items():
    header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) +
                                                                     len(raw)]}
    data += raw
  header_bytes = json.dumps(header).encode()
  (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes
                                           + data)
  loaded = weight_files.load_state_dict(str(tmp_path / "w.safetensors"))
  np.testing.assert_array_equal(loaded["a"], arrays["ema.a"])
  np.testing.assert_array_equal(loaded["b"], arrays["ema.b"])
  np.testing.assert_array_equal(loaded["c"], bf16)
  # Tensors are read in file order, whatever the header's order, and come back in the header's.
  header = {name: header[name] for name in ("c", "__metadata__", "a", "b")}
  header_bytes = json.dumps(header).encode()
  (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes
                                           + data)
  shuffled = weight_files.load_state_dict(str(tmp_path / "w.safetensors"))
  assert list(shuffled) == ["c", "a", "b"]
  for name in loaded:
    np.testing.assert_array_equal(shuffled[name], loaded[name])
  with pytest.raises(ValueError, match="unknown weights format"):
    weight_files.load_state_dict(str(tmp_path / "w.ckpt"))


def test_convert_file_end_to_end(converted, tmp_path):
  """Official state dict in a torch zip -> CLI path -> load_converted: the same params."""
  sd, _, params = converted
  STORAGES.clear()
  tensors = {}
  for i, (name, value) in enumerate(sd.items()):
    STORAGES[str(i)] = np.ascontiguousarray(value).reshape(-1)
    tensors[name] = FakeTensor(str(i), 0, value.shape,
                               tuple(s // 4 for s in np.ascontiguousarray(value).strides))
  write_torch_zip(tmp_path / "official.pt", tensors)
  convert.convert_file(str(tmp_path / "official.pt"), str(tmp_path / "out"), num_heads=HEADS)
  _, loaded = convert.load_converted(str(tmp_path / "out"))
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_new_model_keys_are_checked():
  """Bad values are named by validation; the mmdit backbone refuses the official conventions."""
  config = convert.official_config(official_state_dict(), num_heads=HEADS)
  config.data.data_dir = "/latents"
  config.model.timestep_input = "1-t"
  with pytest.raises(ValueError, match="model.timestep_input='1-t'"):
    config_validation.validate(config, num_devices=1)
  mmdit = t2i.get_config("local")
  mmdit.model.timestep_input = "one_minus_t"
  with pytest.raises(ValueError, match="mmdit backbone needs"):
    nnx.eval_shape(lambda: factory.create_model(mmdit, nnx.Rngs(0)))
