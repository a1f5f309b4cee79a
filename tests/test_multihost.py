"""Two processes on 127.0.0.1 (4 fake CPU devices each) train exactly like one with 8 devices,
stop together when one of them gets SIGTERM, checkpoint collectively and resume.

The 2-process runs go through the CLI (`python -m self_flow.main --coordinator_address=...`, via
tests/multihost_worker.py, which also records the losses) and are compared with a 1-process run
of the same config in this pytest process (8 fake devices, see conftest.py). The comparison is
exact up to float summation order because the global batch is the same row for row (checked
below): the train step draws noise, timesteps and condition dropout per row, so a permuted batch
would give a different loss even though the loss is a mean.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import c2i
from self_flow import train
from self_flow.data import pipeline, sources
from conftest import TINY_MODEL, override

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKER = os.path.join(_REPO, "tests", "multihost_worker.py")
_NUM_PROCESSES = 2
_NUM_STEPS = 10
# A hung collective must fail the test, not hang CI; a healthy launch takes about a minute on 2
# busy cores.
_LAUNCH_TIMEOUT_S = 420

# Tiny model, 8 images per step (one per device), checkpoints every 4 steps, small evaluation.
_OVERRIDES = {
    **TINY_MODEL, "data.source": "debian", "train.log_every": 1, "train.checkpoint_every": 4,
    "eval.num_samples": 16, "eval.batch_size": 8, "eval.grid_rows": 1,
    "eval.classifier_steps": 10, "sampling.num_steps": 2,
}


def _overrides(data_dir, tmp_path, evaluate: bool) -> dict:
  return dict(_OVERRIDES, **{
      "data.data_dir": data_dir, "train.num_steps": _NUM_STEPS, "eval.enabled": evaluate,
      "eval.cache_dir": str(tmp_path / "eval_cache")})


def _config(overrides: dict):
  return override(c2i.get_config("local"), overrides)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _tail(path, lines: int = 40) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return "".join(f.readlines()[-lines:])


def _launch(overrides: dict, workdir, tmp_path, name: str, sigterm: dict[int, int] | None = None
            ) -> list[dict]:
  """Runs the CLI in `_NUM_PROCESSES` processes; returns each one's recorded results.

  `sigterm` maps a process id to the (1-based) batch during which it gets SIGTERM.

  Fails (killing every worker, showing their logs) as soon as one exits with an error, since
  the others would then wait on it, or after `_LAUNCH_TIMEOUT_S`."""
  port = _free_port()
  # A compilation cache shared by the launches: the resumed run's process 0 loads the steps the
  # first run compiled (on CPU, process 1's cache keys differ, so it compiles again).
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4", PYTHONPATH=_REPO,
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  flags = [f"--config.{key}={value}" for key, value in overrides.items()]
  procs, logs, outputs = [], [], []
  for i in range(_NUM_PROCESSES):
    logs.append(tmp_path / f"{name}_{i}.log")
    outputs.append(tmp_path / f"{name}_{i}.json")
    with open(logs[-1], "w", encoding="utf-8") as log:
      preempt = [f"--sigterm_at_batch={sigterm[i]}"] if i in (sigterm or {}) else []
      procs.append(subprocess.Popen(
          [sys.executable, _WORKER, f"--output={outputs[-1]}", *preempt, "--",
           "--config=configs/c2i.py:local", f"--workdir={workdir}",
           f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={_NUM_PROCESSES}",
           f"--process_id={i}", *flags],
          cwd=_REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  deadline = time.time() + _LAUNCH_TIMEOUT_S
  while any(p.poll() is None for p in procs):
    failed = any(p.poll() not in (None, 0) for p in procs)
    if failed or time.time() > deadline:
      for p in procs:
        p.kill()
        p.wait()
      break
    time.sleep(0.5)
  codes = [p.returncode for p in procs]
  if codes != [0] * _NUM_PROCESSES:
    pytest.fail(f"{name}: worker exit codes {codes} (timeout {_LAUNCH_TIMEOUT_S} s)\n" + "\n".join(
        f"--- process {i} log tail ---\n{_tail(log)}" for i, log in enumerate(logs)))
  results = []
  for path in outputs:
    with open(path, encoding="utf-8") as f:
      results.append(json.load(f))
  return results


def _losses(result: dict) -> dict[int, float]:
  return {int(step): loss for step, loss in result["losses"].items()}


def test_process_shards_assemble_the_one_process_batch(fashion_mnist_dir):
  """Row for row, process 0's then process 1's local batch is the 1-process batch."""
  source = sources.open_image_source("fashion_mnist", "train", fashion_mnist_dir, "debian")

  def iterator(index, count):
    return pipeline.make_train_iterator(source, global_batch_size=8, seed=0, process_index=index,
                                        process_count=count, worker_count=0)

  single = iterator(0, 1)
  shards = [iterator(i, _NUM_PROCESSES) for i in range(_NUM_PROCESSES)]
  for _ in range(3):
    expected = next(single)
    local = [next(s) for s in shards]
    for key, value in expected.items():
      np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), value)


def test_two_processes_train_preempt_and_resume_like_one(fashion_mnist_dir, tmp_path,
                                                         monkeypatch, caplog):
  """2 processes: SIGTERM to process 1 during step 2 makes both save the same step k and exit;
  a second launch resumes from k and evaluates. Every loss equals the 1-process run's, and only
  process 0 writes TensorBoard events and samples. The 2-process runs start without prepared
  data: process 0 builds it while process 1 waits. The same checkpoint resumed by ONE process (a
  resized slice) rebuilds the data stream at step k: its batches equal the 1-process run's bit
  for bit, and no checkpoint is set aside."""
  batches = []
  assemble = train.pipeline.make_global_batch

  def recording(local_batch, sharding):
    batches.append({k: np.array(v) for k, v in local_batch.items()})
    return assemble(local_batch, sharding)

  monkeypatch.setattr(train.pipeline, "make_global_batch", recording)
  reference = train.train_and_evaluate(_config(_overrides(fashion_mnist_dir, tmp_path, True)),
                                       str(tmp_path / "one"))
  reference_batches = list(batches)
  expected = reference["losses"]
  assert len({round(v, 6) for v in expected.values()}) == _NUM_STEPS  # the losses do move
  workdir, data_dir = tmp_path / "two", str(tmp_path / "tfds")

  first = _launch(_overrides(data_dir, tmp_path, False), workdir, tmp_path, "first",
                  sigterm={1: 2})
  assert [r["process_index"] for r in first] == [0, 1]
  assert {(r["process_count"], r["device_count"]) for r in first} == {(2, 8)}
  stop = first[0]["preempted_at"]
  assert stop is not None and 2 <= stop < _NUM_STEPS, stop
  assert first[1]["preempted_at"] == stop  # both stopped at the same step
  checkpoint = workdir / "checkpoints" / str(stop)
  assert max(map(int, os.listdir(workdir / "checkpoints"))) == stop
  assert sorted(os.listdir(checkpoint / "data_iter_image")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  assert {"ocdbt.process_0", "ocdbt.process_1", "commit_success.txt"} <= set(
      os.listdir(checkpoint / "state"))
  shutil.copytree(workdir, tmp_path / "resized")

  batches.clear()
  with caplog.at_level("WARNING"):
    one = train.train_and_evaluate(_config(_overrides(data_dir, tmp_path, False)),
                                   str(tmp_path / "resized"))
  assert "process_count 2 -> 1" in caplog.text and f"rebuilt at global batch {stop}" in caplog.text
  assert sorted(_losses(one)) == list(range(stop + 1, _NUM_STEPS + 1))
  assert len(batches) == len(reference_batches[stop:])
  for got, want in zip(batches, reference_batches[stop:]):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  for step, loss in _losses(one).items():
    assert loss == pytest.approx(expected[step], rel=1e-5), step
  assert not [n for n in os.listdir(tmp_path / "resized" / "checkpoints") if "unreadable" in n]

  resumed = _launch(_overrides(data_dir, tmp_path, True), workdir, tmp_path, "resumed")
  for results, steps in ((first, range(1, stop + 1)), (resumed, range(stop + 1, _NUM_STEPS + 1))):
    for result in results:  # metrics are replicated: every process sees the same losses
      losses = _losses(result)
      assert sorted(losses) == list(steps)
      for step in steps:
        assert losses[step] == pytest.approx(expected[step], rel=1e-5), step
  for result in resumed:
    for key, value in reference["eval"].items():
      assert result["eval"][key] == pytest.approx(value, rel=1e-3), key

  # TensorBoard names event files events.out.tfevents.<time>.<host>.<pid>.<n>.v2: one per
  # launch, both by process 0 (elsewhere the writer only logs).
  events = [n for n in os.listdir(workdir) if n.startswith("events.out.tfevents")]
  assert sorted(int(n.split(".")[-3]) for n in events) == sorted(
      r[0]["pid"] for r in (first, resumed))
  assert os.listdir(workdir / "samples") == os.listdir(tmp_path / "one" / "samples")
