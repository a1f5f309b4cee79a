"""A text-to-image user's journey with their own captioned images, end to end, in processes of
their own as the user runs them:

1. 64 Fashion-MNIST images with several captions each (and two bad records) as webdataset tars
   and as parquet files;
2. encoded by `self_flow.tools.encode_captioned` with a tiny random T5 (Hugging Face files:
   config.json, model.safetensors, tokenizer.json) and a tiny random SD-VAE (diffusers files),
   on 2 JAX processes; the job is killed while one process is stuck reading a tar, and the
   rerun writes only the shard that is missing;
3. text-to-image trained from the shards with the stored embeddings (several captions per
   image, one drawn per epoch), stopped, resumed;
4. sampled for two prompts of the user's with `self_flow.tools.sample_prompts`.
"""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import tiny_hf_dirs
from self_flow.data import captions as caption_lib
from self_flow.data import sources
from self_flow.data.latent_shards import layout
from self_flow.data.latent_shards import reader as reader_lib
from self_flow.models import autoencoder_kl

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TIMEOUT_S = 300
_IMAGES = 64
_TARS = 4
# Two levels (one downsample): 16x16 crops -> 8x8x4 latents.
_VAE = autoencoder_kl.AutoencoderConfig(block_out_channels=(8, 16), layers_per_block=1,
                                        norm_num_groups=4)
_T5_WIDTH, _TEXT_LENGTH = 32, 8
_ENCODE = ["--image_size=16", f"--text_max_length={_TEXT_LENGTH}", "--captions_per_example=3",
           "--batch_size=4", "--num_workers=2", "--text_dtype=bfloat16"]
# The tiny MMDiT of conftest.py on the 8x8x4 latents (patch 2: 16 tokens) and 8 x 32 caption
# embeddings, as command-line overrides of configs/t2i.py:local.
_T2I = {
    "model.preset": "custom", "model.hidden_size": 32, "model.num_heads": 2, "model.depth": 4,
    "model.num_double": 2, "model.rope_axes_dims": "(2,6,8)", "model.patch_size": 2,
    "data.global_batch_size": 8, "optim.warmup_steps": 0, "mesh.data": -1, "mesh.fsdp": 1,
    "mesh.cpu_devices": -1, "data.dataset": "latent_shards", "data.image_size": 8,
    "data.num_channels": 4, "text.encoder": "precomputed", "text.embedding_dim": _T5_WIDTH,
    "text.max_length": _TEXT_LENGTH, "data.worker_count": 0, "eval.enabled": False,
    "train.log_every": 1, "train.checkpoint_every": 2,
}


def _env() -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=_REPO, TF_CPP_MIN_LOG_LEVEL="2")


def _start(args: list[str], log_path: str) -> subprocess.Popen:
  with open(log_path, "w", encoding="utf-8") as log:
    return subprocess.Popen([sys.executable, *args], cwd=_REPO, env=_env(), stdout=log,
                            stderr=subprocess.STDOUT)


def _log(path: str) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()


def _finish(procs: list[subprocess.Popen], logs: list[str]) -> str:
  """Waits for every process; fails the test with the logs unless all exit 0."""
  codes = [proc.wait(timeout=_TIMEOUT_S) for proc in procs]
  text = "\n".join(_log(path) for path in logs)
  if any(codes):
    pytest.fail(f"exit statuses {codes}:\n{text[-8000:]}")
  return text


def _run(args: list[str], log_path: str) -> str:
  return _finish([_start(args, log_path)], [log_path])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array[..., 0]).save(buffer, "PNG")
  return buffer.getvalue()


def _captioned_images(fashion_mnist_dir) -> list[tuple[bytes, list[str], int]]:
  """64 (PNG, captions, label): 1 to 3 training phrasings of each image's class."""
  source = sources.open_image_source("fashion_mnist", "train", fashion_mnist_dir, "debian")
  rng = np.random.default_rng(0)
  examples = []
  for index in range(_IMAGES):
    record = source[index]
    label = int(record["label"])
    captions = [caption_lib.train_caption(label, rng) for _ in range(index % 3 + 1)]
    examples.append((_png(np.asarray(record["image"])), captions, label))
  return examples


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _write_tars(directory: str, examples) -> None:
  """4 tars of 16 records: captions in .json (a list) or .txt (the first alone); tar 1 also
  holds a record whose image does not decode, tar 2 one without a caption."""
  os.makedirs(directory)
  per_tar = _IMAGES // _TARS
  for number in range(_TARS):
    with tarfile.open(os.path.join(directory, f"part-{number:03d}.tar"), "w") as tar:
      for index in range(number * per_tar, (number + 1) * per_tar):
        image, captions, label = examples[index]
        key = f"{index:05d}"
        _add(tar, f"{key}.png", image)
        if index % 2:
          _add(tar, f"{key}.json", json.dumps({"captions": captions}).encode())
        else:
          _add(tar, f"{key}.txt", captions[0].encode())
        _add(tar, f"{key}.cls", str(label).encode())
      if number == 1:
        _add(tar, "bad_image.png", b"not a png")
        _add(tar, "bad_image.txt", b"a caption")
      if number == 2:
        _add(tar, "no_caption.png", examples[0][0])


