"""CLI: converts the authors' released Self-Flow checkpoint (PyTorch) into self_flow params.

The official ImageNet model (`selfflow_imagenet256.pt`, `SelfFlowPerTokenDiT`: SiT-XL/2 with
per-token adaLN, class-conditional, SD-VAE latents 32x32x4) becomes the params tree of our
`SelfFlowDiT` plus the matching config, saved with orbax; no PyTorch is needed.

  python -m self_flow.tools.convert_official_checkpoint --input=selfflow_imagenet256.pt \
      --output=DIR [--entry=ema] [--num_heads=16]

  config, params = load_converted(DIR)    # then train_state.merge(model_graphdef(config), params)

Conventions bridged (method doc §1.1, §1.4, §4 item 19):
  - Time: the official public forward feeds 1 - t (paper t, t = 1 is noise) to its inner SiT
    network and negates the output. The negation is folded exactly into the final linear layer;
    the 1 - t cannot be folded into weights, so the config sets model.timestep_input =
    "one_minus_t". Our model then takes and returns the paper convention like any other.
  - Patches: official token vectors are ordered (c, p, q), ours (p, q, c) (modalities/image.py);
    the patch embedding is reordered. The official head has learn_sigma 2C channels per pixel
    in (p, q, c) order and its unpatchify keeps the first C after the (p, q, c) -> (c, p, q)
    shuffle, i.e. channels c < C: we keep exactly those rows, in our (p, q, c) order.
  - Positions: the official fixed table (MAE `get_2d_sincos_pos_embed`, meshgrid(w, h)) puts the
    column embedding in the first channel half and the row in the second; ours is rows first,
    so the config sets model.position_embedding_order = "width_height". The file's `pos_embed`
    is checked against the table our model computes, so a layout mismatch cannot go unnoticed.
  - Linear weights (out, in) become kernels (in, out); the 1001-row label table is our
    num_classes + 1 rows with the null class last; blocks are stacked on a leading layer axis.
"""

import dataclasses
import math
import re

from absl import app, flags, logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from self_flow.modalities import image
from self_flow.models import factory, layers, presets
from self_flow import base_config, config_resolution, storage, train_state, weight_files

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
# Largest |difference| allowed between the file's pos_embed and our computed table (float32
# sin/cos of positions < 64 agree to ~1e-6).
POSITION_TOLERANCE = 1e-4
FREQUENCY_DIM = 256  # Input width of the timestep MLP (official frequency_embedding_size).

# Linears inside each official block: name under blocks.{i} -> our module path under "blocks".
_BLOCK_LINEARS = {
    "attn.qkv": ("attn", "qkv"),
    "attn.proj": ("attn", "proj"),
    "mlp.fc1": ("mlp", "fc1"),
    "mlp.fc2": ("mlp", "fc2"),
    "adaLN_modulation.1": ("modulation",),
}
# Non-block linears: official name -> our module path.
_LINEARS = {
    "t_embedder.mlp.0": ("t_embedder", "fc1"),
    "t_embedder.mlp.2": ("t_embedder", "fc2"),
    "final_layer.adaLN_modulation.1": ("final_layer", "modulation"),
    "projector.linear1": ("projector", "fc1"),
    "projector.linear2": ("projector", "fc2"),
}


@dataclasses.dataclass(frozen=True)
class OfficialSizes:
  """Architecture sizes of an official state dict, read from its array shapes."""

  hidden_size: int
  depth: int
  mlp_dim: int
  projector_dim: int
  num_classes: int  # Real classes; the table has one more row, the null class.
  in_channels: int
  patch_size: int
  grid_size: int  # Tokens per image side.
  out_channels: int  # Per pixel: 2 * in_channels with learn_sigma, else in_channels.


def _need(state_dict, *names):
  missing = [n for n in names if n not in state_dict]
  if missing:
    raise ValueError(f"the state dict lacks {missing}, which give the model sizes; is this an "
                     f"official SelfFlowPerTokenDiT state dict? (first keys: "
                     f"{sorted(state_dict)[:8]})")


