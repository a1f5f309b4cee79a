"""grain input pipelines: the resumable, per-process-sharded training stream and eval arrays.

The training iterator is a grain `DatasetIterator`, so its `get_state()`/`set_state()` give an
exact resume point that is checkpointed next to the model. Each process reads only its own
shard and `make_global_batch` assembles the shards into one global `jax.Array` per feature.
"""

from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from self_flow.modalities import image as image_modality

# Batches the in-process iterator prepares ahead of the one being consumed.
_READ_AHEAD_BATCHES = 2
# Records read per batched call in `load_split_arrays`; bounds the decoded dicts held at once.
_LOAD_CHUNK = 4096


def preprocess(record: dict[str, Any]) -> dict[str, np.ndarray]:
  """Turns a uint8 record into model inputs: image float32 in [-1, 1], label int32.

  Module-level so grain's spawned worker processes can import it by name.
  """
  return {"image": image_modality.from_uint8(np.asarray(record["image"])),
          "label": np.asarray(record["label"], dtype=np.int32)}


def preprocess_latents(record: dict[str, Any]) -> dict[str, np.ndarray]:
  """A latent-shard record as model inputs: latents, caption embedding (or token ids) and mask,
  label; with several captions per example, all of them and `num_captions`, for
  `latent_shards.caption_draw.DrawCaption` to pick one.

  The caption strings stay behind (strings cannot become device arrays). The caption embedding
  keeps its stored 16-bit dtype; `conditioning.from_batch` widens it to float32 on the device.
  """
  inputs = {
      "latent": np.asarray(record["latent"], np.float32),
      "text_mask": np.asarray(record["text_mask"], bool),
      "label": np.asarray(record["label"], np.int32),
  }
  if "text_tokens" in record:
    inputs["text_tokens"] = np.asarray(record["text_tokens"], np.int32)
  else:
    inputs["text_embedding"] = np.asarray(record["text_embedding"])
  if "num_captions" in record:
    inputs["num_captions"] = np.asarray(record["num_captions"], np.int32)
  return inputs


def make_train_iterator(
    source: Sequence[dict[str, Any]],
    *,
    global_batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    worker_count: int,
    worker_buffer_size: int = 2,
    preprocess: Callable[[dict[str, Any]], dict[str, np.ndarray]] = preprocess,
    transforms: Sequence[grain.transforms.Map | grain.transforms.RandomMap] = (),
    start_batch: int = 0,
) -> grain.DatasetIterator:
  """Returns an infinite iterator of this process's batches, reshuffled every epoch.

  All processes shuffle the full source with the same seed, cut it into global batches, and
  process `p` takes rows `[p * L, (p + 1) * L)` of each (`L = global_batch_size //
  process_count`), so their shards are disjoint within an epoch and together cover it. The
  global batch `make_global_batch` assembles is then the same, row for row, for any process
  count: the train step's per-row randomness (noise, timesteps, condition dropout) and any
  RandomMap transform (its rng comes from the example's global position) do not depend on the
  topology, and a run on 2 hosts reproduces one on 1. Batches are dicts of numpy arrays with
  leading dim `L`.

  `preprocess` turns a record into model inputs (default: uint8 images to [-1, 1]); then each of
  `transforms` runs per example (RandomMap ones get a per-example rng derived from `seed`, so a
  resumed iterator reproduces them).

  The stream is a pure function of (source, seed, global batch size): `start_batch=k` starts it
  at global batch k, exactly where an iterator that has yielded k batches stands, whatever the
  process count, worker count or grain version that iterator ran with. A resume whose saved
  iterator state does not fit uses it (`checkpointing.Checkpointer.restore_iterators`).

  With `worker_count > 0`, batches are produced in that many spawned processes; outside an
  absl app call `absl.flags.FLAGS.mark_as_parsed()` before the first `next()`.
  """
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index={process_index}, process_count={process_count}: need "
        "process_count >= 1 and 0 <= process_index < process_count."
    )
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} must be a positive multiple of "
        f"process_count={process_count}."
    )
  if seed < 0:
    raise ValueError(f"seed={seed} must be a non-negative integer.")
  if worker_count < 0:
    raise ValueError(f"worker_count={worker_count} must be >= 0 (0 reads in this process).")
  if start_batch < 0:
    raise ValueError(f"start_batch={start_batch} must be >= 0.")
  # `repeat` reseeds the upstream shuffle per epoch, so every epoch has a different order.
  dataset = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
  dataset = dataset.map(preprocess)
  for transform in transforms:  # e.g. captions drawn per epoch from the pipeline's seed
    if isinstance(transform, grain.transforms.RandomMap):
      dataset = dataset.random_map(transform)
    else:
      dataset = dataset.map(transform)
  # Local batches k * process_count + p (p = this process) make up global batch k. Mapping is
  # lazy, so the other processes' examples are never read or transformed here.
  dataset = dataset.batch(global_batch_size // process_count, drop_remainder=True)
  dataset = dataset[process_index::process_count][start_batch:]
  # grain's default read-ahead (16 threads, 500 elements, here whole batches) keeps preparing
  # most of an epoch in the background, taking the cores the train step runs on (measured: a
  # 3-modality CPU run at 2.4 s/step against 1.3 s with no iterator alive). Two batches ahead
  # on one thread hide the loading; multiprocess prefetch below adds more when configured.
  iter_dataset = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=_READ_AHEAD_BATCHES))
  if worker_count > 0:
    iter_dataset = iter_dataset.mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=worker_count, per_worker_buffer_size=worker_buffer_size
        )
    )
  return iter(iter_dataset)