def _write_parquet(directory: str, examples) -> None:
  """2 parquet files of 32 rows: image bytes, a caption column and a list column of more."""
  os.makedirs(directory)
  half = _IMAGES // 2
  for number in range(2):
    rows = examples[number * half:(number + 1) * half]
    table = pa.table({"image": [image for image, _, _ in rows],
                      "caption": [captions[0] for _, captions, _ in rows],
                      "more_captions": [captions[1:] for _, captions, _ in rows]})
    pq.write_table(table, os.path.join(directory, f"part-{number}.parquet"), row_group_size=8)


def _encode(scratch: str, name: str, *flags: str, processes: int = 1) -> list[subprocess.Popen]:
  port = _free_port()
  distributed = lambda i: ([f"--coordinator_address=127.0.0.1:{port}",  # noqa: E731
                            f"--num_processes={processes}", f"--process_id={i}"]
                           if processes > 1 else [])
  return [_start(["-m", "self_flow.tools.encode_captioned", f"--vae_path={scratch}/vae",
                  f"--text_encoder_path={scratch}/t5", *_ENCODE, *flags, *distributed(i)],
                 f"{scratch}/{name}_{i}.log") for i in range(processes)]


def _wait_for(condition, what: str) -> None:
  deadline = time.time() + _TIMEOUT_S
  while not condition():
    if time.time() > deadline:
      pytest.fail(f"timed out waiting for {what}")
    time.sleep(0.1)


def test_a_command_without_its_encoders_is_refused_before_reading_anything(tmp_path):
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from self_flow.tools import encode_captioned  # pylint: disable=g-import-not-at-top
  options = flags.FlagValues()
  encode_captioned.define_flags(options)
  options(["encode_captioned", "--source=webdataset", f"--inputs={tmp_path}/none-*.tar",
           f"--output_dir={tmp_path}/shards"])
  with pytest.raises(app.UsageError, match="missing --vae_path, --text_encoder_path"):
    encode_captioned.run(options)
  assert not os.path.exists(f"{tmp_path}/shards")


class _ListedSource:
  """A source whose listing can grow between runs, as a bucket does."""

  def __init__(self, inputs: str, files: list[str]):
    self.inputs, self.files = inputs, files

  def units(self) -> list[str]:
    return list(self.files)

  def describe(self) -> dict:
    return {"inputs": self.inputs, "num_units": len(self.files)}

  def __repr__(self) -> str:
    return f"_ListedSource({self.inputs!r})"


