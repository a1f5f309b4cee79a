"""Turns SIGTERM (TPU maintenance, preemptible VMs, job schedulers) into a flag the loop polls.

The loop then saves a checkpoint at a step boundary and exits cleanly, instead of dying
mid-step; orbax's atomic saves mean a kill during that save still leaves the previous one intact.
"""

import signal
import threading

from absl import logging


class PreemptionGuard:
  """Context manager: while active, SIGTERM sets `requested` instead of killing the process."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def _handle(self, signum, frame):
    del frame
    logging.warning("Received signal %d: will checkpoint at the next step boundary and exit.",
                    signum)
    self._event.set()

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False
