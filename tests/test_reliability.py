"""Reliability: preemption, exact and resharded resume, damaged checkpoints, incompatible or bad
configs, numerical faults and unwritable workdirs. Each test provokes the real fault (a SIGTERM
from outside, a truncated file, an out-of-range label that makes the loss NaN, a workdir under a
regular file) and checks what the trainer says and what it leaves on disk."""

import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

from array_record.python import array_record_module
from flax import serialization
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import c2i
from self_flow import (checkpointing, config_validation, optim, run_compatibility, sharding,
                       train, train_state)
from self_flow.data import pipeline
from self_flow.data.latent_shards import encoders
from self_flow.data.latent_shards import layout as layout_lib
from self_flow.data.latent_shards import reader as reader_lib
from self_flow.data.latent_shards import writer as writer_lib
from conftest import TINY_MODEL, override

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKER = os.path.join(_REPO, "tests", "multihost_worker.py")
_NUM_STEPS = 8
_TIMEOUT_S = 300

# The tiny model of conftest.tiny_config as command-line overrides, evaluation off.
_CLI_OVERRIDES = {
    **TINY_MODEL, "data.source": "debian", "train.log_every": 1, "train.checkpoint_every": 100,
    "train.num_steps": _NUM_STEPS, "eval.enabled": False,
}


def _cli_run(tmp_path, name: str, workdir, data_dir: str, devices: int,
             sigterm_after_batch: int | None = None) -> tuple[dict, str]:
  """Runs the CLI in a subprocess on `devices` fake devices; returns (results, log).

  With `sigterm_after_batch`, batches are slowed to 0.3 s and the test sends SIGTERM from
  outside once the run has assembled that many; the run must then exit with status 0."""
  output, progress, log_path = (tmp_path / f"{name}.json", tmp_path / f"{name}.progress",
                                tmp_path / f"{name}.log")
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), PYTHONPATH=_REPO,
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  worker_flags = [f"--output={output}"]
  if sigterm_after_batch is not None:
    worker_flags += [f"--progress_file={progress}", "--batch_delay_s=0.3"]
  overrides = dict(_CLI_OVERRIDES, **{"data.data_dir": data_dir})
  with open(log_path, "w", encoding="utf-8") as log:
    proc = subprocess.Popen(
        [sys.executable, _WORKER, *worker_flags, "--", "--config=configs/c2i.py:local",
         f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in overrides.items()]],
        cwd=_REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + _TIMEOUT_S
  if sigterm_after_batch is not None:
    while proc.poll() is None and time.time() < deadline:
      if progress.exists() and int(progress.read_text() or 0) >= sigterm_after_batch:
        proc.send_signal(signal.SIGTERM)
        break
      time.sleep(0.05)
  try:
    code = proc.wait(timeout=max(deadline - time.time(), 1))
  except subprocess.TimeoutExpired:
    proc.kill()
    code = proc.wait()
  text = log_path.read_text(encoding="utf-8", errors="replace")
  if code != 0:
    pytest.fail(f"{name}: exit status {code}\n{text[-4000:]}")
  with open(output, encoding="utf-8") as f:
    results = json.load(f)
  results["losses"] = {int(k): v for k, v in results["losses"].items()}
  return results, text


def _saved_state(step_dir) -> dict:
  """Every array of a saved state as host numpy, keyed by path."""
  restored = ocp.StandardCheckpointer().restore(
      str(step_dir / "state"), jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
          ocp.StandardCheckpointer().metadata(str(step_dir / "state")).item_metadata.tree))
  flat = jax.tree_util.tree_flatten_with_path(restored)[0]
  return {checkpointing.path_name(p): np.asarray(v) for p, v in flat}


