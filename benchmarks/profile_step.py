"""Where one compiled train step's time goes, op by op, from a jax.profiler trace.

  taskset -c 1 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
    python benchmarks/profile_step.py --variant=self_flow --out=/tmp/step_trace

Compiles the bench variant (self_flow/bench.py) on the CPU reference config, runs two steps,
traces the third, and sums the XLA ops' durations: by kind (YNNPACK matmul fusions, Eigen dots,
elementwise fusions, ...), by the jax primitive and pass (forward or backward) behind every
non-matmul op, and the slowest ops with their shapes. The matmul rate printed beside it uses the
analytic FLOPs, so "matmul GFLOP/s" says how close the dots alone come to the core's peak.
"""

import argparse
import ast
import collections
import glob
import gzip
import json
import re
import shutil

import jax
from absl import flags

from configs import c2i
from self_flow import bench

MATMUL_KINDS = ("ynn_fusion", "dot")
# Trace events that are not XLA ops: the executor, Python frames, the layer loop around its body.
NOT_OPS = ("ThunkExecutor", "$", "while", "PjitFunction")


def op_durations(trace_dir: str) -> collections.Counter:
  """Microseconds per op name, summed over the trace's complete events."""
  path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
  with gzip.open(path) as f:
    trace = json.load(f)
  durations = collections.Counter()
  for event in trace["traceEvents"] if isinstance(trace, dict) else trace:
    if event.get("ph") == "X" and not event.get("name", "").startswith(NOT_OPS):
      durations[event["name"]] += event.get("dur", 0)
  return durations


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Op name -> (result shape, jax op_name metadata) from the optimised HLO."""
  pattern = r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) .*?op_name=\"([^\"]*)\""
  return {m[1]: (m[2], m[3]) for m in re.finditer(pattern, hlo_text, re.M)}


def apply_overrides(config, values: dict) -> None:
  """config.update_from_flattened_dict(values), refusing a key the config does not have (a typo
  would otherwise add a key nothing reads and time the unchanged step)."""
  sections = {key: key.partition(".") for key in values}
  unknown = [key for key, (section, _, field) in sections.items()
             if section not in config or field not in config[section]]
  if unknown:
    raise KeyError(f"config overrides {unknown} name no key of the config")
  config.update_from_flattened_dict(values)


def table(rows, header: str) -> str:
  total = sum(d for _, d in rows) or 1
  lines = [f"| {header} | ms | share |", "|---|---|---|"]
  return "\n".join(lines + [f"| {k} | {d / 1e3:.1f} | {100 * d / total:.1f}% |" for k, d in rows])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="self_flow", choices=sorted(bench.VARIANTS))
  parser.add_argument("--out", default="/tmp/step_trace", help="trace directory (replaced)")
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="config override, VALUE a Python literal (e.g. model.scan_layers=False)")
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()
  config = c2i.get_config("cpu_reference")
  apply_overrides(config, {key: ast.literal_eval(value)
                           for key, value in (o.split("=", 1) for o in args.set)})
  prepared = bench.prepare(config, args.variant)
  state = prepared.state
  for _ in range(2):
    state, metrics = prepared.step(state, prepared.batch, prepared.rng)
    jax.block_until_ready((state, metrics))
  shutil.rmtree(args.out, ignore_errors=True)
  with jax.profiler.trace(args.out, create_perfetto_trace=True):
    state, metrics = prepared.step(state, prepared.batch, prepared.rng)
    jax.block_until_ready((state, metrics))
  durations, ops = op_durations(args.out), hlo_ops(prepared.step.as_text())
  kinds, sources = collections.Counter(), collections.Counter()
  for name, d in durations.items():
    kind = re.sub(r"\.\d+$", "", name)
    kinds[kind] += d
    if kind not in MATMUL_KINDS:
      op_name = ops.get(name, ("?", "?"))[1]
      sources[(op_name.split("/")[-1],
               "backward" if "transpose(jvp" in op_name else "forward")] += d
  matmul_s = sum(kinds[k] for k in MATMUL_KINDS) / 1e6
  gflop = prepared.step_flops.total / 1e9
  print(f"{args.variant}: ops {sum(durations.values()) / 1e6:.3f} s, of which matmuls "
        f"{matmul_s:.3f} s for {gflop:.1f} GFLOP ({gflop / matmul_s:.1f} GFLOP/s)\n")
  print(table(kinds.most_common(args.top), "op kind") + "\n")
  print(table([(f"{p} ({pas})", d) for (p, pas), d in sources.most_common(args.top)],
              "non-matmul ops by jax primitive") + "\n")
  print("| slowest ops | ms | result | jax op |\n|---|---|---|---|")
  for name, d in durations.most_common(args.top):
    shape, op_name = ops.get(name, ("?", "?"))
    print(f"| {name} | {d / 1e3:.1f} | {shape} | {op_name.removeprefix('jit(train_step)/')} |")


if __name__ == "__main__":
  main()
