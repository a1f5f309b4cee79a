"""One live run per workdir: a lease object that the run creates, renews and releases.

Two runs writing checkpoints into one workdir (a job resubmitted while the first still runs, a
copy-pasted command) would interleave their saves and delete each other's checkpoints. The run
claims `<workdir>/lease.json` with a create-only write (a local file created only if absent; on
Cloud Storage `ifGenerationMatch=0`), through TensorStore's key-value store, which does both
atomically. While it runs it rewrites the object every `timeout_s / 5` seconds, each rewrite
conditioned on the generation it wrote last, so a run that lost its lease finds out at its next
renewal instead of overwriting a newer holder. A second run is refused with a message naming the
holder (host, pid, start time); a lease not renewed for `timeout_s` (a preempted or killed job)
is taken over with a warning. Times are the hosts' wall clocks, so `timeout_s` must exceed their
skew by far (minutes, not seconds).
"""

import json
import os
import socket
import threading
import time
from typing import Any
import urllib.parse

from absl import logging
import tensorstore as ts

LEASE_FILE = "lease.json"


class WorkdirBusyError(RuntimeError):
  """Another live run holds the workdir's lease."""


class LeaseLostError(RuntimeError):
  """This run's lease was taken over by another run: it must stop writing to the workdir."""


def _kvstore(workdir: str) -> ts.KvStore:
  """The key-value store of `workdir`: TensorStore's gcs driver for gs://, else its file one."""
  if workdir.startswith("gs://"):
    parsed = urllib.parse.urlparse(workdir)
    spec = {"driver": "gcs", "bucket": parsed.netloc, "path": parsed.path.strip("/") + "/"}
  elif "://" in workdir:
    raise ValueError(f"--workdir={workdir}: only local paths and gs:// URLs are supported.")
  else:
    spec = {"driver": "file", "path": os.path.abspath(workdir) + "/"}
  return ts.KvStore.open(spec).result()


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLease:
  """The lease of one workdir, held by this process from `acquire` until `release`."""

  def __init__(self, workdir: str, timeout_s: float):
    if not timeout_s > 0:
      raise ValueError(f"timeout_s={timeout_s} must be > 0.")
    self.workdir = workdir
    self.timeout_s = float(timeout_s)
    self._store = _kvstore(workdir)
    self._generation = None  # the storage generation this run wrote last
    self._holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    self._stop = threading.Event()
    self._thread = None
    self.lost: LeaseLostError | None = None  # set by the renewal thread when taken over

  def _record(self) -> bytes:
    return json.dumps(dict(self._holder, renewed=time.time())).encode()

  def _describe(self, holder: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    age = time.time() - holder.get("renewed", 0)
    return (f"host {holder.get('host')!r}, pid {holder.get('pid')}, started {started}, last "
            f"renewed {age:.0f} s ago")

  def _is_stale(self, holder: dict[str, Any]) -> bool:
    if time.time() - holder.get("renewed", 0) > self.timeout_s:
      return True
    # A holder on this very host whose process is gone (killed, crashed) is dead already.
    return holder.get("host") == self._holder["host"] and not _pid_alive(int(holder.get("pid", 0)))

  def acquire(self) -> None:
    """Claims the lease (taking over a stale one) and starts renewing it in the background.

    Raises WorkdirBusyError naming the live holder."""
    for _ in range(3):  # another claimant may win a race between our read and our write
      current = self._store.read(LEASE_FILE).result()
      if current.state == "missing":
        written = self._store.write(LEASE_FILE, self._record(),
                                    if_equal=current.stamp.generation).result()
      else:
        holder = json.loads(current.value)
        if not self._is_stale(holder):
          raise WorkdirBusyError(
              f"{self.workdir} is in use by another live run ({self._describe(holder)}). Stop "
              f"that run first, or use another --workdir. A run that died without releasing "
              f"its lease ({LEASE_FILE}) is taken over once it is {self.timeout_s:.0f} s old "
              "(config train.lease_timeout_s).")
        logging.warning("Taking over the lease of %s from a run that stopped renewing it (%s).",
                        self.workdir, self._describe(holder))
        written = self._store.write(LEASE_FILE, self._record(),
                                    if_equal=current.stamp.generation).result()
      if written.generation:  # an empty generation: the condition failed, somebody else wrote
        self._generation = written.generation
        self._thread = threading.Thread(target=self._renew_until_stopped, daemon=True,
                                        name="workdir-lease")
        self._thread.start()
        return
    raise WorkdirBusyError(f"{self.workdir}: another run claimed the lease at the same time.")

  def renew(self) -> None:
    """Rewrites the lease if this run still holds it; raises LeaseLostError otherwise."""
    written = self._store.write(LEASE_FILE, self._record(), if_equal=self._generation).result()
    if not written.generation:
      current = self._store.read(LEASE_FILE).result()
      holder = json.loads(current.value) if current.state == "value" else {}
      raise LeaseLostError(
          f"The lease of {self.workdir} was taken over by another run ({self._describe(holder)}"
          "); this run stops so that the two do not write checkpoints over each other.")
    self._generation = written.generation

  def _renew_until_stopped(self) -> None:
    while not self._stop.wait(self.timeout_s / 5):
      try:
        self.renew()
      except LeaseLostError as err:
        self.lost = err
        return
      except Exception as err:  # pylint: disable=broad-except  (storage hiccup: try again)
        logging.warning("Renewing the lease of %s failed (%s); retrying.", self.workdir, err)

  def check(self) -> None:
    """Raises LeaseLostError if another run took the lease over (called by the train loop)."""
    if self.lost is not None:
      raise self.lost

  def release(self) -> None:
    """Stops renewing and deletes the lease if this run still holds it."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self._generation is not None and self.lost is None:
      self._store.write(LEASE_FILE, None, if_equal=self._generation).result()
      self._generation = None

  def __enter__(self) -> "WorkdirLease":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