def test_sigterm_from_outside_then_exact_and_resharded_resume(fashion_mnist_dir, tmp_path):
  """SIGTERM to a CLI run mid-training: it checkpoints, exits 0 and says how to resume.
  Resumed on the same 8 devices it continues bit for bit (losses and the final params, EMA and
  optimizer state equal the uninterrupted run's); resumed on 4 devices (orbax reshards on
  restore) it continues from the same data position with the same losses up to summation order."""
  reference, _ = _cli_run(tmp_path, "reference", tmp_path / "a", fashion_mnist_dir, 8)
  assert sorted(reference["losses"]) == list(range(1, _NUM_STEPS + 1))
  assert len(set(reference["losses"].values())) == _NUM_STEPS  # the losses do move

  first, log = _cli_run(tmp_path, "first", tmp_path / "b", fashion_mnist_dir, 8,
                        sigterm_after_batch=3)
  stop = first["preempted_at"]
  assert stop is not None and 3 <= stop < _NUM_STEPS, stop
  assert os.listdir(tmp_path / "b" / "checkpoints") == [str(stop)]
  assert "To resume, rerun the same command: python -m self_flow.main" in log
  assert f"--workdir={tmp_path / 'b'}" in log
  shutil.copytree(tmp_path / "b", tmp_path / "c")

  resumed, log = _cli_run(tmp_path, "resumed", tmp_path / "b", fashion_mnist_dir, 8)
  assert f"Resuming from the checkpoint of step {stop}" in log
  assert sorted(resumed["losses"]) == list(range(stop + 1, _NUM_STEPS + 1))
  for step, loss in resumed["losses"].items():
    assert loss == reference["losses"][step], step  # exact, not approximate
  final = _saved_state(tmp_path / "b" / "checkpoints" / str(_NUM_STEPS))
  expected = _saved_state(tmp_path / "a" / "checkpoints" / str(_NUM_STEPS))
  assert final.keys() == expected.keys()
  assert any(k.startswith("opt_state") for k in final) and any(
      k.startswith("ema_params") for k in final)
  for key in expected:
    np.testing.assert_array_equal(final[key], expected[key], err_msg=key)

  resharded, log = _cli_run(tmp_path, "resharded", tmp_path / "c", fashion_mnist_dir, 4)
  assert "4 local / 4 global devices" in log
  assert sorted(resharded["losses"]) == list(range(stop + 1, _NUM_STEPS + 1))
  for step, loss in resharded["losses"].items():
    assert loss == pytest.approx(reference["losses"][step], rel=1e-5), step


def _config(make_config, data_dir, tmp_path, **train_keys):
  config = make_config()
  config.data.data_dir = data_dir
  config.data.source = "debian"
  config.eval.enabled = False
  config.train.log_every = 1
  config.eval.cache_dir = str(tmp_path / "eval_cache")
  for key, value in train_keys.items():
    config.train[key] = value
  return config


def test_second_sigterm_during_the_save_keeps_the_checkpoint(make_config, fashion_mnist_dir,
                                                             tmp_path, monkeypatch):
  """Another SIGTERM arriving while the preemption checkpoint is being written does not
  interrupt the write: the run still returns normally with a checkpoint that resumes."""
  config = _config(make_config, fashion_mnist_dir, tmp_path, num_steps=5)
  calls = []
  real_batch, real_save = pipeline.make_global_batch, checkpointing.Checkpointer.save

  def batch_then_sigterm(local_batch, batch_sharding):
    calls.append(1)
    if len(calls) == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return real_batch(local_batch, batch_sharding)

  def save_then_sigterm(self, *args, **kwargs):
    started = real_save(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)  # while the async write is in flight
    return started

  monkeypatch.setattr(train.pipeline, "make_global_batch", batch_then_sigterm)
  monkeypatch.setattr(checkpointing.Checkpointer, "save", save_then_sigterm)
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["preempted_at"] == 2
  monkeypatch.undo()
  resumed = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert sorted(resumed["losses"]) == [3, 4, 5]


def _largest_array_file(step_dir) -> str:
  files = glob.glob(str(step_dir / "state" / "ocdbt.process_0" / "d" / "*"))
  return max(files, key=os.path.getsize)


