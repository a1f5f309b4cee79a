"""Seed statistics of a study: each metric's final values over a variant's seeds (`Spread`, the
table's secondary view), and the paired comparison with a named baseline that the verdicts come
from (`PAIRED_RULE`): per-seed differences, their mean, a 95% t-interval, a paired t-test and
Holm's correction over the table's metrics, with one pre-registered primary endpoint tested
alone. Also the convergence speed read off the evaluation curves (`convergence`)."""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from self_flow.ablate import runner

ALPHA = 0.05  # Two-sided level of every test and 1 - the intervals' coverage.
PAIRED_RULE = (
    "Every variant is compared with the baseline seed by seed: runs with the same seed share "
    "their initialisation, data order and evaluation draws, so the per-seed difference removes "
    "what the seed does to both. Reported: the mean difference over seeds, its 95% t-interval "
    "and the two-sided paired t-test's p-value. The pre-registered primary endpoint is tested "
    "alone at 0.05. The other metrics of the table are one family per variant: their p-values "
    "are Holm-corrected, and a difference is called real only when its corrected p-value is "
    "below 0.05. With fewer than 2 paired seeds nothing is claimed.")


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

  def to_json(self) -> dict[str, Any]:
    return dict(mean=self.mean, std=self.std, min=float(np.min(self.values)),
                max=float(np.max(self.values)), n=self.n, values=list(self.values))


