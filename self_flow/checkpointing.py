"""Orbax checkpoints of everything a run needs to continue exactly: state, data iterator, config.

Saves are asynchronous (training continues while the previous save is written) and atomic (orbax
writes to a temporary directory and renames), so a crash or SIGTERM mid-save leaves the last
finished checkpoint intact. Only the latest `keep` checkpoints are kept.
"""

import grain
import ml_collections
import orbax.checkpoint as ocp

ITEMS = ("state", "data_iter", "config")


class Checkpointer:
  """One workdir's checkpoints: `save` at an interval (or forced), `restore` the latest."""

  def __init__(self, directory: str, *, save_every: int, keep: int):
    self.manager = ocp.CheckpointManager(
        directory, item_names=ITEMS,
        options=ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
            preservation_policy=ocp.checkpoint_managers.LatestN(keep), create=True,
            enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, config: ml_collections.ConfigDict,
           force: bool = False) -> bool:
    """Starts an async save when `step` is on the interval (or `force`); True if one started."""
    return self.manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(config.to_dict())))

  def restore(self, step: int, abstract_state, data_iterator):
    """Restores `step` into the shardings of `abstract_state`; the iterator is restored in place."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data_iter=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored.state

  def saved_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
