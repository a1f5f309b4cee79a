"""A whole study from Python: train the planned runs (or take them from an earlier results page),
then write the results page; the command line and the ablation notebook both go through it."""

from collections.abc import Callable, Sequence
from typing import Any

from self_flow.ablate import report, runner


def run_ablation(runs: Sequence[runner.AblationRun],
                 train_fn: Callable[[runner.AblationRun], None], output: str,
                 fingerprint: str = "", description: str = "",
                 import_results: str = "") -> dict[str, Any]:
  """`runner.execute` every run, then `report.write_report`; returns the results (with statuses
  per run).

  With `import_results` (an earlier results.json), the runs that page lists as finished are
  taken from it instead of trained (`report.import_histories`)."""
  imported = report.import_histories(import_results, runs) if import_results else {}
  statuses = runner.execute(runs, train_fn, fingerprint,
                            imported=dict.fromkeys(imported, import_results))
  return report.write_report(output, runs, statuses, description, imported)
