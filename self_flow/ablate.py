"""Ablation harness: every (variant, seed) as its own training run, then one results page.

  python -m self_flow.ablate --config=configs/c2i.py:local \\
    --variants=vanilla,dual_timestep,self_flow --seeds=3 --steps=1500 --output=ablations/c2i \\
    [--eval_every=500] [--override=eval.num_samples=500 ...]

A variant is a method (base_config.METHODS) or a labelled method with settings of its own,
`LABEL=METHOD+KEY=VALUE+...` (e.g. `one_ema=self_flow+optim.ema_warmup=False`). Each run is
`python -m self_flow.main` in a process of its own (a crash loses only that run), with
`method=<method>` added to the config argument and `--config.seed` and
`--config.data.shuffle_seed` set to the seed, in OUTPUT/runs/<variant>_seed<seed>. A finished
run leaves `ablation_run.json` in its workdir and is skipped when the same command is repeated;
an interrupted one resumes from its checkpoints. The metrics every run logged are then read back
from its TensorBoard event files and summarised:

  OUTPUT/results.md    final metrics per variant (mean ± std over seeds) and, in words, which
                       differences are within seed noise (`NOISE_RULE`)
  OUTPUT/results.json  the same numbers, each run's final metrics and the plotted curves
  OUTPUT/*.png         metric vs step (mean line, min-max band over seeds), probe accuracy vs
                       layer, held-out loss vs timestep bin

Unless overridden, runs also log the linear probe and the stratified loss (`DEFAULT_OVERRIDES`).
From Python (tests, notebooks): `plan_runs`, then `run_ablation` with `subprocess_train_fn` or
`in_process_train_fn`.
"""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging

from self_flow import base_config
from self_flow.evaluation import student

# Evaluation settings every ablation run gets unless --override names the key.
DEFAULT_OVERRIDES = {"eval.probe_steps": "500", "eval.loss_bins": "10",
                     "train.gradient_balance_every": "250"}
# Written into a run's workdir when it finished; holds the settings it finished with.
MARKER = "ablation_run.json"
NOISE_RULE = (
    "A difference between two variants is called real only when |difference of the means| "
    "exceeds the larger of the two seed standard deviations AND the two ranges over seeds "
    "[min, max] do not overlap; otherwise it is within seed noise. With fewer than 2 seeds on "
    "either side there is no noise estimate and no difference is claimed. This is a screening "
    "rule for a handful of seeds, not a significance test.")
# Row order of the results table (first matching pattern wins); other metrics follow.
_ROW_ORDER = tuple(re.compile(p) for p in (
    r"^eval/[^/]+/fd$", r"^eval/[^/]+/fd_", r"^eval/[^/]+/.*(accuracy|faithfulness)",
    r"^eval/[^/]+/loss$", r"^eval/[^/]+/loss_t", r"^eval/[^/]+/probe_layer",
    r"^train/teacher_cosine$", r"^train/teacher_cosine_trivial$",
    r"^train/grad_ratio_rep_gen$", r"^train/loss_gen$"))
# Training diagnostics in the table beside the evaluation metrics.
_TRAIN_ROWS = ("train/teacher_cosine", "train/teacher_cosine_trivial",
               "train/grad_ratio_rep_gen", "train/loss_gen")
# Metrics drawn against the training step: FD, accuracy, held-out and training loss.
_CURVE_PATTERNS = tuple(re.compile(p) for p in (
    r"^eval/[^/]+/(student/)?fd", r"^eval/[^/]+/.*(accuracy|faithfulness)",
    r"^eval/[^/]+/(student/)?loss$", r"^train/loss_gen$"))


@dataclasses.dataclass(frozen=True)
class AblationRun:
  """One training run of the ablation."""

  variant: str  # The variant's label: its method's name, or the label of a labelled variant.
  seed: int
  workdir: str
  method: str = ""  # A method of base_config.METHODS; "" = the label is the method.
  # Config settings of this variant only, ((key, value), ...), e.g. (("optim.ema_warmup",
  # "False"),); applied after the shared overrides.
  settings: tuple[tuple[str, str], ...] = ()

  @property
  def name(self) -> str:
    return f"{self.variant}_seed{self.seed}"

  @property
  def method_name(self) -> str:
    return self.method or self.variant


