"""Ahead-of-time compilation of the train step for a TPU topology, from a host without a TPU.

  python -m self_flow.aot --config=configs/t2i.py --topology=v5p:4x4x4 [--num_slices=2] \\
      [--config.KEY=VALUE ...] [--markdown]
  # the same row priced again from what an earlier run saved, without compiling:
  python -m self_flow.aot --config=... --topology=... --json=R.json --hlo_dir=R.hlo --reprice

Builds the trainer's own program (`train_program.build`: mesh, state layout, one jitted step
per modality, exactly what `train.train_and_evaluate` runs) over the compile-only devices of
the named topology, lowers every modality's step with abstract state, batch and rng, and runs
the real TPU compiler (libtpu; install it with `pip install -e ".[tpu]"`, see the
README). Per device it prints the compiler's memory figures, the chip's HBM and the headroom,
the compile time, the collectives of the compiled program per step (`hlo_collectives`) and the
analytic model FLOPs (`flops`), and a step-time band (`step_time_band`): compute, memory and
communication time per step from the chip's public figures, with the compiled program's own
FLOPs and HBM bytes (`hlo_collectives.cost`, loops multiplied by their trip counts: XLA's cost
analysis counts a `while` body once, and the TPU compiler adds collective-matmul loops under
FSDP), and the tokens/s, examples/s and MFU range they imply.

These are compiler figures and a model of the compiled program, not measurements: no step runs. The exit status is 1 when a step
does not fit in HBM with `--min_headroom` to spare (or the compiler runs out of memory), with
the knobs that reduce memory per device named.

Topology names are libtpu's: `v5e:2x2` (4 chips), `v5e:4x4`, `v5p:2x2x2` (8 chips),
`v5p:4x4x4`, `v6e:2x2`, `v6e:4x4`, ...
"""

import dataclasses
import json
import os
import sys
import time
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from self_flow import storage

# The host computes on its CPU; the TPU devices are compile-only (no TPU backend is started).
# libtpu asks the cloud metadata server for the host's own TPU otherwise, and logs errors.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
# Compile-only: no chips to guard, so several compiles (tests, a table run) may load libtpu at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Run configuration file.", lock_config=True)
flags.DEFINE_list("topology", None, "TPU topology name(s), e.g. v5p:4x4x4 or v5e:2x2,v5e:4x4.")
flags.DEFINE_integer("num_slices", 1, "Slices of the topology (multi-slice over DCN).")
flags.DEFINE_float("min_headroom", 0.1,
                   "Fraction of the chip's HBM that must stay free for the step to count as "
                   "fitting (the runtime, fragmentation and the input pipeline need some).")
flags.DEFINE_bool("markdown", False, "Also print one markdown table row per compiled step.")
flags.DEFINE_string("json", None, "Also write the reports to this JSON file (tests, tables; local "
                    "or gs://...).")
flags.DEFINE_string("hlo_dir", None, "Also write each compiled step's HLO text here "
                    "(<topology>_<modality>.hlo.txt, local or gs://...), e.g. to inspect its "
                    "collectives.")
flags.DEFINE_bool("reprice", False, "Do not compile: read the --json and --hlo_dir an earlier "
                  "run of the same config and topology wrote, keep its memory figures and "
                  "compile time, and count the collectives, FLOPs, HBM bytes and band again "
                  "from its HLO (after a change to hlo_collectives or the chip table); "
                  "rewrites --json.")

GIB = 2**30
# HBM per chip by device kind (Cloud TPU documentation).
HBM_BYTES = {"TPU v4": 32 * GIB, "TPU v5 lite": 16 * GIB, "TPU v5": 95 * GIB,
             "TPU v6 lite": 32 * GIB}

KNOBS = ("split the state over more chips (--config.mesh.fsdp=-1 with mesh.data=1, or a larger "
         "topology), add tensor parallelism for wide models (--config.mesh.tensor=2|4 with "
         "mesh.rules=fsdp_tp), recompute activations (--config.model.remat_policy=dots|full), "
         "accumulate gradients (--config.train.microbatches=2|4|...), or lower the global batch "
         "(config.data/video/audio.global_batch_size)")


