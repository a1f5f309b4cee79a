"""A sample grid with each column's prompt written under it, so the picture explains itself.

The PNG text chunk and the .txt beside a grid hold the prompts too, but a reader of the README or
of TensorBoard sees only pixels. Cells are enlarged by an integer factor (nearest neighbour, so
samples stay exact) and every prompt is wrapped to its column's width in Pillow's built-in font
(no font file to ship or download).
"""

import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_SIZE = 11  # pixels; Pillow's built-in scalable font
LINE_HEIGHT = 13


def captioned_grid(grid: np.ndarray, prompts: Sequence[str], scale: int = 4) -> np.ndarray:
  """uint8 grid (H, W, C) of len(prompts) equal columns with 1-pixel gaps -> the grid enlarged
  `scale` times with each prompt wrapped under its column, (H', W * scale, C) uint8."""
  if grid.dtype != np.uint8 or grid.ndim != 3:
    raise ValueError(f"grid must be uint8 (H, W, C), got {grid.dtype} {grid.shape}.")
  columns = len(prompts)
  if columns < 1 or (grid.shape[1] + 1) % columns:
    raise ValueError(f"a grid {grid.shape[1]} pixels wide does not split into {columns} columns "
                     "with 1-pixel gaps.")
  big = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
  column_width = (grid.shape[1] + 1) // columns * scale
  font = ImageFont.load_default(size=FONT_SIZE)
  chars = max(4, int(column_width / (font.getlength("abcdefghij") / 10)) - 1)
  wrapped = [textwrap.wrap(p, chars) or [""] for p in prompts]
  band_height = max(map(len, wrapped)) * LINE_HEIGHT + 4
  colour = grid.shape[-1] == 3
  canvas = Image.new("RGB" if colour else "L", (big.shape[1], big.shape[0] + band_height), 0)
  canvas.paste(Image.fromarray(big if colour else big.mean(-1).astype(np.uint8)), (0, 0))
  draw = ImageDraw.Draw(canvas)
  for column, lines in enumerate(wrapped):
    for row, line in enumerate(lines):
      x = column * column_width + (column_width - font.getlength(line)) / 2
      draw.text((x, big.shape[0] + 2 + row * LINE_HEIGHT), line, fill=(255,) * len(
          canvas.getbands()), font=font)
  if colour:
    return np.asarray(canvas)
  out = np.asarray(canvas)[..., None]
  return np.repeat(out, grid.shape[-1], axis=-1)
