"""Resume never loses progress: the data streams are rebuilt when their saved state does not fit,
damaged checkpoints are set aside only when an older one restores, and one live run per workdir.

Each test runs the real trainer on the tiny model and records the global batches it reads, so
"the same batches as an uninterrupted run" is checked bit for bit, not through the losses."""

import json
import os
import socket
import time

import numpy as np
import pytest

from self_flow import checkpointing, train, workdir_lease
from conftest import tiny_config

_NUM_STEPS = 6
_STOP = 3


def _config(make_config, data_dir, tmp_path, num_steps, worker_count=0):
  config = make_config()
  config.data.data_dir = data_dir
  config.data.source = "debian"
  config.data.worker_count = worker_count
  config.train.num_steps = num_steps
  config.train.checkpoint_every = _STOP
  config.train.log_every = 1
  config.eval.enabled = False
  return config


def _recording(monkeypatch, batches: list) -> None:
  """Makes the trainer append every global batch it assembles, as host arrays, to `batches`."""
  assemble = train.pipeline.make_global_batch

  def recording(local_batch, sharding):
    batches.append({k: np.array(v) for k, v in local_batch.items()})
    return assemble(local_batch, sharding)

  monkeypatch.setattr(train.pipeline, "make_global_batch", recording)


@pytest.fixture
def record_batches(monkeypatch):
  """The global batches the trainer assembles during the test."""
  batches = []
  _recording(monkeypatch, batches)
  return batches


@pytest.fixture(scope="module")
def straight(fashion_mnist_dir, tmp_path_factory):
  """(result, batches) of an uninterrupted run of _NUM_STEPS steps (worker_count 0)."""
  batches = []
  with pytest.MonkeyPatch.context() as monkeypatch:
    _recording(monkeypatch, batches)
    tmp_path = tmp_path_factory.mktemp("straight")
    result = train.train_and_evaluate(
        _config(tiny_config, fashion_mnist_dir, tmp_path, _NUM_STEPS), str(tmp_path / "run"))
  return result, batches


def _assert_same_batches(got: list[dict], want: list[dict]) -> None:
  assert len(got) == len(want)
  for step, (a, b) in enumerate(zip(got, want)):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"batch {step}, {key}")


def _checkpoint_names(workdir) -> list[str]:
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


@pytest.mark.parametrize("before, after", [(0, 2), (2, 0)])
def test_other_worker_count_resumes_at_the_saved_step_with_the_same_batches(
    make_config, fashion_mnist_dir, tmp_path, straight, record_batches, caplog, before, after):
  """The grain state saved with `before` workers does not restore into `after` workers (grain
  raises, e.g. KeyError 'exhausted'): the stream is rebuilt at the saved batch, the run resumes
  at the saved step and reads exactly the batches of a run that never stopped; no checkpoint is
  moved."""
  straight, reference = straight
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(
      _config(make_config, fashion_mnist_dir, tmp_path, _STOP, before), workdir)
  _assert_same_batches(record_batches, reference[:_STOP])
  record_batches.clear()
  with caplog.at_level("WARNING"):
    resumed = train.train_and_evaluate(
        _config(make_config, fashion_mnist_dir, tmp_path, _NUM_STEPS, after), workdir)
  assert sorted(resumed["losses"]) == list(range(_STOP + 1, _NUM_STEPS + 1))
  _assert_same_batches(record_batches, reference[_STOP:])
  for step in resumed["losses"]:
    assert resumed["losses"][step] == straight["losses"][step], step
  assert f"worker_count {before} -> {after}" in caplog.text
  assert f"rebuilt at global batch {_STOP}" in caplog.text
  assert _checkpoint_names(workdir) == [str(_STOP), str(_NUM_STEPS)]  # nothing set aside


def test_old_checkpoint_without_a_data_position_resumes_from_the_step(
    make_config, fashion_mnist_dir, tmp_path, straight, record_batches):
  """A checkpoint written before the data position was saved: the stream position follows from
  the step, so a resume with another worker count is still exact."""
  reference = straight[1]
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(_config(make_config, fashion_mnist_dir, tmp_path, _STOP), workdir)
  position = os.path.join(workdir, "checkpoints", str(_STOP), checkpointing.DATA_POSITION_ITEM)
  for name in os.listdir(position):
    os.remove(os.path.join(position, name))
  os.rmdir(position)
  record_batches.clear()
  train.train_and_evaluate(
      _config(make_config, fashion_mnist_dir, tmp_path, _NUM_STEPS, worker_count=2), workdir)
  _assert_same_batches(record_batches, reference[_STOP:])


