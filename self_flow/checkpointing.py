"""Orbax checkpoints of everything a run needs to continue exactly: state, data iterators, config.

Saves are asynchronous (training continues while the previous save is written) and atomic (orbax
writes to a temporary directory and renames), so a crash or SIGTERM mid-save leaves the last
finished checkpoint intact. Only the latest `keep` checkpoints are kept. A multi-modal run has
one data iterator per modality (item `data_iter_<modality>`); which modality a step trains is a
function of the step (`self_flow.mixture`), so iterators + step restore the mixture exactly.

A finished checkpoint can still be damaged later (a truncated copy, a lost file on a flaky
disk): `restore_latest` then moves it aside (renamed, never deleted) and falls back to the one
before. A failed write (disk full, permissions) raises `CheckpointWriteError`, which says that
the previous checkpoint is intact.

The on-disk layout is `<workdir>/checkpoints/<step>/<item>`, the train state in item `state`;
readers that are not the training run (sample_npz, fine-tuning from another run) find and read
it with the functions at the end of this module.
"""

from collections.abc import Mapping, Sequence
import os
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


class CheckpointWriteError(RuntimeError):
  """Writing a checkpoint failed; the checkpoints written before it are untouched."""


def _iterator_item(modality: str) -> str:
  return f"data_iter_{modality}"


class Checkpointer:
  """One workdir's checkpoints: `save` at an interval (or forced), `restore` the latest."""

  def __init__(self, directory: str, *, save_every: int, keep: int, modalities: Sequence[str]):
    self.modalities = tuple(modalities)
    self._pending = None  # step of the last save started (maybe still being written)
    self.manager = ocp.CheckpointManager(
        directory,
        item_names=("state", "config") + tuple(map(_iterator_item, self.modalities)),
        options=ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
            preservation_policy=ocp.checkpoint_managers.LatestN(keep), create=True,
            enable_async_checkpointing=True))

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

  def _check(self, iterators: Mapping) -> None:
    if tuple(iterators) != self.modalities:
      raise ValueError(f"data iterators for {tuple(iterators)} given; this checkpointer holds "
                       f"{self.modalities}.")

  def save(self, step: int, state, iterators: Mapping[str, grain.DatasetIterator],
           config: ml_collections.ConfigDict, force: bool = False) -> bool:
    """Starts an async save when `step` is on the interval (or `force`); True if one started.

    `iterators` maps each modality to its training iterator."""
    self._check(iterators)
    items = {_iterator_item(m): grain.checkpoint.CheckpointSave(it) for m, it in iterators.items()}
    try:
      started = self.manager.save(step, force=force, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict()),
          **items))
    except Exception as err:  # orbax also re-raises here a failure of the previous async save
      raise self._write_error(step, err) from err
    if started:
      self._pending = step
    return started

  def restore(self, step: int, abstract_state, iterators: Mapping[str, grain.DatasetIterator]):
    """Restores `step` into the shardings of `abstract_state`; iterators are restored in place."""
    self._check(iterators)
    items = {_iterator_item(m): grain.checkpoint.CheckpointRestore(it)
             for m, it in iterators.items()}
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), **items))
    return restored.state

  def restore_latest(self, abstract_state, iterators: Mapping[str, grain.DatasetIterator],
                     check=None) -> tuple[int | None, Any]:
    """(step, state) of the newest checkpoint that restores, or (None, None) if there is none.

    `check(step, saved_config, saved_shapes)`, called first for each candidate with what was
    read from its metadata, may raise to refuse the run (e.g. an incompatible config); that
    error propagates. A checkpoint whose metadata or arrays cannot
    be read is set aside and the previous one tried, with a warning naming both."""
    for step in reversed(self.all_steps()):
      try:
        shapes = self.saved_shapes(step)
        saved_config = self.saved_config(step)
      except Exception as err:  # pylint: disable=broad-except
        self._fall_back(step, err)
        continue
      if check is not None:
        check(step, saved_config, shapes)
      try:
        return step, self.restore(step, abstract_state, iterators)
      except Exception as err:  # pylint: disable=broad-except
        self._fall_back(step, err)
    return None, None

  def _fall_back(self, step: int, err: Exception) -> None:
    reason = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    target = self.set_aside(step, reason)
    earlier = [s for s in self.all_steps() if s < step]
    logging.warning("Falling back from the checkpoint of step %d (moved to %s) to %s.", step,
                    target, f"step {earlier[-1]}" if earlier else "a fresh start (no earlier one)")

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
        f"{kept}. Free disk space or fix the directory's permissions, then rerun the same command "
        "to resume from the last good checkpoint.")

  def close(self) -> None:
    self.manager.close()


def checkpoints_dir(workdir: str) -> epath.Path:
  """`<workdir>/checkpoints`, absolute unless a URL (gs://...): orbax refuses to restore from a
  relative path."""
  return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir)) / "checkpoints"


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
