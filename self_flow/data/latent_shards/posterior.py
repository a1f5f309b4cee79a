"""Grain transforms that train on a stored posterior rather than on its mean.

Separate from the reader because only runs with data.latent_sampling="posterior" use them, on
records the reader has already decoded.
"""

from typing import Any

import grain
import numpy as np

from self_flow.data import pipeline

# Training on a stored posterior (`latent_std` present, config data.latent_sampling="posterior").


def preprocess_posterior(record: dict[str, Any]) -> dict[str, np.ndarray]:
  """`pipeline.preprocess_latents` keeping `latent_std`, for `PosteriorSample` to draw with.

  Module-level so grain's spawned worker processes can import it by name.
  """
  return {**pipeline.preprocess_latents(record),
          "latent_std": np.asarray(record["latent_std"], np.float32)}


class PosteriorSample(grain.transforms.RandomMap):
  """Replaces the stored posterior mean `latent` by a draw `latent + latent_std * eps`.

  eps ~ N(0, I) from the per-example rng grain derives from the pipeline seed and the example's
  position in the shuffled, repeated stream, i.e. from (seed, example, epoch): every epoch
  draws fresh latents (as REPA-style trainers do from stored moments), a resumed iterator draws
  the same ones again, and the draw does not depend on the process count.
  """

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    element = dict(element)
    std = element.pop("latent_std")
    noise = rng.standard_normal(std.shape, dtype=np.float32)
    element["latent"] = (element["latent"] + std * noise).astype(np.float32)
    return element
