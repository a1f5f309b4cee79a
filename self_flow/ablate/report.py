"""The results page: results.md (the pre-registered primary endpoint first, then every metric's
paired difference from the baseline with its interval and Holm-corrected p-value, the sentences
that say what is shown, the convergence speed, the evaluation's own noise, the final values per
variant as a secondary view, the figures and every run's status) and results.json with the same
numbers and each run's curves; and reading an earlier results.json back, so that a study adding
seeds need not train again the runs that page finished."""

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from self_flow import storage
from self_flow.ablate import events, figures, metric_tags, runner, statistics

# What the convergence table converts steps into: the analytic model FLOPs of one step, logged
# once per run by the trainer (per modality, all devices together).
FLOPS_TAG = "perf/model_flops_per_step/{modality}"


def _fmt(x: float) -> str:
  return f"{x:.4g}" if math.isfinite(x) else str(x)


def _p(x: float) -> str:
  return "—" if math.isnan(x) else ("< 0.001" if x < 0.001 else f"{x:.3f}")


def _interval(record: Mapping[str, Any]) -> str:
  low, high = record["interval"]
  return "n < 2" if math.isnan(low) else f"[{_fmt(low)}, {_fmt(high)}]"


def _judged(metric: str, difference: float) -> str:
  direction = metric_tags.better_direction(metric)
  return "" if direction == 0 or difference == 0 else (
      ", better" if difference * direction > 0 else ", worse")


# --- Sentences from the paired numbers. ---


def sentences(records: Sequence[Mapping[str, Any]]) -> list[str]:
  """Per variant, one sentence naming the differences from the baseline that the paired test
  shows (`statistics.PAIRED_RULE`) and counting those it does not, so that the page claims no
  more than the seeds support."""
  lines = []
  for variant in dict.fromkeys(r["variant"] for r in records):
    mine = [r for r in records if r["variant"] == variant]
    shown = [f"{r['metric']} {'higher' if r['mean'] > 0 else 'lower'} by {_fmt(abs(r['mean']))} "
             f"(95% CI {_interval(r)}{_judged(r['metric'], r['mean'])})"
             for r in mine if r["verdict"] == "real"]
    not_shown = sum(r["verdict"] == "not shown" for r in mine)
    unknown = sum(r["verdict"] == "undetermined" for r in mine)
    parts = [("shown: " + "; ".join(shown) + ".") if shown else "no difference shown."]
    if not_shown:
      parts.append(f"{not_shown} other metric{'s' if not_shown > 1 else ''} not shown to differ.")
    if unknown:
      parts.append(f"{unknown} not judged (fewer than 2 paired seeds).")
    lines.append(f"**{variant} vs {mine[0]['baseline']}**: " + " ".join(parts))
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


