"""Moving sprites: an embedded, captioned video dataset generated offline from Fashion-MNIST.

Text-to-video needs clips whose captions say something a single frame cannot: here a
Fashion-MNIST object (downsampled to 14x14) moves across a black 32x32 canvas left, right, up or
down at 1 or 2 pixels per frame, for 8 frames. Every choice (source image, direction, speed,
start position) comes from a seeded generator per split, so the dataset is identical on every
machine. It is built into a local TFDS dataset (ArrayRecord, random access) like
`fashion_mnist_local`, from the Debian `dataset-fashion-mnist` files; no download.
"""

import os
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from self_flow.data import fashion_mnist_local, sources
from self_flow.data.motion_captions import MOTIONS, SPEED_WORDS

CLIP_SHAPE = (8, 32, 32, 1)  # (frames, height, width, channels)
SPRITE_SIZE = 14  # 28x28 images are 2x2-mean-downsampled
SPEEDS = tuple(sorted(SPEED_WORDS))  # pixels per frame
SEED = 0
# split -> (Fashion-MNIST file prefix, clips, seed offset)
SPLITS = {"train": ("train", 20000, 0), "test": ("t10k", 2000, 1)}
# (row, col) change per frame of each direction in MOTIONS.
_STEPS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
_FIX_COMMAND = "apt-get install -y dataset-fashion-mnist"


class ClipChoice(NamedTuple):
  """What one clip shows: which source image, how it moves and where it starts."""
  image_index: int
  motion: int
  speed: int
  start: tuple[int, int]  # (row, col) of the sprite's top-left corner in frame 0


def downsample(image28: np.ndarray) -> np.ndarray:
  """(28, 28) uint8 -> (14, 14) uint8 by 2x2 means (rounded)."""
  if image28.shape != (28, 28):
    raise ValueError(f"sprite images must be (28, 28); got {image28.shape}.")
  blocks = image28.astype(np.float32).reshape(14, 2, 14, 2).mean(axis=(1, 3))
  return np.round(blocks).astype(np.uint8)


def make_clip(image28: np.ndarray, motion: int, speed: int, start: tuple[int, int]) -> np.ndarray:
  """The clip of `image28` moving in MOTIONS[motion] at `speed` px/frame from `start`.

  Raises ValueError when the trajectory would leave the canvas, so every clip shows the whole
  object in every frame.
  """
  if not 0 <= motion < len(MOTIONS) or speed not in SPEEDS:
    raise ValueError(f"motion={motion!r} must index {MOTIONS} and speed={speed!r} be one of "
                     f"{SPEEDS}.")
  frames, height, width, _ = CLIP_SHAPE
  sprite = downsample(image28)
  d_row, d_col = _STEPS[MOTIONS[motion]]
  clip = np.zeros(CLIP_SHAPE, np.uint8)
  for f in range(frames):
    row, col = start[0] + d_row * speed * f, start[1] + d_col * speed * f
    if not (0 <= row <= height - SPRITE_SIZE and 0 <= col <= width - SPRITE_SIZE):
      raise ValueError(f"start={start} with motion {MOTIONS[motion]!r} at speed {speed} leaves "
                       f"the {height}x{width} canvas at frame {f}.")
    clip[f, row:row + SPRITE_SIZE, col:col + SPRITE_SIZE, 0] = sprite
  return clip


def draw_choices(num_clips: int, num_images: int, seed: int) -> list[ClipChoice]:
  """Seeded choices of `num_clips` clips: distinct source images, uniform direction and speed,
  a start position uniform over those keeping the whole trajectory inside the canvas."""
  if num_clips > num_images:
    raise ValueError(f"num_clips={num_clips} exceeds the {num_images} source images.")
  rng = np.random.default_rng(seed)
  frames, height, _, _ = CLIP_SHAPE
  room = height - SPRITE_SIZE  # largest top-left coordinate
  images = rng.permutation(num_images)[:num_clips]
  choices = []
  for image_index in images:
    motion = int(rng.integers(len(MOTIONS)))
    speed = int(SPEEDS[rng.integers(len(SPEEDS))])
    travel = speed * (frames - 1)
    d_row, d_col = _STEPS[MOTIONS[motion]]
    # Along the motion: start where the trajectory fits; across it: anywhere.
    def along(step):
      low = travel if step < 0 else 0
      high = room - travel if step > 0 else room
      return int(rng.integers(low, high + 1)) if step else int(rng.integers(room + 1))
    choices.append(ClipChoice(int(image_index), motion, speed, (along(d_row), along(d_col))))
  return choices


class MovingSprites(tfds.core.GeneratorBasedBuilder):
  """Captionable clips of Fashion-MNIST objects in motion, generated from local files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "8 frames of 32x32; 4 directions x 2 speeds; 20000/2000 clips."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Fashion-MNIST sprites moving left/right/up/down on a black canvas.",
        features=tfds.features.FeaturesDict({
            "video": tfds.features.Tensor(shape=CLIP_SHAPE, dtype=np.uint8,
                                          encoding=tfds.features.Encoding.ZLIB),
            "label": tfds.features.ClassLabel(names=list(fashion_mnist_local.CLASS_NAMES)),
            "motion": tfds.features.ClassLabel(names=list(MOTIONS)),
            "speed": tfds.features.Scalar(dtype=np.int32),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    prefix, num_clips, offset = SPLITS[split]
    images = fashion_mnist_local.read_idx(fashion_mnist_local.idx_path(prefix, "images-idx3"))
    labels = fashion_mnist_local.read_idx(fashion_mnist_local.idx_path(prefix, "labels-idx1"))
    for i, choice in enumerate(draw_choices(num_clips, len(images), SEED + offset)):
      yield i, {"video": make_clip(images[choice.image_index], choice.motion, choice.speed,
                                   choice.start),
                "label": int(labels[choice.image_index]), "motion": choice.motion,
                "speed": choice.speed}


def open_video_source(split: str, data_dir: str) -> sources.ImageSource:
  """`split` of the moving-sprites clips in `data_dir`, built there on first use.

  Records are dicts with `video` uint8 CLIP_SHAPE, `label`, `motion` and `speed`.
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not supported; allowed: {sorted(SPLITS)}.")
  builder = MovingSprites(data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    missing = [p for p in fashion_mnist_local.debian_files() if not os.path.exists(p)]
    if missing:
      raise FileNotFoundError(f"Cannot build moving_sprites: missing {', '.join(missing)}. "
                              f"Fix: `{_FIX_COMMAND}`.")
    builder.download_and_prepare()
  return sources.ImageSource(builder.as_data_source(split=split), dataset="moving_sprites",
                             split=split, tfds_name=builder.name)