# --- Planning and running. ---

VARIANT_FORMAT = ("METHOD or LABEL=METHOD+KEY=VALUE+... "
                  "(e.g. one_ema=self_flow+optim.ema_warmup=False)")


def parse_variant(spec: str) -> tuple[str, str, tuple[tuple[str, str], ...]]:
  """'vanilla' -> ('vanilla', 'vanilla', ()); 'one_ema=self_flow+optim.ema_warmup=False' ->
  ('one_ema', 'self_flow', (('optim.ema_warmup', 'False'),)): a method with settings of its own
  under a label, so that one study can compare e.g. Self-Flow with and without a fix."""
  label, sep, rest = spec.partition("=")
  if not sep:
    return spec, spec, ()
  method, *settings = rest.split("+")
  pairs = tuple(tuple(item.split("=", 1)) for item in settings)
  if (not label or not re.fullmatch(r"[A-Za-z0-9_.-]+", label) or
      any(len(p) != 2 or not p[0] or p[0].startswith("config.") for p in pairs)):
    raise ValueError(f"variant {spec!r} must be {VARIANT_FORMAT}.")
  return label, method, pairs


def plan_runs(variants: Sequence[str], num_seeds: int, output: str) -> list[AblationRun]:
  """Every (variant, seed) pair, seeds 0..num_seeds-1, each in OUTPUT/runs/<label>_seed<s>.

  A variant is a method name or a labelled method with settings (`parse_variant`)."""
  parsed = [parse_variant(v) for v in variants]
  labels = [label for label, _, _ in parsed]
  unknown = [m for _, m, _ in parsed if m not in base_config.METHODS]
  if not variants or unknown or len(set(labels)) != len(labels):
    raise ValueError(f"variants={list(variants)} must be distinct names from "
                     f"{sorted(base_config.METHODS)} (or {VARIANT_FORMAT}).")
  if isinstance(num_seeds, bool) or not isinstance(num_seeds, int) or num_seeds < 1:
    raise ValueError(f"seeds={num_seeds!r} must be an integer >= 1.")
  return [AblationRun(label, s, os.path.join(output, "runs", f"{label}_seed{s}"),
                      "" if method == label and not settings else method, settings)
          for label, method, settings in parsed for s in range(num_seeds)]


def _run_fingerprint(run: AblationRun, fingerprint: str) -> str:
  """The shared settings' fingerprint, plus the run's own method and settings if labelled."""
  if not run.method:
    return fingerprint
  return fingerprint + "|" + json.dumps([run.method, list(run.settings)])


def is_finished(run: AblationRun, fingerprint: str) -> bool:
  """Whether `run` finished with the same settings (`fingerprint`) in an earlier invocation."""
  path = os.path.join(run.workdir, MARKER)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return json.load(f).get("fingerprint") == _run_fingerprint(run, fingerprint)


def execute(runs: Sequence[AblationRun], train_fn: Callable[[AblationRun], None],
            fingerprint: str = "", imported: Mapping[str, str] | None = None
            ) -> dict[str, str]:
  """Trains every run not already finished with `fingerprint`, one after the other.

  Returns {run name: "finished" | "finished earlier" | "imported from <path>" |
  "failed: <error>"}; `imported` maps the names of runs taken from an earlier results page
  (`import_histories`) to that page's path, and those are not trained. A failure is logged and
  the next run starts: one crash must not cost the other runs.
  """
  statuses = {}
  for run in runs:
    if imported and run.name in imported:
      statuses[run.name] = f"imported from {imported[run.name]}"
      continue
    if is_finished(run, fingerprint):
      logging.info("Ablation run %s finished earlier; skipping it.", run.name)
      statuses[run.name] = "finished earlier"
      continue
    logging.info("Ablation run %s: training in %s.", run.name, run.workdir)
    start = time.time()
    try:
      train_fn(run)
    except Exception as error:  # pylint: disable=broad-except
      logging.exception("Ablation run %s failed.", run.name)
      statuses[run.name] = f"failed: {type(error).__name__}: {error}"
      continue
    os.makedirs(run.workdir, exist_ok=True)
    with open(os.path.join(run.workdir, MARKER), "w") as f:
      json.dump({"variant": run.variant, "seed": run.seed,
                 "fingerprint": _run_fingerprint(run, fingerprint),
                 "seconds": round(time.time() - start, 1)}, f)
    statuses[run.name] = "finished"
  return statuses


