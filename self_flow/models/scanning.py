"""Blocks stored stacked (leading "layers" axis) and run as scanned segments with rematerialisation.

Scanning keeps compile time flat in depth; segment boundaries are where the Self-Flow feature
taps sit, so tapping a layer or stopping the teacher there costs nothing extra.
"""

from collections.abc import Callable

import jax
from flax import nnx

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat_policy(name: str) -> None:
  if name not in REMAT_POLICIES:
    raise ValueError(f"model.remat_policy={name!r}; allowed: {sorted(REMAT_POLICIES)}.")


def stacked(make: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
  """`count` independently initialised copies of `make(rngs)`, stacked on a "layers" axis."""

  @nnx.split_rngs(splits=count)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def build(block_rngs):
    return make(block_rngs)

  return build(rngs)


def scan_segment(blocks: nnx.Module, carry, start: int, end: int,
                 apply: Callable[[nnx.Module, object], object], remat_policy: str,
                 scan_layers: bool = True):
  """carry <- apply(block_i, carry) for stacked blocks i in [start, end), under one lax.scan.

  `scan_layers=False` (model.scan_layers) unrolls the scan fully: straight-line code, so no stacked
  residuals are written and read back by dynamic slices, at a compile time that grows with
  depth. On one CPU core it made the Self-Flow step of `c2i.py:cpu_reference`, whose segments
  are 4 blocks, 6% faster and the vanilla step, one 12-block segment, 6% slower
  (benchmarks/RESULTS.md).
  """
  if start >= end:
    return carry
  graphdef, stacked_state = nnx.split(blocks)
  segment = jax.tree.map(lambda a: a[start:end], stacked_state)

  def body(c, block_state):
    return apply(nnx.merge(graphdef, block_state), c), None

  if remat_policy != "none":
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat_policy])
  return jax.lax.scan(body, carry, segment, unroll=1 if scan_layers else True)[0]
