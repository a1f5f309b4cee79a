"""Every GCS client the trainer uses, on gs:// paths, against the emulator of gcs_emulator.py.

On the host this module holds one test, which runs this very file again under pytest inside the
emulator's private namespace (`gcs_emulator.run_in_namespace`), where the emulator's settings are
in the environment and the module holds the per-client tests instead: there, tf.io.gfile talks
HTTPS to "www.googleapis.com" as it does against GCS. They need none of the trainer's test set-up,
hence `--noconftest`.
"""

import os
import subprocess
import sys
import tempfile
import time

import pytest

import gcs_emulator

IN_NAMESPACE = gcs_emulator.CONTROL_URL_VAR in os.environ
BUCKET = "test-bucket"

# TF's GCS client retries a failed request 10 times, 1 s to 32 s apart (about 200 s in all): short
# delays keep the fault tests quick, and the other tests see no faults.
FAST_TF_RETRIES = {"GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "50000",
                   "GCS_RETRY_CONFIG_MAX_DELAY_TIME_US": "200000",
                   "GCS_RETRY_CONFIG_MAX_RETRIES": "4"}


if not IN_NAMESPACE:

  def test_clients_against_emulator():
    started = time.monotonic()
    result = gcs_emulator.run_in_namespace(
        [sys.executable, "-m", "pytest", "-q", "--noconftest", os.path.abspath(__file__)],
        bucket=BUCKET, env={**os.environ, **FAST_TF_RETRIES}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, (
        f"the GCS checks in the namespace failed:\n{result.stdout[-30000:]}")
    print(f"GCS checks in the namespace: {time.monotonic() - started:.1f} s\n"
          f"{result.stdout.strip().splitlines()[-1]}")

else:

  @pytest.fixture(scope="module")
  def emulator():
    return gcs_emulator.connect()

  @pytest.fixture
  def root(request):
    """A fresh folder of the bucket for each test (all share the one emulator)."""
    return f"gs://{BUCKET}/{request.node.name}"

  def _requests_since(emulator, since: float) -> list[dict]:
    return [r for r in emulator.requests() if r["time"] >= since]

  def test_tf_gfile(emulator, root):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    gfile = tf.io.gfile
    prefix = root.removeprefix(f"gs://{BUCKET}/")
    since = time.time()
    gfile.makedirs(f"{root}/empty/deep")
    assert gfile.isdir(f"{root}/empty/deep")
    with gfile.GFile(f"{root}/a/x.txt", "w") as file:
      file.write("hello")
    with gfile.GFile(f"{root}/a/x.txt") as file:
      assert file.read() == "hello"
    assert gfile.exists(f"{root}/a/x.txt")
    assert sorted(gfile.listdir(root)) == ["a/", "empty/"]
    gfile.rename(f"{root}/a/x.txt", f"{root}/a/y.txt")
    assert gfile.listdir(f"{root}/a") == ["y.txt"]
    gfile.rename(f"{root}/a", f"{root}/b")  # a folder: asks the bucket's storageLayout first
    assert gfile.glob(f"{root}/b/*") == [f"{root}/b/y.txt"]
    assert emulator.bucket.read(f"{prefix}/b/y.txt") == b"hello"
    gfile.remove(f"{root}/b/y.txt")
    assert not gfile.exists(f"{root}/b/y.txt")
    assert f"{prefix}/b/y.txt" not in emulator.bucket.list(prefix)
    requests = _requests_since(emulator, since)
    assert {(r["scheme"], r["host"]) for r in requests} == {
        ("https", "www.googleapis.com"), ("https", "storage.googleapis.com")}
    assert any(r["path"].endswith("/storageLayout") for r in requests)

  def test_epath(emulator, root):
    from etils import epath  # pylint: disable=import-outside-toplevel
    folder = epath.Path(root)
    (folder / "x.txt").write_text("hi")
    assert (folder / "x.txt").read_text() == "hi"
    assert list(folder.iterdir()) == [folder / "x.txt"]
    assert list(folder.glob("*.txt")) == [folder / "x.txt"]
    (folder / "x.txt").rename(folder / "y.txt")
    assert not (folder / "x.txt").exists() and (folder / "y.txt").exists()
    assert emulator.bucket.read(f"{root.removeprefix(f'gs://{BUCKET}/')}/y.txt") == b"hi"

  def test_orbax_checkpoint_manager(emulator, root):
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    tree = {"w": np.arange(12.0, dtype=np.float32).reshape(3, 4), "b": {"c": np.ones(5, np.int32)}}
    since = time.time()
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
    with ocp.CheckpointManager(f"{root}/checkpoints", options=options) as manager:
      for step in (1, 2):
        manager.save(step, args=ocp.args.StandardSave(jax.tree.map(lambda x, s=step: x * s, tree)))
      manager.wait_until_finished()
      assert manager.all_steps() == [1, 2]
    with ocp.CheckpointManager(f"{root}/checkpoints") as manager:
      assert manager.all_steps() == [1, 2]
      restored = manager.restore(2, args=ocp.args.StandardRestore(tree))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b * 2), restored, tree)
    schemes = {r["scheme"] for r in _requests_since(emulator, since)}
    assert schemes == {"http", "https"}  # tensorstore's array data, tf.io.gfile's metadata

  def test_array_record_reader(emulator, root):
    # pylint: disable=import-outside-toplevel
    import grain.python as grain
    from array_record.python import array_record_module
    records = [f"record {i}".encode() for i in range(7)]
    with tempfile.TemporaryDirectory() as local:
      # ArrayRecordWriter writes local files only.
      writer = array_record_module.ArrayRecordWriter(f"{local}/shard", "group_size:1")
      for record in records:
        writer.write(record)
      writer.close()
      with open(f"{local}/shard", "rb") as file:
        emulator.bucket.write(f"{root.removeprefix(f'gs://{BUCKET}/')}/shard", file.read())
    since = time.time()
    reader = array_record_module.ArrayRecordReader(f"{root}/shard")
    assert reader.read_all() == records
    reader.close()
    source = grain.ArrayRecordDataSource([f"{root}/shard"])
    assert len(source) == 7 and source[3] == records[3]
    assert {r["scheme"] for r in _requests_since(emulator, since)} == {"http"}

  def test_clu_tensorboard_writer(emulator, root):
    # pylint: disable=import-outside-toplevel
    import tensorflow as tf
    from clu import metric_writers
    writer = metric_writers.create_default_writer(f"{root}/logs")
    writer.write_scalars(1, {"loss": 0.5})
    writer.write_scalars(2, {"loss": 0.25})
    writer.flush()
    writer.close()
    prefix = root.removeprefix(f"gs://{BUCKET}/")
    (events,) = [name for name in emulator.bucket.list(prefix) if "tfevents" in name]
    with tempfile.NamedTemporaryFile() as local:
      local.write(emulator.bucket.read(events))
      local.flush()
      losses = {event.step: float(tf.make_ndarray(value.tensor))
                for event in tf.compat.v1.train.summary_iterator(local.name)
                for value in event.summary.value if value.tag == "loss"}
    assert losses == {1: 0.5, 2: 0.25}

  def test_503_reaches_every_client_while_the_server_stays_up(emulator, root):
    # pylint: disable=import-outside-toplevel
    import tensorflow as tf
    import tensorstore as ts
    prefix = root.removeprefix(f"gs://{BUCKET}/")
    # A blip: TF retries through it.
    emulator.fail(503, path="^/upload/", count=2)
    since = time.time()
    with tf.io.gfile.GFile(f"{root}/blip.txt", "w") as file:
      file.write("ok")
    assert [r["status"] for r in _requests_since(emulator, since)][:3] == [503, 503, 200]
    assert emulator.bucket.read(f"{prefix}/blip.txt") == b"ok"
    # A lost upload: TF asks how much of it arrived (the proxy answers: none) and sends it again.
    data = os.urandom(1 << 20)
    emulator.fail(503, methods=["PUT"], count=1)
    since = time.time()
    with tf.io.gfile.GFile(f"{root}/resumed.bin", "wb") as file:
      file.write(data)
    assert [(r["method"], r["status"]) for r in _requests_since(emulator, since)][:4] == [
        ("POST", 200), ("PUT", 503), ("PUT", 308), ("PUT", 200)]
    assert emulator.bucket.read(f"{prefix}/resumed.bin") == data
    # An outage of uploads: TF gives up after its retries; tensorstore too; the data is intact.
    emulator.fail(503, path="^/upload/")
    try:
      with pytest.raises(tf.errors.OpError, match="503"):
        with tf.io.gfile.GFile(f"{root}/lost.txt", "w") as file:
          file.write("lost")
      retries = ts.Context({"gcs_request_retries": {
          "max_retries": 2, "initial_delay": "10ms", "max_delay": "20ms"}})
      store = ts.KvStore.open({"driver": "gcs", "bucket": BUCKET, "path": f"{prefix}/ts/"},
                              context=retries).result()
      with pytest.raises(ValueError, match="503"):
        store.write("key", b"value").result()
      assert tf.io.gfile.GFile(f"{root}/blip.txt").read() == "ok"  # reads still work
      assert emulator.bucket.list(prefix) == [f"{prefix}/blip.txt", f"{prefix}/resumed.bin"]
    finally:
      emulator.heal()
    store.write("key", b"value").result()
    assert emulator.bucket.read(f"{prefix}/ts/key") == b"value"

  def test_stop_and_start(emulator, root):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    with tf.io.gfile.GFile(f"{root}/kept.txt", "w") as file:
      file.write("kept")
    emulator.stop()
    try:
      with pytest.raises(tf.errors.OpError, match="Could not connect"):
        tf.io.gfile.exists(f"{root}/kept.txt")
    finally:
      emulator.start()
    assert tf.io.gfile.GFile(f"{root}/kept.txt").read() == "kept"