def run_overrides(steps: int, eval_every: int, overrides: Mapping[str, str]) -> dict[str, str]:
  """The `--config.<key>=<value>` settings of every run: steps, evaluation interval, the
  probe/loss defaults and the user's overrides (which win)."""
  if steps < 1:
    raise ValueError(f"steps={steps} must be >= 1.")
  if eval_every < 0:
    raise ValueError(f"eval_every={eval_every} must be >= 0 (0 = evaluate only at the end).")
  return {"train.num_steps": str(steps), "train.eval_every": str(eval_every),
          **DEFAULT_OVERRIDES, **overrides}


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
  """['eval.num_samples=500', ...] -> {'eval.num_samples': '500', ...}."""
  parsed = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key or key.startswith("config."):
      raise ValueError(f"--override={item!r} must be <key>=<value> with a config key such as "
                       "eval.num_samples=500 (without the 'config.' prefix).")
    parsed[key] = value
  return parsed


def train_command(run: AblationRun, config_file: str, config_arg: str,
                  overrides: Mapping[str, str], python: str = sys.executable) -> list[str]:
  """The `python -m self_flow.main` command line of one run."""
  if "method=" in config_arg:
    raise ValueError(f"--config argument {config_arg!r} names a method; --variants sets it.")
  method = run.method_name
  arg = f"{config_arg},method={method}" if config_arg else f"method={method}"
  settings = {"seed": str(run.seed), "data.shuffle_seed": str(run.seed), **overrides,
              **dict(run.settings)}
  return ([python, "-m", "self_flow.main", f"--config={config_file}:{arg}",
           f"--workdir={run.workdir}"] + [f"--config.{k}={v}" for k, v in settings.items()])


def subprocess_train_fn(config_file: str, config_arg: str, overrides: Mapping[str, str],
                        env: Mapping[str, str] | None = None) -> Callable[[AblationRun], None]:
  """train(run): `train_command` in a child process, its output appended to <workdir>/train.log;
  raises naming the log when the child fails."""

  def train(run: AblationRun) -> None:
    os.makedirs(run.workdir, exist_ok=True)
    log_path = os.path.join(run.workdir, "train.log")
    command = train_command(run, config_file, config_arg, overrides)
    with open(log_path, "a") as log:
      log.write("$ " + " ".join(command) + "\n")
      log.flush()
      returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                  env=None if env is None else dict(env), check=False).returncode
    if returncode:
      with open(log_path) as log:
        tail = "".join(log.readlines()[-15:])
      raise RuntimeError(f"exit status {returncode}; log {log_path} ends with:\n{tail}")

  return train


def in_process_train_fn(make_config: Callable[[str, int], Any]) -> Callable[[AblationRun], None]:
  """train(run): `train.train_and_evaluate(make_config(variant, seed), workdir)` in this process."""

  def train(run: AblationRun) -> None:
    from self_flow import train as train_lib  # pylint: disable=g-import-not-at-top
    if run.settings:
      raise ValueError(f"variant {run.variant!r} has settings of its own {run.settings}; "
                       "those run through subprocess_train_fn (the command line).")
    train_lib.train_and_evaluate(make_config(run.method_name, run.seed), run.workdir)

  return train