@dataclasses.dataclass
class StepReport:
  """One modality's compiled step on one topology, per device."""

  config_name: str
  topology: str
  num_slices: int
  device_kind: str
  num_devices: int
  mesh: dict
  modality: str
  compile_seconds: float
  hbm_bytes: int
  state_bytes: int  # The whole train state (params, EMA, Adam), before sharding.
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  code_bytes: int = 0
  flops_per_device: float = 0.0
  collectives: Any = None  # hlo_collectives.Report of the compiled program
  # The compiled program's dot and convolution FLOPs and HBM bytes (hlo_collectives.cost).
  hlo_flops_per_device: float = 0.0
  hbm_bytes_per_device: float = 0.0
  band: Any = None  # step_time_band.Band
  throughput: Any = None  # step_time_band.Throughput
  tpu_kernels: int = 0  # Mosaic (Pallas) kernels in the program, e.g. splash attention.
  error: str = ""  # the compiler's message when it ran out of memory

  @property
  def total_bytes(self) -> int:
    """What the step holds in HBM at its peak: live arguments and outputs (donated state counted
    once), temporaries and the program itself."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)

  def fits(self, min_headroom: float) -> bool:
    return not self.error and self.total_bytes <= (1 - min_headroom) * self.hbm_bytes


def topology_devices(name: str, num_slices: int = 1):
  """Compile-only devices of a TPU topology (needs libtpu; no TPU attached)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs).devices
  except Exception as err:  # libtpu missing or an unknown topology name
    raise SystemExit(f"--topology={name} (num_slices={num_slices}) gave no TPU devices: "
                     f"{type(err).__name__}: {err}. The TPU compiler comes with libtpu: "
                     "pip install -e \".[tpu]\" (in its own environment, see the README), "
                     "and topology names look like v5e:2x2, v5p:2x2x2, v6e:4x4.") from err


def hbm_bytes(device_kind: str) -> int:
  for prefix, size in sorted(HBM_BYTES.items(), key=lambda kv: -len(kv[0])):
    if device_kind.startswith(prefix):
      return size
  raise SystemExit(f"device kind {device_kind!r} has no HBM size in self_flow.aot.HBM_BYTES "
                   f"(known: {sorted(HBM_BYTES)}).")


def _without_data(config):
  """A copy of `config` whose empty latent-shard directories name a placeholder: compiling
  reads no data, and the paper presets leave data_dir to the command line."""
  from self_flow.data import modality_sources  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  for modality in config.modalities:
    section = config[modality_sources.SECTIONS[modality]]
    if section.dataset == "latent_shards" and not section.data_dir:
      section.data_dir = "(not read by self_flow.aot)"
  return config


def _out_of_memory(err: Exception) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def _add_band(report: StepReport, hlo_text: str, spec) -> None:
  """The step-time band of a compiled step (`step_time_band`), from the larger of the program's
  and the analytic FLOPs (the Mosaic kernels' FLOPs, splash attention's, are opaque in the
  program; remat recomputation is only in the program's)."""
  # pylint: disable-next=g-import-not-at-top
  from self_flow import hlo_collectives, step_time_band
  cost = hlo_collectives.cost(hlo_text)
  report.hlo_flops_per_device, report.hbm_bytes_per_device = cost.flops, cost.hbm_bytes
  the_chip = step_time_band.chip(report.device_kind)
  collectives = {group: c.bytes for group, c in report.collectives.by_group.items()}
  report.band = step_time_band.band(max(cost.flops, report.flops_per_device), cost.hbm_bytes,
                                    collectives, step_time_band.torus_dims(report.topology),
                                    the_chip)
  report.throughput = step_time_band.throughput(
      report.band, tokens_per_step=spec.global_batch_size * spec.num_tokens,
      examples_per_step=spec.global_batch_size, chips=report.num_devices,
      model_flops_per_chip=report.flops_per_device, the_chip=the_chip)


_MEMORY_FIELDS = ("compile_seconds", "argument_bytes", "output_bytes", "alias_bytes",
                  "temp_bytes", "code_bytes", "error")