def test_truncated_latest_checkpoint_falls_back_to_the_previous(make_config, fashion_mnist_dir,
                                                                tmp_path, caplog):
  """The latest checkpoint's biggest array file is cut short (a partial copy or a lost write):
  the restart sets it aside, says so, resumes from the one before and replays the same steps."""
  straight = train.train_and_evaluate(
      _config(make_config, fashion_mnist_dir, tmp_path, num_steps=6, checkpoint_every=2),
      str(tmp_path / "straight"))
  config = _config(make_config, fashion_mnist_dir, tmp_path, num_steps=4, checkpoint_every=2)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  checkpoints = tmp_path / "run" / "checkpoints"
  assert sorted(os.listdir(checkpoints)) == ["2", "4"]
  damaged = _largest_array_file(checkpoints / "4")
  with open(damaged, "r+b") as f:
    f.truncate(os.path.getsize(damaged) // 3)

  config.train.num_steps = 6
  with caplog.at_level("WARNING"):
    resumed = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert sorted(resumed["losses"]) == [3, 4, 5, 6]  # resumed from step 2, not 4
  for step in (3, 4, 5, 6):
    assert resumed["losses"][step] == straight["losses"][step], step
  set_aside = [n for n in os.listdir(checkpoints) if n.startswith("4.unreadable-")]
  assert len(set_aside) == 1  # kept for inspection, not deleted
  assert "Checkpoint of step 4 is unreadable" in caplog.text
  assert "Falling back from the checkpoint of step 4" in caplog.text and "to step 2" in caplog.text


def _snapshot(directory) -> dict[str, tuple[int, int]]:
  return {os.path.relpath(os.path.join(root, name), directory):
          (os.stat(os.path.join(root, name)).st_size,
           os.stat(os.path.join(root, name)).st_mtime_ns)
          for root, _, names in os.walk(directory) for name in names}


def _fresh_then_restore_matching(config, source):
  """(fresh state of `config`, restore_matching's (state, loaded, left) from run `source`)."""
  mesh = sharding.create_mesh(config.mesh)
  tx, _ = optim.make_optimizer(config.optim, 1)
  layout = train_state.state_layout(config, mesh, tx, sharding.axis_rules(config.mesh))
  fresh = train_state.create_train_state(config, layout, tx)
  return fresh, run_compatibility.restore_matching(str(source), fresh, layout.abstract)


def test_incompatible_workdir_is_refused_before_writing_then_fine_tuned(
    make_config, fashion_mnist_dir, tmp_path):
  """A deeper model pointed at a 4-block run's workdir: refused with the differing keys and
  nothing in the workdir changes; `train.init_from` fine-tunes from it in a new workdir,
  loading every array whose name and shape match."""
  config = _config(make_config, fashion_mnist_dir, tmp_path, num_steps=2)
  train.train_and_evaluate(config, str(tmp_path / "old"))
  before = _snapshot(tmp_path / "old")

  deeper = _config(make_config, fashion_mnist_dir, tmp_path, num_steps=3)
  deeper.model.depth = 6
  deeper.model.hidden_size = 48
  with pytest.raises(run_compatibility.IncompatibleRunError) as error:
    train.train_and_evaluate(deeper, str(tmp_path / "old"))
  message = str(error.value)
  assert "model.depth: 4 -> 6" in message and "model.hidden_size: 32 -> 48" in message
  assert "train.num_steps: 2 -> 3" in message
  assert "params/blocks" in message and "--config.train.init_from=" in message
  assert _snapshot(tmp_path / "old") == before  # not a byte written, not a file added

  wider_depth = _config(make_config, fashion_mnist_dir, tmp_path, num_steps=1)
  wider_depth.model.depth = 6  # same width: embeddings and heads fit, the block stack does not
  wider_depth.train.init_from = str(tmp_path / "old")
  fresh, (merged, loaded, left) = _fresh_then_restore_matching(wider_depth, tmp_path / "old")
  saved = _saved_state(tmp_path / "old" / "checkpoints" / "2")
  assert loaded > 0 and left and all("blocks" in name for name in left)
  np.testing.assert_array_equal(np.asarray(merged["params"]["input_proj"]["kernel"]),
                                saved["params/input_proj/kernel"])
  np.testing.assert_array_equal(np.asarray(merged["ema_params"]["input_proj"]["kernel"]),
                                saved["ema_params/input_proj/kernel"])
  np.testing.assert_array_equal(np.asarray(merged["teacher_params"]["input_proj"]["kernel"]),
                                saved["teacher_params/input_proj/kernel"])
  np.testing.assert_array_equal(np.asarray(merged["params"]["blocks"]["mlp"]["fc1"]["kernel"]),
                                np.asarray(fresh["params"]["blocks"]["mlp"]["fc1"]["kernel"]))
  result = train.train_and_evaluate(wider_depth, str(tmp_path / "fine_tuned"))
  assert sorted(result["losses"]) == [1]


def test_fine_tuning_a_one_ema_run_starts_the_teacher_ema_from_its_ema(
    make_config, fashion_mnist_dir, tmp_path):
  """A run with a teacher EMA of its own, initialised from a one-EMA run (the paper setting):
  its teacher starts as that run's EMA, which was that run's teacher."""
  source = _config(make_config, fashion_mnist_dir, tmp_path, num_steps=2)
  source.optim.teacher_ema_decay = -1.0
  train.train_and_evaluate(source, str(tmp_path / "one_ema"))
  target = _config(make_config, fashion_mnist_dir, tmp_path, num_steps=1)
  assert train_state.has_teacher_ema(target)
  _, (merged, _, left) = _fresh_then_restore_matching(target, tmp_path / "one_ema")
  saved = _saved_state(tmp_path / "one_ema" / "checkpoints" / "2")
  assert not left
  assert not any(name.startswith("teacher_params/") for name in saved)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(merged["teacher_params"]),
               jax.device_get(merged["ema_params"]))
  np.testing.assert_array_equal(np.asarray(merged["teacher_params"]["input_proj"]["kernel"]),
                                saved["ema_params/input_proj/kernel"])


