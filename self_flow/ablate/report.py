"""The results page: results.md (final metrics per variant, sentences saying which differences
from the reference variant are beyond seed noise, the figures, every run's status) and
results.json with the same numbers and each run's curves; and reading an earlier results.json
back, so that a study adding seeds need not train again the runs that page finished."""

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from self_flow import storage
from self_flow.ablate import events, figures, metric_tags, runner, statistics


# --- Sentences that apply the within-noise rule. ---


def _fmt(x: float) -> str:
  return f"{x:.4g}" if math.isfinite(x) else str(x)


def _describe(record: Mapping[str, Any], summary) -> str:
  metric, diff = record["metric"], record["difference"]
  ours = summary[record["variant"]][metric].mean
  theirs = summary[record["reference"]][metric].mean
  direction = metric_tags.better_direction(metric)
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


# --- The results page. ---


def _count(n: int, noun: str) -> str:
  return f"{n} {noun}{'' if n == 1 else 's'}"


def _cell(spreads: Mapping[str, statistics.Spread], metric: str, seeds: int) -> str:
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
    lines.append(f"| {metric}{arrows[metric_tags.better_direction(metric)]} | "
                 + " | ".join(cells) + " |")
  return lines


def write_report(output: str, runs: Sequence[runner.AblationRun], statuses: Mapping[str, str],
                 description: str = "",
                 imported: Mapping[str, Mapping[str, list]] | None = None) -> dict[str, Any]:
  """Reads every finished run's metrics and writes results.md, results.json and the plots.

  `imported` holds the histories of runs taken from an earlier page (`import_histories`), read
  from there instead of from their workdirs. Returns the results.json content. The first
  variant (in run order) is the reference that the others are compared with. `output` may be
  local or a URL (gs://...).
  """
  imported = imported or {}
  variants = list(dict.fromkeys(run.variant for run in runs))
  done = [run for run in runs
          if statuses.get(run.name, "").startswith(("finished", "imported"))]
  histories = {run: imported[run.name] if run.name in imported else events.read_scalars(run.workdir)
               for run in done}
  finals = {run: {tag: series[-1][1] for tag, series in history.items()}
            for run, history in histories.items()}
  summary = statistics.summarise(finals, variants)
  metrics = metric_tags.table_metrics(summary)
  seeds = {v: sum(run.variant == v for run in done) for v in variants}
  records = statistics.compare(summary, metrics, variants[0])
  plots = figures.write_plots(output, histories, summary, variants, metrics)

  lines = ["# Ablation results", ""]
  if description:
    lines += [f"Command: `{description}`", ""]
  counts = ", ".join(f"{v}: {_count(seeds[v], 'seed')}" for v in variants)
  lines += [f"Runs: {len(done)} of {len(runs)} finished or imported ({counts}). Final value "
            "of each metric per run (the last evaluation), mean ± sample std over seeds; ↓ "
            "lower is better, ↑ higher is better; — the variant does not log it (e.g. no "
            "teacher).", ""]
  lines += markdown_table(summary, variants, metrics, seeds)
  lines += ["", f"## Differences from {variants[0]}", "", f"Rule: {statistics.NOISE_RULE}", ""]
  lines += [f"- {s}" for s in sentences(records, summary)] or [
      "- Nothing to compare: fewer than two variants have finished runs with shared metrics."]
  lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
  lines += ["", "## Runs", "", "| run | status | workdir |", "|---|---|---|"]
  lines += [f"| {run.name} | {statuses.get(run.name, 'not run')} | {run.workdir} |"
            for run in runs]
  storage.write_text(storage.join(output, "results.md"), "\n".join(lines) + "\n")

  curve_tags = sorted({t for s in histories.values() for t in s
                       if any(p.search(t) for p in metric_tags.CURVE_PATTERNS)})
  results = {
      "description": description, "rule": statistics.NOISE_RULE, "variants": variants,
      "reference": variants[0], "metrics": metrics, "plots": plots,
      # Each run's curves ("history") let a later study import it (`import_histories`).
      "runs": [dict(name=run.name, variant=run.variant, seed=run.seed, workdir=run.workdir,
                    status=statuses.get(run.name, "not run"), final=finals.get(run, {}),
                    history={t: histories[run][t] for t in curve_tags
                             if t in histories.get(run, {})})
               for run in runs],
      "summary": {v: {m: s.to_json() for m, s in summary[v].items()} for v in variants},
      "comparisons": records,
      "curves": {t: figures.curves(histories, variants, t) for t in curve_tags},
  }
  storage.write_text(storage.join(output, "results.json"), json.dumps(results, indent=1))
  return results


def import_histories(path: str, runs: Sequence[runner.AblationRun]
                     ) -> dict[str, dict[str, list[tuple[int, float]]]]:
  """{run name: {tag: [(step, value), ...]}} of the planned `runs` that the earlier results.json
  at `path` (local or a URL) lists as finished: a study adds seeds to runs whose workdirs are
  gone (another machine, a cleaned disk) without training those runs again.

  Each history holds every final metric of the run, plus its curves: from the run's own
  "history" (written since 2026-12-04), or, in older pages, from the variant's curves when the
  run is its variant's only one there (curve values are per seed but not named by run, so with
  several seeds only the final metrics can be taken back).
  """
  page = storage.read_json(path)
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
