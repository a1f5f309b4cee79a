"""The Self-Flow token transformer: per-token timestep DiT with student and teacher feature taps.

Every modality arrives as tokens (B, N, C) with integer position ids (B, N, 3) over
(time, height, width); only the input and output projections depend on C. Blocks are stored
stacked (leading "layers" axis) and run with `jax.lax.scan` in segments whose boundaries are the
student and teacher feature layers, so a tap costs nothing and the teacher forward simply stops
at its layer.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from self_flow import sharding
from self_flow.models import layers, scanning

# What the timestep embedding sees: "t" (the paper convention, t = 1 is noise) or "one_minus_t"
# (the authors' released checkpoints: their inner SiT-convention network embeds 1 - t).
TIMESTEP_INPUTS = ("t", "one_minus_t")


def _check_image(modality: str) -> None:
  if modality != "image":
    raise ValueError(f"modality={modality!r}: the dit backbone generates images only; video "
                     "and audio use model.architecture='mmdit'.")


class SelfFlowDiT(nnx.Module):
  """A DiT whose adaLN conditioning is per token (Self-Flow §3.3, per-token SiT blocks)."""

  def __init__(
      self, *, in_dim: int, out_dim: int, hidden_size: int, depth: int, num_heads: int,
      mlp_ratio: float, num_classes: int, projector_hidden_mult: int, student_layer: int,
      teacher_layer: int, pos_axes: tuple[int, ...], dtype: Any, param_dtype: Any,
      remat_policy: str, attention: str, rngs: nnx.Rngs, timestep_input: str = "t",
      scan_layers: bool = True):
    scanning.check_remat_policy(remat_policy)
    if timestep_input not in TIMESTEP_INPUTS:
      raise ValueError(f"model.timestep_input={timestep_input!r}; allowed: {TIMESTEP_INPUTS}.")
    self.timestep_input = timestep_input
    self.hidden_size = hidden_size
    self.depth = depth
    self.num_classes = num_classes
    self.student_layer = student_layer
    self.teacher_layer = teacher_layer
    self.pos_axes = tuple(pos_axes)
    self.remat_policy = remat_policy
    self.scan_layers = scan_layers
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.input_proj = layers.dense(in_dim, hidden_size, ("patch", "embed"), rngs, **kw)
    self.t_embedder = layers.TimestepEmbedder(hidden_size, rngs, **kw)
    # Row `num_classes` is the null class used for classifier-free guidance.
    self.label_embed = nnx.Embed(
        num_classes + 1, hidden_size, embedding_init=nnx.with_partitioning(
            layers.normal_002, ("classes", "embed")), rngs=rngs, **kw)

    self.blocks = scanning.stacked(
        lambda r: layers.AdaLNBlock(hidden_size, num_heads, mlp_ratio, r, attention=attention,
                                    **kw), depth, rngs)
    self.final_layer = layers.FinalLayer(hidden_size, out_dim, rngs, **kw)
    self.projector = layers.ProjectionHead(hidden_size, projector_hidden_mult, rngs, **kw)

  @property
  def null_class(self) -> int:
    return self.num_classes

  def condition(self, t_table: jax.Array, labels: jax.Array) -> jax.Array:
    """Conditioning rows (B, K, D): timestep embedding of each table entry + the label embedding."""
    if self.timestep_input == "one_minus_t":
      t_table = 1.0 - t_table
    return self.t_embedder(t_table) + self.label_embed(labels)[:, None, :]

  def embed_tokens(self, x: jax.Array, pos_ids: jax.Array) -> jax.Array:
    pos = layers.sincos_position_embedding(pos_ids, self.hidden_size, self.pos_axes)
    h = self.input_proj(x)
    return sharding.constrain(h + pos.astype(h.dtype), layers.TOKENS)

  def run_blocks(self, h, cond, cond_index, start: int, end: int):
    """Blocks [start, end) (0-based) as one scanned (or unrolled, model.scan_layers) segment over
    the stacked parameters."""
    return scanning.scan_segment(self.blocks, h, start, end,
                                 lambda block, carry: block(carry, cond, cond_index),
                                 self.remat_policy, scan_layers=self.scan_layers)

  def __call__(self, x, pos_ids, t_table, t_index, labels, modality: str = "image"):
    """Student forward: velocity (B, N, C_out) float32 and projected student features (B, N, D).

    Args:
      x: noised tokens (B, N, C_in).
      pos_ids: integer positions (B, N, 3) over (time, height, width).
      t_table: distinct timesteps per sample (B, K), paper convention (t = 1 is noise).
      t_index: per-token row into t_table (B, N): token i is conditioned on
        t_table[b, t_index[b, i]].
      labels: class labels (B,), `null_class` for the unconditional model.
      modality: must be "image": this backbone is the class-conditional image model; the
        argument keeps one calling convention for every backbone.
    """
    _check_image(modality)
    cond = self.condition(t_table, labels)
    h = self.embed_tokens(x, pos_ids)
    h = self.run_blocks(h, cond, t_index, 0, self.student_layer)
    features = self.projector(h)
    h = self.run_blocks(h, cond, t_index, self.student_layer, self.depth)
    velocity = self.final_layer(h, cond, t_index)
    return velocity.astype(jnp.float32), features

  def teacher_features(self, x, pos_ids, t_table, t_index, labels, modality: str = "image"):
    """Raw hidden state after `teacher_layer` (no projector); the forward stops there."""
    _check_image(modality)
    cond = self.condition(t_table, labels)
    h = self.embed_tokens(x, pos_ids)
    return self.run_blocks(h, cond, t_index, 0, self.teacher_layer)
