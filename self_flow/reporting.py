"""Metric writers (TensorBoard via clu), the training metric window, the console progress line
and the throughput numbers.

Every metric goes to TensorBoard; the console gets one short line per log step (step/total,
loss, rate, ETA) instead of clu's line of every scalar, which is unreadable at a glance.

The step's FLOPs are the analytic model FLOPs of `self_flow.flops` (student forward + backward,
projector head, teacher forward up to its layer), not XLA's cost analysis: that counts the body
of every scanned block segment once, so it understates a 28-block model several-fold.
"""

import logging
import os
import time

import jax
import numpy as np
from absl import logging as absl_logging
from clu import metric_writers, periodic_actions

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

# Peak dense bf16 TFLOP/s per device, for MFU (maxtext's table; GPUs: dense tensor-core peak).
PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
}


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard event files on process 0 (asynchronous); nothing on the other processes."""
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(workdir)])


def show_only_own_info_logs() -> None:
  """Keeps the console readable: INFO lines of self_flow's own modules (progress, compilations,
  evaluations, checkpoints restored) and warnings and errors of every library; orbax, grain and
  tfds log dozens of INFO lines per checkpoint or dataset otherwise (main.py's
  --library_info_logs keeps them)."""
  absl_logging.set_verbosity(absl_logging.INFO)
  # absl's logger and its handler, which also prints other loggers' records (jax's, ...); a
  # filter already there is not added twice (a notebook cell run again).
  absl_logging.get_absl_logger().addFilter(_own_or_warning)
  absl_logging.get_absl_handler().addFilter(_own_or_warning)


def _own_or_warning(record: logging.LogRecord) -> bool:
  return (record.levelno >= logging.WARNING
          or os.path.abspath(record.pathname).startswith(_PACKAGE_DIR))


def _duration(seconds: float) -> str:
  """1h02m, 4m05s or 7s."""
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def progress_line(step: int, num_steps: int, loss: float, steps_per_sec: float) -> str:
  """"step 120/1500 (8%) | loss 0.4123 | 1.83 s/step | ETA 42m06s": the rate as steps/s when at
  least one step per second, else as s/step, with three significant digits either way."""
  if steps_per_sec >= 1:
    rate = f"{steps_per_sec:.3g} steps/s"
  else:
    rate = f"{1 / max(steps_per_sec, 1e-9):.3g} s/step"
  eta = _duration((num_steps - step) / max(steps_per_sec, 1e-9))
  return (f"step {step}/{num_steps} ({100 * step / num_steps:.0f}%) | loss {loss:.4f} | {rate} | "
          f"ETA {eta}")


def peak_tflops_per_device(configured: float) -> float | None:
  """The configured peak, else a lookup by device kind; None where unknown (e.g. CPU)."""
  if configured > 0:
    return configured
  kind = jax.devices()[0].device_kind
  for prefix, peak in PEAK_TFLOPS.items():
    if kind.startswith(prefix):
      return peak
  return None


def throughput_metrics(step_flops: float | None, steps_per_sec: float, peak: float | None
                       ) -> dict[str, float]:
  """TFLOP/s per device and MFU from FLOPs per step per device and the step rate."""
  if step_flops is None or steps_per_sec <= 0:
    return {}
  tflops = step_flops * steps_per_sec / 1e12
  metrics = {"perf/tflops_per_device": tflops}
  if peak:
    metrics["perf/mfu"] = tflops / peak
  return metrics


def mean_metrics(window: list[dict[str, np.ndarray]]) -> dict[str, float]:
  """Averages a window of per-step host metrics."""
  return {key: float(np.mean([m[key] for m in window])) for key in window[0]}


def periodic_hooks(workdir: str, profile: bool) -> list:
  """With `profile`, a jax.profiler trace of a few steps on process 0 (TensorBoard's profile
  tab); the progress itself is the console line and perf/steps_per_sec."""
  if profile and jax.process_index() == 0:
    return [periodic_actions.Profile(logdir=workdir, num_profile_steps=5)]
  return []


class MetricWindow:
  """The host metrics of the steps since the last log step, written as one set of scalars.

  At each log step (every `log_every` steps and the last one) it writes the window's means
  (overall and, with several modalities, per modality with how often each was drawn), the
  running count of skipped non-finite steps, the step rate over the window's wall time
  (compiles excluded, see `exclude`), TFLOP/s and MFU, then logs the progress line and starts
  a new window.
  """

  def __init__(self, writer: metric_writers.MetricWriter, *, modalities: tuple[str, ...],
               step_flops: dict[str, float], peak_tflops: float | None, log_every: int,
               num_steps: int):
    self._writer = writer
    self._modalities = modalities
    self._step_flops = step_flops  # modality -> model FLOPs per step per device
    self._peak = peak_tflops
    self._log_every = log_every
    self._num_steps = num_steps
    self._entries: list[tuple[str, dict[str, np.ndarray]]] = []
    self._start = time.time()

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (a compile) out of the window's wall time: the rate counts steps only."""
    self._start += seconds

  def add(self, step: int, modality: str, host: dict[str, np.ndarray]) -> None:
    """Adds step `step`'s host metrics; writes and restarts the window at a log step."""
    self._entries.append((modality, host))
    if step % self._log_every == 0 or step == self._num_steps:
      self._write(step)

  def _write(self, step: int) -> None:
    entries = self._entries
    elapsed = time.time() - self._start
    scalars = {f"train/{k}": v for k, v in mean_metrics([m for _, m in entries]).items()}
    if len(self._modalities) > 1:  # per-modality means, and how often each modality was drawn
      for modality in self._modalities:
        drawn = [m for n, m in entries if n == modality]
        scalars[f"train/{modality}/fraction_of_steps"] = len(drawn) / len(entries)
        if drawn:
          scalars.update({f"train/{modality}/{k}": v for k, v in mean_metrics(drawn).items()})
    # A running total: its latest value, not the window mean (train/finite is the fraction).
    scalars["train/nonfinite_steps"] = float(entries[-1][1]["nonfinite_steps"])
    steps_per_sec = len(entries) / max(elapsed, 1e-9)
    scalars["perf/steps_per_sec"] = steps_per_sec
    mean_flops = float(np.mean([self._step_flops[n] for n, _ in entries]))
    scalars.update(throughput_metrics(mean_flops, steps_per_sec, self._peak))
    self._writer.write_scalars(step, scalars)
    absl_logging.info("%s", progress_line(step, self._num_steps, scalars["train/loss"],
                                          steps_per_sec))
    self._entries = []
    self._start = time.time()