def test_a_rerun_finishes_the_recorded_inputs_and_refuses_other_ones(tmp_path):
  """The first run records the listing; a rerun reads it back even if the bucket grew; other
  source settings are refused with the recorded plan untouched; --overwrite lists afresh."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from self_flow.tools import encode_captioned  # pylint: disable=g-import-not-at-top
  plan = lambda source, overwrite=False: encode_captioned.planned_units(  # noqa: E731
      source, str(tmp_path), "train", 0, None, overwrite)
  first = plan(_ListedSource("gs://b/*.tar", ["a.tar", "b.tar"]))
  assert first["units"] == ["a.tar", "b.tar"] and first["source"]["num_units"] == 2
  assert plan(_ListedSource("gs://b/*.tar", ["a.tar", "b.tar", "c.tar"])) == first
  with pytest.raises(app.UsageError, match=r"records the inputs of this split's job as "
                                           r"_ListedSource\('gs://b/\*.tar'\), not "
                                           r"_ListedSource\('gs://c/\*.tar'\)"):
    plan(_ListedSource("gs://c/*.tar", ["x.tar"]))
  assert plan(_ListedSource("gs://b/*.tar", ["a.tar"])) == first
  assert plan(_ListedSource("gs://c/*.tar", ["x.tar"]), overwrite=True)["units"] == ["x.tar"]


def test_bad_records_are_passed_on_or_stop_the_job_with_bad_input_error():
  """--bad_input=skip: a reader's Skipped and a record prepare cannot use reach the writer as
  Skipped, good ones as examples; --bad_input=error: the first bad record stops the job."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from self_flow.data import captioned  # pylint: disable=g-import-not-at-top
  from self_flow.tools import encode_captioned  # pylint: disable=g-import-not-at-top

  class Source:
    def read(self, unit):
      assert unit == "u"
      return [captioned.Skipped("u#0", "unreadable_record", "bad json"),
              captioned.RawExample("u#1", b"not an image", ("a caption",)),
              captioned.RawExample("u#2", _png(np.zeros((16, 16, 1), np.uint8)), ("a bag",), 3)]

  options = flags.FlagValues()
  encode_captioned.define_flags(options)
  options(["encode_captioned", "--image_size=8", "--num_workers=2"])
  prepared = encode_captioned._prepared  # pylint: disable=protected-access
  skipped_0, skipped_1, example = prepared(Source(), "u", options)
  assert (skipped_0.reason, skipped_1.reason) == ("unreadable_record", "undecodable_image")
  assert example["image"].shape == (8, 8, 3) and example["captions"] == ("a bag",)
  assert example["label"] == 3
  options.bad_input = "error"
  with pytest.raises(ValueError, match=r"Record 'u#0' cannot be used \(unreadable_record\): "
                                       r"bad json"):
    list(prepared(Source(), "u", options))


@pytest.fixture(scope="module")
def journey(tmp_path_factory, fashion_mnist_dir):
  """The inputs, the tiny encoders and the webdataset shards, written as steps 1-2 describe."""
  scratch = str(tmp_path_factory.mktemp("captioned"))
  examples = _captioned_images(fashion_mnist_dir)
  _write_tars(f"{scratch}/tars", examples)
  _write_parquet(f"{scratch}/parquet", examples)
  tiny_hf_dirs.write_t5_dir(f"{scratch}/t5", d_model=_T5_WIDTH)
  tiny_hf_dirs.write_diffusers_dir(f"{scratch}/vae", _VAE)
  return scratch, examples


@pytest.fixture(scope="module")
def webdataset_shards(journey):
  """Step 2 on the tars, 2 processes, killed once and rerun: (shard directory, rerun logs)."""
  scratch, _ = journey
  shards = f"{scratch}/shards"
  inputs = ["--source=webdataset", f"--inputs={scratch}/tars/part-*.tar",
            f"--output_dir={shards}"]
  # Tar 3 (process 1's second unit) is a pipe nobody writes: process 1 hangs reading it, as a
  # host does on a stalled read, until the job is killed (a preemption).
  real = f"{scratch}/tars/part-003.tar"
  os.rename(real, real + ".later")
  os.mkfifo(real)
  procs = _encode(scratch, "killed", *inputs, processes=2)
  manifests = lambda: {n for n in os.listdir(f"{shards}/manifests")  # noqa: E731
                       if n.endswith(".array_record.json")} if os.path.isdir(
                           f"{shards}/manifests") else set()
  _wait_for(lambda: len(manifests()) == 3, "shards 0, 1 and 2")
  for proc in procs:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert not os.path.exists(f"{shards}/{layout.METADATA_FILE}")
  os.remove(real)
  os.rename(real + ".later", real)

  logs = _finish(_encode(scratch, "rerun", *inputs, processes=2),
                 [f"{scratch}/rerun_{i}.log" for i in range(2)])
  return shards, logs


def test_a_killed_two_process_encode_reruns_only_the_missing_shard(journey, webdataset_shards):
  scratch, examples = journey
  shards, logs = webdataset_shards
  assert logs.count("is already written; skipped") == 3
  # 8x8x4 float16 mean and std + 3 captions x 8 x 32 bfloat16 + mask; counted from tar 0.
  assert ("storage: 2.5 KiB per example (latent 512.0 B, latent_std 512.0 B, text 1.5 KiB, "
          "text_mask 24.0 B); 64 examples (estimated: 16 in the first of 4 input units)") in logs
  metadata = layout.read_metadata(shards)
  train = metadata["splits"]["train"]
  assert train["num_examples"] == _IMAGES and train["num_shards"] == _TARS
  assert train["skipped"] == {"missing_caption": 1, "undecodable_image": 1}
  assert metadata["text_encoder"] == f"t5:{scratch}/t5"
  assert metadata["fields"]["text_embedding"] == {"shape": [3, _TEXT_LENGTH, _T5_WIDTH],
                                                  "dtype": "bfloat16"}
  assert metadata["fields"]["latent"]["shape"] == [8, 8, 4]
  source = reader_lib.LatentShardSource(shards, "train")
  for index in (0, 1, 5, 63):
    record = source[index]
    _, captions, label = examples[index]
    want = captions if index % 2 else captions[:1]  # a .txt member holds one caption
    assert record["captions"] == tuple(want) and record["num_captions"] == len(want)
    assert record["label"] == label


