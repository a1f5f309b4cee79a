"""Step-time benchmark: vanilla FM, dual-timestep only, Self-Flow and naive per-token adaLN,
and optionally a PyTorch reference Self-Flow step.

One config, four train steps compiled exactly as the trainer compiles them (same mesh, shardings,
donated state), fed the same synthetic batch, timed side by side:

  vanilla          single timestep, no teacher         (method=vanilla)
  dual_timestep    dual-timestep noising, no teacher   (method=dual_timestep)
  self_flow        dual-timestep + EMA teacher + L_rep (method=self_flow)
  naive_adaln      self_flow with per-token adaLN computed for every token: the student gets a
                   (B, N) timestep table with index arange(N), i.e. one modulation row per token,
                   the cost the distinct-row gather avoids; it must give the same losses.

Opt-in, with torch installed (the `bench` extra: pip install -e ".[bench]"), on a CPU backend:

  torch_public     PyTorch Self-Flow step at public-trainer math: per-token adaLN and a full
                   teacher forward (self_flow/torch_reference).
  torch_equal      PyTorch Self-Flow step at our math: distinct-row adaLN, teacher truncated at
                   its layer; the same FLOPs as self_flow. Both torch variants start from the same
                   weights and draws, so they must give the same losses.

The torch steps run in this process, interleaved with ours under the same protocol, with one
intra-op thread when XLA is single-threaded (XLA_FLAGS below) and one per core of the affinity
mask otherwise; the report adds torch_public / self_flow and torch_equal / self_flow.

Repeats are interleaved (each round runs every variant once, in a rotated order), so a noisy
neighbour slows all variants alike. Every step blocks on its outputs before the clock stops. The
process CPU time of each step is reported too: pinned to one core it is the step time the core
would give on a quiet machine, so the CPU-time ratios stay meaningful when the machine is busy.
`--breakdown` adds where the Self-Flow step's time goes (teacher, backward, optimizer and EMA).
The module is one protocol end to end (variants, interleaved timing, the report RESULTS.md
records), a little over 450 lines, kept together so that what is timed and what is reported
cannot drift apart; the PyTorch steps themselves live in `self_flow.torch_reference`.

CPU reference protocol (one thread on one core, tcmalloc), as recorded in benchmarks/RESULTS.md:

  taskset -c 1 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \\
    python -m self_flow.bench --config=configs/c2i.py:cpu_reference

  and, against PyTorch in the same run: the same command with
  --variants=self_flow,torch_equal,torch_public

GPU (SiT-XL/2 Self-Flow, bf16; MFU against the device's bf16 peak):

  python -m self_flow.bench --config=configs/c2i.py:cpu_reference --config.model.preset=XL \\
    --config.model.compute_dtype=bfloat16 --config.model.attention=auto \\
    --config.data.global_batch_size=64 --repeats=20 \\
    --variants=vanilla,self_flow
"""

import contextlib
import datetime
import os
import platform
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from self_flow import (accelerators, base_config, config_resolution, flops, objectives,
                       reporting, torch_reference, train_program, train_state, train_step)
from self_flow.data import modality_sources
from self_flow.modalities import spec as spec_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Run configuration file.", lock_config=True)
flags.DEFINE_integer("warmup", 2, "Untimed steps per variant (the first one also compiles).")
flags.DEFINE_integer("repeats", 12, "Timed steps per variant; the table reports their median.")
flags.DEFINE_list("variants", ["vanilla", "dual_timestep", "self_flow", "naive_adaln"],
                  "Variants to time: any of the four, and torch_equal, torch_public (PyTorch "
                  "reference steps; need torch).")
flags.DEFINE_float("peak_gflops", 0.0,
                   "Peak GFLOP/s per device for MFU; 0 = the device table (accelerators) or a "
                   "measured fp32 matmul peak (CPU).")
flags.DEFINE_bool("breakdown", False,
                  "Also time the Self-Flow step's parts: forward without and with the teacher, "
                  "forward + backward, whole step.")


class Variant(NamedTuple):
  method: str  # base_config.METHODS key
  naive_adaln: bool


VARIANTS = {
    "vanilla": Variant("vanilla", False),
    "dual_timestep": Variant("dual_timestep", False),
    "self_flow": Variant("self_flow", False),
    "naive_adaln": Variant("self_flow", True),
}
# Opt-in PyTorch reference steps: variant -> torch_reference math.
TORCH_VARIANTS = {"torch_public": "public", "torch_equal": "equal"}


