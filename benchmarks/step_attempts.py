"""Issue 18's attempts at a faster step, each timed beside the step as it is, in one process.

  taskset -c 1 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
    python benchmarks/step_attempts.py --variant=self_flow --attempts=jax_attention,unrolled_blocks

An attempt swaps one piece of the model or step while the bench variant (self_flow/bench.py) is
traced and compiled, or changes config keys; `current` is the code and config as they are. All of them are then stepped interleaved
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

from configs import c2i
from self_flow import bench, sharding
from self_flow.models import attention, layers, scanning

import profile_step  # benchmarks/, the script's own folder


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


def scan_unroll_2():
  """Blocks scanned two per loop iteration (lax.scan unroll=2)."""
  scan = jax.lax.scan

  def scan_by_two(*args, **kwargs):
    return scan(*args, **{**kwargs, "unroll": 2})

  return swapped(scanning.jax.lax, "scan", scan_by_two)


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


def overrides(**values):
  """An attempt that changes config keys, not code (nested keys as model__scan_layers)."""
  return contextlib.nullcontext, {k.replace("__", "."): v for k, v in values.items()}


# name -> (context manager factory active while the step compiles, config overrides)
ATTEMPTS = {
    "current": (contextlib.nullcontext, {}),
    "jax_attention": (jax_attention, {}),
    "joint_modulation": (joint_modulation, {}),
    "select_gather": (select_gather, {}),
    "onehot_gather": (onehot_gather, {}),
    "unrolled_blocks": overrides(model__scan_layers=False),
    "scan_unroll_2": (scan_unroll_2, {}),
    "remat_dots": overrides(model__remat_policy="dots"),
    "transposed_kernel_grad": (transposed_kernel_grad, {}),
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
  prepared = {}
  for name in names:
    patch, values = ATTEMPTS[name]
    config = c2i.get_config("cpu_reference")
    profile_step.apply_overrides(config, values)
    with patch():
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
