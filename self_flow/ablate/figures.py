"""The results page's figures (PNG, matplotlib's Agg backend): each metric against the training
step, probe accuracy by layer and held-out loss by timestep bin, as a mean line with a min-max
band over seeds. Each is rendered in memory and written whole to its path, local or a URL."""

import io
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from self_flow import storage
from self_flow.ablate import metric_tags, runner
from self_flow.evaluation import student


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
  png = io.BytesIO()
  figure.savefig(png, format="png", dpi=100)
  storage.write_bytes(path, png.getvalue())


def _band(axes, x, values_per_x: list[list[float]], label: str) -> None:
  """Mean line with a min-max band over seeds."""
  mean = [np.mean(v) for v in values_per_x]
  line, = axes.plot(x, mean, marker="o", markersize=3, label=label)
  axes.xaxis.get_major_locator().set_params(integer=all(float(v).is_integer() for v in x))
  axes.fill_between(x, [min(v) for v in values_per_x], [max(v) for v in values_per_x],
                        color=line.get_color(), alpha=0.2, linewidth=0)


def curves(histories: Mapping[runner.AblationRun, Mapping[str, list]], variants: Sequence[str],
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


def write_plots(output: str, histories, summary, variants, metrics) -> list[str]:
  """Writes the PNGs; returns their file names."""
  written = []
  histories_tags = {t for series in histories.values() for t in series}
  for metric in sorted(t for t in histories_tags
                       if any(p.search(t) for p in metric_tags.CURVE_PATTERNS)
                       and not student.SET_UP_METRICS.search(t)):
    name = "curve_" + metric.replace("/", "_") + ".png"
    plot_curve(curves(histories, variants, metric), metric, storage.join(output, name))
    written.append(name)
  for modality in sorted({m.split("/")[1] for m in metrics if m.startswith("eval/")}):
    # eval/<m>/probe_t<t>_layer<k>: one figure per noise level t.
    levels = sorted({metric_tags.numbers(m)[0] for m in metrics
                     if m.startswith(f"eval/{modality}/probe_t")})
    for t in levels:
      probes = [m for m in metrics if m.startswith(f"eval/{modality}/probe_t")
                and metric_tags.numbers(m)[0] == t]
      name = f"probe_{modality}_t{t:g}_by_layer.png"
      plot_final_by(summary, variants, probes, "block (1-based)",
                    lambda m: metric_tags.numbers(m)[1], "linear-probe top-1 accuracy",
                    f"{modality}: probe accuracy by layer at t = {t:g} (final, min-max over "
                    "seeds)", storage.join(output, name))
      written.append(name)
    bins = [m for m in metrics if m.startswith(f"eval/{modality}/loss_t")]
    if bins:
      name = f"loss_{modality}_by_t.png"
      plot_final_by(summary, variants, bins, "timestep t (bin centre)",
                    lambda m: float(np.mean(metric_tags.numbers(m)[:2])), "held-out flow loss",
                    f"{modality}: loss by timestep (final, min-max over seeds)",
                    storage.join(output, name))
      written.append(name)
  return written