def read_sizes(state_dict: dict[str, np.ndarray], patch_size: int = 2) -> OfficialSizes:
  """Sizes from shapes; `patch_size` is used only for a Linear patch embed (a conv names it)."""
  _need(state_dict, "x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
        "blocks.0.mlp.fc1.weight", "projector.linear1.weight", "final_layer.linear.weight")
  embed = state_dict["x_embedder.proj.weight"].shape
  hidden = embed[0]
  if len(embed) == 4 and embed[2] == embed[3]:
    channels, patch_size = embed[1], embed[2]
  elif len(embed) == 2 and embed[1] % (patch_size * patch_size) == 0:
    channels = embed[1] // (patch_size * patch_size)
  else:
    raise ValueError(f"x_embedder.proj.weight has shape {embed}; expected a Conv2d (D, C, p, p) "
                     f"or a Linear (D, C*p*p) with p = patch_size = {patch_size}.")
  tokens = state_dict["pos_embed"].shape[1] if state_dict["pos_embed"].ndim == 3 else 0
  grid = math.isqrt(tokens)
  if grid * grid != tokens or tokens == 0:
    raise ValueError(f"pos_embed has shape {state_dict['pos_embed'].shape}; expected (1, N, D) "
                     "with N a square number of tokens.")
  out_dim = state_dict["final_layer.linear.weight"].shape[0]
  depth = 1 + max(int(m.group(1)) for k in state_dict
                  if (m := re.match(r"blocks\.(\d+)\.", k)))
  return OfficialSizes(
      hidden_size=hidden, depth=depth, mlp_dim=state_dict["blocks.0.mlp.fc1.weight"].shape[0],
      projector_dim=state_dict["projector.linear1.weight"].shape[0],
      num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
      in_channels=channels, patch_size=patch_size, grid_size=grid,
      out_channels=out_dim // (patch_size * patch_size))


def _position_table(config: ml_collections.ConfigDict, order: str) -> np.ndarray:
  """Our model's position embedding (N, D) of the config's token grid, under `order`."""
  m = config.model
  ids = image.position_ids(config.data.image_size, config.data.image_size, m.patch_size)
  hidden = config_resolution.resolve(config).dims.hidden_size
  return np.asarray(layers.sincos_position_embedding(
      ids[None], hidden, factory.POSITION_ORDERS[order]))[0]


def _position_deviation(pos_embed: np.ndarray, config, order: str) -> float:
  return float(np.max(np.abs(pos_embed.reshape(-1, pos_embed.shape[-1])
                             - _position_table(config, order))))


def official_config(state_dict: dict[str, np.ndarray], *, num_heads: int = 0,
                    patch_size: int = 2) -> ml_collections.ConfigDict:
  """The self_flow config of an official checkpoint: sizes from its shapes, our conventions set.

  Starts from the base config (the paper's ImageNet recipe) on SD-VAE latent shards in float32
  (as the authors' inference code runs) and sets the sizes from the weights; a size that matches
  a SiT preset (S, B, L, XL) uses it. Attention heads leave no trace in the shapes: `num_heads`
  (0 = the SiT preset of that width) sets them.
  Sampling defaults to the official protocol (SDE, 250 steps, no guidance).
  """
  sizes = read_sizes(state_dict, patch_size)
  hidden, depth = sizes.hidden_size, sizes.depth
  widths = {d: h for d, _, h in presets.SIZE_PRESETS.values()}
  heads = num_heads or widths.get(hidden, 0)
  if not heads:
    raise ValueError(f"hidden size {hidden} is no SiT preset width ({sorted(widths)}); the head "
                     "count is not in the weights, so pass num_heads.")
  if sizes.mlp_dim % hidden or sizes.projector_dim % hidden:
    raise ValueError(f"MLP width {sizes.mlp_dim} and projector width {sizes.projector_dim} must "
                     f"be multiples of the hidden size {hidden}.")
  if sizes.out_channels not in (sizes.in_channels, 2 * sizes.in_channels):
    raise ValueError(f"final_layer.linear predicts {sizes.out_channels} channels per pixel; "
                     f"expected {sizes.in_channels} or {2 * sizes.in_channels} (learn_sigma).")
  config = base_config.get_base_config()
  config.data.dataset = "latent_shards"  # SD-VAE latents: sampling decodes them with the VAE.
  config.data.data_dir = ""
  config.model.compute_dtype = "float32"
  m = config.model
  preset = [n for n, dims in presets.SIZE_PRESETS.items() if dims == (hidden, depth, heads)]
  m.preset = preset[0] if preset else "custom"
  m.hidden_size, m.depth, m.num_heads = (0, 0, 0) if preset else (hidden, depth, heads)
  m.mlp_ratio = sizes.mlp_dim / hidden
  m.patch_size = sizes.patch_size
  m.projector_hidden_mult = sizes.projector_dim // hidden
  m.student_layer = 0  # The 0.3 / 0.7 rule: 8 / 20 for SiT-XL, as in the official README.
  m.teacher_layer = 0
  m.timestep_input = "one_minus_t"
  config.data.image_size = sizes.grid_size * sizes.patch_size
  config.data.num_channels = sizes.in_channels
  config.data.num_classes = sizes.num_classes
  config.sampling.method = "sde"
  config.sampling.num_steps = 250
  config.sampling.cfg_scale = 1.0
  deviations = {order: _position_deviation(state_dict["pos_embed"], config, order)
                for order in factory.POSITION_ORDERS}
  best = min(deviations, key=deviations.get)
  if deviations[best] > POSITION_TOLERANCE:
    raise ValueError(f"pos_embed matches neither position-embedding layout of our model (max "
                     f"|difference| per model.position_embedding_order: {deviations}); it is "
                     "not the fixed 2-D sin-cos table.")
  m.position_embedding_order = best
  return config


def _official_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], ...]]:
  """Every key of the official state dict of `config`'s model -> its allowed shapes."""
  m, dims = config.model, config_resolution.resolve(config).dims
  d, p, c = dims.hidden_size, m.patch_size, config.data.num_channels
  mlp, proj = int(d * m.mlp_ratio), m.projector_hidden_mult * d
  shapes = {
      "x_embedder.proj.weight": ((d, c * p * p), (d, c, p, p)),
      "x_embedder.proj.bias": ((d,),),
      "pos_embed": ((1, (config.data.image_size // p) ** 2, d),),
      "y_embedder.embedding_table.weight": ((config.data.num_classes + 1, d),),
      "final_layer.linear.weight": ((p * p * 2 * c, d), (p * p * c, d)),
      "final_layer.linear.bias": ((p * p * 2 * c,), (p * p * c,)),
  }
  linears = {"t_embedder.mlp.0": (d, FREQUENCY_DIM),
             "t_embedder.mlp.2": (d, d), "final_layer.adaLN_modulation.1": (2 * d, d),
             "projector.linear1": (proj, d), "projector.linear2": (d, proj)}
  for i in range(dims.depth):
    linears.update({f"blocks.{i}.attn.qkv": (3 * d, d), f"blocks.{i}.attn.proj": (d, d),
                    f"blocks.{i}.mlp.fc1": (mlp, d), f"blocks.{i}.mlp.fc2": (d, mlp),
                    f"blocks.{i}.adaLN_modulation.1": (6 * d, d)})
  for name, (out_dim, in_dim) in linears.items():
    shapes[f"{name}.weight"] = ((out_dim, in_dim),)
    shapes[f"{name}.bias"] = ((out_dim,),)
  return shapes


def check_state_dict(state_dict: dict[str, np.ndarray], config: ml_collections.ConfigDict):
  """Raises one ValueError naming every missing, unexpected and wrongly shaped key."""
  expected = _official_shapes(config)
  missing = sorted(set(expected) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(expected))
  wrong = [f"{k}: {tuple(state_dict[k].shape)}, expected "
           f"{' or '.join(map(str, expected[k]))}"
           for k in sorted(set(expected) & set(state_dict))
           if tuple(state_dict[k].shape) not in expected[k]]
  problems = ([f"missing keys {missing}"] if missing else []) + (
      [f"unexpected keys {unexpected}"] if unexpected else []) + (
      [f"wrong shapes: {'; '.join(wrong)}"] if wrong else [])
  if problems:
    raise ValueError("the state dict does not fit the official model of this config "
                     f"(hidden {expected['x_embedder.proj.bias'][0][0]}, "
                     f"{sum(k.endswith('attn.qkv.weight') for k in expected)} blocks): "
                     + " | ".join(problems))
  deviation = _position_deviation(state_dict["pos_embed"], config,
                                  config.model.position_embedding_order)
  if deviation > POSITION_TOLERANCE:
    raise ValueError(f"pos_embed differs from our table under model.position_embedding_order="
                     f"{config.model.position_embedding_order!r} by up to {deviation:.3g}; "
                     "official_config(state_dict) detects the layout.")


def _kernel(state_dict, name: str) -> dict[str, np.ndarray]:
  """A torch Linear (out, in) weight + bias -> our {"kernel": (in, out), "bias"}."""
  return {"kernel": state_dict[f"{name}.weight"].T, "bias": state_dict[f"{name}.bias"]}


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for part in path[:-1]:
    tree = tree.setdefault(part, {})
  tree[path[-1]] = value


def convert_state_dict(state_dict: dict[str, np.ndarray], config: ml_collections.ConfigDict):
  """Official PyTorch-layout state dict -> params of `config`'s model (see the module doc).

  The result has exactly the tree, shapes and dtypes of `train_state.model_graphdef(config)`'s
  params (nested dicts of numpy arrays), so `train_state.merge` takes it as it is.
  """
  check_state_dict(state_dict, config)
  m = config.model
  sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  d, p, c = sd["x_embedder.proj.bias"].shape[0], m.patch_size, config.data.num_channels
  params = {}
  # Patch embed: input vectors (c, p, q) -> ours (p, q, c); a Conv2d weight has the same order.
  embed = sd["x_embedder.proj.weight"].reshape(d, c, p, p).transpose(2, 3, 1, 0)
  params["input_proj"] = {"kernel": embed.reshape(p * p * c, d),
                          "bias": sd["x_embedder.proj.bias"]}
  params["label_embed"] = {"embedding": sd["y_embedder.embedding_table.weight"]}
  for name, path in _LINEARS.items():
    _set(params, path, _kernel(sd, name))
  depth = sum(k.endswith("attn.qkv.weight") for k in sd)
  for name, path in _BLOCK_LINEARS.items():
    per_block = [_kernel(sd, f"blocks.{i}.{name}") for i in range(depth)]
    _set(params, ("blocks",) + path,
         {leaf: np.stack([b[leaf] for b in per_block]) for leaf in ("kernel", "bias")})
  # Head: rows (p, q, c_out) with c_out < 2C under learn_sigma; keep c < C (what the official
  # unpatchify keeps) in our (p, q, c) order, negated (the official output negation).
  weight = sd["final_layer.linear.weight"].reshape(p, p, -1, d)[:, :, :c].reshape(p * p * c, d)
  bias = sd["final_layer.linear.bias"].reshape(p, p, -1)[:, :, :c].reshape(p * p * c)
  params["final_layer"]["linear"] = {"kernel": -weight.T, "bias": -bias}
  abstract = train_state.abstract_params(config)
  if jax.tree.structure(abstract) != jax.tree.structure(params):
    mismatch = ["the tree structure"]
  else:
    mismatch = [jax.tree_util.keystr(path) for (path, want), got in zip(
        jax.tree_util.tree_flatten_with_path(abstract)[0], jax.tree.leaves(params))
                if want.shape != got.shape]
  if mismatch:
    raise AssertionError(f"converted params do not match the model of the config at {mismatch}; "
                         "the converter and the model layout have drifted apart.")
  return jax.tree.map(lambda a, x: np.ascontiguousarray(x, a.dtype), abstract, params)


def save_converted(directory: str, config: ml_collections.ConfigDict, params) -> None:
  """Writes `directory/config.json` and the params as an orbax checkpoint in `directory/params`
  (`directory` local or a URL: orbax and `storage` both take gs://)."""
  directory = storage.resolve(directory)
  if storage.exists(storage.join(directory, PARAMS_DIR)):
    raise ValueError(f"{directory} already holds converted params; choose a new output "
                     "directory or delete it.")
  storage.write_text(storage.join(directory, CONFIG_FILE), config.to_json(indent=2))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(storage.join(directory, PARAMS_DIR), params)
    checkpointer.wait_until_finished()


def load_converted_config(directory: str) -> ml_collections.ConfigDict:
  """The config written by `save_converted`, without reading the weights."""
  config_path = storage.join(storage.resolve(directory), CONFIG_FILE)
  if not storage.exists(config_path):
    raise ValueError(f"{storage.resolve(directory)} holds no {CONFIG_FILE}; is it an output of "
                     "convert_official_checkpoint?")
  config = base_config.get_base_config()
  config.update(storage.read_json(config_path))  # Typed by the base config (tuples stay tuples).
  return config


def load_converted(directory: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(config, params) written by `save_converted`; params are host numpy arrays in the tree of
  `train_state.model_graphdef(config)` (merge them, or device_put them to shardings)."""
  directory = storage.resolve(directory)
  config = load_converted_config(directory)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          train_state.abstract_params(config))
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(storage.join(directory, PARAMS_DIR), abstract)
  return config, jax.tree.map(np.asarray, params)


def convert_file(input_path: str, output_dir: str, *, entry: str | None = None,
                 num_heads: int = 0) -> ml_collections.ConfigDict:
  """Reads a weights file, converts it and saves it; returns the config written."""
  state_dict = weight_files.load_state_dict(input_path, entry)
  config = official_config(state_dict, num_heads=num_heads)
  params = convert_state_dict(state_dict, config)
  del state_dict  # Frees the file's storages (the params hold copies) before orbax copies again.
  save_converted(output_dir, config, params)
  m, dims = config.model, config_resolution.resolve(config).dims
  logging.info("Converted %s: %d parameters, preset %s (hidden %d, depth %d, heads %d), %d "
               "classes, %dx%dx%d latents, time input %s, positions %s -> %s", input_path,
               sum(x.size for x in jax.tree.leaves(params)), m.preset, dims.hidden_size,
               dims.depth, dims.num_heads, config.data.num_classes, config.data.image_size,
               config.data.image_size, config.data.num_channels, m.timestep_input,
               m.position_embedding_order, output_dir)
  return config


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the CLI flags; only when run as a program, since tools that import this module
  (sample_npz --converted) define flags of the same names (--output)."""
  flags.DEFINE_string("input", None, "Official checkpoint: torch.save .pt/.pth/.bin, .npz or "
                      ".safetensors (local or gs://...).")
  flags.DEFINE_string("output", None, "Directory to write (config.json + orbax params/; local "
                      "or gs://...).")
  flags.DEFINE_string("entry", None, "Entry of a nested checkpoint holding the weights "
                      "(default: 'ema' when present, else the top level).")
  flags.DEFINE_integer("num_heads", 0, "Attention heads (not in the weights); 0 = the SiT "
                       "preset of the checkpoint's width (16 for XL).", lower_bound=0)


def main(argv):
  del argv
  jax.config.update("jax_platforms", "cpu")  # Conversion is host work; leave accelerators free.
  convert_file(FLAGS.input, FLAGS.output, entry=FLAGS.entry, num_heads=FLAGS.num_heads)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["input", "output"])
  app.run(main)
