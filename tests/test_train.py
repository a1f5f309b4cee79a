"""train_and_evaluate end to end: outputs in the workdir, exact resume, bad configs, the CLI."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from self_flow import config_resolution, train, train_program
from self_flow.evaluation import evaluator
from conftest import tiny_run_config


def test_end_to_end_writes_checkpoint_events_samples_and_eval(make_config, fashion_mnist_dir,
                                                               tmp_path, monkeypatch):
  config = tiny_run_config(fashion_mnist_dir, tmp_path, num_steps=4)
  monkeypatch.chdir(tmp_path)
  workdir = tmp_path / "run"
  result = train.train_and_evaluate(config, "run")  # a relative workdir, as users type it
  assert sorted(result["losses"]) == [1, 2, 3, 4]
  assert all(np.isfinite(v) for v in result["losses"].values())
  assert set(result["eval"]) >= {"eval/image/fd", "eval/image/class_accuracy",
                                 "eval/image/student/fd", "eval/image/student/class_accuracy"}
  assert result["eval"]["eval/image/fd"] > 0
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "4"]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
  assert any(name.endswith(".png") for name in os.listdir(workdir / "samples"))
  # The student's metrics are those of the final live params, evaluated directly; the EMA's
  # are those of the EMA params (and differ: after 4 warm-up steps the EMA is not the student).
  saved = _saved_state(workdir, 4)
  program = train_program.build(config, config_resolution.resolve(config))
  direct = evaluator.ImageEvaluator(config, program.resolved, program.layout.graphdef,
                                    str(workdir), program.mesh)
  student = direct.metrics(saved["params"])
  assert student["eval/image/fd"] == result["eval"]["eval/image/student/fd"]
  assert (student["eval/image/class_accuracy"]
          == result["eval"]["eval/image/student/class_accuracy"])
  assert direct.metrics(saved["ema_params"])["eval/image/fd"] == result["eval"]["eval/image/fd"]
  assert result["eval"]["eval/image/student/fd"] != result["eval"]["eval/image/fd"]


def _saved_state(workdir, step):
  """The saved train state of `step` as host arrays."""
  return ocp.PyTreeCheckpointer().restore(str(workdir / "checkpoints" / str(step) / "state"))


def test_resume_with_two_emas_is_exact(make_config, fashion_mnist_dir, tmp_path):
  """With a teacher EMA of its own (and EMA warm-up), 3 steps + resume + 3 steps give the
  bit-identical state of 6 uninterrupted steps: params, both EMAs and the optimizer state."""
  def config(num_steps):
    run = tiny_run_config(fashion_mnist_dir, tmp_path, num_steps)
    # Warm-up caps both decays at (1 + n) / (10 + n) >= 0.1: a teacher below that differs.
    run.optim.update(ema_decay=0.9, teacher_ema_decay=0.05, ema_warmup=True)
    run.eval.enabled = False
    return run

  train.train_and_evaluate(config(6), str(tmp_path / "a"))
  train.train_and_evaluate(config(3), str(tmp_path / "b"))
  resumed = train.train_and_evaluate(config(6), str(tmp_path / "b"))
  assert sorted(resumed["losses"]) == [4, 5, 6]
  straight, restarted = _saved_state(tmp_path / "a", 6), _saved_state(tmp_path / "b", 6)
  assert set(straight) >= {"params", "ema_params", "teacher_params", "opt_state"}
  jax.tree.map(np.testing.assert_array_equal, restarted, straight)
  # The two EMAs really differ, so checking both is not checking one twice.
  teacher, ema = straight["teacher_params"], straight["ema_params"]
  assert any(not np.array_equal(t, e) for t, e in zip(jax.tree.leaves(teacher),
                                                       jax.tree.leaves(ema)))


def test_restart_reproduces_the_uninterrupted_run(make_config, fashion_mnist_dir, tmp_path):
  """Stop after step 3, restart from the workdir: steps 4..6 match a run that never stopped."""
  straight = train.train_and_evaluate(
      tiny_run_config(fashion_mnist_dir, tmp_path, num_steps=6), str(tmp_path / "a"))
  first = train.train_and_evaluate(
      tiny_run_config(fashion_mnist_dir, tmp_path, num_steps=3), str(tmp_path / "b"))
  resumed = train.train_and_evaluate(
      tiny_run_config(fashion_mnist_dir, tmp_path, num_steps=6), str(tmp_path / "b"))
  assert sorted(resumed["losses"]) == [4, 5, 6]  # really resumed, did not start over
  for step in (1, 2, 3):
    assert first["losses"][step] == pytest.approx(straight["losses"][step], rel=1e-6)
  for step in (4, 5, 6):
    assert resumed["losses"][step] == pytest.approx(straight["losses"][step], rel=1e-6)
  # The losses do move from step to step, so equality above is not trivial.
  assert len({round(v, 6) for v in straight["losses"].values()}) == 6


def test_bad_config_fails_before_touching_the_workdir(make_config, tmp_path):
  config = make_config()
  config.objective.mask_ratio = 0.7
  workdir = tmp_path / "never_created"
  with pytest.raises(ValueError, match=r"objective\.mask_ratio=0\.7.*\[0, 0\.5\]"):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()
  config = make_config()
  config.objective.noising = "sorted_dual"
  with pytest.raises(ValueError, match="'sorted_dual'.*dual_timestep"):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_cli_rejects_a_bad_override(tmp_path):
  workdir = tmp_path / "cli"
  proc = subprocess.run(
      [sys.executable, "-m", "self_flow.main", "--config=configs/c2i.py:local",
       f"--workdir={workdir}", "--config.sampling.method=rk4"],
      capture_output=True, text=True, timeout=300,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode != 0
  assert "config.sampling.method='rk4'" in proc.stderr
  assert not workdir.exists()


def test_sigterm_saves_and_exits_then_resumes(make_config, fashion_mnist_dir, tmp_path,
                                              monkeypatch):
  """A real SIGTERM during step 2 leaves a checkpoint at step 2; rerunning resumes from it."""
  config = tiny_run_config(fashion_mnist_dir, tmp_path, num_steps=5)
  real_make_global_batch = train.pipeline.make_global_batch
  calls = []

  def batch_then_sigterm(local_batch, batch_sharding):
    calls.append(1)
    if len(calls) == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return real_make_global_batch(local_batch, batch_sharding)

  monkeypatch.setattr(train.pipeline, "make_global_batch", batch_then_sigterm)
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["preempted_at"] == 2
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]
  monkeypatch.setattr(train.pipeline, "make_global_batch", real_make_global_batch)
  resumed = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert sorted(resumed["losses"]) == [3, 4, 5]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed after the run
