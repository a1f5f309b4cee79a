"""Video clips <-> spatio-temporal patch tokens with (time, height, width) position ids.

A token is a `patch_time x patch_size x patch_size` tube of a clip (T, H, W, C), so a video is a
token sequence like an image, with positions along all three axes for the 3-D RoPE. Noise is
i.i.d. per element, so noising tokens equals noising pixels.
"""

import jax.numpy as jnp
import numpy as np

from self_flow.modalities import image


def check_patchable(num_frames: int, image_size: int, patch_time: int, patch_size: int) -> None:
  """Raises ValueError unless the tube sizes are positive divisors of the clip sizes."""
  for key, size, patch in (("video.patch_time", num_frames, patch_time),
                           ("video.patch_size", image_size, patch_size)):
    if not isinstance(patch, (int, np.integer)) or patch <= 0 or size % patch:
      other = "video.num_frames" if key.endswith("time") else "video.image_size"
      raise ValueError(f"{key}={patch!r} must be a positive divisor of {other}={size}.")


def patchify(videos, patch_time: int, patch_size: int):
  """(B, T, H, W, C) -> (B, (T/pt)(H/p)(W/p), pt*p*p*C); tokens time-major, then rows, cols."""
  b, t, h, w, c = videos.shape
  pt, p = patch_time, patch_size
  x = videos.reshape(b, t // pt, pt, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, (t // pt) * (h // p) * (w // p), pt * p * p * c)


def unpatchify(tokens, patch_time: int, patch_size: int, num_frames: int, height: int,
               width: int):
  """Inverse of `patchify`."""
  b, _, d = tokens.shape
  pt, p = patch_time, patch_size
  c = d // (pt * p * p)
  x = tokens.reshape(b, num_frames // pt, height // p, width // p, pt, p, p, c)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(b, num_frames, height, width, c)


def position_ids(num_frames: int, height: int, width: int, patch_time: int,
                 patch_size: int) -> jnp.ndarray:
  """Integer (frame block, row, col) of every token in `patchify` order, (N, 3) int32."""
  grid = np.meshgrid(np.arange(num_frames // patch_time), np.arange(height // patch_size),
                     np.arange(width // patch_size), indexing="ij")
  return jnp.asarray(np.stack(grid, axis=-1).reshape(-1, 3), dtype=jnp.int32)


def preprocess(record: dict) -> dict[str, np.ndarray]:
  """A moving-sprites record as model inputs: clip float32 in [-1, 1] and its labels.

  Module-level so grain's worker processes can import it by name; `speed` stays for captions.
  """
  return {"video": image.from_uint8(np.asarray(record["video"])),
          "label": np.asarray(record["label"], np.int32),
          "motion": np.asarray(record["motion"], np.int32),
          "speed": np.asarray(record["speed"], np.int32)}


def to_strips(videos: np.ndarray) -> np.ndarray:
  """uint8 (B, T, H, W, C) -> (B*(H+1)-1, T*(W+1)-1, C): one clip per row, frames left to right."""
  b, t, h, w, c = videos.shape
  return image.make_grid(videos.reshape(b * t, h, w, c), columns=t)

