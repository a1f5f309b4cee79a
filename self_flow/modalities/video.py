"""Video clips <-> spatio-temporal patch tokens with (time, height, width) position ids.

A token is a `patch_time x patch_size x patch_size` tube of a clip (T, H, W, C), so a video is a
token sequence like an image, with positions along all three axes for the 3-D RoPE. Noise is
i.i.d. per element, so noising tokens equals noising pixels; this module is the single place
that knows about clip layout.
"""

import jax.numpy as jnp
import numpy as np

from self_flow.modalities import image


def _is_positive_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


def check_patchable(num_frames: int, image_size: int, patch_time: int, patch_size: int) -> None:
  """Raises ValueError unless the tube sizes are positive divisors of the clip sizes."""
  for key, size in (("video.num_frames", num_frames), ("video.image_size", image_size)):
    if not _is_positive_int(size):
      raise ValueError(f"{key}={size!r} must be a positive integer.")
  for key, size, patch, other in (
      ("video.patch_time", num_frames, patch_time, "video.num_frames"),
      ("video.patch_size", image_size, patch_size, "video.image_size")):
    if not _is_positive_int(patch) or size % patch:
      raise ValueError(f"{key}={patch!r} must be a positive divisor of {other}={size}.")


def _check_clip_sizes(num_frames: int, height: int, width: int, patch_time: int,
                      patch_size: int) -> None:
  """Like `check_patchable`, for clips whose height and width may differ."""
  check_patchable(num_frames, height, patch_time, patch_size)
  if width % patch_size:
    raise ValueError(f"video.patch_size={patch_size!r} must also divide the clip width {width}.")


def patchify(videos, patch_time: int, patch_size: int):
  """(B, T, H, W, C) -> (B, (T/pt)(H/p)(W/p), pt*p*p*C); tokens time-major, then rows, cols.

  Each token's features are ordered (frame, row, col, channel) within its tube. Works on numpy
  and JAX arrays (shapes are static, so the checks also run under jit).
  """
  if len(videos.shape) != 5:
    raise ValueError(f"videos must be (B, T, H, W, C); got shape {tuple(videos.shape)}.")
  b, t, h, w, c = videos.shape
  _check_clip_sizes(t, h, w, patch_time, patch_size)
  pt, p = patch_time, patch_size
  x = videos.reshape(b, t // pt, pt, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, (t // pt) * (h // p) * (w // p), pt * p * p * c)


def unpatchify(tokens, patch_time: int, patch_size: int, num_frames: int, height: int,
               width: int):
  """Inverse of `patchify`: (B, N, pt*p*p*C) -> (B, num_frames, height, width, C)."""
  if len(tokens.shape) != 3:
    raise ValueError(f"tokens must be (B, N, D); got shape {tuple(tokens.shape)}.")
  _check_clip_sizes(num_frames, height, width, patch_time, patch_size)
  b, n, d = tokens.shape
  pt, p = patch_time, patch_size
  grid = (num_frames // pt, height // p, width // p)
  if n != grid[0] * grid[1] * grid[2] or d % (pt * p * p):
    raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not tile a {num_frames}x"
                     f"{height}x{width} clip in {pt}x{p}x{p} tubes ({np.prod(grid)} tokens of "
                     f"a multiple of {pt * p * p} values).")
  c = d // (pt * p * p)
  x = tokens.reshape(b, *grid, pt, p, p, c)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(b, num_frames, height, width, c)


def position_ids(num_frames: int, height: int, width: int, patch_time: int,
                 patch_size: int) -> jnp.ndarray:
  """Integer (frame block, row, col) of every token in `patchify` order, (N, 3) int32."""
  _check_clip_sizes(num_frames, height, width, patch_time, patch_size)
  grid = np.meshgrid(np.arange(num_frames // patch_time), np.arange(height // patch_size),
                     np.arange(width // patch_size), indexing="ij")
  return jnp.asarray(np.stack(grid, axis=-1).reshape(-1, 3), dtype=jnp.int32)


def preprocess(record: dict) -> dict[str, np.ndarray]:
  """A moving-sprites record as model inputs: clip float32 in [-1, 1] (T, H, W, C), labels.

  Module-level so grain's worker processes can import it by name. `speed` is kept (int32) for
  the caption transform that follows, which drops it once the caption names it.
  """
  return {"video": image.from_uint8(np.asarray(record["video"])),
          "label": np.asarray(record["label"], np.int32),
          "motion": np.asarray(record["motion"], np.int32),
          "speed": np.asarray(record["speed"], np.int32)}


def to_strips(videos: np.ndarray) -> np.ndarray:
  """uint8 (B, T, H, W, C) -> (B*(H+1)-1, T*(W+1)-1, C): one clip per row, frames left to right,
  1-pixel black gaps; one image shows motion without a video player."""
  videos = np.asarray(videos)
  if videos.ndim != 5 or videos.dtype != np.uint8:
    raise ValueError(f"videos must be uint8 (B, T, H, W, C); got {videos.dtype} {videos.shape}.")
  b, t, h, w, c = videos.shape
  return image.make_grid(videos.reshape(b * t, h, w, c), columns=t)