def _hlo_name(topology: str, num_slices: int, modality: str) -> str:
  return f"{topology.replace(':', '_')}x{num_slices}_{modality}.hlo.txt"


def compile_steps(config, config_name: str, topology: str, num_slices: int = 1,
                  hlo_dir: str | None = None, saved: list[dict] | None = None
                  ) -> list[StepReport]:
  """Compiles every modality's train step of `config` for `topology`; one report each, with its
  step-time band (and the compiled HLO text in `hlo_dir` when given).

  With `saved` (the JSON reports of an earlier run, whose HLO text is in `hlo_dir`) nothing is
  compiled: the memory figures and compile time are the saved ones, and everything counted from
  the program (collectives, FLOPs, HBM bytes, band) is counted again from the saved HLO."""
  # pylint: disable-next=g-import-not-at-top
  from self_flow import config_validation, flops, train_program, train_state
  devices = topology_devices(topology, num_slices)
  config = _without_data(config)
  resolved = config_validation.validate(config, num_devices=len(devices))
  program = train_program.build(config, resolved, devices)
  kind = devices[0].device_kind
  state_bytes = train_state.num_bytes(program.layout.abstract)
  reports = []
  for modality in program.specs:
    report = StepReport(config_name, topology, num_slices, kind, len(devices),
                        dict(program.mesh.shape), modality, 0.0, hbm_bytes(kind), state_bytes)
    step_flops = flops.train_step_flops(config, resolved, modality)
    report.flops_per_device = step_flops.total / len(devices)
    if saved is not None:
      _reprice(report, saved, hlo_dir, resolved.spec(modality))
      reports.append(report)
      continue
    start = time.perf_counter()
    try:
      compiled = train_program.lower(config, program, modality).compile()
    except Exception as err:  # pylint: disable=broad-except
      if not _out_of_memory(err):
        raise
      report.compile_seconds = time.perf_counter() - start
      report.error = str(err).strip().splitlines()[0][:400]
      reports.append(report)
      continue
    report.compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    report.argument_bytes = memory.argument_size_in_bytes
    report.output_bytes = memory.output_size_in_bytes
    report.alias_bytes = memory.alias_size_in_bytes
    report.temp_bytes = memory.temp_size_in_bytes
    report.code_bytes = memory.generated_code_size_in_bytes
    hlo_text = compiled.as_text()
    if hlo_dir:
      storage.write_text(storage.join(hlo_dir, _hlo_name(topology, num_slices, modality)),
                         hlo_text)
    _count_program(report, hlo_text, resolved.spec(modality))
    reports.append(report)
  return reports


def _count_program(report: StepReport, hlo_text: str, spec) -> None:
  # pylint: disable-next=g-import-not-at-top
  from self_flow import hlo_collectives
  report.collectives = hlo_collectives.count(hlo_text)
  report.tpu_kernels = hlo_text.count('custom_call_target="tpu_custom_call"')
  _add_band(report, hlo_text, spec)


def _reprice(report: StepReport, saved: list[dict], hlo_dir: str | None, spec) -> None:
  """Fills `report` from the saved report of its modality and the saved HLO text."""
  match = [r for r in saved if r["modality"] == report.modality
           and r["topology"] == report.topology and r["num_slices"] == report.num_slices]
  if len(match) != 1 or not hlo_dir:
    raise ValueError(f"--reprice needs the --json of an earlier run with one {report.modality} "
                     f"step on {report.topology} and its --hlo_dir; found {len(match)} in the "
                     f"JSON, hlo_dir={hlo_dir!r}.")
  for field in _MEMORY_FIELDS:
    setattr(report, field, match[0][field])
  if not report.error:
    _count_program(report, storage.read_text(storage.join(
        hlo_dir, _hlo_name(report.topology, report.num_slices, report.modality))), spec)


def _gib(num_bytes: float) -> str:
  """GiB with two decimals, or MiB below 1 GiB (small test models)."""
  if num_bytes < GIB:
    return f"{num_bytes / 2**20:.1f} MiB"
  return f"{num_bytes / GIB:.2f} GiB"