def _base_config():
  config = c2i.get_config("local")
  config.data.global_batch_size = 64
  return config


def _with(key: str, value):
  return lambda config: override(config, {key: value})


def _as_dict_with(key: str, value):
  """Builds the config from a plain dict, as a notebook or an old run's JSON would: no type or
  key locking on assignment, so validation is what catches the mistake."""
  def mutate(config):
    tree = config.to_dict()
    section, name = key.rsplit(".", 1)
    tree[section][name] = value
    return ml_collections.ConfigDict(tree)
  return mutate


BAD_CONFIGS = [
    ("mask ratio above 0.5", _with("objective.mask_ratio", 0.6),
     r"config\.objective\.mask_ratio=0\.6 is not allowed; it must be a float in \[0, 0\.5\]"),
    ("negative mask ratio", _with("objective.mask_ratio", -0.1),
     r"config\.objective\.mask_ratio=-0\.1 is not allowed"),
    ("video mask ratio", _with("video.mask_ratio", 0.75),
     r"config\.video\.mask_ratio=0\.75 is not allowed; it must be a float in \[0, 0\.5\]"),
    ("student not before teacher", lambda c: (_with("model.student_layer", 4)(c),
                                              _with("model.teacher_layer", 4)(c))[0],
     r"1 <= student_layer < teacher_layer <= depth; got student_layer=4, teacher_layer=4, "
     r"depth=6"),
    ("teacher beyond depth", _with("model.teacher_layer", 7),
     r"got student_layer=2, teacher_layer=7, depth=6"),
    ("batch not divisible by data parallelism", _with("data.global_batch_size", 12),
     r"config\.data\.global_batch_size=12 must be divisible by mesh data\*fsdp=8"),
    ("mesh larger than the devices", _with("mesh.data", 16),
     r"mesh sizes \{'data': 16, 'fsdp': 1, 'tensor': 1\} use 16 devices, but 8 are available"),
    ("mesh not dividing the devices", lambda c: (_with("mesh.data", -1)(c),
                                                 _with("mesh.tensor", 3)(c))[0],
     r"8 devices are not divisible by the fixed axes' product 3"),
    ("two axes to fill", lambda c: (_with("mesh.data", -1)(c), _with("mesh.fsdp", -1)(c))[0],
     r"at most one may be -1"),
    ("unknown key", _as_dict_with("optim.lerning_rate", 1e-3),
     r"config\.optim\.lerning_rate is not a config key; config\.optim has: .*learning_rate"),
    ("unknown section", lambda c: ml_collections.ConfigDict(dict(c.to_dict(), trainer={})),
     r"config\.trainer is not a config key; config has: .*train"),
    ("string for a float", _as_dict_with("optim.learning_rate", "1e-4"),
     r"config\.optim\.learning_rate='1e-4' has the wrong type: it must be a float"),
    ("float for an int", _as_dict_with("train.num_steps", 10.5),
     r"config\.train\.num_steps=10\.5 has the wrong type: it must be an int"),
    ("int for a bool", _as_dict_with("eval.enabled", 1),
     r"config\.eval\.enabled=1 has the wrong type: it must be a bool"),
    ("unknown noising policy", _with("objective.noising", "sorted_dual"),
     r"config\.objective\.noising='sorted_dual' is not allowed; choose one of \['single', "
     r"'dual_timestep'"),
    ("unknown non-finite policy", _with("train.nonfinite", "ignore"),
     r"config\.train\.nonfinite='ignore' is not allowed; choose one of \['skip', 'stop'\]"),
    ("unknown bad-record policy", _with("data.bad_records", "drop"),
     r"config\.data\.bad_records='drop' is not allowed; choose one of \['error', 'skip'\]"),
    ("microbatches not dividing the batch", _with("train.microbatches", 3),
     r"config\.train\.microbatches=3 is not allowed with config\.data\.global_batch_size=64"),
    ("EMA decay of 1", _with("optim.ema_decay", 1.0),
     r"config\.optim\.ema_decay=1\.0 is not allowed; it must be a float in \[0, 1\)"),
]