# --- Reading the runs' metrics back. ---


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...] sorted by step} of every scalar in the workdir's event files.

  A restarted run writes some steps twice (and its hparams at step 0 again); the last value
  logged for a step wins, so nothing is purged as out of order.
  """
  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  accumulator = event_accumulator.EventAccumulator(
      workdir, size_guidance={event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0},
      purge_orphaned_data=False)
  accumulator.Reload()
  tags = accumulator.Tags()
  series = {}
  for tag in tags[event_accumulator.TENSORS]:
    values = {}
    for event in accumulator.Tensors(tag):
      array = tensor_util.make_ndarray(event.tensor_proto)
      if array.size == 1 and np.issubdtype(array.dtype, np.number):
        values[event.step] = float(array.reshape(()))
    if values:
      series[tag] = sorted(values.items())
  for tag in tags[event_accumulator.SCALARS]:  # summaries written the TF1 way
    series[tag] = sorted({e.step: float(e.value) for e in accumulator.Scalars(tag)}.items())
  return series


def import_histories(path: str, runs: Sequence[AblationRun]
                     ) -> dict[str, dict[str, list[tuple[int, float]]]]:
  """{run name: {tag: [(step, value), ...]}} of the planned `runs` that the earlier results.json
  at `path` lists as finished: a study adds seeds to runs whose workdirs are gone (another
  machine, a cleaned disk) without training those runs again.

  Each history holds every final metric of the run, plus its curves: from the run's own
  "history" (written since 2026-12-04), or, in older pages, from the variant's curves when the
  run is its variant's only one there (curve values are per seed but not named by run, so with
  several seeds only the final metrics can be taken back).
  """
  with open(path) as f:
    page = json.load(f)
  finished = [r for r in page["runs"] if r["status"].startswith(("finished", "imported"))]
  per_variant = {v: sum(r["variant"] == v for r in finished) for v in page["variants"]}
  wanted = {run.name: run for run in runs}
  histories = {}
  for entry in finished:
    run = wanted.get(entry["name"])
    if run is None or run.variant != entry["variant"]:
      continue
    if "history" in entry:
      history = {tag: [tuple(point) for point in series]
                 for tag, series in entry["history"].items()}
    elif per_variant[run.variant] == 1:
      history = {tag: [(step, values[0]) for step, values in
                       zip(curve[run.variant]["steps"], curve[run.variant]["values"])]
                 for tag, curve in page["curves"].items() if run.variant in curve}
    else:
      history = {}
    last_step = max((series[-1][0] for series in history.values() if series), default=0)
    for tag, value in entry["final"].items():
      history.setdefault(tag, [(last_step, value)])
    histories[run.name] = history
  if not histories:
    raise ValueError(f"import_results={path!r} lists no finished run among the planned ones "
                     f"({', '.join(wanted)}); it lists "
                     f"{', '.join(r['name'] for r in finished) or 'none'}.")
  return histories


@dataclasses.dataclass(frozen=True)
class Spread:
  """One metric's final values over a variant's seeds."""

  values: tuple[float, ...]

  @property
  def n(self) -> int:
    return len(self.values)

  @property
  def mean(self) -> float:
    return float(np.mean(self.values))

  @property
  def std(self) -> float:
    """Sample standard deviation (ddof 1); 0 for a single seed."""
    return float(np.std(self.values, ddof=1)) if self.n > 1 else 0.0

  @property
  def low(self) -> float:
    return float(np.min(self.values))

  @property
  def high(self) -> float:
    return float(np.max(self.values))

  def to_json(self) -> dict[str, Any]:
    return dict(mean=self.mean, std=self.std, min=self.low, max=self.high, n=self.n,
                values=list(self.values))


def summarise(finals: Mapping[AblationRun, Mapping[str, float]], variants: Sequence[str]
              ) -> dict[str, dict[str, Spread]]:
  """{variant: {metric: Spread of its runs' final values}} (runs lacking a metric are left out)."""
  summary = {}
  for variant in variants:
    by_metric: dict[str, list[float]] = {}
    for run, metrics in finals.items():
      if run.variant == variant:
        for tag, value in metrics.items():
          by_metric.setdefault(tag, []).append(value)
    summary[variant] = {tag: Spread(tuple(v)) for tag, v in by_metric.items()}
  return summary


def _numbers(tag: str) -> tuple[float, ...]:
  """The numbers in a tag's last part (probe layer, bin edges), for numeric ordering."""
  return tuple(float(x) for x in re.findall(r"\d+(?:\.\d+)?", tag.rsplit("/", 1)[-1]))


def _row_key(tag: str):
  is_student = "/student/" in tag  # eval/<modality>/student/<name>: after the EMA's rows
  ema_tag = tag.replace("/student/", "/")
  rank = next((i for i, p in enumerate(_ROW_ORDER) if p.search(ema_tag)), len(_ROW_ORDER))
  parts = tag.split("/")
  modality = parts[1] if len(parts) > 2 else ""  # eval/<modality>/<name>
  return (parts[0] != "eval", modality, is_student, rank, _numbers(tag), tag)


def table_metrics(summary: Mapping[str, Mapping[str, Spread]]) -> list[str]:
  """The results-table rows: every `eval/` metric that describes a run (the EMA's, then the
  student's), the Self-Flow diagnostics and the final training flow loss (`_TRAIN_ROWS`), in
  `_ROW_ORDER`."""
  tags = {t for metrics in summary.values() for t in metrics}
  rows = [t for t in tags if t.startswith("eval/") and not student.SET_UP_METRICS.search(t)]
  rows += [t for t in _TRAIN_ROWS if t in tags]
  return sorted(rows, key=_row_key)


def better_direction(tag: str) -> int:
  """-1 if lower is better (FD, losses), +1 if higher is better (accuracies, probe), else 0."""
  name = tag.rsplit("/", 1)[-1]
  if name.startswith(("fd", "loss")):
    return -1
  if "accuracy" in name or "faithfulness" in name or name.startswith("probe"):
    return 1
  return 0


# --- The within-noise rule and the sentences that apply it. ---


def verdict(a: Spread, b: Spread) -> str:
  """'beyond noise', 'within noise' or 'undetermined' (fewer than 2 seeds), by `NOISE_RULE`."""
  if a.n < 2 or b.n < 2:
    return "undetermined"
  separated = a.high < b.low or b.high < a.low
  if abs(a.mean - b.mean) > max(a.std, b.std) and separated:
    return "beyond noise"
  return "within noise"


def _count(n: int, noun: str) -> str:
  return f"{n} {noun}{'' if n == 1 else 's'}"


def _fmt(x: float) -> str:
  return f"{x:.4g}" if math.isfinite(x) else str(x)


def compare(summary: Mapping[str, Mapping[str, Spread]], metrics: Sequence[str],
            reference: str) -> list[dict[str, Any]]:
  """One record per (variant other than `reference`, metric both have): difference and verdict."""
  records = []
  for variant, spreads in summary.items():
    if variant == reference:
      continue
    for metric in metrics:
      if metric in spreads and metric in summary[reference]:
        ours, theirs = spreads[metric], summary[reference][metric]
        records.append(dict(variant=variant, reference=reference, metric=metric,
                            difference=ours.mean - theirs.mean,
                            verdict=verdict(ours, theirs), n=ours.n, reference_n=theirs.n))
  return records


def _describe(record: Mapping[str, Any], summary) -> str:
  metric, diff = record["metric"], record["difference"]
  ours = summary[record["variant"]][metric].mean
  theirs = summary[record["reference"]][metric].mean
  direction = better_direction(metric)
  judged = "" if direction == 0 else (", better" if diff * direction > 0 else ", worse")
  return (f"{metric} {'higher' if diff > 0 else 'lower'} by {_fmt(abs(diff))} "
          f"({_fmt(ours)} vs {_fmt(theirs)}{judged})")


def sentences(records: Sequence[Mapping[str, Any]], summary) -> list[str]:
  """Per variant, one sentence saying which differences from the reference are beyond seed
  noise and which are not, so that the page claims no more than the seeds support."""
  lines = []
  for variant in dict.fromkeys(r["variant"] for r in records):
    mine = [r for r in records if r["variant"] == variant]
    reference = mine[0]["reference"]
    beyond = [_describe(r, summary) for r in mine if r["verdict"] == "beyond noise"]
    within = [r["metric"] for r in mine if r["verdict"] == "within noise"]
    unknown = [r["metric"] for r in mine if r["verdict"] == "undetermined"]
    parts = []
    if beyond:
      parts.append("beyond seed noise: " + "; ".join(beyond) + ".")
    elif within:
      parts.append("no difference beyond seed noise.")
    if within:
      parts.append("Within seed noise: " + ", ".join(within) + ".")
    if unknown:
      parts.append("Not judged (fewer than 2 seeds, so no noise estimate): "
                   + ", ".join(unknown) + ".")
    lines.append(f"**{variant} vs {reference}**: " + " ".join(parts))
  return lines


# --- Plots. ---


def _axes(figsize=(6, 4)):
  """(figure, axes) drawn by the Agg backend, without pyplot: no global backend switch in the
  caller's process (a notebook keeps its inline plots)."""
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  figure = Figure(figsize=figsize)
  FigureCanvasAgg(figure)
  return figure, figure.subplots()


def _save(figure, axes, path: str) -> None:
  axes.grid(alpha=0.3)
  axes.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=100)


def _band(axes, x, values_per_x: list[list[float]], label: str) -> None:
  """Mean line with a min-max band over seeds."""
  mean = [np.mean(v) for v in values_per_x]
  line, = axes.plot(x, mean, marker="o", markersize=3, label=label)
  axes.xaxis.get_major_locator().set_params(integer=all(float(v).is_integer() for v in x))
  axes.fill_between(x, [min(v) for v in values_per_x], [max(v) for v in values_per_x],
                        color=line.get_color(), alpha=0.2, linewidth=0)


def curves(histories: Mapping[AblationRun, Mapping[str, list]], variants: Sequence[str],
           metric: str) -> dict[str, dict[str, list]]:
  """{variant: {"steps": [...], "values": [[value per seed], ...]}} for one metric."""
  result = {}
  for variant in variants:
    by_step: dict[int, list[float]] = {}
    for run, series in histories.items():
      if run.variant == variant:
        for step, value in series.get(metric, []):
          by_step.setdefault(step, []).append(value)
    if by_step:
      steps = sorted(by_step)
      result[variant] = {"steps": steps, "values": [by_step[s] for s in steps]}
  return result


def plot_curve(curve: Mapping[str, Mapping[str, list]], metric: str, path: str) -> None:
  fig, ax = _axes()
  for variant, data in curve.items():
    _band(ax, data["steps"], data["values"], variant)
  ax.set_xlabel("training step")
  ax.set_ylabel(metric)
  ax.set_title(f"{metric} (mean, min-max over seeds)")
  _save(fig, ax, path)


def plot_final_by(summary, variants: Sequence[str], metrics: Sequence[str], x_label: str,
                  x_of: Callable[[str], float], y_label: str, title: str, path: str) -> None:
  """Final values of a family of metrics (probe layers, loss bins) against their number."""
  fig, ax = _axes()
  for variant in variants:
    present = [m for m in metrics if m in summary[variant]]
    if present:
      _band(ax, [x_of(m) for m in present], [list(summary[variant][m].values) for m in present],
            variant)
  ax.set_xlabel(x_label)
  ax.set_ylabel(y_label)
  ax.set_title(title)
  _save(fig, ax, path)


def _write_plots(output: str, histories, summary, variants, metrics) -> list[str]:
  """Writes the PNGs; returns their file names."""
  written = []
  histories_tags = {t for series in histories.values() for t in series}
  for metric in sorted(t for t in histories_tags if any(p.search(t) for p in _CURVE_PATTERNS)
                       and not student.SET_UP_METRICS.search(t)):
    name = "curve_" + metric.replace("/", "_") + ".png"
    plot_curve(curves(histories, variants, metric), metric, os.path.join(output, name))
    written.append(name)
  for modality in sorted({m.split("/")[1] for m in metrics if m.startswith("eval/")}):
    probes = [m for m in metrics if m.startswith(f"eval/{modality}/probe_layer")]
    if probes:
      name = f"probe_{modality}_by_layer.png"
      plot_final_by(summary, variants, probes, "block (1-based)", lambda m: _numbers(m)[0],
                    "linear-probe top-1 accuracy",
                    f"{modality}: probe accuracy by layer (final, min-max over seeds)",
                    os.path.join(output, name))
      written.append(name)
    bins = [m for m in metrics if m.startswith(f"eval/{modality}/loss_t")]
    if bins:
      name = f"loss_{modality}_by_t.png"
      plot_final_by(summary, variants, bins, "timestep t (bin centre)",
                    lambda m: float(np.mean(_numbers(m)[:2])), "held-out flow loss",
                    f"{modality}: loss by timestep (final, min-max over seeds)",
                    os.path.join(output, name))
      written.append(name)
  return written


# --- The results page. ---


def _cell(spreads: Mapping[str, Spread], metric: str, seeds: int) -> str:
  if metric not in spreads:
    return "—"
  s = spreads[metric]
  text = f"{_fmt(s.mean)} ± {s.std:.2g}" if s.n > 1 else _fmt(s.mean)
  return text + (f" (n={s.n})" if s.n != seeds else "")


def markdown_table(summary, variants: Sequence[str], metrics: Sequence[str],
                   seeds_per_variant: Mapping[str, int]) -> list[str]:
  arrows = {-1: " ↓", 1: " ↑", 0: ""}
  lines = ["| metric | " + " | ".join(f"{v} (n={seeds_per_variant[v]})" for v in variants) + " |",
           "|---|" + "---|" * len(variants)]
  for metric in metrics:
    cells = [_cell(summary[v], metric, seeds_per_variant[v]) for v in variants]
    lines.append(f"| {metric}{arrows[better_direction(metric)]} | " + " | ".join(cells) + " |")
  return lines


def write_report(output: str, runs: Sequence[AblationRun], statuses: Mapping[str, str],
                 description: str = "",
                 imported: Mapping[str, Mapping[str, list]] | None = None) -> dict[str, Any]:
  """Reads every finished run's metrics and writes results.md, results.json and the plots.

  `imported` holds the histories of runs taken from an earlier page (`import_histories`), read
  from there instead of from their workdirs. Returns the results.json content. The first
  variant (in run order) is the reference that the others are compared with.
  """
  os.makedirs(output, exist_ok=True)
  imported = imported or {}
  variants = list(dict.fromkeys(run.variant for run in runs))
  done = [run for run in runs
          if statuses.get(run.name, "").startswith(("finished", "imported"))]
  histories = {run: imported[run.name] if run.name in imported else read_scalars(run.workdir)
               for run in done}
  finals = {run: {tag: series[-1][1] for tag, series in history.items()}
            for run, history in histories.items()}
  summary = summarise(finals, variants)
  metrics = table_metrics(summary)
  seeds = {v: sum(run.variant == v for run in done) for v in variants}
  records = compare(summary, metrics, variants[0])
  plots = _write_plots(output, histories, summary, variants, metrics)

  lines = ["# Ablation results", ""]
  if description:
    lines += [f"Command: `{description}`", ""]
  counts = ", ".join(f"{v}: {_count(seeds[v], 'seed')}" for v in variants)
  lines += [f"Runs: {len(done)} of {len(runs)} finished or imported ({counts}). Final value "
            "of each metric per run (the last evaluation), mean ± sample std over seeds; ↓ "
            "lower is better, ↑ higher is better; — the variant does not log it (e.g. no "
            "teacher).", ""]
  lines += markdown_table(summary, variants, metrics, seeds)
  lines += ["", f"## Differences from {variants[0]}", "", f"Rule: {NOISE_RULE}", ""]
  lines += [f"- {s}" for s in sentences(records, summary)] or [
      "- Nothing to compare: fewer than two variants have finished runs with shared metrics."]
  lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
  lines += ["", "## Runs", "", "| run | status | workdir |", "|---|---|---|"]
  lines += [f"| {run.name} | {statuses.get(run.name, 'not run')} | {run.workdir} |"
            for run in runs]
  with open(os.path.join(output, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")

  curve_tags = sorted({t for s in histories.values() for t in s
                       if any(p.search(t) for p in _CURVE_PATTERNS)})
  results = {
      "description": description, "rule": NOISE_RULE, "variants": variants,
      "reference": variants[0], "metrics": metrics, "plots": plots,
      # Each run's curves ("history") let a later study import it (`import_histories`).
      "runs": [dict(name=run.name, variant=run.variant, seed=run.seed, workdir=run.workdir,
                    status=statuses.get(run.name, "not run"), final=finals.get(run, {}),
                    history={t: histories[run][t] for t in curve_tags
                             if t in histories.get(run, {})})
               for run in runs],
      "summary": {v: {m: s.to_json() for m, s in summary[v].items()} for v in variants},
      "comparisons": records,
      "curves": {t: curves(histories, variants, t) for t in curve_tags},
  }
  with open(os.path.join(output, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  return results


def run_ablation(runs: Sequence[AblationRun], train_fn: Callable[[AblationRun], None],
                 output: str, fingerprint: str = "", description: str = "",
                 import_results: str = "") -> dict[str, Any]:
  """`execute` every run, then `write_report`; returns the results (with statuses per run).

  With `import_results` (an earlier results.json), the runs that page lists as finished are
  taken from it instead of trained (`import_histories`)."""
  imported = import_histories(import_results, runs) if import_results else {}
  statuses = execute(runs, train_fn, fingerprint,
                     imported=dict.fromkeys(imported, import_results))
  return write_report(output, runs, statuses, description, imported)


# --- Command line. ---


def _define_flags() -> None:
  """The CLI's flags, defined only when run as a program (self_flow.main defines --config too)."""
  flags.DEFINE_string("config", None, "Config file and argument, e.g. configs/c2i.py:local "
                      "(method= is added per variant).")
  flags.DEFINE_list("variants", ["vanilla", "dual_timestep", "self_flow"],
                    f"Variants to compare, the first is the reference; each is one of "
                    f"{sorted(base_config.METHODS)}, or {VARIANT_FORMAT}.")
  flags.DEFINE_integer("seeds", 3, "Seeds per variant (0..seeds-1).")
  flags.DEFINE_integer("steps", None, "Training steps of every run.")
  flags.DEFINE_string("output", None, "Directory for the runs and the results page.")
  flags.DEFINE_integer("eval_every", 0, "Steps between evaluations (the curves); 0 = only at "
                       "the end.")
  flags.DEFINE_multi_string("override", [], "Extra config setting for every run, "
                            "<key>=<value> (e.g. eval.num_samples=500); repeatable.")
  flags.DEFINE_string("import_results", "", "results.json of an earlier study with the same "
                      "settings: the runs it lists as finished are taken from it, not trained "
                      "(e.g. seed 0 of a study whose workdirs are gone, when adding seeds).")
  flags.mark_flags_as_required(["config", "steps", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  config_file, _, config_arg = f.config.partition(":")
  runs = plan_runs(f.variants, f.seeds, f.output)
  overrides = run_overrides(f.steps, f.eval_every, parse_overrides(f.override))
  fingerprint = json.dumps({"config": f.config, "overrides": overrides}, sort_keys=True)
  description = "python -m self_flow.ablate " + " ".join(sys.argv[1:])
  results = run_ablation(runs, subprocess_train_fn(config_file, config_arg, overrides), f.output,
                         fingerprint, description, f.import_results)
  failed = [r["name"] for r in results["runs"] if r["status"].startswith("failed")]
  logging.info("Results in %s.", os.path.join(f.output, "results.md"))
  if failed:
    raise SystemExit(f"{len(failed)} of {len(runs)} runs failed ({', '.join(failed)}); their "
                     "logs are train.log in their workdirs. Rerun the same command to retry "
                     "them (finished runs are skipped).")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