def format_report(report: StepReport, min_headroom: float) -> str:
  """The human-readable block for one compiled step."""
  head = (f"{report.config_name} [{report.modality}] on {report.topology}"
          f"{f' x {report.num_slices} slices' if report.num_slices > 1 else ''}: "
          f"{report.num_devices} x {report.device_kind}, mesh {report.mesh}, compiled in "
          f"{report.compile_seconds:.1f} s")
  if report.error:
    return f"{head}\n  DOES NOT FIT: the TPU compiler ran out of memory: {report.error}"
  headroom = report.hbm_bytes - report.total_bytes
  lines = [head,
           f"  per device: arguments {_gib(report.argument_bytes)}, outputs "
           f"{_gib(report.output_bytes)} (aliased to arguments {_gib(report.alias_bytes)}), "
           f"temporaries {_gib(report.temp_bytes)}, program {_gib(report.code_bytes)}",
           f"  total {_gib(report.total_bytes)} of {_gib(report.hbm_bytes)} HBM: headroom "
           f"{_gib(headroom)} ({headroom / report.hbm_bytes:.0%}); "
           + ("fits" if report.fits(min_headroom) else
              f"DOES NOT FIT with {min_headroom:.0%} headroom"),
           f"  train state {_gib(report.state_bytes)} in all; analytic model FLOPs per device "
           f"per step {report.flops_per_device:.4g}; Mosaic kernels {report.tpu_kernels}"]
  for kind, c in report.collectives.by_kind.items():
    lines.append(f"  {kind}: {c.instructions} in the program, {c.executions} per step, "
                 f"{_gib(c.bytes)} per device per step")
  if not report.collectives.by_kind:
    lines.append("  collectives: none")
  if report.collectives.unknown_trip_counts:
    lines.append(f"  ({report.collectives.unknown_trip_counts} loops of unreadable trip count "
                 "counted once)")
  if report.band is not None:
    b, t = report.band, report.throughput
    lines += [
        f"  step-time band (a model of the compiled program, not a measurement): "
        f"{b.lower * 1e3:.1f} to {b.upper * 1e3:.1f} ms; compute {b.compute * 1e3:.1f} ms, "
        f"memory {b.memory * 1e3:.1f} ms, communication {b.communication * 1e3:.1f} ms "
        f"({b.bound_by}-bound at the lower end)",
        f"    program FLOPs per device {report.hlo_flops_per_device:.4g} "
        f"({report.hlo_flops_per_device / report.flops_per_device - 1:+.1%} vs analytic), HBM "
        f"bytes {_gib(report.hbm_bytes_per_device)}",
        f"    tokens/s/chip {t.tokens_per_chip_per_s[0]:.4g} to {t.tokens_per_chip_per_s[1]:.4g};"
        f" examples/s (slice) {t.examples_per_s[0]:.4g} to {t.examples_per_s[1]:.4g}; MFU "
        f"{t.mfu[0]:.0%} to {t.mfu[1]:.0%}"]
  return "\n".join(lines)


MARKDOWN_HEADER = ("| config | step | topology | chips | mesh (data, fsdp, tensor) | arguments | "
                   "temporaries | total / HBM | fits | collective GiB/step (kinds) | "
                   "model TFLOP/step/chip | compile s |\n"
                   "|---|---|---|---|---|---|---|---|---|---|---|---|")


def markdown_row(report: StepReport, min_headroom: float) -> str:
  mesh = f"{report.mesh['data']}, {report.mesh['fsdp']}, {report.mesh['tensor']}"
  topology = report.topology + (f" x{report.num_slices}" if report.num_slices > 1 else "")
  if report.error:
    return (f"| {report.config_name} | {report.modality} | {topology} | {report.num_devices} | "
            f"{mesh} | | | compiler: out of memory | no | | "
            f"{report.flops_per_device / 1e12:.3g} | {report.compile_seconds:.0f} |")
  kinds = ", ".join(f"{k} {c.executions}" for k, c in report.collectives.by_kind.items())
  total = report.collectives.total_bytes
  return (f"| {report.config_name} | {report.modality} | {topology} | {report.num_devices} | "
          f"{mesh} | {_gib(report.argument_bytes)} | {_gib(report.temp_bytes)} | "
          f"{_gib(report.total_bytes)} / {report.hbm_bytes // GIB} GiB | "
          f"{'yes' if report.fits(min_headroom) else 'no'} | {total / GIB:.2f} ({kinds or 'none'}) "
          f"| {report.flops_per_device / 1e12:.3g} | {report.compile_seconds:.0f} |")