@pytest.mark.parametrize("mutate,message", [b[1:] for b in BAD_CONFIGS],
                         ids=[b[0] for b in BAD_CONFIGS])
def test_bad_config_is_refused_with_one_clear_message(mutate, message):
  config = mutate(_base_config())
  config_validation.validate(_base_config(), num_devices=8)  # the unmutated config is fine
  with pytest.raises(ValueError, match=message):
    config_validation.validate(config, num_devices=8)


def _poison_batch(at_batches):
  """Labels far outside the class table at the given (1-based) batches: the embedding lookup
  then reads NaN (out-of-range gathers fill with NaN), so loss and gradients go non-finite,
  the way a corrupt label in real data would make them."""
  real = pipeline.make_global_batch
  calls = []

  def poisoned(local_batch, batch_sharding):
    calls.append(1)
    if len(calls) in at_batches:
      local_batch = dict(local_batch, label=np.full_like(local_batch["label"], 10_000))
    return real(local_batch, batch_sharding)

  return poisoned


def test_nonfinite_step_is_skipped_with_the_state_unchanged(make_config, fashion_mnist_dir,
                                                           tmp_path, monkeypatch):
  config = _config(make_config, fashion_mnist_dir, tmp_path, num_steps=5, checkpoint_every=1,
                   keep_checkpoints=10, nonfinite="skip")
  monkeypatch.setattr(train.pipeline, "make_global_batch", _poison_batch({3}))
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  losses = result["losses"]
  assert np.isnan(losses[3]) and all(np.isfinite(losses[s]) for s in (1, 2, 4, 5))
  checkpoints = tmp_path / "run" / "checkpoints"
  before, after, later = (_saved_state(checkpoints / str(s)) for s in (2, 3, 4))
  for key in before:
    if key in ("step", "nonfinite_steps"):
      continue
    np.testing.assert_array_equal(after[key], before[key], err_msg=key)  # skipped exactly
  assert int(after["step"]) == 3 and int(after["nonfinite_steps"]) == 1
  assert int(later["nonfinite_steps"]) == 1
  assert not np.array_equal(later["params/input_proj/kernel"], after["params/input_proj/kernel"])