def variant_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """A copy of `config` with the variant's method (objective keys only)."""
  config = config.copy_and_resolve_references()
  base_config.apply_method(config, VARIANTS[name].method)
  return config


@contextlib.contextmanager
def per_token_adaln():
  """While tracing, every draw's conditioning table becomes one row per token (B, N) with index
  arange(N): the same per-token timesteps, so the same model function, at the naive cost."""
  draw_timesteps = objectives.draw_timesteps

  def per_token(*args, **kwargs):
    draw = draw_timesteps(*args, **kwargs)
    table = jnp.take_along_axis(draw.table, draw.index, axis=1)
    index = jnp.broadcast_to(jnp.arange(table.shape[1], dtype=jnp.int32), table.shape)
    return draw._replace(table=table, index=index)

  objectives.draw_timesteps = per_token
  try:
    yield
  finally:
    objectives.draw_timesteps = draw_timesteps


def synthetic_batch(config: ml_collections.ConfigDict, spec: spec_lib.ModalitySpec,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """A batch of `spec`'s modality with the pipeline's keys, shapes and dtypes
  (`modality_sources.batch_shapes`): Gaussian signal and embeddings, random labels and tokens
  (the step's cost does not depend on the values)."""
  rng = np.random.default_rng(seed)
  b = spec.global_batch_size
  batch = {}
  shapes = modality_sources.batch_shapes(config, spec)
  for key, (shape, dtype) in shapes.items():
    if key == "label":
      batch[key] = rng.integers(0, config.data.num_classes, (b,), np.int32)
    elif key == "text_tokens":
      batch[key] = rng.integers(1, 256, (b, *shape), np.int32)
    elif key == "text_mask":
      batch[key] = np.ones((b, *shape), bool)
    else:
      batch[key] = rng.standard_normal((b, *shape)).astype(dtype)
  return batch


class Prepared(NamedTuple):
  """One variant ready to run: its compiled step and the arguments it consumes."""

  step: Any  # compiled (state, batch, rng) -> (state, metrics), state donated
  state: Any
  batch: Any
  rng: jax.Array
  step_flops: flops.StepFlops  # analytic, global batch


class Setup(NamedTuple):
  """The trainer's program (`train_program.build`), a fresh state and a synthetic batch."""

  program: train_program.TrainProgram
  state: Any
  batch: Any
  rng: jax.Array


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Program, sharded fresh state and a sharded synthetic batch, as the trainer has them."""
  resolved = config_resolution.resolve(config)
  program = train_program.build(config, resolved)
  state = train_state.create_train_state(config, program.layout, program.tx, resolved)
  batch = jax.device_put(synthetic_batch(config, resolved.first_spec), program.batch_sharding)
  rng = jax.device_put(jax.random.PRNGKey(config.seed), program.replicated)
  return Setup(program, state, batch, rng)


def torch_threads() -> int:
  """Intra-op threads for torch: 1 when XLA_FLAGS make XLA's CPU backend single-threaded (the
  CPU reference protocol), else one per core in the affinity mask, as XLA uses."""
  if "--xla_cpu_multi_thread_eigen=false" in os.environ.get("XLA_FLAGS", ""):
    return 1
  return accelerators.usable_cores()


def prepare_torch(config: ml_collections.ConfigDict, name: str) -> Prepared:
  """A PyTorch reference step on the synthetic batch ours gets; its state is the step object."""
  if jax.default_backend() != "cpu":
    raise ValueError(f"--variants={name}: the PyTorch reference runs on the CPU, but JAX runs on "
                     f"{jax.default_backend()!r}; compare on a CPU backend.")
  setting = torch_reference.setting(config)
  spec = config_resolution.resolve(config).first_spec
  batch = synthetic_batch(config, spec)
  reference = torch_reference.make_step(setting, TORCH_VARIANTS[name], spec.signal(batch),
                                        batch["label"], threads=torch_threads())
  return Prepared(lambda state, _batch, _rng: (state, state.step()), reference, None, None,
                  torch_reference.step_flops(setting, TORCH_VARIANTS[name]))


def prepare(config: ml_collections.ConfigDict, name: str) -> Prepared:
  """Builds state and step as `train.train_and_evaluate` does, and compiles the step."""
  if name in TORCH_VARIANTS:
    return prepare_torch(config, name)
  config = variant_config(config, name)
  s = setup(config)
  step = next(iter(s.program.step_fns.values()))
  naive = VARIANTS[name].naive_adaln
  with per_token_adaln() if naive else contextlib.nullcontext():
    compiled = step.lower(s.state, s.batch, s.rng).compile()
  resolved = s.program.resolved
  tokens = resolved.first_spec.num_tokens
  return Prepared(compiled, s.state, s.batch, s.rng,
                  flops.train_step_flops(config, resolved, rows=tokens if naive else None))


class Timing(NamedTuple):
  """Wall and process-CPU seconds of every timed step, and the losses of every step."""

  wall: list[float]
  cpu: list[float]
  losses: list[float]


def run_interleaved(prepared: dict[str, Prepared], warmup: int, repeats: int
                    ) -> dict[str, Timing]:
  """warmup + repeats rounds; each round steps every variant once, rotating which goes first.

  Each step blocks on its whole output (state and metrics, hence the loss) before the clock
  stops, so no work leaks into the next measurement.
  """
  names = list(prepared)
  states = {n: p.state for n, p in prepared.items()}
  timing = {n: Timing([], [], []) for n in names}
  for round_index in range(warmup + repeats):
    shift = round_index % len(names)
    for name in names[shift:] + names[:shift]:
      p = prepared[name]
      wall, cpu = time.perf_counter(), time.process_time()
      states[name], metrics = p.step(states[name], p.batch, p.rng)
      jax.block_until_ready((states[name], metrics))
      wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
      timing[name].losses.append(float(metrics["loss"]))
      if round_index >= warmup:
        timing[name].wall.append(wall)
        timing[name].cpu.append(cpu)
  return timing


# Pairs of variants that compute the same losses in a different way (same init, batch and step
# randomness, so the same numbers up to float rounding): (label, variant, reference variant).
SAME_LOSSES = (("naive vs distinct-row adaLN", "naive_adaln", "self_flow"),
               ("PyTorch public vs equal math", "torch_public", "torch_equal"))


def check_same_losses(timing: dict[str, Timing], rtol: float = 1e-4) -> dict[str, float]:
  """Max relative loss difference over every step of each timed `SAME_LOSSES` pair; raises
  above rtol."""
  diffs = {}
  for label, name, reference in SAME_LOSSES:
    if name not in timing or reference not in timing:
      continue
    got, want = np.asarray(timing[name].losses), np.asarray(timing[reference].losses)
    diff = float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-12)))
    if not diff <= rtol:
      raise AssertionError(f"{label}: {name} losses {got} differ from the {reference} losses "
                           f"{want} (max relative difference {diff:.2e} > {rtol}).")
    diffs[label] = diff
  return diffs


def median_seconds(call, warmup: int, repeats: int) -> tuple[float, float]:
  """Median (wall, process CPU) seconds of `call()`, blocking on its outputs each time."""
  for _ in range(warmup):
    jax.block_until_ready(call())
  wall, cpu = [], []
  for _ in range(repeats):
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(call())
    wall.append(time.perf_counter() - start_wall)
    cpu.append(time.process_time() - start_cpu)
  return float(np.median(wall)), float(np.median(cpu))


def breakdown(config: ml_collections.ConfigDict, warmup: int, repeats: int
              ) -> dict[str, tuple[float, float]]:
  """Median (wall, CPU) seconds of nested parts of the Self-Flow step, each compiled alone.

  Row differences attribute the step: teacher forward (+ projector and L_rep) = row 2 - row 1,
  backward = row 3 - row 2, gradient clipping + AdamW + EMA update = row 4 - row 3.
  """
  self_flow = variant_config(config, "self_flow")
  s = setup(self_flow)
  graphdef, spec = s.program.layout.graphdef, s.program.resolved.first_spec
  args = (s.state["params"], train_state.teacher_params(s.state), s.batch, s.rng)
  parts = {
      "student forward and L_gen": train_step.make_loss_fn(
          variant_config(config, "dual_timestep"), graphdef, spec),
      "+ teacher forward, projector, L_rep": train_step.make_loss_fn(self_flow, graphdef, spec),
      "+ backward": train_step.make_grad_fn(self_flow, graphdef, spec),
  }
  times = {}
  for name, fn in parts.items():
    compiled = jax.jit(fn).lower(*args).compile()
    times[name] = median_seconds(lambda c=compiled: c(*args), warmup, repeats)
  step = prepare(config, "self_flow")
  state = step.state

  def one_step():
    nonlocal state
    state, metrics = step.step(state, step.batch, step.rng)
    return state, metrics

  times["+ clipping, AdamW, EMA (whole step)"] = median_seconds(one_step, warmup, repeats)
  return times


def format_breakdown(times: dict[str, tuple[float, float]]) -> str:
  lines = ["| Self-Flow step, cumulative | s median | CPU s median |", "|---|---|---|"]
  lines += [f"| {name} | {wall:.3f} | {cpu:.3f} |" for name, (wall, cpu) in times.items()]
  return "\n".join(lines)


def _best_seconds(fn, x, tries: int) -> float:
  """Fastest of `tries` timed calls of jitted `fn(x)` after one untimed (compiling) call."""
  fn = jax.jit(fn)
  jax.block_until_ready(fn(x))
  best = float("inf")
  for _ in range(tries):
    start = time.perf_counter()
    jax.block_until_ready(fn(x))
    best = min(best, time.perf_counter() - start)
  return best


def measured_matmul_peak(size: int = 2048, tries: int = 10) -> float:
  """Best fp32 GFLOP/s of one jitted size^3 matmul on the default device (a CPU's practical
  peak, under the same thread and affinity settings as the benchmark)."""
  seconds = _best_seconds(lambda x: x @ x, jnp.ones((size, size), jnp.float32), tries)
  return 2 * size**3 / seconds / 1e9


def measured_memory_bandwidth(megabytes: int = 256, tries: int = 10) -> float:
  """Best bytes/s of a jitted elementwise op that reads a float32 array once and writes one of
  the same size (a memory-bound step's practical bandwidth on the default device)."""
  x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
  return 2 * x.nbytes / _best_seconds(lambda a: a * 2.0, x, tries)


def peak_gflops(configured: float) -> tuple[float, str]:
  """(peak GFLOP/s per device, where it comes from)."""
  if configured > 0:
    return configured, "--peak_gflops"
  table = reporting.peak_tflops_per_device(0.0)
  if table:
    return table * 1e3, f"{jax.devices()[0].device_kind} bf16 table"
  return measured_matmul_peak(), "measured fp32 2048^3 matmul"


def environment() -> dict[str, str]:
  """What the numbers depend on: device, threads, affinity, allocator, versions, date."""
  cpu = platform.processor() or platform.machine()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
  affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  return {
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "cpu": f"{cpu}, {os.cpu_count()} logical cores, affinity {affinity}",
      "XLA_FLAGS": os.environ.get("XLA_FLAGS", "(unset)"),
      "LD_PRELOAD": os.environ.get("LD_PRELOAD", "(unset)"),
      "threads in process": str(len(os.listdir("/proc/self/task")))
                            if os.path.isdir("/proc/self/task") else "?",
      "versions": f"jax {jax.__version__}, python {platform.python_version()}",
  }


def summarize(timing: dict[str, Timing], prepared: dict[str, Prepared], peak: float
              ) -> dict[str, dict[str, float]]:
  """Per variant: median/min/IQR seconds per step, CPU/wall, GFLOP per step, GFLOP/s, MFU."""
  rows = {}
  for name, t in timing.items():
    wall = np.asarray(t.wall)
    q25, median, q75 = np.percentile(wall, [25, 50, 75])
    devices = 1 if name in TORCH_VARIANTS else jax.device_count()
    gflop = prepared[name].step_flops.total / 1e9 / devices
    rows[name] = dict(median=float(median), min=float(wall.min()), iqr=float(q75 - q25),
                      cpu_median=float(np.median(t.cpu)), gflop=gflop, gflops=gflop / median,
                      mfu=gflop / median / peak if peak else float("nan"))
  return rows


RATIOS = (("self_flow / vanilla", "self_flow", "vanilla"),
          ("dual_timestep / vanilla", "dual_timestep", "vanilla"),
          ("naive / distinct-row adaLN (Self-Flow)", "naive_adaln", "self_flow"))
# Above 1: ours is faster than PyTorch by that factor.
TORCH_RATIOS = (("torch_public / self_flow (PyTorch public-trainer math / ours)", "torch_public",
                 "self_flow"),
                ("torch_equal / self_flow (PyTorch equal math / ours)", "torch_equal",
                 "self_flow"))


def ratios(rows: dict[str, dict[str, float]], key: str = "median") -> dict[str, float]:
  """Step-time ratios (of `key`: wall or CPU-time medians) of the pairs that were timed."""
  return {label: rows[a][key] / rows[b][key]
          for label, a, b in RATIOS + TORCH_RATIOS if a in rows and b in rows}


def format_report(env: dict[str, str], config: ml_collections.ConfigDict, warmup: int,
                  repeats: int, rows, ratio_values, peak: tuple[float, str],
                  loss_diffs: dict[str, float]) -> str:
  """The markdown that benchmarks/RESULTS.md records."""
  shape = flops.model_shape(config, config_resolution.resolve(config))
  m = config.model
  lines = [f"- {key}: {value}" for key, value in env.items()]
  lines += [
      f"- model: {m.architecture} preset {m.preset}, width {shape.width}, depth {shape.depth}, "
      f"{shape.tokens} tokens x {shape.token_dim} channels, batch "
      f"{config.data.global_batch_size}, compute {m.compute_dtype}, params {m.param_dtype}, "
      f"layers {shape.student_layer}/{shape.teacher_layer}, remat {m.remat_policy}, "
      f"{'scanned' if m.scan_layers else 'unrolled'} blocks",
      f"- protocol: {warmup} warm-up + {repeats} timed steps per variant, interleaved, every "
      "step blocked on its outputs",
      f"- peak for MFU: {peak[0]:.1f} GFLOP/s per device ({peak[1]})",
      "",
      "| variant | s/step median | min | IQR | CPU s/step | GFLOP/step | GFLOP/s | MFU |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for name, r in rows.items():
    lines.append(f"| {name} | {r['median']:.3f} | {r['min']:.3f} | {r['iqr']:.3f} | "
                 f"{r['cpu_median']:.3f} | {r['gflop']:.4g} | {r['gflops']:.4g} | "
                 f"{r['mfu']:.1%} |")
  lines.append("")
  cpu_ratios = ratios(rows, "cpu_median")
  lines += [f"- {label}: {value:.3f} (CPU time: {cpu_ratios[label]:.3f})"
            for label, value in ratio_values.items()]
  lines += [f"- {label} losses, max relative difference over all steps: {diff:.1e}"
            for label, diff in loss_diffs.items()]
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, variants: Sequence[str], warmup: int, repeats: int,
        configured_peak: float = 0.0) -> dict[str, Any]:
  """Compiles and times `variants` of `config`; returns the table rows, ratios and report."""
  unknown = [v for v in variants if v not in VARIANTS and v not in TORCH_VARIANTS]
  if unknown or not variants:
    raise ValueError(f"--variants={list(variants)}: each must be one of "
                     f"{list(VARIANTS) + list(TORCH_VARIANTS)}.")
  if warmup < 1 or repeats < 1:
    raise ValueError(f"--warmup={warmup} and --repeats={repeats} must be >= 1.")
  if any(name in TORCH_VARIANTS for name in variants):  # fail before compiling anything
    torch_reference.require()
    torch_reference.setting(config)
  env = environment()
  peak = peak_gflops(configured_peak)
  prepared = {name: prepare(config, name) for name in variants}
  if any(name in TORCH_VARIANTS for name in variants):
    env["torch"] = torch_reference.runtime()
  timing = run_interleaved(prepared, warmup, repeats)
  loss_diffs = check_same_losses(timing)
  rows = summarize(timing, prepared, peak[0])
  ratio_values = ratios(rows)
  report = format_report(env, config, warmup, repeats, rows, ratio_values, peak, loss_diffs)
  return {"rows": rows, "ratios": ratio_values, "report": report}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  result = run(FLAGS.config, FLAGS.variants, FLAGS.warmup, FLAGS.repeats, FLAGS.peak_gflops)
  print(result["report"], flush=True)
  if FLAGS.breakdown:
    print("\n" + format_breakdown(breakdown(FLAGS.config, FLAGS.warmup, FLAGS.repeats)),
          flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
