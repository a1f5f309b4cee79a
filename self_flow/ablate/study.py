"""A whole study from Python: train the planned runs (or take them from an earlier results page),
measure the evaluation's own noise on one baseline run if asked, then write the results page;
the command line and the ablation notebook both go through it."""

from collections.abc import Callable, Sequence
from typing import Any

from absl import logging

from self_flow import storage
from self_flow.ablate import report, runner, statistics

# The evaluation-noise measurement, beside results.md; reused while its settings are unchanged.
NOISE_FILE = "evaluation_noise.json"


def measure_evaluation_noise(runs: Sequence[runner.AblationRun], statuses: dict[str, str],
                             baseline: str, draws: int,
                             reevaluate_fn: Callable[[runner.AblationRun, Sequence[int], str],
                                                     None],
                             output: str, fingerprint: str) -> dict[str, Any] | None:
  """Evaluates the last checkpoint of the baseline's lowest-seed trained run `draws` times
  (eval.seed_offset 0..draws-1) and returns {"run", "step", "offsets", "draws", "metrics",
  "spread": statistics.evaluation_noise}, stored in OUTPUT/evaluation_noise.json and reused by a
  rerun with the same fingerprint. None when no baseline run was trained here (an imported run
  has no checkpoint to read)."""
  trained = [run for run in runs if run.variant == baseline
             and statuses.get(run.name, "").startswith("finished")]
  if not trained:
    logging.warning("No trained %s run to measure the evaluation noise on.", baseline)
    return None
  run = min(trained, key=lambda r: r.seed)
  offsets = list(range(draws))
  path = storage.join(output, NOISE_FILE)
  key = dict(run=run.name, offsets=offsets, fingerprint=fingerprint)
  if storage.exists(path):
    stored = storage.read_json(path)
    if all(stored.get(k) == v for k, v in key.items()):
      return stored
  raw = storage.join(output, "evaluation_noise_raw.json")
  reevaluate_fn(run, offsets, raw)
  measured = storage.read_json(raw)
  noise = dict(key, step=measured["step"], draws=draws, metrics=measured["metrics"],
               spread=statistics.evaluation_noise(measured["metrics"]))
  storage.write_json(path, noise)
  return noise


def run_ablation(runs: Sequence[runner.AblationRun],
                 train_fn: Callable[[runner.AblationRun], None], output: str,
                 fingerprint: str = "", description: str = "",
                 import_results: str = "", baseline: str = "", primary: str = "",
                 noise_draws: int = 0,
                 reevaluate_fn: Callable[[runner.AblationRun, Sequence[int], str], None]
                 | None = None) -> dict[str, Any]:
  """`runner.execute` every run, optionally `measure_evaluation_noise` (`noise_draws` > 1 with a
  `reevaluate_fn`), then `report.write_report` with `baseline` (default: the first variant) and
  the pre-registered `primary` metric; returns the results (with statuses per run).

  With `import_results` (an earlier results.json), the runs that page lists as finished are
  taken from it instead of trained (`report.import_histories`)."""
  variants = list(dict.fromkeys(run.variant for run in runs))
  baseline = baseline or variants[0]
  if baseline not in variants:
    raise ValueError(f"baseline={baseline!r} must be one of the variants {variants}.")
  if noise_draws == 1 or noise_draws < 0 or (noise_draws and reevaluate_fn is None):
    raise ValueError(f"noise_draws={noise_draws} must be 0 (no measurement) or >= 2, with a "
                     "reevaluate_fn.")
  imported = report.import_histories(import_results, runs) if import_results else {}
  statuses = runner.execute(runs, train_fn, fingerprint,
                            imported=dict.fromkeys(imported, import_results))
  noise = (measure_evaluation_noise(runs, statuses, baseline, noise_draws, reevaluate_fn, output,
                                    fingerprint) if noise_draws else None)
  return report.write_report(output, runs, statuses, description, imported, baseline, primary,
                             noise)
