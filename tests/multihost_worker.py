"""One process of a tiny training run through the CLI, recording its results for a test.

  JAX_NUM_CPU_DEVICES=4 python tests/multihost_worker.py --output=FILE [--sigterm_at_batch=N] \
      [--progress_file=FILE --batch_delay_s=S] -- \
      --config=configs/c2i.py:local --workdir=DIR --coordinator_address=127.0.0.1:PORT \
      --num_processes=2 --process_id=0 [--config.key=value ...]

Everything after `--` goes to `self_flow.main` unchanged, so the test exercises the real launch
path (flags, `jax.distributed.initialize`, `train.train_and_evaluate`). The additions: the
result of `train_and_evaluate` (losses per step, evaluation metrics) is written as JSON to
`--output` with the process's index and pid, for tests/test_multihost.py to compare runs of
different process counts and to tell which process wrote which file; `--sigterm_at_batch`
preempts this process like a TPU maintenance event would. `--progress_file` (the number of
batches assembled so far, rewritten at each) and `--batch_delay_s` let a test send the signal
from outside at a known point of the run (tests/test_reliability.py).
"""

import argparse
import itertools
import json
import os
import signal
import sys
import time

from absl import app


def _record_results(output: str) -> None:
  """Wraps `train.train_and_evaluate` so its result also lands in `output` as JSON."""
  import jax  # pylint: disable=g-import-not-at-top
  from self_flow import train  # pylint: disable=g-import-not-at-top

  train_and_evaluate = train.train_and_evaluate

  def recorded(config, workdir):
    result = train_and_evaluate(config, workdir)
    with open(output, "w", encoding="utf-8") as f:
      json.dump({"process_index": jax.process_index(), "process_count": jax.process_count(),
                 "device_count": jax.device_count(), "pid": os.getpid(),
                 "losses": result["losses"], "eval": result["eval"],
                 "preempted_at": result.get("preempted_at")}, f)
    return result

  train.train_and_evaluate = recorded


def _sigterm_at_batch(batch: int) -> None:
  """SIGTERMs this process while it assembles global batch `batch` (1-based).

  Every later batch then waits 0.5 s: the notice takes about a second to reach every process,
  which tiny test steps would outrun (real steps take longer), ending the run unpreempted."""
  from self_flow.data import pipeline  # pylint: disable=g-import-not-at-top

  make_global_batch = pipeline.make_global_batch
  calls = itertools.count(1)

  def preempting(local_batch, sharding):
    call = next(calls)
    if call == batch:
      os.kill(os.getpid(), signal.SIGTERM)
    elif call > batch:
      time.sleep(0.5)
    return make_global_batch(local_batch, sharding)

  pipeline.make_global_batch = preempting


def _report_progress(path: str, delay_s: float) -> None:
  """Writes the count of assembled batches to `path` before each one, after `delay_s`."""
  from self_flow.data import pipeline  # pylint: disable=g-import-not-at-top

  make_global_batch = pipeline.make_global_batch
  calls = itertools.count(1)

  def reporting(local_batch, sharding):
    time.sleep(delay_s)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.write(str(next(calls)))
    os.replace(path + ".tmp", path)
    return make_global_batch(local_batch, sharding)

  pipeline.make_global_batch = reporting


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", required=True, help="JSON file for this process's results.")
  parser.add_argument("--sigterm_at_batch", type=int, default=None,
                      help="SIGTERM this process while it assembles this (1-based) batch.")
  parser.add_argument("--progress_file", default=None,
                      help="Rewrite this file with the number of batches assembled so far.")
  parser.add_argument("--batch_delay_s", type=float, default=0.0,
                      help="With --progress_file: sleep this long before each batch.")
  ours, cli_args = sys.argv[1:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]
  args = parser.parse_args(ours)
  from self_flow import main as cli  # pylint: disable=g-import-not-at-top

  _record_results(args.output)
  if args.progress_file is not None:
    _report_progress(args.progress_file, args.batch_delay_s)
  if args.sigterm_at_batch is not None:
    _sigterm_at_batch(args.sigterm_at_batch)
  app.run(cli.main, argv=["self_flow.main", *cli_args])


if __name__ == "__main__":
  main()