BAND_MARKDOWN_HEADER = (
    "| config | step | topology | band ms (lower-upper) | compute / memory / comm ms | bound | "
    "program vs analytic FLOPs | tokens/s/chip | examples/s (slice) | MFU |\n"
    "|---|---|---|---|---|---|---|---|---|---|")


def band_markdown_row(report: StepReport) -> str:
  """The band's table row (TPU_AOT.md): a model of the compiled program, not a measurement."""
  topology = report.topology + (f" x{report.num_slices}" if report.num_slices > 1 else "")
  if report.band is None:
    return f"| {report.config_name} | {report.modality} | {topology} | | | | | | | |"
  b, t = report.band, report.throughput
  return (f"| {report.config_name} | {report.modality} | {topology} | "
          f"{b.lower * 1e3:.0f}-{b.upper * 1e3:.0f} | {b.compute * 1e3:.0f} / "
          f"{b.memory * 1e3:.0f} / {b.communication * 1e3:.0f} | {b.bound_by} | "
          f"{report.hlo_flops_per_device / report.flops_per_device - 1:+.0%} | "
          f"{t.tokens_per_chip_per_s[0]:.0f}-{t.tokens_per_chip_per_s[1]:.0f} | "
          f"{t.examples_per_s[0]:.1f}-{t.examples_per_s[1]:.1f} | "
          f"{t.mfu[0]:.0%}-{t.mfu[1]:.0%} |")


def to_json(report: StepReport, min_headroom: float) -> dict:
  out = dataclasses.asdict(report)
  collectives = report.collectives
  out["collectives"] = ({k: c._asdict() for k, c in collectives.by_kind.items()}
                        if collectives else {})
  out["unknown_trip_counts"] = collectives.unknown_trip_counts if collectives else 0
  if report.band is not None:
    out["band"] = dict(dataclasses.asdict(report.band), lower=report.band.lower,
                       upper=report.band.upper, bound_by=report.band.bound_by)
  out.update(total_bytes=report.total_bytes, fits=report.fits(min_headroom))
  return out


def _config_name() -> str:
  """The --config argument as given (file and variant), for the report."""
  for arg in sys.argv[1:]:
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return "config"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if FLAGS.reprice and not (FLAGS.json and FLAGS.hlo_dir):
    raise app.UsageError("--reprice reads --json and --hlo_dir: name both.")
  saved = json.loads(storage.read_text(FLAGS.json)) if FLAGS.reprice else None
  reports = []
  for topology in FLAGS.topology:
    for report in compile_steps(FLAGS.config, _config_name(), topology, FLAGS.num_slices,
                                FLAGS.hlo_dir, saved):
      print(format_report(report, FLAGS.min_headroom), flush=True)
      reports.append(report)
  if FLAGS.json:
    as_json = [to_json(r, FLAGS.min_headroom) for r in reports]
    storage.write_text(FLAGS.json, json.dumps(as_json, indent=1))
  if FLAGS.markdown:
    print("\n" + MARKDOWN_HEADER)
    for report in reports:
      print(markdown_row(report, FLAGS.min_headroom))
    print("\n" + BAND_MARKDOWN_HEADER)
    for report in reports:
      print(band_markdown_row(report))
  too_big = [r for r in reports if not r.fits(FLAGS.min_headroom)]
  if too_big:
    names = ", ".join(f"{r.modality} on {r.topology}" for r in too_big)
    largest = max(too_big, key=lambda r: r.total_bytes)
    print(f"\nERROR: {names} does not fit in HBM with {FLAGS.min_headroom:.0%} headroom "
          f"(largest: {_gib(largest.total_bytes)} per device, {_gib(largest.hbm_bytes)} HBM"
          f"{'; the compiler ran out of memory' if largest.error else ''}). To reduce memory per "
          f"device: {KNOBS}.", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "topology"])
  app.run(main)
