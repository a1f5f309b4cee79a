"""FLUX.2-style text-to-image transformer with per-token timesteps (Self-Flow's T2I backbone).

Double-stream blocks (separate image and text weights, joint attention) are followed by
single-stream blocks over the concatenated [text, image] sequence (paper App. A.3: FLUX with the
FLUX.2 changes: shared modulation, SwiGLU, qkv bias, 3-D RoPE).

Self-Flow specifics:
  * Image tokens carry per-token timesteps. As in `dit.SelfFlowDiT`, conditioning arrives as a
    table of distinct timesteps per sample (B, K) plus a per-token index (B, N); the shared
    modulation is computed once per table row and gathered per token.
  * Text tokens are conditioning: never noised or masked, and they receive no flow loss. Their
    modulation uses one vector per sample: the mean of the image tokens' conditioning vectors
    (method doc §5; at inference, where all image tokens share t, it is exactly the standard
    FLUX conditioning).
  * Feature taps count blocks 1-based, double blocks first; taps read the image tokens only.

Joint multi-modal models (paper Sec. 4.2) have one input and one output projection per modality
(`token_dims`); every other weight is shared, and a call names the modality of its tokens.

Text enters either as byte tokens through a small trainable encoder (offline) or as precomputed
embeddings of a frozen large encoder read from the data; both end in `text_in`.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from self_flow import sharding
from self_flow.models import attention, layers, rope, scanning


def rms_norm(x, scale, eps: float = 1e-6):
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps) * scale).astype(x.dtype)


def joint_attention(q, k, v, cos, sin, key_mask, implementation):
  """RoPE, then attention over the joint sequence; key_mask (B, S) hides padded text keys."""
  q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
  out = attention.dot_product_attention(q, k, v, key_mask=key_mask,
                                        implementation=implementation)
  return out.reshape(*out.shape[:2], -1)


class StreamWeights(nnx.Module):
  """One stream's weights in a double block: qkv (with bias), q/k RMSNorm, proj, SwiGLU MLP."""

  def __init__(self, hidden_size, num_heads, mlp_dim, rngs, *, dtype, param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    head_dim = hidden_size // num_heads
    self.num_heads = num_heads
    self.qkv = layers.dense(hidden_size, 3 * hidden_size, ("embed", "heads"), rngs, **kw)
    self.q_scale = nnx.Param(jnp.ones((head_dim,), param_dtype))
    self.k_scale = nnx.Param(jnp.ones((head_dim,), param_dtype))
    self.proj = layers.dense(hidden_size, hidden_size, ("heads", "embed"), rngs, **kw)
    self.mlp_in = layers.dense(hidden_size, 2 * mlp_dim, ("embed", "mlp"), rngs, **kw)
    self.mlp_out = layers.dense(mlp_dim, hidden_size, ("mlp", "embed"), rngs, **kw)

  def qkv_heads(self, x):
    b, s, d = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(b, s, 3, self.num_heads, d // self.num_heads), 3, 2)
    return _heads(rms_norm(q[:, :, 0], self.q_scale.value),
                  rms_norm(k[:, :, 0], self.k_scale.value), v[:, :, 0])

  def mlp(self, x):
    gate, up = jnp.split(self.mlp_in(x), 2, axis=-1)
    return self.mlp_out(sharding.constrain(jax.nn.silu(gate) * up, layers.HIDDEN))


class DoubleBlock(nnx.Module):
  """Image and text streams with their own weights, attending jointly."""

  def __init__(self, hidden_size, num_heads, mlp_dim, rngs, *, dtype, param_dtype, attention):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.attention = attention
    self.img = StreamWeights(hidden_size, num_heads, mlp_dim, rngs, **kw)
    self.txt = StreamWeights(hidden_size, num_heads, mlp_dim, rngs, **kw)

  def __call__(self, img, txt, img_mod, txt_mod, cos, sin, key_mask):
    img_a, img_m = jnp.split(img_mod, 2, axis=-1)
    txt_a, txt_m = jnp.split(txt_mod, 2, axis=-1)
    qi, ki, vi = self.img.qkv_heads(_modulate(img, img_a))
    qt, kt, vt = self.txt.qkv_heads(_modulate(txt, txt_a))
    cat = lambda a, b: jnp.concatenate([a, b], axis=1)
    out = joint_attention(cat(qt, qi), cat(kt, ki), cat(vt, vi), cos, sin, key_mask,
                          self.attention)
    n_txt = txt.shape[1]
    img = img + _gate(img_a) * self.img.proj(out[:, n_txt:])
    txt = txt + _gate(txt_a) * self.txt.proj(out[:, :n_txt])
    img = img + _gate(img_m) * self.img.mlp(_modulate(img, img_m))
    txt = txt + _gate(txt_m) * self.txt.mlp(_modulate(txt, txt_m))
    return sharding.constrain(img, layers.TOKENS), sharding.constrain(txt, layers.TOKENS)


class SingleBlock(nnx.Module):
  """One fused block over [text, image]: linear1 -> (qkv, SwiGLU in); linear2 on (attn, mlp)."""

  def __init__(self, hidden_size, num_heads, mlp_dim, rngs, *, dtype, param_dtype, attention):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    head_dim = hidden_size // num_heads
    self.num_heads = num_heads
    self.mlp_dim = mlp_dim
    self.attention = attention
    self.linear1 = layers.dense(hidden_size, 3 * hidden_size + 2 * mlp_dim, ("embed", "mlp"),
                                rngs, **kw)
    self.linear2 = layers.dense(hidden_size + mlp_dim, hidden_size, ("mlp", "embed"), rngs, **kw)
    self.q_scale = nnx.Param(jnp.ones((head_dim,), param_dtype))
    self.k_scale = nnx.Param(jnp.ones((head_dim,), param_dtype))

  def __call__(self, x, mod, cos, sin, key_mask):
    b, s, d = x.shape
    h = self.linear1(_modulate(x, mod))
    qkv, gate, up = jnp.split(h, [3 * d, 3 * d + self.mlp_dim], axis=-1)
    q, k, v = jnp.split(qkv.reshape(b, s, 3, self.num_heads, d // self.num_heads), 3, 2)
    q, k, v = _heads(rms_norm(q[:, :, 0], self.q_scale.value),
                     rms_norm(k[:, :, 0], self.k_scale.value), v[:, :, 0])
    attn = joint_attention(q, k, v, cos, sin, key_mask, self.attention)
    hidden = sharding.constrain(jax.nn.silu(gate) * up, layers.HIDDEN)
    return sharding.constrain(
        x + _gate(mod) * self.linear2(jnp.concatenate([attn, hidden], -1)), layers.TOKENS)


def _modulate(x, mod):
  """mod = [shift, scale, gate] (last axis): LayerNorm, then x (1 + scale) + shift."""
  shift, scale, _ = jnp.split(mod, 3, axis=-1)
  return layers.modulate(layers.layer_norm(x), shift, scale)


def _gate(mod):
  return jnp.split(mod, 3, axis=-1)[2]


def _heads(*arrays):
  """Pins (B, S, heads, head_dim) attention inputs to the heads' logical axes."""
  return tuple(sharding.constrain(a, layers.HEADS) for a in arrays)


class SelfFlowMMDiT(nnx.Module):
  """Per-token-timestep MMDiT; the text-conditioned counterpart of `dit.SelfFlowDiT`."""

  def __init__(
      self, *, token_dims: dict[str, int], hidden_size: int, num_heads: int, num_double: int,
      num_single: int, mlp_ratio: float, text_dim: int, text_encoder: nnx.Module | None,
      projector_hidden_mult: int, student_layer: int, teacher_layer: int,
      rope_axes_dims: tuple[int, ...], dtype: Any, param_dtype: Any, remat_policy: str,
      attention: str, rngs: nnx.Rngs, scan_layers: bool = True):
    scanning.check_remat_policy(remat_policy)
    if sum(rope_axes_dims) != hidden_size // num_heads:
      raise ValueError(f"model.rope_axes_dims={tuple(rope_axes_dims)} must sum to the head dim "
                       f"{hidden_size // num_heads} (hidden {hidden_size} / {num_heads} heads).")
    self.hidden_size = hidden_size
    self.num_double = num_double
    self.depth = num_double + num_single
    self.student_layer = student_layer
    self.teacher_layer = teacher_layer
    self.rope_axes_dims = tuple(rope_axes_dims)
    self.remat_policy = remat_policy
    self.scan_layers = scan_layers
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    mlp_dim = int(hidden_size * mlp_ratio)
    # Per-modality projections: tokens -> width, and width -> velocity (adaLN final layer).
    self.inputs = nnx.Dict({
        name: layers.dense(dim, hidden_size, ("patch", "embed"), rngs, **kw)
        for name, dim in token_dims.items()})
    self.outputs = nnx.Dict({
        name: layers.FinalLayer(hidden_size, dim, rngs, **kw) for name, dim in token_dims.items()})
    self.text_encoder = text_encoder
    self.txt_in = layers.dense(text_dim, hidden_size, ("patch", "embed"), rngs, **kw)
    self.t_embedder = layers.TimestepEmbedder(hidden_size, rngs, **kw)
    # FLUX.2 shared modulation: one set of (shift, scale, gate) x2 per stream for all double
    # blocks and one (shift, scale, gate) for all single blocks; zero-init = identity blocks.
    zero = dict(init=layers.zeros, **kw)
    self.double_mod_img = layers.dense(hidden_size, 6 * hidden_size, ("embed", "modulation"),
                                       rngs, **zero)
    self.double_mod_txt = layers.dense(hidden_size, 6 * hidden_size, ("embed", "modulation"),
                                       rngs, **zero)
    self.single_mod = layers.dense(hidden_size, 3 * hidden_size, ("embed", "modulation"), rngs,
                                   **zero)
    block_kw = dict(attention=attention, **kw)
    self.double_blocks = scanning.stacked(
        lambda r: DoubleBlock(hidden_size, num_heads, mlp_dim, r, **block_kw), num_double, rngs)
    self.single_blocks = scanning.stacked(
        lambda r: SingleBlock(hidden_size, num_heads, mlp_dim, r, **block_kw), num_single, rngs)
    self.projector = layers.ProjectionHead(hidden_size, projector_hidden_mult, rngs, **kw)

  def embed_text(self, text: dict[str, jax.Array]) -> jax.Array:
    """Byte tokens through the trainable encoder, or precomputed embeddings, -> (B, L, D)."""
    if self.text_encoder is not None:
      return self.txt_in(self.text_encoder(text["tokens"], text["mask"]))
    return self.txt_in(text["embedding"])

  def _prepare(self, x, pos_ids, t_table, t_index, text, modality):
    """Everything the blocks need: streams, gathered modulations, RoPE angles, key mask."""
    b, n, _ = x.shape
    cond = self.t_embedder(t_table)  # (B, K, D), one row per distinct timestep
    counts = jax.vmap(lambda idx: jnp.bincount(idx, length=t_table.shape[1]))(t_index)
    text_cond = jnp.einsum("bk,bkd->bd", counts.astype(cond.dtype) / n, cond)[:, None, :]
    act, text_act = jax.nn.silu(cond), jax.nn.silu(text_cond)
    txt = self.embed_text(text)
    n_txt = txt.shape[1]
    txt_ids = jnp.zeros((b, n_txt, 3), pos_ids.dtype)
    cos, sin = rope.rope_frequencies(jnp.concatenate([txt_ids, pos_ids], 1), self.rope_axes_dims)
    key_mask = jnp.concatenate([text["mask"], jnp.ones((b, n), bool)], axis=1)
    # Single blocks see [text, image]: row 0 = text vector, rows 1.. = image timestep rows.
    single_rows = self.single_mod(jnp.concatenate([text_act, act], axis=1))
    single_index = jnp.concatenate([jnp.zeros((b, n_txt), jnp.int32), t_index + 1], axis=1)
    return dict(
        img=sharding.constrain(self._modality_layer(self.inputs, modality)(x), layers.TOKENS),
        txt=sharding.constrain(txt, layers.TOKENS), cos=cos, sin=sin,
        key_mask=key_mask,
        img_mod=layers.gather_rows(self.double_mod_img(act), t_index),
        txt_mod=self.double_mod_txt(text_act),
        single_mod=layers.gather_rows(single_rows, single_index),
        cond=cond)

  def _modality_layer(self, table: nnx.Dict, modality: str):
    if modality not in table:
      raise ValueError(f"modality={modality!r} has no projection in this model; it has "
                       f"{sorted(table)} (the config's `modalities`).")
    return table[modality]

  def run_blocks(self, img, txt, p, start: int, end: int):
    """Blocks [start, end) (0-based, double then single), scanned (or unrolled, see
    model.scan_layers); returns (img, txt)."""
    nd = self.num_double
    if min(end, nd) > start:
      img, txt = scanning.scan_segment(
          self.double_blocks, (img, txt), start, min(end, nd),
          lambda blk, c: blk(c[0], c[1], p["img_mod"], p["txt_mod"], p["cos"], p["sin"],
                             p["key_mask"]), self.remat_policy, scan_layers=self.scan_layers)
    s_start, s_end = max(start, nd) - nd, end - nd
    if s_end > s_start:
      n_txt = txt.shape[1]
      x = scanning.scan_segment(
          self.single_blocks, jnp.concatenate([txt, img], 1), s_start, s_end,
          lambda blk, c: blk(c, p["single_mod"], p["cos"], p["sin"], p["key_mask"]),
          self.remat_policy, scan_layers=self.scan_layers)
      txt, img = x[:, :n_txt], x[:, n_txt:]
    return img, txt

  def __call__(self, x, pos_ids, t_table, t_index, text, modality: str = "image"):
    """Student forward: velocity (B, N, C_out) float32 and projected student features.

    `text` is {"tokens", "mask"} (byte encoder) or {"embedding", "mask"} (precomputed);
    `modality` picks the input/output projections of the tokens' modality; the other arguments
    are as in `dit.SelfFlowDiT.__call__`.
    """
    p = self._prepare(x, pos_ids, t_table, t_index, text, modality)
    img, txt = self.run_blocks(p["img"], p["txt"], p, 0, self.student_layer)
    features = self.projector(img)
    img, _ = self.run_blocks(img, txt, p, self.student_layer, self.depth)
    velocity = self._modality_layer(self.outputs, modality)(img, p["cond"], t_index)
    return velocity.astype(jnp.float32), features

  def teacher_features(self, x, pos_ids, t_table, t_index, text, modality: str = "image"):
    """Raw hidden state of the generated tokens after `teacher_layer`; the forward stops there."""
    p = self._prepare(x, pos_ids, t_table, t_index, text, modality)
    return self.run_blocks(p["img"], p["txt"], p, 0, self.teacher_layer)[0]
