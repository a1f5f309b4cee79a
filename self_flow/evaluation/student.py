"""The student's (live params') evaluation metrics, named beside the EMA's.

Evaluators report the EMA weights as eval/<modality>/<name>; the same metrics of the live params
go to eval/<modality>/student/<name>, so that an EMA lagging behind the student (or leading it)
shows in every run and table. Set-up metrics, properties of the evaluation itself (the feature
classifiers' held-out accuracy), are the same for both and are not repeated.
"""

import re

SET_UP_METRICS = re.compile(r"classifier_heldout_accuracy$")


def student_metrics(results: dict[str, float], modality: str) -> dict[str, float]:
  """{eval/<modality>/<name>: value} of the live params -> {eval/<modality>/student/<name>}."""
  prefix = f"eval/{modality}/"
  renamed = {}
  for name, value in results.items():
    if not name.startswith(prefix):
      raise ValueError(f"metric {name!r} is not named {prefix}<name>.")
    if not SET_UP_METRICS.search(name):
      renamed[f"{prefix}student/{name[len(prefix):]}"] = value
  return renamed