@pytest.fixture(scope="module")
def token_shards(journey):
  """Step 2 on the parquet files, storing T5 token ids: the shard directory."""
  scratch, _ = journey
  _run(["-m", "self_flow.tools.encode_captioned", f"--vae_path={scratch}/vae",
        f"--text_encoder_path={scratch}/t5", *_ENCODE, "--source=parquet",
        f"--inputs={scratch}/parquet", f"--output_dir={scratch}/token_shards",
        "--caption_columns=caption,more_captions", "--text_output=tokens"],
       f"{scratch}/parquet.log")
  return f"{scratch}/token_shards"


def test_parquet_caption_columns_are_encoded_together_as_token_ids(journey, token_shards):
  """Parquet, several caption columns, stored as T5 token ids (for the in-step encoder)."""
  scratch, examples = journey
  # Parquet footers count the rows: 3 x 8 int32 ids and the mask per image.
  assert "text 96.0 B, text_mask 24.0 B); 64 examples (counted)" in _log(f"{scratch}/parquet.log")
  source = reader_lib.LatentShardSource(token_shards, "train")
  assert len(source) == _IMAGES and source.text_field == "text_tokens"
  assert [source[i]["captions"] for i in (0, 2, 40)] == [tuple(examples[i][1])
                                                         for i in (0, 2, 40)]
  record = source[2]  # three captions
  tokens, mask = record["text_tokens"], record["text_mask"]
  assert tokens.shape == mask.shape == (3, _TEXT_LENGTH) and tokens.dtype == np.int32
  assert all(row[real][-1] == tiny_hf_dirs.EOS for row, real in zip(tokens, mask))


@pytest.mark.parametrize("mode", ["precomputed", "t5"])
def test_trained_from_the_shards_resumed_and_sampled_for_the_users_prompts(
    journey, webdataset_shards, token_shards, mode):
  """Precomputed embeddings (the webdataset shards) or the T5 run in the step on the token ids
  (the parquet shards): 2 steps, resumed to 4, then two prompts of the user's."""
  scratch, _ = journey
  workdir = f"{scratch}/workdir_{mode}"
  shards = webdataset_shards[0] if mode == "precomputed" else token_shards
  overrides = [*[f"--config.{k}={v}" for k, v in _T2I.items()],
               f"--config.data.data_dir={shards}", f"--config.text.encoder={mode}",
               f"--config.text.t5_path={scratch}/t5" if mode == "t5" else "--config.seed=0"]
  train = lambda steps, name: _run(  # noqa: E731
      ["-m", "self_flow.main", "--config=configs/t2i.py:local", f"--workdir={workdir}",
       f"--config.train.num_steps={steps}", *overrides], f"{scratch}/{name}_{mode}.log")
  train(2, "train")
  resumed = train(4, "resumed")
  assert "Resuming from the checkpoint of step 2" in resumed, resumed[-3000:]
  assert sorted(os.listdir(f"{workdir}/checkpoints"))[-1] == "4"
  prompts = ["a photo of a sneaker", "a picture showing a bag"]
  out = f"{scratch}/prompts_{mode}"
  _run(["-m", "self_flow.tools.sample_prompts", "--config=configs/t2i.py:local",
        f"--workdir={workdir}", *[f"--prompt={p}" for p in prompts], "--num_per_prompt=2",
        "--num_steps=2", f"--vae={scratch}/vae", f"--output={out}", *overrides],
       f"{scratch}/sample_{mode}.log")
  grid = np.asarray(Image.open(f"{out}/grid.png"))
  assert grid.shape[1] >= 2 * 16  # one 16-pixel column per prompt, at least
  with open(f"{out}/prompts.txt", encoding="utf-8") as f:
    assert f.read().split("\n")[:2] == prompts
