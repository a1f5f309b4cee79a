"""Rotary position embedding over integer (time, height, width) position ids.

Positions are rotations applied to queries and keys, computed from the ids at run time, so a
model trained at one resolution or clip length can be sampled at another. Each axis owns a
slice of the head dimension (`axes_dims`, e.g. 24 + 24 + 24 = 72 for FLUX.2-style heads); text
tokens carry id (0, 0, 0), i.e. no rotation.
"""

import jax
import jax.numpy as jnp


def rope_frequencies(pos_ids: jax.Array, axes_dims: tuple[int, ...], theta: float = 10_000.0
                     ) -> tuple[jax.Array, jax.Array]:
  """(B, S, 3) ids -> cos, sin of shape (B, S, head_dim / 2), float32."""
  if len(axes_dims) != pos_ids.shape[-1] or any(d % 2 for d in axes_dims):
    raise ValueError(f"rope axes_dims={axes_dims} must give one even size per position axis "
                     f"({pos_ids.shape[-1]} axes).")
  angles = []
  for axis, dim in enumerate(axes_dims):
    freqs = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles.append(pos_ids[..., axis].astype(jnp.float32)[..., None] * freqs)
  angles = jnp.concatenate(angles, axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates consecutive channel pairs of x (B, S, heads, head_dim) by the given angles."""
  x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  real = x32[..., 0] * cos - x32[..., 1] * sin
  imag = x32[..., 0] * sin + x32[..., 1] * cos
  return jnp.stack([real, imag], axis=-1).reshape(x.shape).astype(x.dtype)