def test_nonfinite_step_stops_with_the_last_good_checkpoint(make_config, fashion_mnist_dir,
                                                           tmp_path, monkeypatch):
  """"stop": the NaN step falls on a checkpoint step, yet only the earlier, finite checkpoint
  exists afterwards; the error says where to resume. "skip" also stops once too many NaN steps
  come in a row (a diverged run)."""
  config = _config(make_config, fashion_mnist_dir, tmp_path, num_steps=6, checkpoint_every=2,
                   nonfinite="stop")
  monkeypatch.setattr(train.pipeline, "make_global_batch", _poison_batch({4}))
  with pytest.raises(FloatingPointError, match=r"Non-finite step 4: loss nan.*stopping "
                     r"\(train.nonfinite='stop'\).*the last checkpoint \(step 2\) is intact"):
    train.train_and_evaluate(config, str(tmp_path / "stop"))
  checkpoints = tmp_path / "stop" / "checkpoints"
  assert os.listdir(checkpoints) == ["2"]
  assert all(np.all(np.isfinite(v)) for v in _saved_state(checkpoints / "2").values())

  config = _config(make_config, fashion_mnist_dir, tmp_path, num_steps=6, checkpoint_every=100,
                   nonfinite="skip", max_nonfinite_in_a_row=2)
  monkeypatch.setattr(train.pipeline, "make_global_batch", _poison_batch({2, 3, 4, 5, 6}))
  with pytest.raises(FloatingPointError, match=r"Non-finite step 3.*2 in a row reached "
                     r"train\.max_nonfinite_in_a_row.*no checkpoint had been written yet"):
    train.train_and_evaluate(config, str(tmp_path / "diverged"))


