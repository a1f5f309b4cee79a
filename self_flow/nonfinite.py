"""What the loop does when a step's loss or gradient is not finite (`train.nonfinite`).

The step itself never applies a non-finite update (it keeps the state and counts the step,
`train_step`); the host reads the step's finiteness flag one step later and either lets the run
go on ("skip", until `train.max_nonfinite_in_a_row` in a row) or stops it with an error that
says which checkpoint is intact ("stop"). The loop saves only after a step was checked, so a
state that went NaN never becomes the latest checkpoint.
"""

from collections.abc import Callable

import numpy as np
from absl import logging

POLICIES = ("skip", "stop")


class NonFinitePolicy:
  """Acts on each step's on-device finiteness flag, in step order."""

  def __init__(self, policy: str, max_in_a_row: int, latest_checkpoint: Callable[[], int | None]):
    if policy not in POLICIES:
      raise ValueError(f"train.nonfinite={policy!r} is not allowed; choose one of "
                       f"{list(POLICIES)}.")
    self._policy = policy
    self._max_in_a_row = max_in_a_row
    self._latest_checkpoint = latest_checkpoint
    self._in_a_row = 0

  def check(self, step: int, host: dict[str, np.ndarray]) -> None:
    """Returns if step `step` was finite or may be skipped; raises FloatingPointError to stop."""
    if host["finite"]:
      self._in_a_row = 0
      return
    self._in_a_row += 1
    what = f"step {step}: loss {float(host['loss'])}, gradient norm {float(host['grad_norm'])}"
    if self._policy == "skip" and self._in_a_row < self._max_in_a_row:
      logging.warning("Non-finite %s; skipped the update (state unchanged; %d skipped in this "
                      "run, %d in a row).", what, int(host["nonfinite_steps"]), self._in_a_row)
      return
    why = ("train.nonfinite='stop'" if self._policy == "stop" else
           f"{self._in_a_row} in a row reached train.max_nonfinite_in_a_row")
    latest = self._latest_checkpoint()
    raise FloatingPointError(
        f"Non-finite {what}; stopping ({why}). Nothing after step {step - 1} was saved: "
        + (f"the last checkpoint (step {latest}) is intact; rerun the same command to resume "
           "from it" if latest is not None else "no checkpoint had been written yet")
        + " (lower optim.learning_rate or check the data if it happens again).")