def make_global_batch(
    local_batch: dict[str, np.ndarray], sharding: NamedSharding
) -> dict[str, jax.Array]:
  """Assembles every process's local batch into global arrays split along the batch dim.

  Only the first entry of `sharding.spec` (the batch axes) is used, so the same sharding serves
  leaves of any rank (4-D images, 1-D labels).
  """
  batch_axes = sharding.spec[0] if len(sharding.spec) else None
  leaf_sharding = NamedSharding(sharding.mesh, PartitionSpec(batch_axes))
  return {
      key: jax.make_array_from_process_local_data(leaf_sharding, np.asarray(value))
      for key, value in local_batch.items()
  }


def load_split_fields(source: Sequence[dict[str, Any]], fields: Sequence[str],
                      num_examples: int | None = None) -> dict[str, np.ndarray]:
  """Reads `fields` of the first `num_examples` records (all if None), each stacked into an array.

  For evaluation, which needs fixed in-memory arrays rather than a stream. Sources with a
  batched `__getitems__` (like `ImageSource`) are read in chunks, which is much faster.
  """
  if num_examples is not None and num_examples < 1:
    raise ValueError(f"num_examples={num_examples} must be >= 1 or None (all records).")
  count = len(source) if num_examples is None else min(num_examples, len(source))
  if count == 0:
    raise ValueError(f"Source {source!r} has no records.")
  values = {field: [] for field in fields}
  for start in range(0, count, _LOAD_CHUNK):
    indices = range(start, min(start + _LOAD_CHUNK, count))
    if hasattr(source, "__getitems__"):
      records = source.__getitems__(indices)
    else:
      records = [source[i] for i in indices]
    for field in fields:
      values[field].extend(np.asarray(r[field]) for r in records)
  return {field: np.stack(v) for field, v in values.items()}


def load_split_arrays(
    source: Sequence[dict[str, Any]], num_examples: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Reads the first `num_examples` records (all if None) as (uint8 images, int32 labels)."""
  arrays = load_split_fields(source, ("image", "label"), num_examples)
  return arrays["image"].astype(np.uint8), arrays["label"].astype(np.int32)
