"""Moving sprites: an embedded, captioned video dataset generated offline from Fashion-MNIST.

Text-to-video needs clips whose captions say something a single frame cannot: here a
Fashion-MNIST object (downsampled to 14x14) moves across a black 32x32 canvas left, right, up or
down at 1 or 2 pixels per frame, for 8 frames. Every choice (source image, direction, speed,
start position) comes from a generator seeded per split, so the dataset is identical on every
machine. It is built into a local TFDS dataset (ArrayRecord, random access) like
`fashion_mnist_local`, from the Debian `dataset-fashion-mnist` files; no download.
"""

import os
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from self_flow.data import fashion_mnist_local, sources

NUM_FRAMES = 8
CANVAS_SIZE = 32
CLIP_SHAPE = (NUM_FRAMES, CANVAS_SIZE, CANVAS_SIZE, 1)  # (frames, height, width, channels)
SPRITE_SIZE = 14  # 28x28 images are 2x2-mean-downsampled
MOTIONS = ("left", "right", "up", "down")
SPEEDS = (1, 2)  # pixels per frame
SEED = 0
# split -> (Fashion-MNIST file prefix, clips, seed offset). The clip classifiers of the video
# evaluator learn 40 (object, motion) classes from the train split, hence 500 clips per class;
# the whole build still takes about 4 s on 2 cores.
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


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def downsample(image28: np.ndarray) -> np.ndarray:
  """(28, 28) uint8 -> (14, 14) uint8 by 2x2 means (rounded): small enough to travel 14 px."""
  image28 = np.asarray(image28)
  if image28.shape != (28, 28) or image28.dtype != np.uint8:
    raise ValueError(f"sprite images must be uint8 (28, 28); got {image28.dtype} "
                     f"{image28.shape}.")
  blocks = image28.astype(np.float32).reshape(14, 2, 14, 2).mean(axis=(1, 3))
  return np.round(blocks).astype(np.uint8)


def make_clip(sprite28: np.ndarray, motion: int, speed: int, start: tuple[int, int]) -> np.ndarray:
  """The uint8 CLIP_SHAPE clip of `sprite28` moving in MOTIONS[motion] at `speed` px/frame.

  `start` is the (row, col) of the sprite's top-left corner in frame 0. Raises ValueError when
  the trajectory would leave the canvas, so every clip shows the whole object in every frame
  (a clipped sprite would make the motion ambiguous).
  """
  if not _is_int(motion) or not 0 <= motion < len(MOTIONS):
    raise ValueError(f"motion={motion!r} must be an integer in [0, {len(MOTIONS)}) indexing "
                     f"{MOTIONS}.")
  if not _is_int(speed) or speed not in SPEEDS:
    raise ValueError(f"speed={speed!r} must be one of {SPEEDS} (pixels per frame).")
  if len(start) != 2 or not all(_is_int(s) for s in start):
    raise ValueError(f"start={start!r} must be a (row, col) pair of integers.")
  frames, height, width, _ = CLIP_SHAPE
  sprite = downsample(sprite28)
  d_row, d_col = _STEPS[MOTIONS[motion]]
  clip = np.zeros(CLIP_SHAPE, np.uint8)
  for f in range(frames):
    row, col = int(start[0]) + d_row * speed * f, int(start[1]) + d_col * speed * f
    if not (0 <= row <= height - SPRITE_SIZE and 0 <= col <= width - SPRITE_SIZE):
      raise ValueError(f"start={tuple(start)} with motion {MOTIONS[motion]!r} at speed {speed} "
                       f"leaves the {height}x{width} canvas at frame {f}; top-left corners "
                       f"must stay in [0, {height - SPRITE_SIZE}].")
    # Maximum onto the black canvas: the sprite as is, and well defined if sprites overlapped.
    window = clip[f, row:row + SPRITE_SIZE, col:col + SPRITE_SIZE, 0]
    np.maximum(window, sprite, out=window)
  return clip


def draw_choices(num_clips: int, num_images: int, seed: int) -> list[ClipChoice]:
  """Choices of `num_clips` clips from a generator seeded with `seed`: distinct source images,
  uniform direction and speed, and a start uniform over those keeping the whole trajectory
  inside the canvas (along the motion) or anywhere (across it)."""
  if not _is_int(num_images) or num_images < 1:
    raise ValueError(f"num_images={num_images!r} must be an integer >= 1.")
  if not _is_int(num_clips) or not 1 <= num_clips <= num_images:
    raise ValueError(f"num_clips={num_clips!r} must be an integer in [1, {num_images}] (each "
                     "clip uses its own source image).")
  rng = np.random.default_rng(seed)
  room = CANVAS_SIZE - SPRITE_SIZE  # largest top-left coordinate
  images = rng.permutation(num_images)[:num_clips]
  choices = []
  for image_index in images:
    motion = int(rng.integers(len(MOTIONS)))
    speed = int(SPEEDS[rng.integers(len(SPEEDS))])
    travel = speed * (NUM_FRAMES - 1)
    start = []
    for step in _STEPS[MOTIONS[motion]]:
      low = travel if step < 0 else 0
      high = room - travel if step > 0 else room
      start.append(int(rng.integers(low, high + 1)))
    choices.append(ClipChoice(int(image_index), motion, speed, (start[0], start[1])))
  return choices


class MovingSprites(tfds.core.GeneratorBasedBuilder):
  """Captionable clips of Fashion-MNIST objects in motion, generated from local files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "8 frames of 32x32; 4 directions x 2 speeds; 20000/2000 clips."}

  def _info(self) -> tfds.core.DatasetInfo:
    # zlib: clips are mostly black, so the files are ~20x smaller (8 MB instead of 180 MB).
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
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    if split not in SPLITS:
      raise ValueError(f"split={split!r} is not supported; allowed: {sorted(SPLITS)}.")
    prefix, num_clips, offset = SPLITS[split]
    images = fashion_mnist_local.read_idx(fashion_mnist_local.idx_path(prefix, "images-idx3"))
    labels = fashion_mnist_local.read_idx(fashion_mnist_local.idx_path(prefix, "labels-idx1"))
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
      raise ValueError(f"IDX files for {prefix!r} hold images {images.shape} and labels "
                       f"{labels.shape}; expected (n, 28, 28) images with n labels.")
    for i, choice in enumerate(draw_choices(num_clips, len(images), SEED + offset)):
      yield i, {"video": make_clip(images[choice.image_index], choice.motion, choice.speed,
                                   choice.start),
                "label": int(labels[choice.image_index]), "motion": choice.motion,
                "speed": choice.speed}


def open_video_source(split: str, data_dir: str) -> sources.ImageSource:
  """`split` of the moving-sprites clips in `data_dir`, built there on first use (seconds).

  Records are dicts with `video` uint8 CLIP_SHAPE, `label`, `motion` and `speed`. The source's
  repr names only the dataset, split and size, so grain's checkpoint validation accepts it when
  a run resumes with another data_dir.

  Raises:
    ValueError: `split` is not one of SPLITS.
    FileNotFoundError: the dataset is not prepared and the Debian Fashion-MNIST files are absent.
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not supported; allowed: {sorted(SPLITS)}.")
  builder = MovingSprites(data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    missing = [p for p in fashion_mnist_local.debian_files() if not os.path.exists(p)]
    if missing:
      raise FileNotFoundError(f"Cannot build moving_sprites in {data_dir!r}: missing "
                              f"{', '.join(missing)}. Fix: `{_FIX_COMMAND}`.")
    builder.download_and_prepare()
  return sources.ImageSource(builder.as_data_source(split=split), dataset="moving_sprites",
                             split=split, tfds_name=builder.name)