def _truncate_state(workdir, step) -> None:
  state = os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_0", "d")
  largest = max((os.path.join(state, n) for n in os.listdir(state)), key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 3)


def test_every_checkpoint_damaged_stops_the_run_and_moves_nothing(make_config, fashion_mnist_dir,
                                                                   tmp_path):
  """No silent fresh start: with every checkpoint damaged, the run names them and leaves them."""
  workdir = str(tmp_path / "run")
  config = _config(make_config, fashion_mnist_dir, tmp_path, _NUM_STEPS)
  train.train_and_evaluate(config, workdir)
  for step in (_STOP, _NUM_STEPS):
    _truncate_state(workdir, step)
  with pytest.raises(checkpointing.NoReadableCheckpointError,
                     match=f"(?s)every one is damaged: step {_NUM_STEPS}: .*step {_STOP}: .*"
                           "None was moved"):
    train.train_and_evaluate(config, workdir)
  assert _checkpoint_names(workdir) == [str(_STOP), str(_NUM_STEPS)]


def test_is_damage_tells_damage_from_errors_that_prove_nothing():
  """Damage: a file absent or short, metadata that does not parse (TensorStore's codes as the
  truncation test above raises them). Not damage: unavailability, timeouts, memory."""
  wrapped = Exception("Encountered error while reading array index")
  wrapped.__cause__ = ValueError('OUT_OF_RANGE: Error reading "w/0": Requested byte range')
  assert checkpointing.is_damage(wrapped)
  assert checkpointing.is_damage(json.JSONDecodeError("Expecting value", "{", 1))
  assert checkpointing.is_damage(FileNotFoundError("gs://b/run/checkpoints/4/state/_METADATA"))
  assert checkpointing.is_damage(ValueError("FAILED_PRECONDITION: Truncated Zstd stream"))
  for transient in (ValueError("UNAVAILABLE: HTTP response code: 503"), TimeoutError("read"),
                    MemoryError(), ConnectionResetError(104, "reset"),
                    ValueError("DEADLINE_EXCEEDED: deadline exceeded")):
    assert not checkpointing.is_damage(transient), transient


def test_second_live_run_is_refused_and_a_stale_lease_is_taken_over(
    make_config, fashion_mnist_dir, tmp_path, caplog):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  config = _config(make_config, fashion_mnist_dir, tmp_path, 2)
  live = workdir_lease.WorkdirLease(workdir, timeout_s=60)
  live.acquire()
  try:
    with pytest.raises(workdir_lease.WorkdirBusyError,
                       match=f"(?s)in use by another live run.*{socket.gethostname()}.*pid "
                             f"{os.getpid()}, started"):
      train.train_and_evaluate(config, workdir)
  finally:
    live.release()
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))  # refused before any state
  assert not os.path.exists(os.path.join(workdir, workdir_lease.LEASE_FILE))  # released

  # A preempted job on another host stopped renewing its lease 20 minutes ago.
  with open(os.path.join(workdir, workdir_lease.LEASE_FILE), "w", encoding="utf-8") as f:
    json.dump({"host": "pod-worker-7", "pid": 4242, "started": time.time() - 7200,
               "renewed": time.time() - 1200}, f)
  with caplog.at_level("WARNING"):
    result = train.train_and_evaluate(config, workdir)
  assert sorted(result["losses"]) == [1, 2]
  assert "Taking over the lease" in caplog.text and "'pod-worker-7'" in caplog.text
  assert not os.path.exists(os.path.join(workdir, workdir_lease.LEASE_FILE))


def test_lease_of_a_dead_process_on_this_host_is_taken_over_and_a_lost_lease_stops(tmp_path):
  workdir = str(tmp_path)
  with open(os.path.join(workdir, workdir_lease.LEASE_FILE), "w", encoding="utf-8") as f:
    json.dump({"host": socket.gethostname(), "pid": 2**22 + 17, "started": time.time(),
               "renewed": time.time()}, f)  # renewed just now, but its process is gone
  lease = workdir_lease.WorkdirLease(workdir, timeout_s=600)
  lease.acquire()
  lease.renew()
  # Another run takes the lease over (its holder looked stale to it): this one must notice.
  other = workdir_lease.WorkdirLease(workdir, timeout_s=0.05)
  time.sleep(0.1)
  other.acquire()
  with pytest.raises(workdir_lease.LeaseLostError, match="taken over by another run"):
    lease.renew()
  lease.lost = workdir_lease.LeaseLostError("lost")
  lease.release()  # does not delete the other run's lease
  assert os.path.exists(os.path.join(workdir, workdir_lease.LEASE_FILE))
  other.release()
  assert not os.path.exists(os.path.join(workdir, workdir_lease.LEASE_FILE))
