"""Images <-> patch tokens with (time, height, width) position ids.

Noise is i.i.d. per element, so noising patch tokens is identical to noising pixels; the
objective therefore works on tokens only and this module is the single place that knows about
image layout.
"""

import jax.numpy as jnp
import numpy as np

# Position-id axes an image uses (time is constant 0 for a still image).
POSITION_AXES = (1, 2)


def from_uint8(pixels):
  """uint8 pixels -> float32 in [-1, 1] (numpy or JAX arrays); the range every model sees."""
  return pixels.astype(np.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
  """Inverse of `from_uint8` for generated images, rounded and clipped."""
  return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def check_patchable(image_size: int, patch_size: int) -> None:
  if patch_size <= 0 or image_size % patch_size:
    raise ValueError(f"model.patch_size={patch_size} must be a positive divisor of "
                     f"data.image_size={image_size}.")


def patchify(images, patch_size: int):
  """(B, H, W, C) -> (B, (H/p)*(W/p), p*p*C), patches in row-major order, channels (p, q, c)."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens, patch_size: int, height: int, width: int):
  """Inverse of `patchify`."""
  b, _, d = tokens.shape
  p = patch_size
  c = d // (p * p)
  x = tokens.reshape(b, height // p, width // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, height, width, c)


def position_ids(height: int, width: int, patch_size: int) -> jnp.ndarray:
  """Integer (time=0, row, col) ids of the patch grid, (N, 3) int32."""
  rows, cols = np.meshgrid(np.arange(height // patch_size), np.arange(width // patch_size),
                           indexing="ij")
  ids = np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(-1, 3)
  return jnp.asarray(ids, dtype=jnp.int32)


def make_grid(images: np.ndarray, columns: int) -> np.ndarray:
  """(N, H, W, C) uint8 -> one (rows*H, columns*W, C) mosaic with 1-pixel gaps."""
  n, h, w, c = images.shape
  rows = -(-n // columns)
  grid = np.zeros((rows * (h + 1) - 1, columns * (w + 1) - 1, c), np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, columns)
    grid[r * (h + 1):r * (h + 1) + h, col * (w + 1):col * (w + 1) + w] = img
  return grid
