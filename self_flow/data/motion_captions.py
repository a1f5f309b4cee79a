"""Captions for moving-sprite clips: the object and its motion, in several phrasings.

As for images (`captions.py`), each caption is a random template around a random name of the
object, so the model must read the words; the motion (direction, and speed in some templates)
is named too, which is what makes a clip caption more than an image caption. Evaluation uses
templates never seen in training, so faithfulness is measured on new phrasings.
"""

from typing import Any

import grain
import numpy as np

from self_flow.data.captions import NAMES
from self_flow.data.moving_sprites import MOTIONS, SPEEDS
from self_flow.text import tokenizer

# pixels per frame -> adverb, for each of SPEEDS (1 -> "slowly", 2 -> "quickly").
SPEED_WORDS = dict(zip(SPEEDS, ("slowly", "quickly"), strict=True))
# A second way to say each direction, so a direction is not one fixed word.
DIRECTION_PHRASES = {"left": "to the left", "right": "to the right", "up": "upward",
                     "down": "downward"}

# {name}: the object's noun phrase; {direction}: a word of MOTIONS; {toward}: its phrase in
# DIRECTION_PHRASES; {speed}: the adverb of the speed.
TRAIN_TEMPLATES = (
    "{name} moving {direction}",
    "{name} moving {speed} {direction}",
    "{name} sliding {toward}",
    "{name} sliding {speed} {toward}",
    "{name} drifting {speed} {direction}",
    "a clip of {name} moving {direction}",
    "{name} travels {toward}",
)
# Disjoint from TRAIN_TEMPLATES; no fixed text of these occurs in a training caption. Without
# {speed}: the evaluation classifier judges (object, direction) only. 3 templates x 3 names = 9
# combinations, coprime with the 40 (object, motion) classes the evaluator cycles through, so
# every class meets every phrasing.
HELDOUT_TEMPLATES = (
    "video: {name} heading {direction}",
    "{name} gliding {toward}",
    "watch {name} going {direction}",
)
# text.max_length of configs/t2v.py:local; the tests check every caption fits (longest: 47).
MAX_CAPTION_BYTES = 64


def motion_class(label, motion):
  """The joint (object, motion) class a clip classifier predicts: label * len(MOTIONS) + motion.

  Joint, so that one classifier's accuracy measures whether a sample shows both what and how
  the caption asked for (an object classifier alone cannot see motion, and a motion classifier
  alone ignores the object). Works on ints and integer arrays.
  """
  label, motion = np.asarray(label), np.asarray(motion)
  if not np.issubdtype(label.dtype, np.integer) or np.any((label < 0) | (label >= len(NAMES))):
    raise ValueError(f"label={label!r} must hold integer class ids in [0, {len(NAMES)}).")
  if not np.issubdtype(motion.dtype, np.integer) or np.any((motion < 0)
                                                           | (motion >= len(MOTIONS))):
    raise ValueError(f"motion={motion!r} must hold integers in [0, {len(MOTIONS)}) indexing "
                     f"{MOTIONS}.")
  return label * len(MOTIONS) + motion


def _check(label, motion) -> None:
  if not isinstance(label, (int, np.integer)) or not 0 <= label < len(NAMES):
    raise ValueError(f"label={label!r} must be an integer class id in [0, {len(NAMES)}).")
  if not isinstance(motion, (int, np.integer)) or not 0 <= motion < len(MOTIONS):
    raise ValueError(f"motion={motion!r} must be an integer in [0, {len(MOTIONS)}) "
                     f"indexing {MOTIONS}.")


def _fill(template: str, name: str, motion: int, speed: int | None = None) -> str:
  direction = MOTIONS[int(motion)]
  return template.format(name=name, direction=direction, toward=DIRECTION_PHRASES[direction],
                         speed=SPEED_WORDS.get(speed, ""))


def train_caption(label: int, motion: int, speed: int, rng: np.random.Generator) -> str:
  """A training caption: random template, random name of the object, its direction and speed."""
  _check(label, motion)
  if speed not in SPEED_WORDS:
    raise ValueError(f"speed={speed!r} must be one of {sorted(SPEED_WORDS)} (pixels per frame).")
  names = NAMES[int(label)]
  template = TRAIN_TEMPLATES[rng.integers(len(TRAIN_TEMPLATES))]
  return _fill(template, names[rng.integers(len(names))], motion, int(speed))


def heldout_caption(label: int, motion: int, index: int) -> str:
  """The `index`-th evaluation caption of (label, motion), cycling over held-out templates and
  names; deterministic, so every evaluation conditions on the same phrasings."""
  _check(label, motion)
  if not isinstance(index, (int, np.integer)) or index < 0:
    raise ValueError(f"index={index!r} must be a non-negative integer.")
  names = NAMES[int(label)]
  combo = int(index) % (len(HELDOUT_TEMPLATES) * len(names))
  template = HELDOUT_TEMPLATES[combo % len(HELDOUT_TEMPLATES)]
  return _fill(template, names[combo // len(HELDOUT_TEMPLATES)], motion)


class VideoCaptionTokens(grain.transforms.RandomMap):
  """Adds `text_tokens` int32 (L,) and `text_mask` bool (L,) of a training caption of the clip.

  A RandomMap so grain hands it a per-example rng derived from the pipeline seed: each epoch
  sees new phrasings, and a restored iterator reproduces them exactly. `speed` is dropped once
  the caption has used it: the model never sees it, and a batch holds only what the step takes.
  """

  def __init__(self, max_length: int):
    if not isinstance(max_length, (int, np.integer)) or max_length < 1:
      raise ValueError(f"max_length={max_length!r} must be an integer >= 1.")
    self.max_length = int(max_length)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    caption = train_caption(int(element["label"]), int(element["motion"]),
                            int(element["speed"]), rng)
    tokens, mask = tokenizer.tokenize([caption], self.max_length)
    out = {k: v for k, v in element.items() if k != "speed"}
    return {**out, "text_tokens": tokens[0], "text_mask": mask[0]}
