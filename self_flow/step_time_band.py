"""A step-time band for a compiled train step: a model of the compiled program on a chip, not a
measurement.

Three times per step and chip, each from the compiled program and the chip's public figures
(`CHIPS`):

  compute        = FLOPs per chip / peak bf16 FLOP/s
  memory         = bytes accessed per chip / HBM bandwidth
  communication  = sum over the program's collectives of the bytes a chip receives in them, each
                   over the ICI links its group spans (`collective_seconds`)

The lower bound is the largest of the three (everything overlaps perfectly), the upper bound
their sum (nothing overlaps). From the band: tokens and examples per second and the model FLOP
utilisation range (analytic model FLOPs per chip / peak / step time, `Throughput`).

How a collective is priced. Each chip of a group of g receives, per execution with a result of
r bytes: all-gather and all-to-all r (g - 1) / g, all-reduce 2 r (g - 1) / g (ring: a
reduce-scatter then an all-gather), reduce-scatter r (g - 1), collective-permute and
collective-broadcast r. It receives over the links of the torus dimensions the group spans: the
fewest of the topology's dimensions (largest first) whose chips number at least g, two links
per dimension (one neighbour each way), at most the chip's ports, each at the per-direction
link bandwidth. That is optimistic for a single ring of permutes (one link) and exact for a
bandwidth-optimal collective on a full torus; slices connected by the data-center network
(multi-slice) are not priced.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation's public figures (benchmarks/TPU_AOT.md names the sources)."""

  name: str
  peak_flops: float  # Peak bf16 FLOP/s per chip.
  hbm_bandwidth: float  # HBM bytes/s per chip.
  ici_bandwidth: float  # Bidirectional ICI bytes/s per chip, all ports together.
  ports: int  # ICI ports (links) per chip.

  @property
  def link_bandwidth(self) -> float:
    """Bytes/s one link carries in one direction."""
    return self.ici_bandwidth / self.ports / 2


# Cloud TPU documentation (cloud.google.com/tpu/docs/v5e, /v5p, /v6e), keyed by JAX device kind.
CHIPS = {
    "TPU v5 lite": Chip("v5e", 197e12, 819e9, 400e9, 4),
    "TPU v5": Chip("v5p", 459e12, 2765e9, 1200e9, 6),
    "TPU v6 lite": Chip("v6e", 918e12, 1638e9, 800e9, 4),
}
# A collective's result bytes r on a group of g chips -> bytes each chip receives.
RECEIVED = {
    "all-gather": lambda r, g: r * (g - 1) / g,
    "all-to-all": lambda r, g: r * (g - 1) / g,
    "ragged-all-to-all": lambda r, g: r * (g - 1) / g,
    "all-reduce": lambda r, g: 2 * r * (g - 1) / g,
    "reduce-scatter": lambda r, g: r * (g - 1),
    "collective-permute": lambda r, g: r,
    "collective-broadcast": lambda r, g: r,
}


def chip(device_kind: str) -> Chip:
  """The figures of a JAX TPU device kind ("TPU v5 lite", ...)."""
  if device_kind not in CHIPS:
    raise ValueError(f"device kind {device_kind!r} has no figures in "
                     f"self_flow.step_time_band.CHIPS (known: {sorted(CHIPS)}).")
  return CHIPS[device_kind]


def torus_dims(topology: str) -> tuple[int, ...]:
  """'v5p:2x2x4' -> (2, 2, 4): the chips along each dimension of the slice."""
  _, _, shape = topology.partition(":")
  try:
    dims = tuple(int(d) for d in shape.split("x"))
  except ValueError:
    dims = ()
  if not dims or min(dims) < 1:
    raise ValueError(f"topology {topology!r} must look like v5e:4x4 or v5p:2x2x4.")
  return dims


def links_spanned(group: int, dims: Sequence[int], ports: int) -> int:
  """ICI links into a chip that a group of `group` chips spans: 2 per torus dimension of the
  fewest (largest first) that hold the group, at most `ports`; 0 for a group of one."""
  if group <= 1:
    return 0
  covered, used = 1, 0
  for extent in sorted((d for d in dims if d > 1), reverse=True):
    covered *= extent
    used += 1
    if covered >= group:
      break
  return min(2 * max(used, 1), ports)


def collective_seconds(kind: str, result_bytes: float, group: int, dims: Sequence[int],
                       the_chip: Chip) -> float:
  """Seconds a chip spends receiving one kind's `result_bytes` (per step) in groups of `group`
  chips (0 = every chip of the slice) on a slice of `dims`."""
  group = group or math.prod(dims)
  links = links_spanned(group, dims, the_chip.ports)
  if links == 0:
    return 0.0
  return RECEIVED[kind](result_bytes, group) / (links * the_chip.link_bandwidth)


@dataclasses.dataclass(frozen=True)
class Band:
  """Seconds per step of one chip, by resource, and the band they make."""

  compute: float
  memory: float
  communication: float

  @property
  def lower(self) -> float:
    return max(self.compute, self.memory, self.communication)

  @property
  def upper(self) -> float:
    return self.compute + self.memory + self.communication

  @property
  def bound_by(self) -> str:
    """The resource whose time is the lower bound."""
    times = {"compute": self.compute, "memory": self.memory,
             "communication": self.communication}
    return max(times, key=times.get)


def band(flops: float, bytes_accessed: float,
         collectives: Mapping[tuple[str, int], float], dims: Sequence[int],
         the_chip: Chip) -> Band:
  """The band of a step whose program does `flops` and accesses `bytes_accessed` per chip and
  whose collectives move {(kind, group size): result bytes per step} per chip."""
  communication = sum(collective_seconds(kind, size, group, dims, the_chip)
                      for (kind, group), size in collectives.items())
  return Band(flops / the_chip.peak_flops, bytes_accessed / the_chip.hbm_bandwidth,
              communication)


@dataclasses.dataclass(frozen=True)
class Throughput:
  """What a band means for a run: rates at the upper and at the lower step time."""

  tokens_per_chip_per_s: tuple[float, float]  # (slowest, fastest)
  examples_per_s: tuple[float, float]  # the whole slice
  mfu: tuple[float, float]  # model FLOPs / peak, (slowest, fastest)


def throughput(the_band: Band, *, tokens_per_step: float, examples_per_step: float,
               chips: int, model_flops_per_chip: float, the_chip: Chip) -> Throughput:
  """Rates of a step of `examples_per_step` examples with `tokens_per_step` generated tokens (the
  whole slice) whose analytic model FLOPs per chip are `model_flops_per_chip`."""
  slow, fast = the_band.upper, the_band.lower
  return Throughput(
      (tokens_per_step / chips / slow, tokens_per_step / chips / fast),
      (examples_per_step / slow, examples_per_step / fast),
      (model_flops_per_chip / the_chip.peak_flops / slow,
       model_flops_per_chip / the_chip.peak_flops / fast))


def program_cost(compiled) -> tuple[float, float]:
  """(FLOPs, bytes accessed) per device of a compiled program, from XLA's cost analysis.

  XLA counts a `while` body once, so a program with scanned layers under-counts: compile with
  model.scan_layers=False for these figures. Custom calls (the Mosaic splash-attention kernel)
  are opaque to it: their FLOPs are missing, their operands and results are counted."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # one entry per program in older jax releases
    cost = cost[0]
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