def test_unwritable_workdir_and_failed_save_say_what_happened(make_config, fashion_mnist_dir,
                                                             tmp_path, monkeypatch):
  config = _config(make_config, fashion_mnist_dir, tmp_path, num_steps=4, checkpoint_every=2)
  not_a_dir = tmp_path / "a_file"
  not_a_dir.write_text("x")
  with pytest.raises(OSError, match=r"--workdir=.*a_file/run is not writable"):
    train.train_and_evaluate(config, str(not_a_dir / "run"))

  monkeypatch.setattr(train.shutil, "disk_usage",
                      lambda _: types.SimpleNamespace(total=1, used=0, free=1))
  with pytest.raises(OSError, match=r"has 0\.0 MiB free; one checkpoint of this run needs"):
    train.train_and_evaluate(config, str(tmp_path / "full_disk"))
  assert not (tmp_path / "full_disk" / "checkpoints").exists()
  monkeypatch.undo()

  real_save = ocp.CheckpointManager.save

  def disk_full_at_step_4(self, step, *args, **kwargs):
    if step == 4:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full_at_step_4)
  with pytest.raises(checkpointing.CheckpointWriteError,
                     match=r"Writing the checkpoint of step 4 .* failed \(OSError: .*No space "
                     r"left on device\); the previous checkpoint \(step 2\) is intact"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  monkeypatch.undo()
  resumed = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert sorted(resumed["losses"]) == [3, 4]


def _rewrite_shard(path: str, replace: dict[int, bytes]) -> None:
  """Rewrites an ArrayRecord shard with some records replaced (the others byte for byte)."""
  reader = array_record_module.ArrayRecordReader(path)
  records = [reader.read() for _ in range(reader.num_records())]
  reader.close()
  writer = array_record_module.ArrayRecordWriter(path, layout_lib.WRITER_OPTIONS)
  for index, record in enumerate(records):
    writer.write(replace.get(index, record))
  writer.close()


def test_bad_dataset_records_are_named_or_skipped(tmp_path):
  """Record 0 of shard 1 is garbage and record 3 holds a latent of the wrong shape: "error"
  names the shard file and record; "skip" serves the next good record and counts the skips."""
  rng = np.random.default_rng(0)
  examples = [{"image": rng.integers(0, 256, (8, 8, 1), dtype=np.uint8), "caption": f"c{i}",
               "label": i % 10} for i in range(12)]
  directory = str(tmp_path / "latents")
  writer_lib.write_shards(
      examples, output_dir=directory, split="train", num_shards=2,
      signal_encoder=encoders.avgpool2_encoder,
      text_encoder=encoders.bytes_text_encoder(8), batch_size=4,
      signal_encoder_name="avgpool2", text_encoder_name="bytes")
  shard = layout_lib.shard_name("train", 1, 2)
  good = reader_lib.LatentShardSource(directory, "train")
  wrong_shape = serialization.msgpack_restore(good._records[good._key(7)])  # pylint: disable=protected-access
  wrong_shape["latent"] = np.zeros((3, 3, 1), np.float16)
  expected = [good[i] for i in range(12)]
  _rewrite_shard(os.path.join(directory, shard),
                 {0: b"\x00not msgpack", 3: serialization.msgpack_serialize(wrong_shape)})

  strict = reader_lib.LatentShardSource(directory, "train")
  with pytest.raises(reader_lib.BadRecordError,
                     match=rf"latent shard '{shard}' record 0 \(example 6 of "):
    strict[6]  # pylint: disable=pointless-statement  (shard 1 holds examples 6..11)
  with pytest.raises(reader_lib.BadRecordError,
                     match=rf"'{shard}' record 3 \(example 9 .*latent has shape \(3, 3, 1\), "
                     r"the metadata says \(4, 4, 1\)"):
    strict.__getitems__([8, 9, 10])
  with pytest.raises(Exception, match=rf"latent shard '{shard}' record"):
    iterator = pipeline.make_train_iterator(
        strict, global_batch_size=4, seed=0, process_index=0, process_count=1, worker_count=0,
        preprocess=pipeline.preprocess_latents)
    for _ in range(3):  # one epoch: every record is read
      next(iterator)

  lenient = reader_lib.LatentShardSource(directory, "train", bad_records="skip")
  read = lenient.__getitems__(list(range(12)))
  assert lenient.skipped_records == 2
  for index, stand_in in ((6, 7), (9, 10)):
    np.testing.assert_array_equal(read[index]["latent"], expected[stand_in]["latent"])
  for index in (0, 4, 8, 11):
    np.testing.assert_array_equal(read[index]["latent"], expected[index]["latent"])


@pytest.mark.parametrize("text_dtype", ["float16", "bfloat16"])
def test_caption_embeddings_keep_their_storage_dtype_and_non_finite_ones_are_refused(
    tmp_path, text_dtype):
  """The reader hands the 16-bit caption embedding over as stored (the step widens it), and its
  bit-level finiteness check still refuses an inf or a NaN anywhere in it."""
  examples = [{"image": np.full((8, 8, 1), i, np.uint8), "caption": f"c{i}", "label": i}
              for i in range(4)]
  directory = str(tmp_path / "latents")
  writer_lib.write_shards(
      examples, output_dir=directory, split="train", num_shards=1,
      signal_encoder=encoders.avgpool2_encoder, text_encoder=encoders.bytes_text_encoder(8),
      batch_size=4, signal_encoder_name="avgpool2", text_encoder_name="bytes",
      text_dtype=text_dtype)
  good = reader_lib.LatentShardSource(directory, "train")
  stored = writer_lib.TEXT_DTYPES[text_dtype]
  record = good[1]
  assert record["text_embedding"].dtype == stored
  assert pipeline.preprocess_latents(record)["text_embedding"].dtype == stored
  raw = serialization.msgpack_restore(good._records[good._key(1)])  # pylint: disable=protected-access
  replace = {}
  for index, (row, column, value) in {1: (0, 0, np.inf), 2: (7, 3, -np.inf),
                                      3: (3, 1, np.nan)}.items():
    bad = dict(raw)
    bad["text_embedding"] = np.array(raw["text_embedding"])
    bad["text_embedding"][row, column] = value
    replace[index] = serialization.msgpack_serialize(bad)
  _rewrite_shard(os.path.join(directory, layout_lib.shard_name("train", 0, 1)), replace)
  source = reader_lib.LatentShardSource(directory, "train")
  np.testing.assert_array_equal(source[0]["text_embedding"], good[0]["text_embedding"])
  for index in (1, 2, 3):
    with pytest.raises(reader_lib.BadRecordError,
                       match=rf"example {index} .*text_embedding holds non-finite values"):
      source[index]  # pylint: disable=pointless-statement
