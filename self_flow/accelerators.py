"""Which accelerator this host has, read from the operating system rather than from JAX.

JAX falls back to the CPU without an error when its TPU or CUDA plugin is missing, so a TPU VM or
GPU host set up with a plain `pip install -e .` would train on its CPU. `launch/setup.sh` runs
this file (`python self_flow/accelerators.py` prints the pip extra to install), and the trainer
compares the host's accelerator with JAX's backend and warns. Standard library only, so that it
runs before anything is installed.
"""

import glob
import os
from collections.abc import Sequence

# Host accelerator -> the extra of pyproject.toml that brings JAX's plugin for it.
EXTRAS = {"tpu": "tpu", "gpu": "cuda12"}


def host_accelerator() -> str | None:
  """"tpu" or "gpu" when the kernel exposes one (TPU VMs: /dev/accel* or VFIO groups; NVIDIA
  drivers: /dev/nvidia0...), else None."""
  if (glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
      or os.environ.get("TPU_ACCELERATOR_TYPE")):
    return "tpu"
  if glob.glob("/dev/nvidia[0-9]*"):
    return "gpu"
  return None


def unused_accelerator_warning(backend: str) -> str | None:
  """A warning when the host has a TPU/GPU but JAX's `backend` is the CPU, unless the CPU was
  asked for (JAX_PLATFORMS=cpu); None otherwise."""
  host = host_accelerator()
  if host is None or backend != "cpu" or os.environ.get("JAX_PLATFORMS", "").lower() == "cpu":
    return None
  extra = EXTRAS[host]
  return (f"This host has a {host.upper()}, but JAX sees only the CPU: training here runs on the "
          f"CPU, orders of magnitude slower. JAX's {host.upper()} plugin is not installed; "
          f"install it with `pip install -e \".[{extra}]\"` in the checkout (or "
          f"`pip install \"jax[{extra}]\"` at the installed jax version), then check with "
          "`python -c 'import jax; print(jax.devices())'`. Set JAX_PLATFORMS=cpu to train on "
          "the CPU on purpose and silence this.")


def usable_cores() -> int:
  """CPU cores this process may run on (its affinity mask where the OS has one)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def cpu_device_count(requested: int, batch_sizes: Sequence[int], cores: int) -> int | None:
  """XLA CPU devices to split the host into (`mesh.cpu_devices`), or None to leave JAX's setting.

  XLA:CPU runs the small matmuls of a CPU-sized model on about one core, but it runs the
  per-device programs of a data-parallel mesh concurrently, so one device per core uses them
  all (t2i local on 2 cores: 1.92 -> 3.57 steps/s, same losses). `requested` -1 leaves JAX's
  setting (one device, or XLA_FLAGS' --xla_force_host_platform_device_count), n >= 1 asks for
  n, and 0 for the most devices, at most `cores`, that divide every batch in `batch_sizes`.
  """
  if not isinstance(requested, int) or requested < -1:
    raise ValueError(f"config.mesh.cpu_devices={requested!r}: allowed are -1 (JAX's setting), "
                     "0 (one per usable core that divides the batch sizes) or an integer >= 1.")
  if requested == -1:
    return None
  if requested >= 1:
    return requested
  return max(n for n in range(1, max(cores, 1) + 1) if all(b % n == 0 for b in batch_sizes))


if __name__ == "__main__":
  print(EXTRAS.get(host_accelerator() or "", ""))
