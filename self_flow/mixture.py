"""Which modality each step of a joint multi-modal run trains.

Every batch holds one modality (paper Sec. 4.2), drawn with the configured probabilities. The
draw is a pure function of (seed, step) rather than the state of a host RNG: a run resumed from
a checkpoint repeats exactly the sequence an uninterrupted run would have drawn, with nothing
extra to checkpoint, and every process of a pod draws the same modality without communicating.
"""

from collections.abc import Mapping

import numpy as np

# Separates the mixture's random stream from any other use of the run seed.
_STREAM = 0x6D6978


class ModalitySchedule:
  """step -> modality name, for fixed names and probabilities (which must sum to 1)."""

  def __init__(self, probabilities: Mapping[str, float], seed: int):
    names = tuple(probabilities)
    weights = np.asarray([probabilities[n] for n in names], np.float64)
    if not names or np.any(~(weights > 0)) or abs(weights.sum() - 1.0) > 1e-6:
      raise ValueError(f"probabilities={dict(probabilities)} must be > 0 and sum to 1.")
    self.names = names
    self._cumulative = np.cumsum(weights)
    self._seed = int(seed)

  def __call__(self, step: int) -> str:
    if len(self.names) == 1:
      return self.names[0]
    u = np.random.default_rng([self._seed, _STREAM, int(step)]).random()
    index = int(np.searchsorted(self._cumulative, u, side="right"))
    return self.names[min(index, len(self.names) - 1)]

  def sequence(self, start: int, stop: int) -> list[str]:
    """Modalities of steps [start, stop)."""
    return [self(step) for step in range(start, stop)]
