"""Which accelerator this host has, read from the operating system rather than from JAX.

JAX falls back to the CPU without an error when its TPU or CUDA plugin is missing, so a TPU VM or
GPU host set up with a plain `pip install -e .` would train on its CPU. `launch/setup.sh` runs
this file (`python self_flow/accelerators.py` prints the pip extra to install), and the trainer
compares the host's accelerator with JAX's backend and warns. Standard library only, so that it
runs before anything is installed.
"""

import glob
import os

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


if __name__ == "__main__":
  print(EXTRAS.get(host_accelerator() or "", ""))
