"""The step-time band's method checked where a step can be timed: the CPU reference step.

  taskset -c 1 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
    python benchmarks/cpu_band.py [--variants=vanilla,self_flow] [--repeats=10]

For each variant of `configs/c2i.py:cpu_reference` (SiT-S/2, 256 tokens, batch 8, fp32, one
device) it prints the band that `self_flow.step_time_band` predicts from XLA:CPU's cost analysis
of the step compiled with unrolled blocks (FLOPs and bytes accessed; no collectives on one
device) and this core's figures measured in the same run (the best fp32 2048^3 matmul as the
peak, the best copy of a 256 MiB array as the memory bandwidth), beside the measured median
step time of the step the trainer runs (`self_flow.bench`'s protocol: the trainer's compiled
step, interleaved repeats). The prediction holds when the measured time lies in the band.

It also prints what `hlo_collectives.cost` (the HLO parser that prices the TPU rows of
TPU_AOT.md, loops multiplied out) reads from the same unrolled program (checked against XLA's
count of it) and from the scanned program the trainer runs, with the band that count gives.
"""

import argparse
import os
import platform
import subprocess
import sys
from typing import NamedTuple

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import c2i
from self_flow import (bench, config_resolution, flops, hlo_collectives, step_time_band,
                       train_program)


def _compiled_step(config):
  resolved = config_resolution.resolve(config)  # as bench.setup: no data is read
  program = train_program.build(config, resolved)
  return train_program.lower(config, program, "image").compile(), resolved


class Costs(NamedTuple):
  """One variant's step counted three ways, per device."""

  xla_flops: float  # XLA's cost analysis of the unrolled step
  xla_bytes: float
  analytic_flops: float  # flops.py
  parsed_unrolled: hlo_collectives.Cost  # the TPU rows' parser on the same unrolled program
  parsed_scanned: hlo_collectives.Cost  # ... and on the scanned program the trainer runs


def step_costs(config) -> Costs:
  unrolled = config.copy_and_resolve_references()
  unrolled.model.scan_layers = False
  compiled, resolved = _compiled_step(unrolled)
  scanned, _ = _compiled_step(config)
  return Costs(*step_time_band.program_cost(compiled),
               flops.train_step_flops(unrolled, resolved, "image").total,
               hlo_collectives.cost(compiled.as_text()), hlo_collectives.cost(scanned.as_text()))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variants", default="vanilla,self_flow")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  model = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
  model = next((line.split(":", 1)[1].strip() for line in model.splitlines()
                if line.startswith("Model name")), platform.processor())
  peak = bench.measured_matmul_peak() * 1e9
  bandwidth = bench.measured_memory_bandwidth()
  cpu = step_time_band.Chip("cpu core", peak, bandwidth, 0.0, 1)
  print(f"{model}; jax {jax.__version__}; affinity {sorted(os.sched_getaffinity(0))}; "
        f"measured peak {peak / 1e9:.1f} GFLOP/s (fp32 matmul), memory {bandwidth / 1e9:.2f} "
        "GB/s (copy)")
  base = c2i.get_config("cpu_reference")
  prepared = {name: bench.prepare(base, name) for name in args.variants.split(",")}
  timing = bench.run_interleaved(prepared, args.warmup, args.repeats)
  print("| variant | XLA GFLOP (unrolled) | analytic GFLOP | GB accessed | compute s | memory s "
        "| band s (lower-upper) | measured median s | in the band | parser GFLOP / GB, unrolled "
        "| parser GFLOP / GB, scanned | band s from the scanned count |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for name in prepared:
    costs = step_costs(bench.variant_config(base, name))
    band = step_time_band.band(costs.xla_flops, costs.xla_bytes, {}, (1,), cpu)
    scanned = costs.parsed_scanned
    scanned_band = step_time_band.band(scanned.flops, scanned.hbm_bytes, {}, (1,), cpu)
    measured = float(np.median(timing[name].wall))
    inside = band.lower <= measured <= band.upper
    print(f"| {name} | {costs.xla_flops / 1e9:.1f} | {costs.analytic_flops / 1e9:.1f} | "
          f"{costs.xla_bytes / 1e9:.2f} | {band.compute:.3f} | {band.memory:.3f} | "
          f"{band.lower:.3f}-{band.upper:.3f} | {measured:.3f} | "
          f"{'yes' if inside else 'no: measured / upper = %.2f' % (measured / band.upper)} | "
          f"{costs.parsed_unrolled.flops / 1e9:.1f} / {costs.parsed_unrolled.hbm_bytes / 1e9:.2f} "
          f"| {scanned.flops / 1e9:.1f} / {scanned.hbm_bytes / 1e9:.2f} | "
          f"{scanned_band.lower:.3f}-{scanned_band.upper:.3f} |")

if __name__ == "__main__":
  main()
