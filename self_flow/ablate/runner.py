"""What an ablation trains and how: the variants, one run per (variant, seed), each run's
`python -m self_flow.main` command, and training the runs one after the other, skipping those
that finished with the same settings, so that a crash costs only its own run."""

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any

from absl import logging

from self_flow import base_config, storage

# Evaluation settings every ablation run gets unless --override names the key.
DEFAULT_OVERRIDES = {"eval.probe_examples": "2000", "eval.loss_bins": "10",
                     "train.gradient_balance_every": "250"}
# Written into a run's workdir when it finished; holds the settings it finished with.
MARKER = "ablation_run.json"


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
  """Every (variant, seed) pair, seeds 0..num_seeds-1, each in OUTPUT/runs/<label>_seed<s>,
  seed by seed (every variant of seed 0, then of seed 1, ...), so that a study stopped part-way
  holds complete pairs to compare.

  A variant is a method name or a labelled method with settings (`parse_variant`)."""
  parsed = [parse_variant(v) for v in variants]
  labels = [label for label, _, _ in parsed]
  unknown = [m for _, m, _ in parsed if m not in base_config.METHODS]
  if not variants or unknown or len(set(labels)) != len(labels):
    raise ValueError(f"variants={list(variants)} must be distinct names from "
                     f"{sorted(base_config.METHODS)} (or {VARIANT_FORMAT}).")
  if isinstance(num_seeds, bool) or not isinstance(num_seeds, int) or num_seeds < 1:
    raise ValueError(f"seeds={num_seeds!r} must be an integer >= 1.")
  return [AblationRun(label, s, storage.join(output, "runs", f"{label}_seed{s}"),
                      "" if method == label and not settings else method, settings)
          for s in range(num_seeds) for label, method, settings in parsed]


def _run_fingerprint(run: AblationRun, fingerprint: str) -> str:
  """The shared settings' fingerprint, plus the run's own method and settings if labelled."""
  if not run.method:
    return fingerprint
  return fingerprint + "|" + json.dumps([run.method, list(run.settings)])


def is_finished(run: AblationRun, fingerprint: str) -> bool:
  """Whether `run` finished with the same settings (`fingerprint`) in an earlier invocation."""
  path = storage.join(run.workdir, MARKER)
  if not storage.exists(path):
    return False
  return storage.read_json(path).get("fingerprint") == _run_fingerprint(run, fingerprint)


def execute(runs: Sequence[AblationRun], train_fn: Callable[[AblationRun], None],
            fingerprint: str = "", imported: Mapping[str, str] | None = None
            ) -> dict[str, str]:
  """Trains every run not already finished with `fingerprint`, one after the other.

  Returns {run name: "finished" | "finished earlier" | "imported from <path>" |
  "failed: <error>"}; `imported` maps the names of runs taken from an earlier results page
  (`report.import_histories`) to that page's path, and those are not trained. A failure is logged
  and the next run starts: one crash must not cost the other runs.
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
    storage.write_json(storage.join(run.workdir, MARKER),
                       {"variant": run.variant, "seed": run.seed,
                        "fingerprint": _run_fingerprint(run, fingerprint),
                        "seconds": round(time.time() - start, 1)})
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


def config_flags(run: AblationRun, config_file: str, config_arg: str,
                 overrides: Mapping[str, str]) -> list[str]:
  """The `--config=...` and `--config.<key>=<value>` flags that give one run its config."""
  if "method=" in config_arg:
    raise ValueError(f"--config argument {config_arg!r} names a method; --variants sets it.")
  method = run.method_name
  arg = f"{config_arg},method={method}" if config_arg else f"method={method}"
  settings = {"seed": str(run.seed), "data.shuffle_seed": str(run.seed), **overrides,
              **dict(run.settings)}
  return [f"--config={config_file}:{arg}"] + [f"--config.{k}={v}" for k, v in settings.items()]


def train_command(run: AblationRun, config_file: str, config_arg: str,
                  overrides: Mapping[str, str], python: str = sys.executable) -> list[str]:
  """The `python -m self_flow.main` command line of one run."""
  config, *settings = config_flags(run, config_file, config_arg, overrides)
  return [python, "-m", "self_flow.main", config, f"--workdir={run.workdir}", *settings]


def reevaluate_command(run: AblationRun, config_file: str, config_arg: str,
                       overrides: Mapping[str, str], seed_offsets: Sequence[int], output: str,
                       python: str = sys.executable) -> list[str]:
  """The `python -m self_flow.ablate.reevaluate` command line that evaluates `run`'s last
  checkpoint under each eval.seed_offset, into the JSON `output`."""
  config, *settings = config_flags(run, config_file, config_arg, overrides)
  return [python, "-m", "self_flow.ablate.reevaluate", config, f"--workdir={run.workdir}",
          f"--seed_offsets={','.join(map(str, seed_offsets))}", f"--output={output}", *settings]


@contextlib.contextmanager
def _appended_log(path: str) -> Iterator[IO[str]]:
  """A text file to append a run's log to, ending up at `path` (local or a URL).

  A local log is appended to in place, so that it can be followed while the run trains. A Cloud
  Storage object cannot be appended to: its earlier content is copied into a local temporary
  file, which is uploaded when the block ends, also when it raises (an interrupted run's log is
  the one worth reading)."""
  if not storage.is_url(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as log:
      yield log
    return
  with tempfile.TemporaryDirectory(prefix="self_flow_ablate_") as directory:
    local = os.path.join(directory, "train.log")
    with open(local, "wb") as earlier:
      earlier.write(storage.read_bytes(path) if storage.exists(path) else b"")
    with open(local, "a") as log:
      try:
        yield log
      finally:
        log.flush()
        storage.upload(local, path)


def _run_logged(command: Sequence[str], log_path: str, env: Mapping[str, str] | None) -> None:
  """`command` in a child process, its output appended to `log_path`; raises naming the log
  (and quoting its end) when the child fails."""
  with _appended_log(log_path) as log:
    log.write("$ " + " ".join(command) + "\n")
    log.flush()
    returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                env=None if env is None else dict(env), check=False).returncode
  if returncode:
    log_text = storage.read_bytes(log_path).decode(errors="replace")
    tail = "".join(log_text.splitlines(keepends=True)[-15:])
    raise RuntimeError(f"exit status {returncode}; log {log_path} ends with:\n{tail}")


class RunInterruptedError(RuntimeError):
  """A run's trainer returned before its last step (a SIGTERM made it save and exit)."""