def paired_table(records: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> list[str]:
  """metric | per variant: mean difference [95% CI], adjusted p (* where shown)."""
  others = list(dict.fromkeys(r["variant"] for r in records))
  by_key = {(r["variant"], r["metric"]): r for r in records}
  lines = ["| metric | " + " | ".join(f"{v} − {records[0]['baseline']}" for v in others) + " |",
           "|---|" + "---|" * len(others)]
  for metric in metrics:
    cells = []
    for variant in others:
      r = by_key.get((variant, metric))
      if r is None:
        cells.append("—")
        continue
      p = r["p_value"] if r["primary"] else r["p_adjusted"]
      mark = "**" if r["verdict"] == "real" else ""
      cells.append(f"{mark}{_fmt(r['mean'])} {_interval(r)}, p {_p(p)}{mark} (n={r['n']})")
    if any(c != "—" for c in cells):
      lines.append(f"| {metric} | " + " | ".join(cells) + " |")
  return lines


def primary_lines(records: Sequence[Mapping[str, Any]], primary: str) -> list[str]:
  """The pre-registered endpoint: every variant's per-seed differences, mean, interval, p."""
  mine = [r for r in records if r["metric"] == primary]
  if not mine:
    return [f"`{primary}`: no variant has paired runs with the baseline that logged it yet."]
  lines = []
  for r in mine:
    diffs = ", ".join(f"seed {s}: {_fmt(d)}" for s, d in zip(r["seeds"], r["differences"]))
    lines.append(f"- **{r['variant']} − {r['baseline']}** on `{primary}`: mean "
                 f"{_fmt(r['mean'])}, 95% CI {_interval(r)}, paired t-test p {_p(r['p_value'])} "
                 f"(n = {r['n']}; {diffs}). Verdict: "
                 + {"real": "a difference is shown" + _judged(primary, r["mean"]) + ".",
                    "not shown": "no difference is shown.",
                    "undetermined": "not judged (fewer than 2 paired seeds)."}[r["verdict"]])
  return lines


def convergence_lines(records: Sequence[Mapping[str, Any]], baseline: str) -> list[str]:
  if not records:
    return ["No run logged the metrics the convergence table reads."]
  lines = [f"Steps (model FLOPs) until a run's evaluation first reaches the final value of the "
           f"{baseline} run with the same seed; mean over the seeds that reach it.", "",
           "| metric | variant | reached | mean steps | mean FLOPs | steps per seed |",
           "|---|---|---|---|---|---|"]
  for r in records:
    lines.append(f"| {r['metric']} | {r['variant']} | {r['reached']} of {r['seeds']} | "
                 f"{_fmt(r['mean_steps'])} | {_fmt(r['mean_flops'])} | "
                 f"{', '.join(map(str, r['steps'])) or '—'} |")
  return lines


def noise_lines(noise: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
                metrics: Sequence[str]) -> list[str]:
  """Each metric's std over evaluation draws of one checkpoint beside the std of the paired
  differences over training seeds."""
  spread = noise["spread"]
  lines = [f"Run `{noise['run']}` (step {noise['step']}) evaluated {noise['draws']} times with "
           "eval.seed_offset = " + ", ".join(map(str, noise["offsets"])) + " (new sampling, "
           "probe and held-out loss noise each time).", "",
           "| metric | std over evaluation draws | std of the paired differences over seeds |",
           "|---|---|---|"]
  diff_std = {}
  for r in records:
    diff_std.setdefault(r["metric"], []).append(f"{r['variant']}: {_fmt(r['std'])}")
  for metric in metrics:
    if metric in spread:
      lines.append(f"| {metric} | {_fmt(spread[metric]['std'])} | "
                   f"{'; '.join(diff_std.get(metric, [])) or '—'} |")
  return lines


def write_report(output: str, runs: Sequence[runner.AblationRun], statuses: Mapping[str, str],
                 description: str = "",
                 imported: Mapping[str, Mapping[str, list]] | None = None,
                 baseline: str = "", primary: str = "",
                 noise: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Reads every finished run's metrics and writes results.md, results.json and the plots.

  `imported` holds the histories of runs taken from an earlier page (`import_histories`), read
  from there instead of from their workdirs. `baseline` (default: the first variant in run
  order) is the variant every other is paired with; `primary` the pre-registered endpoint
  reported first; `noise` the evaluation-noise measurement (`study.measure_evaluation_noise`).
  Returns the results.json content. `output` may be local or a URL (gs://...).
  """
  imported = imported or {}
  variants = list(dict.fromkeys(run.variant for run in runs))
  baseline = baseline or variants[0]
  done = [run for run in runs
          if statuses.get(run.name, "").startswith(("finished", "imported"))]
  histories = {run: imported[run.name] if run.name in imported else events.read_scalars(run.workdir)
               for run in done}
  finals = {run: {tag: series[-1][1] for tag, series in history.items()}
            for run, history in histories.items()}
  summary = statistics.summarise(finals, variants)
  metrics = metric_tags.table_metrics(summary)
  if primary and primary in metrics:
    metrics = [primary] + [m for m in metrics if m != primary]
  seeds = {v: sum(run.variant == v for run in done) for v in variants}
  records = statistics.compare_paired(finals, variants, baseline, metrics, primary)
  modalities = sorted({m.split("/")[1] for m in metrics if m.startswith("eval/")})
  speed = [record for modality in modalities for metric in ("loss", "fd")
           for record in statistics.convergence(
               histories, variants, baseline, f"eval/{modality}/{metric}", -1,
               FLOPS_TAG.format(modality=modality))]
  plots = figures.write_plots(output, histories, summary, variants, metrics)

  lines = ["# Ablation results", ""]
  if description:
    lines += [f"Command: `{description}`", ""]
  counts = ", ".join(f"{v}: {_count(seeds[v], 'seed')}" for v in variants)
  lines += [f"Runs: {len(done)} of {len(runs)} finished or imported ({counts}). Baseline: "
            f"{baseline}.", ""]
  if primary:
    lines += ["## Primary endpoint (pre-registered)", ""] + primary_lines(records, primary)
    lines += [""]
  lines += [f"## Paired differences from {baseline}", "", f"Rule: {statistics.PAIRED_RULE}", "",
            "Each cell: mean of the per-seed differences, its 95% t-interval, the p-value "
            "(primary: the paired t-test's; others: Holm-adjusted), bold where shown.", ""]
  lines += paired_table(records, metrics) if records else [
      "Nothing to compare: no other variant has runs paired with the baseline."]
  lines += [""] + [f"- {s}" for s in sentences(records)]
  lines += ["", "## Convergence speed", ""] + convergence_lines(speed, baseline)
  if noise:
    lines += ["", "## Evaluation noise", ""] + noise_lines(noise, records, metrics)
  lines += ["", "## Final values", "",
            "Final value of each metric per run (the last evaluation), mean ± sample std over "
            "seeds; ↓ lower is better, ↑ higher is better; — the variant does not log it (e.g. "
            "no teacher). A secondary view: the verdicts above come from the paired numbers.", ""]
  lines += markdown_table(summary, variants, metrics, seeds)
  lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
  lines += ["", "## Runs", "", "| run | status | workdir |", "|---|---|---|"]
  lines += [f"| {run.name} | {statuses.get(run.name, 'not run')} | {run.workdir} |"
            for run in runs]
  storage.write_text(storage.join(output, "results.md"), "\n".join(lines) + "\n")

  curve_tags = sorted({t for s in histories.values() for t in s
                       if any(p.search(t) for p in metric_tags.CURVE_PATTERNS)
                       or t.startswith("perf/model_flops_per_step/")})
  results = {
      "description": description, "rule": statistics.PAIRED_RULE, "variants": variants,
      "baseline": baseline, "primary": primary, "metrics": metrics, "plots": plots,
      # Each run's curves ("history") let a later study import it (`import_histories`).
      "runs": [dict(name=run.name, variant=run.variant, seed=run.seed, workdir=run.workdir,
                    status=statuses.get(run.name, "not run"), final=finals.get(run, {}),
                    history={t: histories[run][t] for t in curve_tags
                             if t in histories.get(run, {})})
               for run in runs],
      "summary": {v: {m: s.to_json() for m, s in summary[v].items()} for v in variants},
      "paired": records,
      "convergence": speed,
      "evaluation_noise": dict(noise) if noise else None,
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
