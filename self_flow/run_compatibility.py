"""Whether a workdir's checkpoint belongs to this config, and fine-tuning from another run.

Resuming a run whose model differs from the config (a changed depth, width, patch size, class
count...) would fail deep inside orbax with an unhelpful shape error, or worse, after the new
run had already written into the old run's directory. `check_resumable` compares the saved
array shapes with the ones this config builds, from metadata only, before anything is written,
and names the config keys that differ from the saved run. Deliberately starting from another
run's weights is `restore_matching` (config `train.init_from`): parameters whose names and shapes
match are loaded, the rest keep their fresh initialisation.
"""

from typing import Any

from absl import logging
from etils import epath
import jax

from self_flow import checkpointing

# Saved trees restored by fine-tuning: weights only, never the optimizer moments or the step.
# teacher_params exists only in runs with a teacher EMA of its own (train_state.has_teacher_ema).
_WEIGHT_TREES = ("params", "ema_params", "teacher_params")
# Array mismatches quoted in an error message (the rest are counted).
_QUOTED = 5


class IncompatibleRunError(ValueError):
  """The workdir holds a run whose state does not fit this config."""


def _frozen(value):
  """Lists (as JSON gives back) and tuples, at any depth, as tuples: equal configs compare equal."""
  return tuple(map(_frozen, value)) if isinstance(value, (list, tuple)) else value


def flatten_config(tree: dict, prefix: str = "") -> dict[str, Any]:
  """Nested config dict -> {"model.depth": 12, ...}; sequences as tuples."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(flatten_config(value, name + "."))
    else:
      flat[name] = _frozen(value)
  return flat


def config_differences(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
  """{key: (saved value, current value)} for keys whose values differ (or exist in one only)."""
  old, new = flatten_config(saved), flatten_config(current)
  missing = object()
  return {k: (old.get(k, "<absent>"), new.get(k, "<absent>"))
          for k in sorted(old.keys() | new.keys()) if old.get(k, missing) != new.get(k, missing)}


def _describe(differences: dict[str, tuple[Any, Any]]) -> str:
  return ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in differences.items())


def check_resumable(*, workdir: str, step: int, saved_config: dict, saved_shapes: dict,
                    config_dict: dict, abstract_state) -> None:
  """Raises IncompatibleRunError if the saved state cannot be restored into this config's state.

  Array names, shapes and dtypes decide (they are what a restore needs); the message lists the
  config keys that differ from the saved run, and the way to fine-tune from it instead. Keys
  that differ without changing the state (learning rate, step count, logging...) only log a
  warning: changing them on resume is legitimate, but the run is no longer an exact replay."""
  want = checkpointing.tree_shapes(abstract_state)
  changed = config_differences(saved_config, config_dict)
  mismatched = [name for name in sorted(want.keys() | saved_shapes.keys())
                if want.get(name) != saved_shapes.get(name)]
  if not mismatched:
    if changed:
      logging.warning("Resuming %s at step %d with config values that differ from the saved "
                      "run: %s.", workdir, step, _describe(changed))
    return
  quoted = "; ".join(f"{name}: saved {saved_shapes.get(name, 'absent')}, this config "
                     f"{want.get(name, 'absent')}" for name in mismatched[:_QUOTED])
  more = f" (and {len(mismatched) - _QUOTED} more)" if len(mismatched) > _QUOTED else ""
  keys = _describe(changed) if changed else "none (the saved config equals this one)"
  raise IncompatibleRunError(
      f"--workdir={workdir} holds a run whose checkpoint (step {step}) does not fit this config; "
      f"nothing was written. Config keys that differ from the saved run: {keys}. Arrays that "
      f"differ: {quoted}{more}. To resume, use the saved run's values for these keys. To "
      f"fine-tune from that run instead, use a new --workdir with "
      f"--config.train.init_from={workdir} (parameters with matching names and shapes are "
      "loaded, the others initialised fresh).")


def _latest_checkpoint(source: str) -> tuple[epath.Path, int]:
  """(checkpoints directory, latest step) of `source`, a run directory or its `checkpoints/`."""
  directory = checkpointing.checkpoints_dir(source)
  if not directory.exists():  # `source` is the checkpoints directory itself
    directory = directory.parent
  step = checkpointing.latest_step(directory)
  if step is None:
    raise FileNotFoundError(f"config.train.init_from={source!r} holds no checkpoint (looked for "
                            f"step directories in {directory}); allowed: a run directory or its "
                            "checkpoints/ directory.")
  return directory, step


def restore_matching(source: str, state, abstract_state):
  """`state` with params and EMAs replaced wherever `source`'s latest checkpoint has an array of
  the same name and shape; returns (state, number loaded, names left at their initialisation).

  A teacher EMA of this run that the source lacks (a one-EMA run) starts as the source's EMA,
  which was that run's teacher."""
  directory, step = _latest_checkpoint(source)
  saved = checkpointing.saved_state_shapes(checkpointing.state_dir(directory, step))
  trees = [k for k in _WEIGHT_TREES if k in abstract_state]
  if "teacher_params" in trees and not any(n.startswith("teacher_params/") for n in saved):
    trees.remove("teacher_params")
    teacher_from_ema = True
  else:
    teacher_from_ema = False
  want = checkpointing.tree_shapes({k: abstract_state[k] for k in trees})
  loadable = {name for name, (shape, _) in want.items() if saved.get(name, (None,))[0] == shape}

  def keep(path, leaf):
    return leaf if checkpointing.path_name(path) in loadable else None

  partial = jax.tree_util.tree_map_with_path(
      keep, {k: abstract_state[k] for k in trees})
  partial = _drop_none(partial)
  restored = checkpointing.restore_state_subtree(directory, step, partial)
  merged = dict(state)
  for tree in trees:
    merged[tree] = _overlay(state[tree], restored.get(tree, {}))
  if teacher_from_ema:
    merged["teacher_params"] = jax.tree.map(lambda e: e.copy(), merged["ema_params"])
  fresh = sorted(set(want) - loadable)
  logging.info("Initialised from step %d of %s: %d of %d weight arrays loaded; left at their "
               "initialisation: %s.", step, directory, len(loadable), len(want),
               ", ".join(fresh) if fresh else "none")
  return merged, len(loadable), fresh


def _drop_none(tree):
  if isinstance(tree, dict):
    kept = {k: _drop_none(v) for k, v in tree.items()}
    return {k: v for k, v in kept.items() if v is not None and v != {}}
  return tree


def _overlay(base, loaded):
  if isinstance(base, dict):
    return {k: _overlay(v, loaded[k]) if k in loaded else v for k, v in base.items()}
  return loaded