def check_reached(run: AblationRun, num_steps: int) -> None:
  """Raises RunInterruptedError unless the run's newest checkpoint is of its last step: a
  trainer that saved after a SIGTERM exits with status 0 so that a scheduler restarts it, and
  such a run must be resumed, not marked finished."""
  # pylint: disable-next=g-import-not-at-top
  from self_flow import checkpointing  # orbax: imported by the harness only when it checks
  step = checkpointing.latest_step(checkpointing.checkpoints_dir(run.workdir))
  if step != num_steps:
    raise RunInterruptedError(f"{run.name} stopped at step {step} of {num_steps} (preempted); "
                              "the next invocation resumes it from that checkpoint.")


def subprocess_train_fn(config_file: str, config_arg: str, overrides: Mapping[str, str],
                        env: Mapping[str, str] | None = None) -> Callable[[AblationRun], None]:
  """train(run): `train_command` in a child process, its output appended to <workdir>/train.log;
  raises naming the log when the child fails, and `RunInterruptedError` when it returned before
  its last step."""

  def train(run: AblationRun) -> None:
    _run_logged(train_command(run, config_file, config_arg, overrides),
                storage.join(run.workdir, "train.log"), env)
    check_reached(run, int({**overrides, **dict(run.settings)}["train.num_steps"]))

  return train


def subprocess_reevaluate_fn(config_file: str, config_arg: str, overrides: Mapping[str, str],
                             env: Mapping[str, str] | None = None
                             ) -> Callable[[AblationRun, Sequence[int], str], None]:
  """reevaluate(run, seed_offsets, output): `reevaluate_command` in a child process, its output
  appended to <workdir>/reevaluate.log; raises naming the log when the child fails."""

  def reevaluate(run: AblationRun, seed_offsets: Sequence[int], output: str) -> None:
    _run_logged(reevaluate_command(run, config_file, config_arg, overrides, seed_offsets,
                                   output), storage.join(run.workdir, "reevaluate.log"), env)

  return reevaluate


def in_process_train_fn(make_config: Callable[[str, int], Any]) -> Callable[[AblationRun], None]:
  """train(run): `train.train_and_evaluate(make_config(variant, seed), workdir)` in this process."""

  def train(run: AblationRun) -> None:
    from self_flow import train as train_lib  # pylint: disable=g-import-not-at-top
    if run.settings:
      raise ValueError(f"variant {run.variant!r} has settings of its own {run.settings}; "
                       "those run through subprocess_train_fn (the command line).")
    result = train_lib.train_and_evaluate(make_config(run.method_name, run.seed), run.workdir)
    if result.get("preempted_at") is not None:
      raise RunInterruptedError(f"{run.name} stopped at step {result['preempted_at']} "
                                "(preempted); the next invocation resumes it.")

  return train
