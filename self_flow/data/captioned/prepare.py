"""One raw record -> an ADM center-cropped uint8 image with its captions, or why it is skipped.

The checks run cheapest first, so that a record to skip costs as little as possible: captions
(no decoding), then the image size (read from the header), then the full decode and the crop.
Users' datasets always hold some bad records (a truncated JPEG, an empty caption file, a
thumbnail), and one bad record must not stop a job encoding millions: by default each is
returned as a `Skipped` for the job to count and log; `bad_input="error"` raises instead, for
datasets that are expected to be clean.

`prepare` is a pure function (PIL releases the GIL while decoding and resizing), so a job can
run it in a thread pool over a unit's records.
"""

import io
from typing import Any

import numpy as np
from PIL import Image

from self_flow.data.captioned import RawExample, Skipped

BAD_INPUT_POLICIES = ("skip", "error")
# What PIL raises for bytes it cannot decode: UnidentifiedImageError and truncated data are
# OSErrors; DecompressionBombError guards against images too large to decode safely.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# Channels a decoded uint8 array may have: greyscale, RGB, RGBA.
_ARRAY_CHANNELS = (1, 3, 4)


def center_crop(image: Image.Image, size: int) -> np.ndarray:
  """ADM's center crop (guided-diffusion): (size, size, 3) uint8.

  Halves the image with a BOX filter while its short side is at least 2 * size, resizes it with
  BICUBIC so the short side is `size`, then takes the central size x size square. Images of any
  mode (greyscale, CMYK, palette) are converted to RGB first.
  """
  image = image.convert("RGB")
  while min(image.size) >= 2 * size:
    image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
  scale = size / min(image.size)
  image = image.resize(tuple(round(side * scale) for side in image.size),
                       resample=Image.BICUBIC)
  array = np.asarray(image)
  top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
  return array[top:top + size, left:left + size]


def prepare(raw: RawExample | Skipped, *, image_size: int, bad_input: str = "skip",
            upscale_small: bool = False) -> dict[str, Any] | Skipped:
  """The example of `raw`: `{"image", "captions", "label", "key"}`, or a `Skipped`.

  Args:
    raw: a record from a source's `read` (a `Skipped` from the reader is passed on, or raised
      under `bad_input="error"`).
    image_size: the side of the square crop.
    bad_input: "skip" returns a `Skipped` for a record that cannot be used; "error" raises a
      ValueError naming the record, the reason and the detail.
    upscale_small: whether images whose short side is below `image_size` are enlarged to it
      (BICUBIC) rather than skipped as "image_too_small".

  Returns:
    `image`: (image_size, image_size, 3) uint8; `captions`: the record's captions stripped, the
    empty ones and repeats dropped (img2dataset writes each caption to both .txt and .json),
    in order; `label`: int; `key`: the record's key.
  """
  if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
    raise ValueError(f"image_size={image_size!r}: expected a positive integer.")
  if bad_input not in BAD_INPUT_POLICIES:
    raise ValueError(f"bad_input={bad_input!r}: expected one of {BAD_INPUT_POLICIES}.")
  if not isinstance(upscale_small, bool):
    raise ValueError(f"upscale_small={upscale_small!r}: expected True or False.")
  result = raw if isinstance(raw, Skipped) else _prepare(raw, image_size, upscale_small)
  if isinstance(result, Skipped) and bad_input == "error":
    raise ValueError(f"Record {result.key!r} cannot be used ({result.reason}): {result.detail}. "
                     "Pass bad_input='skip' to leave such records out.")
  return result


def _prepare(raw: RawExample, image_size: int, upscale_small: bool) -> dict[str, Any] | Skipped:
  captions = tuple(dict.fromkeys(c.strip() for c in raw.captions if c.strip()))
  if not captions:
    detail = (f"its {len(raw.captions)} captions are empty" if raw.captions
              else "it has no caption")
    return Skipped(raw.key, "missing_caption", detail)
  try:
    image = _open(raw.image)
    width, height = image.size
    if min(width, height) < image_size and not upscale_small:
      return Skipped(raw.key, "image_too_small",
                     f"{width}x{height} has a side below image_size={image_size}")
    image.load()
    array = center_crop(image, image_size)
  except _DECODE_ERRORS as e:
    return Skipped(raw.key, "undecodable_image", f"{type(e).__name__}: {e}")
  return {"image": array, "captions": captions, "label": raw.label, "key": raw.key}


def _open(image: bytes | np.ndarray) -> Image.Image:
  """A PIL image of encoded bytes (header read only) or of a decoded uint8 (H, W, C) array."""
  if isinstance(image, bytes):
    return Image.open(io.BytesIO(image))
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in _ARRAY_CHANNELS:
    raise ValueError(f"a decoded image must be uint8 (H, W, 1|3|4), not {image.dtype} "
                     f"{image.shape}")
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
