"""Metric writers (TensorBoard + console via clu) and the throughput numbers we log.

The step's FLOPs are the analytic model FLOPs of `self_flow.flops` (student forward + backward,
projector head, teacher forward up to its layer), not XLA's cost analysis: that counts the body
of every scanned block segment once, so it understates a 28-block model several-fold.
"""

import jax
import numpy as np
from clu import metric_writers, periodic_actions

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
  """TensorBoard event files + console on process 0; console only elsewhere."""
  return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)


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


def periodic_hooks(num_steps: int, writer, workdir: str, profile: bool) -> list:
  """ReportProgress (steps/s, ETA) everywhere; a jax.profiler trace of a few steps on process 0."""
  hooks = [periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                           every_steps=None, every_secs=60.0)]
  if profile and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=5))
  return hooks
