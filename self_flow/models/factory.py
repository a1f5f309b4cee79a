"""Builds the model a config describes (backbone, sizes, dtypes, feature layers, text encoder),
and owns the checks of which backbone takes which conditioning, modalities and imports."""

import jax.numpy as jnp
import ml_collections
from flax import nnx

from self_flow import conditioning, config_resolution
from self_flow.modalities import image
from self_flow.models import byte_encoder, dit, mmdit
from self_flow.text import frozen_encoders

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ARCHITECTURES = ("dit", "mmdit")
# text.encoder: the trainable byte encoder, embeddings stored with latent shards, a frozen
# pretrained encoder looked up by the data pipeline, or a frozen T5 run in the train step on
# token ids stored with latent shards (self_flow.text.in_step_encoder).
TEXT_ENCODERS = ("bytes", "precomputed", *frozen_encoders.DIMS, "t5")
# model.position_embedding_order -> the image position-id axes whose sin-cos halves fill the
# width, in order: rows first (ours) or columns first (the official SiT/MAE table).
POSITION_ORDERS = {"height_width": image.POSITION_AXES, "width_height": image.POSITION_AXES[::-1]}


def parse_dtype(name: str, key: str):
  if name not in DTYPES:
    raise ValueError(f"{key}={name!r}; allowed: {sorted(DTYPES)}.")
  return DTYPES[name]


def check_config(config: ml_collections.ConfigDict,
                 resolved: config_resolution.ResolvedConfig) -> None:
  """Raises ValueError when the backbone cannot take the config's conditioning, modalities,
  checkpoint-import conventions or text encoder."""
  m = config.model
  if m.architecture not in ARCHITECTURES:
    raise ValueError(f"config.model.architecture={m.architecture!r} is not allowed; choose one "
                     f"of {list(ARCHITECTURES)}.")
  if m.architecture == "dit":
    if m.conditioning not in ("class", "none"):
      raise ValueError(f"config.model.conditioning={m.conditioning!r} needs "
                       "model.architecture='mmdit'; the dit backbone is class-conditional or "
                       "unconditional ('none').")
    others = [name for name in resolved.specs if name != "image"]
    if others:
      raise ValueError(f"config.modalities={tuple(config.modalities)} includes {others[0]!r}, "
                       "which needs model.architecture='mmdit' (text-conditioned, per-modality "
                       "projections); dit generates class-conditional images only.")
    if m.position_embedding_order not in POSITION_ORDERS:
      raise ValueError(f"config.model.position_embedding_order={m.position_embedding_order!r} "
                       f"is not allowed; choose one of {sorted(POSITION_ORDERS)}.")
    return
  depth = resolved.dims.depth
  if (m.timestep_input, m.position_embedding_order) != ("t", "height_width"):
    raise ValueError(f"config.model.timestep_input={m.timestep_input!r} and model.position_"
                     f"embedding_order={m.position_embedding_order!r} import official dit "
                     "checkpoints; the mmdit backbone needs 't' and 'height_width'.")
  if m.conditioning != "text" or not 0 <= m.num_double <= depth:
    raise ValueError(f"config.model: mmdit needs conditioning='text' (got {m.conditioning!r}) "
                     f"and num_double={m.num_double} in [0, depth={depth}].")
  head_dim = resolved.dims.hidden_size // resolved.dims.num_heads
  if sum(m.rope_axes_dims) != head_dim or len(m.rope_axes_dims) != 3:
    raise ValueError(f"config.model.rope_axes_dims={tuple(m.rope_axes_dims)} must be 3 even "
                     f"sizes summing to the head dim {head_dim}.")
  text = config.text
  if text.encoder not in TEXT_ENCODERS:
    raise ValueError(f"config.text.encoder={text.encoder!r} is not allowed; choose one of "
                     f"{list(TEXT_ENCODERS)}.")
  if text.encoder == "t5":
    parse_dtype(text.t5_dtype, "config.text.t5_dtype")
    if not (text.t5_path or text.t5_config):
      raise ValueError("config.text.encoder='t5' needs config.text.t5_path (the Hugging Face "
                       "T5 encoder directory) or, for shapes only, config.text.t5_config.")
  if text.encoder == "bytes" and text.width % text.num_heads:
    raise ValueError(f"config.text.width={text.width} must be divisible by "
                     f"config.text.num_heads={text.num_heads}.")


def _text_encoder(config: ml_collections.ConfigDict, rngs: nnx.Rngs, **kw):
  """The trainable byte encoder, or None when embeddings come from a frozen encoder (looked up
  by the data pipeline) or precomputed with the data."""
  text = config.text
  if text.encoder != "bytes":
    return None, frozen_encoders.caption_condition_shape(text)[1]
  encoder = byte_encoder.ByteTextEncoder(width=text.width, depth=text.depth,
                                         num_heads=text.num_heads, max_length=text.max_length,
                                         rngs=rngs, **kw)
  return encoder, text.width


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs,
                 resolved: config_resolution.ResolvedConfig | None = None):
  """The generator of `config`: a class-conditional image DiT or a text-conditioned MMDiT with
  input/output projections for each of `config.modalities`.

  `resolved` is the run's `config_resolution.resolve(config)` (the trainer passes the one it
  validated); a standalone caller may leave it to be resolved here.
  """
  resolved = config_resolution.resolve(config) if resolved is None else resolved
  check_config(config, resolved)
  m, dims = config.model, resolved.dims
  token_dims = {name: s.token_dim for name, s in resolved.specs.items()}
  kw = dict(dtype=parse_dtype(m.compute_dtype, "model.compute_dtype"),
            param_dtype=parse_dtype(m.param_dtype, "model.param_dtype"))
  common = dict(hidden_size=dims.hidden_size, num_heads=dims.num_heads, mlp_ratio=m.mlp_ratio,
                projector_hidden_mult=m.projector_hidden_mult,
                student_layer=resolved.student_layer, teacher_layer=resolved.teacher_layer,
                remat_policy=m.remat_policy, scan_layers=m.scan_layers, attention=m.attention,
                rngs=rngs, **kw)
  if m.architecture == "dit":
    return dit.SelfFlowDiT(depth=dims.depth, num_classes=conditioning.model_classes(config),
                           in_dim=token_dims["image"], out_dim=token_dims["image"],
                           pos_axes=POSITION_ORDERS[m.position_embedding_order],
                           timestep_input=m.timestep_input, **common)
  encoder, text_dim = _text_encoder(config, rngs, **kw)
  return mmdit.SelfFlowMMDiT(num_double=m.num_double, num_single=dims.depth - m.num_double,
                             text_dim=text_dim, text_encoder=encoder, token_dims=token_dims,
                             rope_axes_dims=tuple(m.rope_axes_dims), **common)
