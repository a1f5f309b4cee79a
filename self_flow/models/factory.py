"""Builds the model a config describes (backbone, sizes, dtypes, feature layers, text encoder)."""

import jax.numpy as jnp
import ml_collections
from flax import nnx

from self_flow.modalities import image, spec
from self_flow.models import dit, mmdit, presets
from self_flow.text import frozen_encoders

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ARCHITECTURES = ("dit", "mmdit")
# model.position_embedding_order -> the image position-id axes whose sin-cos halves fill the
# width, in order: rows first (ours) or columns first (the official SiT/MAE table).
POSITION_ORDERS = {"height_width": image.POSITION_AXES, "width_height": image.POSITION_AXES[::-1]}


def parse_dtype(name: str, key: str):
  if name not in DTYPES:
    raise ValueError(f"{key}={name!r}; allowed: {sorted(DTYPES)}.")
  return DTYPES[name]


def _text_encoder(config: ml_collections.ConfigDict, rngs: nnx.Rngs, **kw):
  """The trainable byte encoder, or None when embeddings come from a frozen encoder (looked up
  by the data pipeline) or precomputed with the data."""
  text = config.text
  if text.encoder == "precomputed" or text.encoder in frozen_encoders.DIMS:
    return None, frozen_encoders.caption_condition_shape(text)[1]
  if text.encoder == "bytes":
    from self_flow.text import byte_encoder  # pylint: disable=g-import-not-at-top
    encoder = byte_encoder.ByteTextEncoder(width=text.width, depth=text.depth,
                                           num_heads=text.num_heads,
                                           max_length=text.max_length, rngs=rngs, **kw)
    return encoder, text.width
  raise ValueError(f"text.encoder={text.encoder!r}; allowed: "
                   f"{['bytes', 'precomputed', *frozen_encoders.DIMS]}.")


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs):
  """The generator of `config`: a class-conditional image DiT or a text-conditioned MMDiT with
  input/output projections for each of `config.modalities`."""
  m = config.model
  dims = presets.resolve_dims(m.preset, m.hidden_size, m.depth, m.num_heads)
  student, teacher = presets.feature_layers(dims.depth, m.student_layer, m.teacher_layer)
  token_dims = {name: s.token_dim for name, s in spec.modality_specs(config).items()}
  kw = dict(dtype=parse_dtype(m.compute_dtype, "model.compute_dtype"),
            param_dtype=parse_dtype(m.param_dtype, "model.param_dtype"))
  common = dict(hidden_size=dims.hidden_size, num_heads=dims.num_heads, mlp_ratio=m.mlp_ratio,
                projector_hidden_mult=m.projector_hidden_mult, student_layer=student,
                teacher_layer=teacher, remat_policy=m.remat_policy, scan_layers=m.scan_layers,
                attention=m.attention, rngs=rngs, **kw)
  if m.architecture == "dit":
    if m.conditioning != "class":
      raise ValueError(f"model.conditioning={m.conditioning!r} needs model.architecture='mmdit' "
                       "(the dit backbone is class-conditional).")
    if tuple(token_dims) != ("image",):
      raise ValueError(f"modalities={tuple(config.modalities)}: the dit backbone generates "
                       "images only; use model.architecture='mmdit' for video and audio.")
    if m.position_embedding_order not in POSITION_ORDERS:
      raise ValueError(f"model.position_embedding_order={m.position_embedding_order!r}; "
                       f"allowed: {sorted(POSITION_ORDERS)}.")
    return dit.SelfFlowDiT(depth=dims.depth, num_classes=config.data.num_classes,
                           in_dim=token_dims["image"], out_dim=token_dims["image"],
                           pos_axes=POSITION_ORDERS[m.position_embedding_order],
                           timestep_input=m.timestep_input, **common)
  if m.architecture == "mmdit":
    if (m.timestep_input, m.position_embedding_order) != ("t", "height_width"):
      raise ValueError(f"model.timestep_input={m.timestep_input!r} and model.position_embedding_"
                       f"order={m.position_embedding_order!r} import official dit checkpoints; "
                       "the mmdit backbone needs 't' and 'height_width'.")
    if m.conditioning != "text":
      raise ValueError(f"model.conditioning={m.conditioning!r}: the mmdit backbone is "
                       "text-conditioned; use model.conditioning='text'.")
    if not 0 <= m.num_double <= dims.depth:
      raise ValueError(f"model.num_double={m.num_double} must be in [0, depth={dims.depth}].")
    encoder, text_dim = _text_encoder(config, rngs, **kw)
    return mmdit.SelfFlowMMDiT(num_double=m.num_double, num_single=dims.depth - m.num_double,
                               text_dim=text_dim, text_encoder=encoder, token_dims=token_dims,
                               rope_axes_dims=tuple(m.rope_axes_dims), **common)
  raise ValueError(f"model.architecture={m.architecture!r}; allowed: {ARCHITECTURES}.")
