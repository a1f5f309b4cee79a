"""Reading a run's logged scalars back from the TensorBoard event files in its workdir: what
training logged is all the ablation learns of a run's results."""

import numpy as np


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...] sorted by step} of every scalar in the workdir's event files.

  A restarted run writes some steps twice (and its hparams at step 0 again); the last value
  logged for a step wins, so nothing is purged as out of order.
  """
  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  accumulator = event_accumulator.EventAccumulator(
      workdir, size_guidance={event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0},
      purge_orphaned_data=False)
  accumulator.Reload()
  tags = accumulator.Tags()
  series = {}
  for tag in tags[event_accumulator.TENSORS]:
    values = {}
    for event in accumulator.Tensors(tag):
      array = tensor_util.make_ndarray(event.tensor_proto)
      if array.size == 1 and np.issubdtype(array.dtype, np.number):
        values[event.step] = float(array.reshape(()))
    if values:
      series[tag] = sorted(values.items())
  for tag in tags[event_accumulator.SCALARS]:  # summaries written the TF1 way
    series[tag] = sorted({e.step: float(e.value) for e in accumulator.Scalars(tag)}.items())
  return series
