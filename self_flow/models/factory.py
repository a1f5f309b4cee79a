"""Builds the model a config describes (sizes, dtypes, feature layers, modality projections)."""

import jax.numpy as jnp
import ml_collections
from flax import nnx

from self_flow.modalities import image
from self_flow.models import dit, presets

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_dtype(name: str, key: str):
  if name not in DTYPES:
    raise ValueError(f"{key}={name!r}; allowed: {sorted(DTYPES)}.")
  return DTYPES[name]


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> dit.SelfFlowDiT:
  """The class-conditional image model of `config` (tokens = image patches)."""
  m = config.model
  dims = presets.resolve_dims(m.preset, m.hidden_size, m.depth, m.num_heads)
  student, teacher = presets.feature_layers(dims.depth, m.student_layer, m.teacher_layer)
  image.check_patchable(config.data.image_size, m.patch_size)
  token_dim = m.patch_size * m.patch_size * config.data.num_channels
  return dit.SelfFlowDiT(
      in_dim=token_dim, out_dim=token_dim, hidden_size=dims.hidden_size, depth=dims.depth,
      num_heads=dims.num_heads, mlp_ratio=m.mlp_ratio, num_classes=config.data.num_classes,
      projector_hidden_mult=m.projector_hidden_mult, student_layer=student, teacher_layer=teacher,
      pos_axes=image.POSITION_AXES, dtype=parse_dtype(m.compute_dtype, "model.compute_dtype"),
      param_dtype=parse_dtype(m.param_dtype, "model.param_dtype"),
      remat_policy=m.remat_policy, attention=m.attention, rngs=rngs)
