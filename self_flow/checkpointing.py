"""Orbax checkpoints of everything a run needs to continue exactly: state, data position, config.

Saves are asynchronous (training continues while the previous save is written) and atomic (orbax
writes to a temporary directory and renames, or on Cloud Storage commits a marker file last), so
a crash or SIGTERM mid-save leaves the last finished checkpoint intact. Only the latest `keep`
checkpoints are kept. A multi-modal run has one data iterator per modality (item
`data_iter_<modality>`); which modality a step trains is a function of the step
(`self_flow.mixture`), so iterators + step restore the mixture exactly.

A user never loses progress on a restart:
- The train state is what matters; the data iterators are auxiliary. Item `data_position` holds
  how many global batches each modality's stream has yielded and the layout that read them
  (worker count, process count, batch sizes, grain version). The stream is a pure function of
  (seed, global batch), so when the saved grain state does not fit (another worker or process
  count, a resized slice, a new grain) the iterator is rebuilt at the saved batch, with a
  warning, and yields what an uninterrupted run would have.
- Only a checkpoint that is provably damaged (`is_damage`: a missing or truncated array file,
  unparsable metadata) is set aside (renamed, never deleted), and only when an older one
  restores. An error that proves nothing (a 503, a timeout, memory) is retried, then fails the
  run with every checkpoint where it was. Checkpoints that exist but none of which restores stop
  the run with an error naming them: never a silent fresh start.
A failed write (disk full, permissions) raises `CheckpointWriteError`, which says that the
previous checkpoint is intact.

The on-disk layout is `<workdir>/checkpoints/<step>/<item>`, the train state in item `state`;
readers that are not the training run (sample_npz, fine-tuning from another run) find and read
it with the functions at the end of this module.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import importlib.metadata
import json
import time
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from self_flow import storage

DATA_POSITION_ITEM = "data_position"
# Words of TensorStore's status codes (and Python errors) that prove a checkpoint damaged: a
# file it names is absent or shorter than its index says, or its metadata does not parse.
_DAMAGE_CODES = ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS", "FAILED_PRECONDITION")
_DAMAGE_TYPES = (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError)


class CheckpointWriteError(RuntimeError):
  """Writing a checkpoint failed; the checkpoints written before it are untouched."""


class CheckpointReadError(RuntimeError):
  """Reading a checkpoint failed for a reason that does not prove it damaged (storage
  unreachable, a timeout, memory); every checkpoint was left where it was."""


class NoReadableCheckpointError(RuntimeError):
  """The workdir holds checkpoints and every one of them is damaged."""


def is_damage(err: BaseException) -> bool:
  """Whether `err` (or an error it was raised from) proves the checkpoint it read damaged."""
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    if isinstance(err, _DAMAGE_TYPES) or any(
        str(err).startswith(code) or f" {code}:" in str(err) for code in _DAMAGE_CODES):
      return True
    err = err.__cause__ or err.__context__
  return False


def _reason(err: BaseException) -> str:
  return f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"


@dataclasses.dataclass(frozen=True)
class DataPosition:
  """Where the training streams stand at a checkpoint, and the layout that read them."""

  batches: dict[str, int]  # global batches each modality's iterator has yielded
  global_batch_sizes: dict[str, int]  # each modality's global batch size
  worker_count: int  # grain worker processes per host
  process_count: int  # JAX processes (hosts) of the run
  grain_version: str = dataclasses.field(
      default_factory=lambda: importlib.metadata.version("grain"))

  def layout_differences(self, current: "DataPosition") -> list[str]:
    """What of the reading layout differs in `current` ("worker_count 0 -> 2", ...)."""
    return [f"{name} {getattr(self, name)} -> {getattr(current, name)}"
            for name in ("worker_count", "process_count", "grain_version", "global_batch_sizes")
            if getattr(self, name) != getattr(current, name)]


class _Damaged(Exception):
  """A checkpoint read failed with `is_damage`; carries the reason."""


class Checkpointer:
  """One workdir's checkpoints: `save` at an interval (or forced), `restore_latest`."""

  def __init__(self, directory: str, *, save_every: int, keep: int, modalities: Sequence[str],
               read_attempts: int = 3, retry_wait_s: float = 5.0):
    self.modalities = tuple(modalities)
    self._read_attempts = read_attempts
    self._retry_wait_s = retry_wait_s
    self._pending = None  # step of the last save started (maybe still being written)
    self.directory = directory
    # Opening lists the saved steps and reads their commit markers: retried like a restore.
    self.manager = self._read("list of checkpoints", lambda: ocp.CheckpointManager(
        directory,
        item_names=("state", "config", DATA_POSITION_ITEM) + tuple(
            map(_iterator_item, self.modalities)),
        options=ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
            preservation_policy=ocp.checkpoint_managers.LatestN(keep), create=True,
            enable_async_checkpointing=True)), damage_possible=False)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def step_dir(self, step: int) -> epath.Path:
    return epath.Path(self.manager.directory) / str(step)

  def saved_shapes(self, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """{"params/blocks/...": (shape, dtype)} of the saved state, read from metadata only."""
    return saved_state_shapes(state_dir(self.manager.directory, step))

  def set_aside(self, step: int, reason: str) -> epath.Path:
    """Renames the checkpoint of `step` to `<step>.unreadable-<time>` (process 0; all wait).

    Renaming keeps the bytes for inspection and takes the step out of orbax's view, so the run
    can fall back to an earlier checkpoint and later save this step number again."""
    target = self.step_dir(step).parent / f"{step}.unreadable-{int(time.time())}"
    if jax.process_index() == 0:
      self.step_dir(step).rename(target)
      logging.warning("Checkpoint of step %d is unreadable (%s); moved it to %s.", step, reason,
                      target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"self_flow: checkpoint {step} set aside")
    self.manager.reload()
    return target

  def should_save(self, step: int) -> bool:
    """Whether `save(step)` (not forced) would write a checkpoint."""
    return self.manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    """True at the one step every process stops at after a SIGTERM to any of them.

    JAX's preemption sync manager (set up by `jax.distributed.initialize`) catches SIGTERM and
    agrees on that step; all processes must call this at every step. False without
    `jax.distributed` (a single process watches SIGTERM with `preemption.PreemptionGuard`)."""
    return self.manager.reached_preemption(step)

  def _check(self, names) -> None:
    if tuple(names) != self.modalities:
      raise ValueError(f"data iterators for {tuple(names)} given; this checkpointer holds "
                       f"{self.modalities}.")

  def save(self, step: int, state, iterators: Mapping[str, grain.DatasetIterator],
           position: DataPosition, config: ml_collections.ConfigDict,
           force: bool = False) -> bool:
    """Starts an async save when `step` is on the interval (or `force`); True if one started.

    `iterators` maps each modality to its training iterator, `position` says where they
    stand."""
    self._check(iterators)
    self._check(position.batches)
    items = {_iterator_item(m): grain.checkpoint.CheckpointSave(it) for m, it in iterators.items()}
    try:
      started = self.manager.save(step, force=force, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict()),
          **{DATA_POSITION_ITEM: ocp.args.JsonSave(dataclasses.asdict(position))}, **items))
    except Exception as err:  # orbax also re-raises here a failure of the previous async save
      raise self._write_error(step, err) from err
    if started:
      self._pending = step
    return started

  def restore_latest(self, abstract_state, check=None
                     ) -> tuple[int | None, Any, DataPosition | None]:
    """(step, state, data position) of the newest checkpoint that restores; all None if the
    workdir has no checkpoint. The position is None for checkpoints written before it was
    saved.

    `check(step, saved_config, saved_shapes)`, called first for each candidate with what was
    read from its metadata, may raise to refuse the run (e.g. an incompatible config); that
    error propagates. Damaged checkpoints newer than the one restored are set aside, with a
    warning naming both; other read errors are retried, then raise `CheckpointReadError`; if
    every checkpoint is damaged, `NoReadableCheckpointError` names them and moves nothing."""
    damaged: list[tuple[int, str]] = []
    for step in reversed(self.all_steps()):
      try:
        shapes, saved_config = self._read(
            f"metadata of the checkpoint of step {step}",
            lambda s=step: (self.saved_shapes(s), self.saved_config(s)))
        if check is not None:
          check(step, saved_config, shapes)
        state = self._read(
            f"train state of the checkpoint of step {step}",
            lambda s=step: self.manager.restore(s, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state))).state)
      except _Damaged as err:
        damaged.append((step, str(err)))
        continue
      for newer, reason in damaged:
        target = self.set_aside(newer, reason)
        logging.warning("Falling back from the checkpoint of step %d (moved to %s) to step %d.",
                        newer, target, step)
      return step, state, self._saved_position(step)
    if damaged:
      raise NoReadableCheckpointError(
          f"{self.directory} holds checkpoints, and every one is damaged: " + "; ".join(
              f"step {step}: {reason}" for step, reason in damaged) + ". None was moved. To "
          "start this run afresh, move them away (or use another --workdir); to recover, "
          "restore them from a copy.")
    return None, None, None

  def _read(self, what: str, read: Callable[[], Any], damage_possible: bool = True) -> Any:
    """`read()`, retried on errors that do not prove the checkpoint damaged. Raises _Damaged on
    damage (agreed by all processes: one reading a damaged shard is enough; never when not
    `damage_possible`) and `CheckpointReadError` when the retries are spent."""
    for attempt in range(1, self._read_attempts + 1):
      error, result = None, None
      try:
        result = read()
      except Exception as err:  # pylint: disable=broad-except  (classified right below)
        error = err
      status = 0 if error is None else (1 if damage_possible and is_damage(error) else 2)
      statuses = [status]
      if jax.process_count() > 1:
        statuses = multihost_utils.process_allgather(np.int32(status)).tolist()
      if max(statuses) == 0:
        return result
      if 2 not in statuses:
        raise _Damaged(_reason(error) if error is not None else "damaged on another process")
      detail = _reason(error) if error is not None else "failed on another process"
      if attempt == self._read_attempts:
        raise CheckpointReadError(
            f"Reading the {what} in {self.directory} failed {attempt} times ({detail}). That "
            "does not prove a checkpoint damaged, so every checkpoint was left in place. Fix "
            "the cause (storage reachable? enough host memory?) and rerun the same command to "
            "resume.") from error
      wait = self._retry_wait_s * 2 ** (attempt - 1)
      logging.warning("Reading the %s in %s failed (%s); retrying in %.1f s (attempt %d of "
                      "%d).", what, self.directory, detail, wait, attempt + 1,
                      self._read_attempts)
      time.sleep(wait)
    raise AssertionError("unreachable")

  def _saved_position(self, step: int) -> DataPosition | None:
    """The checkpoint's data position; None if it has none (or it cannot be read: the streams
    are then rebuilt from the step, which loses nothing)."""
    if not (self.step_dir(step) / DATA_POSITION_ITEM).exists():
      return None
    try:
      saved = self.manager.restore(step, args=ocp.args.Composite(
          **{DATA_POSITION_ITEM: ocp.args.JsonRestore()}))[DATA_POSITION_ITEM]
      return DataPosition(**saved)
    except Exception as err:  # pylint: disable=broad-except
      logging.warning("The data position of the checkpoint of step %d is unreadable (%s); the "
                      "data streams are rebuilt from the step.", step, _reason(err))
      return None

  def restore_iterators(self, step: int, saved: DataPosition | None, current: DataPosition,
                        open_iterator: Callable[[str, int], grain.DatasetIterator]
                        ) -> dict[str, grain.DatasetIterator]:
    """Each modality's training iterator at checkpoint `step`.

    `current` is this run's layout, with `batches` the position implied by the step (used when
    the checkpoint has no saved position); `open_iterator(modality, start_batch)` builds a
    stream starting at a global batch. The saved grain state is restored when the layout that
    saved it is this one; otherwise, or if that restore fails, the stream is rebuilt at the
    saved batch (a pure function of seed and batch: the same batches as an uninterrupted run)."""
    self._check(current.batches)
    batches = (saved or current).batches
    changed = saved.layout_differences(current) if saved is not None else []
    iterators = {}
    for name in self.modalities:
      if not changed:
        iterator = open_iterator(name, 0)
        try:
          self.manager.restore(step, args=ocp.args.Composite(
              **{_iterator_item(name): grain.checkpoint.CheckpointRestore(iterator)}))
          iterators[name] = iterator
          continue
        except Exception as err:  # pylint: disable=broad-except  (rebuilt exactly below)
          why = f"its saved iterator state did not restore ({_reason(err)})"
      else:
        why = f"the saved iterator state was written with {', '.join(changed)}"
      logging.warning("Data stream of %s: %s; rebuilt at global batch %d from the seed, which "
                      "gives the batches an uninterrupted run would read%s.", name, why,
                      batches[name],
                      "" if saved is None or saved.global_batch_sizes == current.global_batch_sizes
                      else " at the old batch size (the new one changes what follows)")
      iterators[name] = open_iterator(name, batches[name])
    return iterators

  def saved_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def wait(self) -> None:
    """Blocks until the pending save is on disk; raises `CheckpointWriteError` if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as err:  # pylint: disable=broad-except
      raise self._write_error(self._pending, err) from err

  def _write_error(self, step: int | None, err: Exception) -> CheckpointWriteError:
    what = f"the checkpoint of step {step}" if step is not None else "a checkpoint"
    try:  # let an earlier save still in flight finish, then list only what is on disk
      self.manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass  # that earlier save failed too: it is not listed below
    try:
      self.manager.reload()
    except Exception:  # pylint: disable=broad-except
      pass
    earlier = [s for s in self.all_steps() if s != step]
    kept = (f"the previous checkpoint (step {earlier[-1]}) is intact" if earlier
            else "no earlier checkpoint exists")
    return CheckpointWriteError(
        f"Writing {what} to {self.manager.directory} failed ({type(err).__name__}: {err}); "
        f"{kept}. Free disk space, fix the directory's permissions or the storage's "
        "reachability, then rerun the same command to resume from the last good checkpoint.")

  def close(self) -> None:
    self.manager.close()


def _iterator_item(modality: str) -> str:
  return f"data_iter_{modality}"


def checkpoints_dir(workdir: str) -> epath.Path:
  """`<workdir>/checkpoints`, absolute unless a URL (gs://...): orbax refuses to restore from a
  relative path."""
  return epath.Path(storage.resolve(workdir)) / "checkpoints"


def state_dir(directory, step: int) -> epath.Path:
  """The saved train state (item `state`) of `step` in a checkpoints directory."""
  return epath.Path(directory) / str(step) / "state"


def latest_step(directory) -> int | None:
  """The newest finished step in a checkpoints directory, None if it holds none (or is absent).

  Read-only, so a reader never creates or changes another run's directory; unfinished saves and
  checkpoints set aside as unreadable are not steps."""
  with ocp.CheckpointManager(directory,
                             options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
    return manager.latest_step()


def restore_state_subtree(directory, step: int, abstract: dict, *, as_numpy: bool = False):
  """The arrays of `step`'s saved train state that `abstract` names: a nested dict of
  ShapeDtypeStructs, part of the saved tree (e.g. {"ema_params": ...}, possibly pruned).

  Nothing else is read, so neither the optimizer moments nor the data iterators need to fit.
  The arrays come in `abstract`'s shardings or, with `as_numpy`, as host numpy arrays that any
  host can hold whatever mesh the run was trained on."""
  if as_numpy:
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
  else:
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
  return ocp.PyTreeCheckpointer().restore(
      state_dir(directory, step), args=ocp.args.PyTreeRestore(
          item=abstract, restore_args=restore_args, partial_restore=True))


def saved_state_shapes(path) -> dict[str, tuple[tuple[int, ...], str]]:
  """{"/"-joined path: (shape, dtype name)} of a saved state item, from its metadata only."""
  return tree_shapes(ocp.StandardCheckpointer().metadata(str(path)).item_metadata.tree)


def tree_shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """{"/"-joined path: (shape, dtype name)} of any tree of arrays or array metadata, so saved
  and live states compare key for key."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_name(path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in flat}


def path_name(path) -> str:
  """A pytree key path as "params/blocks/attn/qkv/kernel", the same for saved and live trees."""
  return "/".join(str(next((getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a)), k))
                  for k in path)
