"""Captions generated from Fashion-MNIST labels, so a text-to-image model can train offline.

Each class has several names and each caption a random template, so the condition is carried by
the text rather than by a fixed string per class: the model must read the words. Evaluation uses
templates never seen in training (text faithfulness on new phrasings). Names are noun phrases
with their article ("an overcoat", "a pair of pants") so every template reads grammatically.
"""

from typing import Any

import grain
import numpy as np

from self_flow.data.fashion_mnist_local import CLASS_NAMES
from self_flow.text import embedding_cache, tokenizer

# Names per class, in the label order of CLASS_NAMES; no name is shared between classes.
CLASS_PHRASES = {
    "t-shirt/top": ("a t-shirt", "a tee", "a top"),
    "trouser": ("a pair of trousers", "a pair of pants", "a pair of jeans"),
    "pullover": ("a pullover", "a sweater", "a jumper"),
    "dress": ("a dress", "a gown", "a frock"),
    "coat": ("a coat", "a jacket", "an overcoat"),
    "sandal": ("a sandal", "a flip-flop", "a strappy sandal"),
    "shirt": ("a shirt", "a button-up shirt", "a blouse"),
    "sneaker": ("a sneaker", "a trainer", "a running shoe"),
    "bag": ("a bag", "a handbag", "a purse"),
    "ankle boot": ("an ankle boot", "a boot", "a bootie"),
}
NAMES = tuple(CLASS_PHRASES[name] for name in CLASS_NAMES)

TRAIN_TEMPLATES = (
    "{}",
    "a photo of {}",
    "{} on a black background",
    "a grayscale picture of {}",
    "an image of {}",
    "a low-resolution photo of {}",
    "a centered photo of {}",
    "{} in grayscale",
)
# Disjoint from TRAIN_TEMPLATES, and no fixed text of one appears in any training caption.
# 3 templates x 3 names = 9 combinations, coprime with the 10 classes, so labels cycling with the
# index (label = index % 10, as in sample grids) still meet every combination.
HELDOUT_TEMPLATES = (
    "a picture showing {}",
    "product shot: {}",
    "here is {}",
)


def _names(label: int) -> tuple[str, ...]:
  if not isinstance(label, (int, np.integer)) or not 0 <= label < len(NAMES):
    raise ValueError(f"label={label!r} must be an integer class id in [0, {len(NAMES)}).")
  return NAMES[int(label)]


def train_caption(label: int, rng: np.random.Generator) -> str:
  """A training caption for `label`: a random name in a random training template."""
  names = _names(label)
  template = TRAIN_TEMPLATES[rng.integers(len(TRAIN_TEMPLATES))]
  return template.format(names[rng.integers(len(names))])


def heldout_caption(label: int, index: int) -> str:
  """The `index`-th evaluation caption for `label`, cycling over held-out templates and names.

  Deterministic, so every evaluation conditions on the same phrasings.
  """
  names = _names(label)
  if not isinstance(index, (int, np.integer)) or index < 0:
    raise ValueError(f"index={index!r} must be a non-negative integer.")
  combo = int(index) % (len(HELDOUT_TEMPLATES) * len(names))
  template = HELDOUT_TEMPLATES[combo % len(HELDOUT_TEMPLATES)]
  return template.format(names[combo // len(HELDOUT_TEMPLATES)])


def all_captions() -> list[str]:
  """Every caption the data and the evaluation can produce: each class's names in every
  training and held-out template (what a frozen encoder embeds once, `CaptionEmbedding`)."""
  return [template.format(name) for names in NAMES for name in names
          for template in TRAIN_TEMPLATES + HELDOUT_TEMPLATES]


class CaptionTokens(grain.transforms.RandomMap):
  """Adds `text_tokens` int32 (L,) and `text_mask` bool (L,) of a train caption of the label.

  A RandomMap so grain hands it a per-example rng derived from the pipeline seed: each epoch sees
  different phrasings, and a restored iterator reproduces them exactly.
  """

  def __init__(self, max_length: int):
    if not isinstance(max_length, (int, np.integer)) or max_length < 1:
      raise ValueError(f"max_length={max_length!r} must be an integer >= 1.")
    self.max_length = int(max_length)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    caption = train_caption(int(element["label"]), rng)
    tokens, mask = tokenizer.tokenize([caption], self.max_length)
    return {**element, "text_tokens": tokens[0], "text_mask": mask[0]}


class CaptionEmbedding(grain.transforms.RandomMap):
  """Adds a frozen encoder's `text_embedding` float32 (1, D) and `text_mask` bool (1,) of a train
  caption of the label, looked up in `table` (the same caption `CaptionTokens` would draw)."""

  def __init__(self, table: embedding_cache.CaptionTable):
    self.table = table

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    cond = self.table.condition([train_caption(int(element["label"]), rng)])
    return {**element, "text_embedding": cond["embedding"][0], "text_mask": cond["mask"][0]}
