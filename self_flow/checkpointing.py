"""Orbax checkpoints of everything a run needs to continue exactly: state, data iterators, config.

Saves are asynchronous (training continues while the previous save is written) and atomic (orbax
writes to a temporary directory and renames), so a crash or SIGTERM mid-save leaves the last
finished checkpoint intact. Only the latest `keep` checkpoints are kept. A multi-modal run has
one data iterator per modality (item `data_iter_<modality>`); which modality a step trains is a
function of the step (`self_flow.mixture`), so iterators + step restore the mixture exactly.
"""

from collections.abc import Mapping, Sequence

import grain
import ml_collections
import orbax.checkpoint as ocp


def _iterator_item(modality: str) -> str:
  return f"data_iter_{modality}"


class Checkpointer:
  """One workdir's checkpoints: `save` at an interval (or forced), `restore` the latest."""

  def __init__(self, directory: str, *, save_every: int, keep: int, modalities: Sequence[str]):
    self.modalities = tuple(modalities)
    self.manager = ocp.CheckpointManager(
        directory,
        item_names=("state", "config") + tuple(map(_iterator_item, self.modalities)),
        options=ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
            preservation_policy=ocp.checkpoint_managers.LatestN(keep), create=True,
            enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

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
    return self.manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict()), **items))

  def restore(self, step: int, abstract_state, iterators: Mapping[str, grain.DatasetIterator]):
    """Restores `step` into the shardings of `abstract_state`; iterators are restored in place."""
    self._check(iterators)
    items = {_iterator_item(m): grain.checkpoint.CheckpointRestore(it)
             for m, it in iterators.items()}
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), **items))
    return restored.state

  def saved_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
