"""Captions for moving-sprite clips: the object and its motion, in several phrasings.

As for images (`captions.py`), each caption is a random template around a random name of the
object, so the model must read the words; the motion (direction, and speed in some templates)
is named too, which is what makes a clip caption more than an image caption. Evaluation uses
templates never seen in training.
"""

from typing import Any

import grain
import numpy as np

from self_flow.data.captions import NAMES
from self_flow.text import tokenizer

MOTIONS = ("left", "right", "up", "down")
SPEED_WORDS = {1: "slowly", 2: "quickly"}  # pixels per frame -> adverb

# {0} object phrase, {1} direction, {2} speed adverb.
TRAIN_TEMPLATES = (
    "{0} moving {1}",
    "{0} moving {2} {1}",
    "{0} sliding {1}",
    "{0} drifting {2} {1}",
    "a clip of {0} moving {1}",
    "{0} travels {1}",
)
# Disjoint from TRAIN_TEMPLATES; no fixed text of these occurs in a training caption.
HELDOUT_TEMPLATES = (
    "video: {0} heading {1}",
    "{0} gliding {1}",
    "watch {0} going {1}",
)
MAX_CAPTION_BYTES = 64  # text.max_length of configs/t2v.py:local; checked by the tests


def motion_class(label, motion):
  """The joint (object, motion) class a clip classifier predicts: label * 4 + motion.

  Joint, so that one classifier's accuracy measures whether a sample shows both what and how the
  caption asked for. Works on ints and integer arrays.
  """
  return np.asarray(label) * len(MOTIONS) + np.asarray(motion)


def _check(label, motion) -> None:
  if not isinstance(label, (int, np.integer)) or not 0 <= label < len(NAMES):
    raise ValueError(f"label={label!r} must be an integer class id in [0, {len(NAMES)}).")
  if not isinstance(motion, (int, np.integer)) or not 0 <= motion < len(MOTIONS):
    raise ValueError(f"motion={motion!r} must be an integer in [0, {len(MOTIONS)}) "
                     f"indexing {MOTIONS}.")


def train_caption(label: int, motion: int, speed: int, rng: np.random.Generator) -> str:
  """A training caption: random template, random name of the object, its direction and speed."""
  _check(label, motion)
  if speed not in SPEED_WORDS:
    raise ValueError(f"speed={speed!r} must be one of {sorted(SPEED_WORDS)} (pixels per frame).")
  names = NAMES[int(label)]
  template = TRAIN_TEMPLATES[rng.integers(len(TRAIN_TEMPLATES))]
  return template.format(names[rng.integers(len(names))], MOTIONS[int(motion)],
                         SPEED_WORDS[int(speed)])


def heldout_caption(label: int, motion: int, index: int) -> str:
  """The `index`-th evaluation caption of (label, motion), cycling over held-out templates and
  names; deterministic, so every evaluation conditions on the same phrasings."""
  _check(label, motion)
  if not isinstance(index, (int, np.integer)) or index < 0:
    raise ValueError(f"index={index!r} must be a non-negative integer.")
  names = NAMES[int(label)]
  combo = int(index) % (len(HELDOUT_TEMPLATES) * len(names))
  template = HELDOUT_TEMPLATES[combo % len(HELDOUT_TEMPLATES)]
  return template.format(names[combo // len(HELDOUT_TEMPLATES)], MOTIONS[int(motion)])


class VideoCaptionTokens(grain.transforms.RandomMap):
  """Adds `text_tokens` int32 (L,) and `text_mask` bool (L,) of a training caption of the clip.

  A RandomMap so each epoch sees new phrasings and a restored iterator reproduces them.
  """

  def __init__(self, max_length: int):
    if not isinstance(max_length, (int, np.integer)) or max_length < 1:
      raise ValueError(f"max_length={max_length!r} must be an integer >= 1.")
    self.max_length = int(max_length)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    caption = train_caption(int(element["label"]), int(element["motion"]),
                            int(element["speed"]), rng)
    tokens, mask = tokenizer.tokenize([caption], self.max_length)
    out = {k: v for k, v in element.items() if k != "speed"}  # not needed past captioning
    return {**out, "text_tokens": tokens[0], "text_mask": mask[0]}
