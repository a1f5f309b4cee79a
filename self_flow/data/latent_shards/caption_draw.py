"""The grain transform that picks one of an example's stored captions per epoch.

Caption sets often hold several captions per image (the paper's text-to-image data: 4). The
shards store all of them (`captions_per_example`); training sees one per example per epoch.
Separate from the reader because it acts on decoded records in the training stream only.
"""

from typing import Any

import grain
import numpy as np

# The per-caption fields of a multi-caption record, (C, L, ...) each.
_TEXT_FIELDS = ("text_embedding", "text_tokens", "text_mask")


class DrawCaption(grain.transforms.RandomMap):
  """Replaces the (C, L, ...) text fields by the row of one caption, drawn uniformly from the
  example's `num_captions` real ones, and drops `num_captions`.

  The rng is the per-example one grain derives from the pipeline seed and the example's position
  in the shuffled, repeated stream, i.e. from (seed, step): every epoch may draw another caption,
  a resumed run draws the same ones again, on any process or worker count.
  """

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    element = dict(element)
    count = int(element.pop("num_captions"))
    if count < 1:
      raise ValueError(f"An example holds num_captions={count}; the writer stores at least one.")
    row = int(rng.integers(count))
    for field in _TEXT_FIELDS:
      if field in element:
        element[field] = element[field][row]
    return element