def summarise(finals: Mapping[runner.AblationRun, Mapping[str, float]], variants: Sequence[str]
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


@dataclasses.dataclass(frozen=True)
class Paired:
  """A variant minus the baseline, seed by seed, for one metric."""

  seeds: tuple[int, ...]
  differences: tuple[float, ...]

  @property
  def _spread(self) -> Spread:
    return Spread(self.differences)

  @property
  def n(self) -> int:
    return self._spread.n

  @property
  def mean(self) -> float:
    return self._spread.mean

  @property
  def std(self) -> float:
    """Sample standard deviation of the differences (ddof 1); 0 for a single seed."""
    return self._spread.std

  @property
  def interval(self) -> tuple[float, float]:
    """The (1 - ALPHA) t-interval of the mean difference; (nan, nan) below 2 seeds."""
    if self.n < 2:
      return (math.nan, math.nan)
    half = stats.t.ppf(1 - ALPHA / 2, self.n - 1) * self.std / math.sqrt(self.n)
    return (self.mean - half, self.mean + half)

  @property
  def p_value(self) -> float:
    """Two-sided paired t-test of mean difference 0; nan below 2 seeds. Equal differences
    (std 0) give 0 when they are not 0 and 1 when they are."""
    if self.n < 2:
      return math.nan
    if self.std == 0:
      return 1.0 if self.mean == 0 else 0.0
    t = self.mean / (self.std / math.sqrt(self.n))
    return float(2 * stats.t.sf(abs(t), self.n - 1))

  def to_json(self) -> dict[str, Any]:
    low, high = self.interval
    return dict(seeds=list(self.seeds), differences=list(self.differences), n=self.n,
                mean=self.mean, std=self.std, interval=[low, high], p_value=self.p_value)


def paired(variant: Mapping[int, float], baseline: Mapping[int, float]) -> Paired:
  """variant - baseline over the seeds both have ({seed: final value} each)."""
  seeds = tuple(sorted(variant.keys() & baseline.keys()))
  return Paired(seeds, tuple(variant[s] - baseline[s] for s in seeds))


def holm(p_values: Sequence[float]) -> list[float]:
  """Holm's step-down adjusted p-values (nan stays nan and is not counted in the family).

  With the m valid p-values sorted ascending, the k-th (from 0) is multiplied by m - k, the
  running maximum keeps the order, and values are capped at 1."""
  valid = [i for i, p in enumerate(p_values) if not math.isnan(p)]
  order = sorted(valid, key=lambda i: p_values[i])
  adjusted = [math.nan] * len(p_values)
  running = 0.0
  for k, i in enumerate(order):
    running = max(running, min(1.0, (len(order) - k) * p_values[i]))
    adjusted[i] = running
  return adjusted


def by_seed(finals: Mapping[runner.AblationRun, Mapping[str, float]], variant: str,
            metric: str) -> dict[int, float]:
  """{seed: final value} of `metric` in `variant`'s runs that logged it."""
  return {run.seed: values[metric] for run, values in finals.items()
          if run.variant == variant and metric in values}


def compare_paired(finals: Mapping[runner.AblationRun, Mapping[str, float]],
                   variants: Sequence[str], baseline: str, metrics: Sequence[str],
                   primary: str = "") -> list[dict[str, Any]]:
  """One record per (variant other than `baseline`, metric both logged): the `Paired`
  numbers, the p-value used for the verdict (the raw one for `primary`, Holm-adjusted over the
  variant's other metrics otherwise) and the verdict: "real" (p < ALPHA), "not shown" or
  "undetermined" (fewer than 2 paired seeds)."""
  records = []
  for variant in variants:
    if variant == baseline:
      continue
    mine = []
    for metric in metrics:
      pair = paired(by_seed(finals, variant, metric), by_seed(finals, baseline, metric))
      if pair.n:
        mine.append(dict(variant=variant, baseline=baseline, metric=metric,
                         primary=metric == primary, **pair.to_json()))
    secondary = [r for r in mine if not r["primary"]]
    for record, adjusted in zip(secondary, holm([r["p_value"] for r in secondary])):
      record["p_adjusted"] = adjusted
    for record in mine:
      p = record["p_value"] if record["primary"] else record["p_adjusted"]
      record["verdict"] = ("undetermined" if math.isnan(p)
                           else "real" if p < ALPHA else "not shown")
    records += mine
  return records


def steps_to_reach(series: Sequence[tuple[int, float]], target: float,
                   direction: int) -> int | None:
  """The first evaluated step whose value is at least as good as `target` (direction -1: lower is
  better, +1: higher), or None if none is."""
  for step, value in series:
    if (value <= target) if direction < 0 else (value >= target):
      return int(step)
  return None


def convergence(histories: Mapping[runner.AblationRun, Mapping[str, list]],
                variants: Sequence[str], baseline: str, metric: str, direction: int,
                flops_tag: str) -> list[dict[str, Any]]:
  """Per variant: the steps (and model FLOPs, when the runs logged `flops_tag`) its runs took
  to reach the final `metric` value of the baseline run with the same seed, from the evaluation
  curve (so at the resolution of train.eval_every). Runs that never reach it are counted."""
  finals = {run.seed: series[metric][-1][1] for run, series in histories.items()
            if run.variant == baseline and series.get(metric)}
  records = []
  for variant in variants:
    steps, flops, unreached, seeds = [], [], 0, 0
    for run, series in histories.items():
      if run.variant != variant or run.seed not in finals or not series.get(metric):
        continue
      seeds += 1
      reached = steps_to_reach(series[metric], finals[run.seed], direction)
      if reached is None:
        unreached += 1
        continue
      steps.append(reached)
      if series.get(flops_tag):
        flops.append(reached * series[flops_tag][-1][1])
    if seeds:
      records.append(dict(
          variant=variant, metric=metric, seeds=seeds, reached=len(steps), steps=steps,
          mean_steps=float(np.mean(steps)) if steps else math.nan,
          mean_flops=float(np.mean(flops)) if flops and len(flops) == len(steps) else math.nan,
          unreached=unreached))
  return records


def evaluation_noise(metrics_by_draw: Mapping[Any, Mapping[str, float]]
                     ) -> dict[str, dict[str, float]]:
  """{metric: {"std": sample std over the evaluation draws, "n": draws}} of one checkpoint
  evaluated under several eval.seed_offset values (`reevaluate`)."""
  by_metric: dict[str, list[float]] = {}
  for values in metrics_by_draw.values():
    for metric, value in values.items():
      by_metric.setdefault(metric, []).append(value)
  return {m: {"std": float(np.std(v, ddof=1)) if len(v) > 1 else math.nan, "n": len(v)}
          for m, v in by_metric.items()}
