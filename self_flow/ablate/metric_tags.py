"""What the logged metric tags mean for a study: which are rows of the results table and in
which order, which are drawn against the training step, and whether lower or higher is better;
shared by the results page and its figures."""

import re
from collections.abc import Mapping

from self_flow.ablate import statistics
from self_flow.evaluation import student

# Row order of the results table (first matching pattern wins); other metrics follow.
_ROW_ORDER = tuple(re.compile(p) for p in (
    r"^eval/[^/]+/fd$", r"^eval/[^/]+/fd_", r"^eval/[^/]+/.*(accuracy|faithfulness)",
    r"^eval/[^/]+/loss$", r"^eval/[^/]+/loss_t", r"^eval/[^/]+/probe_",
    r"^eval/[^/]+/reference_cosine",
    r"^train/teacher_cosine$", r"^train/teacher_cosine_trivial$",
    r"^train/grad_ratio_rep_gen$", r"^train/loss_gen$"))
# Training diagnostics in the table beside the evaluation metrics.
_TRAIN_ROWS = ("train/teacher_cosine", "train/teacher_cosine_trivial",
               "train/grad_ratio_rep_gen", "train/loss_gen")
# Metrics drawn against the training step: FD, accuracy, held-out and training loss.
CURVE_PATTERNS = tuple(re.compile(p) for p in (
    r"^eval/[^/]+/(student/)?fd", r"^eval/[^/]+/.*(accuracy|faithfulness)",
    r"^eval/[^/]+/(student/)?loss$", r"^train/loss_gen$"))


def numbers(tag: str) -> tuple[float, ...]:
  """The numbers in a tag's last part (probe layer, bin edges), for numeric ordering."""
  return tuple(float(x) for x in re.findall(r"\d+(?:\.\d+)?", tag.rsplit("/", 1)[-1]))


def _row_key(tag: str):
  is_student = "/student/" in tag  # eval/<modality>/student/<name>: after the EMA's rows
  ema_tag = tag.replace("/student/", "/")
  rank = next((i for i, p in enumerate(_ROW_ORDER) if p.search(ema_tag)), len(_ROW_ORDER))
  parts = tag.split("/")
  modality = parts[1] if len(parts) > 2 else ""  # eval/<modality>/<name>
  return (parts[0] != "eval", modality, is_student, rank, numbers(tag), tag)


def table_metrics(summary: Mapping[str, Mapping[str, statistics.Spread]]) -> list[str]:
  """The results-table rows: every `eval/` metric that describes a run (the EMA's, then the
  student's), the Self-Flow diagnostics and the final training flow loss (`_TRAIN_ROWS`), in
  `_ROW_ORDER`."""
  tags = {t for metrics in summary.values() for t in metrics}
  rows = [t for t in tags if t.startswith("eval/") and not student.SET_UP_METRICS.search(t)]
  rows += [t for t in _TRAIN_ROWS if t in tags]
  return sorted(rows, key=_row_key)


def better_direction(tag: str) -> int:
  """-1 if lower is better (FD, losses), +1 if higher is better (accuracies, probe, the
  reference cosine), else 0."""
  name = tag.rsplit("/", 1)[-1]
  if name.startswith(("fd", "loss")):
    return -1
  if ("accuracy" in name or "faithfulness" in name
      or name.startswith(("probe", "reference_cosine"))):
    return 1
  return 0
