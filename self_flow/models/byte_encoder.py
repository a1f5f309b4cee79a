"""A small trainable transformer over byte tokens: the text encoder of offline text-to-image.

No pretrained language model is downloadable here, so the caption encoder is trained jointly with
the generator from byte ids (`tokenizer`). Padding is masked out of every attention, so outputs at
real positions do not depend on what the padded positions hold, and padded outputs are zero.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from self_flow.models import layers
from self_flow.text import tokenizer


class MaskedSelfAttention(nnx.Module):
  """Non-causal multi-head self-attention whose keys at padded positions are hidden.

  Every query also attends to itself, so a row with no real token (the empty caption of
  classifier-free guidance) has a non-empty softmax and stays finite, as do its gradients; real
  queries still see only real keys, since they themselves are real.
  """

  def __init__(self, width, num_heads, rngs, *, dtype, param_dtype):
    self.num_heads = num_heads
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.qkv = layers.dense(width, 3 * width, ("embed", "heads"), rngs, **kw)
    self.proj = layers.dense(width, width, ("heads", "embed"), rngs, **kw)

  def __call__(self, x, mask):
    batch, length, width = x.shape
    qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, width // self.num_heads)
    allowed = mask[:, None, None, :] | jnp.eye(length, dtype=bool)[None, None]
    out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask=allowed)
    return self.proj(out.reshape(batch, length, width))


class EncoderBlock(nnx.Module):
  """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, width, num_heads, mlp_dim, rngs, *, dtype, param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.attn = MaskedSelfAttention(width, num_heads, rngs, **kw)
    self.mlp = layers.Mlp(width, mlp_dim, rngs, **kw)

  def __call__(self, x, mask):
    x = x + self.attn(layers.layer_norm(x), mask)
    return x + self.mlp(layers.layer_norm(x))


class ByteTextEncoder(nnx.Module):
  """Byte ids (B, L) and mask (B, L) -> per-token features (B, L, width) in `dtype`.

  Token embedding plus a learned position embedding over the `max_length` positions, `depth`
  pre-LN blocks (MLP ratio 4), and a final affine-free LayerNorm (the consumer's projection
  supplies scale and shift). Sequences shorter than `max_length` use the first positions.
  """

  def __init__(self, *, width: int, depth: int, num_heads: int, max_length: int, dtype,
               param_dtype, rngs: nnx.Rngs):
    for name, value, low in (("width", width, 1), ("depth", depth, 0),
                             ("num_heads", num_heads, 1), ("max_length", max_length, 1)):
      if not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}.")
    if width % num_heads:
      raise ValueError(f"width={width} must be divisible by num_heads={num_heads}.")
    self.max_length = max_length
    self.dtype = dtype
    self.embed = nnx.Embed(
        tokenizer.VOCAB_SIZE, width, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nnx.with_partitioning(layers.normal_002, ("vocab", "embed")), rngs=rngs)
    self.pos_embed = nnx.Param(nnx.with_partitioning(layers.normal_002, (None, "embed"))(
        rngs.params(), (max_length, width), param_dtype))
    self.blocks = nnx.List([
        EncoderBlock(width, num_heads, 4 * width, rngs, dtype=dtype, param_dtype=param_dtype)
        for _ in range(depth)
    ])

  def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    if tokens.ndim != 2 or tokens.shape != mask.shape:
      raise ValueError(f"tokens shape {tokens.shape} and mask shape {mask.shape} must be the "
                       "same (B, L).")
    length = tokens.shape[1]
    if length > self.max_length:
      raise ValueError(f"caption length {length} exceeds the encoder's max_length="
                       f"{self.max_length}.")
    mask = mask.astype(bool)
    x = self.embed(tokens) + self.pos_embed.value[:length].astype(self.dtype)
    for block in self.blocks:
      x = block(x, mask)
    x = layers.layer_norm(x)
    return jnp.where(mask[..., None], x, 0).astype(self.dtype)
