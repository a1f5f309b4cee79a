"""Issue 18's attempts at a faster step, each timed beside the step as it is, in one process.

  taskset -c 1 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
    python benchmarks/step_attempts.py --variant=self_flow --attempts=jax_attention,unrolled_scan

An attempt swaps one piece of the model or step while the bench variant (self_flow/bench.py) is
traced and compiled; `current` is the code as it is. All of them are then stepped interleaved
under the CPU reference protocol (`bench.run_interleaved`), and the median process-CPU seconds of
each are printed with their ratio to `current` and the last loss (the same for every attempt
that keeps the math). The attempts kept are in the library already; the rest live only here, so
the numbers in benchmarks/RESULTS.md can be rerun.
"""

import argparse
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from configs import c2i
from self_flow import bench, sharding
from self_flow.models import attention, layers, scanning


@contextlib.contextmanager
def swapped(owner, name, value):
  """owner.name = value for the duration (tracing and compiling happen inside)."""
  original = getattr(owner, name)
  setattr(owner, name, value)
  try:
    yield
  finally:
    setattr(owner, name, original)


def jax_attention():
  """The XLA attention before issue 18: jax.nn.dot_product_attention's grouped-query form."""

  def attend(q, k, v, key_mask=None):
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")

  return swapped(attention, "xla_attention", attend)


def _small_table(per_token):
  """gather_rows that uses `per_token(table, index)` for 2 to 4 rows per example."""
  gather = layers.gather_rows

  def rows(table, index):
    return per_token(table, index) if 1 < table.shape[1] <= 4 else gather(table, index)

  return swapped(layers, "gather_rows", rows)


def select_gather():
  """adaLN rows picked by a chain of selects instead of a gather (fusable into consumers)."""

  def select(table, index):
    rows = table[:, :1]
    for k in range(1, table.shape[1]):
      rows = jnp.where(index[..., None] == k, table[:, k:k + 1], rows)
    return rows

  return _small_table(select)


def onehot_gather():
  """adaLN rows as a one-hot (B, N, K) x (B, K, F) product instead of a gather."""
  return _small_table(lambda table, index: jnp.einsum(
      "bnk,bkf->bnf", jax.nn.one_hot(index, table.shape[1], dtype=table.dtype), table))


def joint_modulation():
  """The adaLN table gathered whole, (B, N, 6D), then split (before issue 18: the gradients of
  the six parts are concatenated back to (B, N, 6D))."""

  def block(self, x, cond, cond_index):
    mod = layers.gather_rows(self.modulation(jax.nn.silu(cond)), cond_index)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
    x = sharding.constrain(
        x + gate_a * self.attn(layers.modulate(layers.layer_norm(x), shift_a, scale_a)),
        layers.TOKENS)
    return sharding.constrain(
        x + gate_m * self.mlp(layers.modulate(layers.layer_norm(x), shift_m, scale_m)),
        layers.TOKENS)

  return swapped(layers.AdaLNBlock, "__call__", block)


def _scan(unroll, policy=None):
  """scan_segment with lax.scan's `unroll` and, given, another rematerialisation policy."""
  scan_segment = scanning.scan_segment

  def segment(blocks, carry, start, end, apply, remat_policy):
    if policy is not None:
      return scan_segment(blocks, carry, start, end, apply, policy)
    if start >= end:
      return carry
    graphdef, stacked_state = nnx.split(blocks)
    part = jax.tree.map(lambda a: a[start:end], stacked_state)
    body = lambda c, s: (apply(nnx.merge(graphdef, s), c), None)
    return jax.lax.scan(body, carry, part, unroll=unroll)[0]

  return swapped(scanning, "scan_segment", segment)


def unrolled_scan():
  """Every scanned segment fully unrolled (no stacked residuals, no dynamic slices)."""
  return _scan(unroll=True)


def scan_unroll_2():
  return _scan(unroll=2)


def remat_dots():
  """Rematerialise everything but the matmuls (fewer stacked residuals, more elementwise)."""
  return _scan(unroll=1, policy="dots")


def transposed_kernel_grad():
  """Dense's kernel gradient as (materialised x^T) @ g, a dot contracting lhs's last dim (the
  form XLA sends to YNNPACK) instead of x contracted over its rows (Eigen)."""

  @jax.custom_vjp
  def matmul(x, w):
    return x @ w

  def forward(x, w):
    return x @ w, (x, w)

  def backward(residuals, g):
    x, w = residuals
    return g @ w.T, jax.lax.optimization_barrier(x.T) @ g

  matmul.defvjp(forward, backward)

  def call(self, inputs):
    y = matmul(inputs.reshape(-1, inputs.shape[-1]), self.kernel[...])
    y = y if self.bias is None else y + self.bias[...]
    return y.reshape(*inputs.shape[:-1], y.shape[-1])

  return swapped(layers.Dense, "__call__", call)


ATTEMPTS = {
    "current": contextlib.nullcontext,
    "jax_attention": jax_attention,
    "select_gather": select_gather,
    "onehot_gather": onehot_gather,
    "joint_modulation": joint_modulation,
    "unrolled_scan": unrolled_scan,
    "scan_unroll_2": scan_unroll_2,
    "remat_dots": remat_dots,
    "transposed_kernel_grad": transposed_kernel_grad,
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="self_flow", choices=sorted(bench.VARIANTS))
  parser.add_argument("--attempts", default=",".join(a for a in ATTEMPTS if a != "current"),
                      help=f"comma-separated, from {sorted(ATTEMPTS)}; `current` is always run")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=6)
  args = parser.parse_args()
  names = ["current"] + [a for a in args.attempts.split(",") if a and a != "current"]
  unknown = [a for a in names if a not in ATTEMPTS]
  if unknown:
    parser.error(f"unknown attempts {unknown}; choose from {sorted(ATTEMPTS)}")
  flags.FLAGS.mark_as_parsed()  # bench's absl flags are defined but not parsed here
  config = c2i.get_config("cpu_reference")
  prepared = {}
  for name in names:
    with ATTEMPTS[name]():
      prepared[name] = bench.prepare(config, args.variant)
  timing = bench.run_interleaved(prepared, args.warmup, args.repeats)
  base = np.median(timing["current"].cpu)
  print(f"{args.variant}, {args.warmup} warm-up + {args.repeats} interleaved steps each")
  print("| attempt | CPU s/step median | min | / current | last loss |\n|---|---|---|---|---|")
  for name in names:
    cpu = timing[name].cpu
    print(f"| {name} | {np.median(cpu):.3f} | {min(cpu):.3f} | {np.median(cpu) / base:.3f} "
          f"| {timing[name].losses[-1]:.6f} |")


if __name__ == "__main__":
  main()
