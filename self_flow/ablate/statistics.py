"""Seed statistics: a metric's final values over a variant's seeds (`Spread`), and the screening
rule (`NOISE_RULE`) that calls a difference between two variants real or within seed noise."""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from self_flow.ablate import runner

NOISE_RULE = (
    "A difference between two variants is called real only when |difference of the means| "
    "exceeds the larger of the two seed standard deviations AND the two ranges over seeds "
    "[min, max] do not overlap; otherwise it is within seed noise. With fewer than 2 seeds on "
    "either side there is no noise estimate and no difference is claimed. This is a screening "
    "rule for a handful of seeds, not a significance test.")


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


def verdict(a: Spread, b: Spread) -> str:
  """'beyond noise', 'within noise' or 'undetermined' (fewer than 2 seeds), by `NOISE_RULE`."""
  if a.n < 2 or b.n < 2:
    return "undetermined"
  separated = a.high < b.low or b.high < a.low
  if abs(a.mean - b.mean) > max(a.std, b.std) and separated:
    return "beyond noise"
  return "within noise"


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
