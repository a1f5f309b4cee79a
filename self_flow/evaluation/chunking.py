"""A jitted function over host arrays in fixed-size chunks split over the mesh.

Sampling, probe features, per-example losses and the sample_npz tool all feed host arrays
larger than one call's batch; they share this loop so that each pads, shards and trims alike.
"""

import jax
import numpy as np


def map_in_chunks(fn, arrays: tuple, chunk: int, batch_sharding) -> np.ndarray:
  """fn(i, *rows) over the `chunk`-row slices of host arrays (pytrees with a leading example
  dim), i = 0, 1, ... numbering the slices; the per-example outputs come back concatenated.

  The rows are global arrays split over `batch_sharding`. The last slice is padded to `chunk`
  rows, so every call has one compiled shape. The slice number lets a caller vary something per
  call (a random key) without depending on the rows themselves.
  """
  total = len(jax.tree.leaves(arrays)[0])
  outputs = []
  for i, start in enumerate(range(0, total, chunk)):
    part = jax.tree.map(lambda a, s=start: np.asarray(a[s:s + chunk]), arrays)
    count = len(jax.tree.leaves(part)[0])
    padded = jax.tree.map(
        lambda a, c=count: np.pad(a, [(0, chunk - c)] + [(0, 0)] * (a.ndim - 1)), part)
    # Every process holds the same values; each contributes the shards its devices own.
    global_part = jax.tree.map(
        lambda a: jax.make_array_from_callback(a.shape, batch_sharding,
                                               lambda index, a=a: a[index]), padded)
    outputs.append(np.asarray(fn(i, *global_part))[:count])
  return np.concatenate(outputs)
