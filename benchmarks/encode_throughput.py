"""Images per second of the captioned-data encoder (`self_flow.tools.encode_captioned`) on this
host, for a tiny and an SD-VAE-sized autoencoder, measured end to end in one process:

  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
    python benchmarks/encode_throughput.py --images=16 --per_tar=8 --batch_size=8 --repeats=3 --aot

Each setting encodes the same webdataset tars of random 256x256 JPEGs (1 to 4 captions each)
with random weights in the Hugging Face file formats (written by tests/tiny_hf_dirs.py): a
diffusers VAE directory and a T5 encoder directory with its tokenizer.json. The job is the
real one (tar streaming, threaded JPEG decoding and ADM crop, the jitted VAE and T5 on this
host's devices, ArrayRecord shards, manifests, metadata). A job's fixed cost (loading weights,
compiling) is paid once per job, not per image: so each repeat times a job of `--images` and
one of twice as many, and the rate is the extra images over the extra seconds. The median of
`--repeats` is printed per setting, with the ratio of the two settings measured in one run.

With `--aot`, it then compiles the t2i default with the frozen T5-XXL run in the step
(text.encoder=t5, no stored embeddings) for its documented slice, v5e:4x4, with the real TPU
compiler (`python -m self_flow.aot` in the TPU environment, `launch/setup_tpu_aot.sh`; a few
minutes) and prints its row of benchmarks/TPU_AOT.md: the other way to pay for the captions.

Settings (XLA's cost analysis of the jitted VAE encoder on one 256x256 image: 269 GFLOP for
SD-VAE's, 4.9 for the tiny one; both give 32x32x4 latents):
  tiny     VAE (32, 32, 64, 64) channels, 1 ResNet per level; T5 width 64, 2 layers, 32 tokens.
  sd_vae   SD-VAE's encoder (128, 256, 512, 512) channels, 2 ResNets per level; T5 width 512,
           8 layers, 6 heads (T5 v1.1 small-sized), 128 tokens.
"""

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
from absl import flags
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
import tiny_hf_dirs  # noqa: E402  (tests/: the Hugging Face file writers)
from self_flow.models import autoencoder_kl  # noqa: E402
from self_flow.tools import encode_captioned  # noqa: E402

SETTINGS = {
    "tiny": dict(vae=autoencoder_kl.AutoencoderConfig(block_out_channels=(32, 32, 64, 64),
                                                      layers_per_block=1, norm_num_groups=8),
                 t5=dict(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16),
                 text_max_length=32),
    "sd_vae": dict(vae=autoencoder_kl.AutoencoderConfig(),
                   t5=dict(d_model=512, d_ff=1024, num_layers=8, num_heads=6, d_kv=64,
                           num_buckets=32),
                   text_max_length=128),
}
WORDS = ("a", "red", "cat", "on", "the", "mat", "dog", "shoe", "photo", "of", "bag")


def write_tars(directory: str, images: int, per_tar: int, seed: int = 0) -> None:
  """Tars of random 256x256 JPEGs, each with 1 to 4 captions in a .json member."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory)
  for number in range(0, images, per_tar):
    with tarfile.open(os.path.join(directory, f"part-{number // per_tar:04d}.tar"), "w") as tar:
      for index in range(number, min(number + per_tar, images)):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(
            buffer, "JPEG", quality=90)
        captions = [" ".join(rng.choice(WORDS, 8)) for _ in range(1 + index % 4)]
        for suffix, data in ((".jpg", buffer.getvalue()),
                             (".json", json.dumps({"captions": captions}).encode())):
          info = tarfile.TarInfo(f"{index:06d}{suffix}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))


def options(scratch: str, name: str, output_dir: str, inputs: str, batch_size: int):
  """encode_captioned's flags for one setting, parsed on a FlagValues of their own."""
  values = flags.FlagValues()
  encode_captioned.define_flags(values)
  setting = SETTINGS[name]
  values([
      "encode_throughput", "--source=webdataset", f"--inputs={inputs}",
      f"--output_dir={output_dir}", f"--vae_path={scratch}/{name}_vae",
      f"--text_encoder_path={scratch}/{name}_t5", "--image_size=256",
      f"--text_max_length={setting['text_max_length']}", "--captions_per_example=4",
      f"--batch_size={batch_size}", "--num_workers=4", "--text_dtype=bfloat16"])
  return values


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=32, help="Images per timed run.")
  parser.add_argument("--per_tar", type=int, default=8, help="Images per tar (= per shard).")
  parser.add_argument("--batch_size", type=int, default=8, help="Images per encoder call.")
  parser.add_argument("--repeats", type=int, default=3, help="Timed runs per setting.")
  parser.add_argument("--settings", default="tiny,sd_vae")
  parser.add_argument("--aot", action="store_true",
                      help="Also compile t2i with T5-XXL in the step for v5e:4x4; print its row.")
  parser.add_argument("--tpu_python", default=os.path.join(REPO, ".venv-tpu", "bin", "python"),
                      help="A Python with the tpu extra (for --aot).")
  args = parser.parse_args()
  names = args.settings.split(",")
  flags.FLAGS.mark_as_parsed()
  with tempfile.TemporaryDirectory(prefix="encode_bench_") as scratch:
    write_tars(f"{scratch}/small", args.images, args.per_tar)
    write_tars(f"{scratch}/large", 2 * args.images, args.per_tar)
    for name in names:
      setting = SETTINGS[name]
      tiny_hf_dirs.write_diffusers_dir(f"{scratch}/{name}_vae", setting["vae"])
      tiny_hf_dirs.write_t5_dir(f"{scratch}/{name}_t5", **setting["t5"])
    rates = {}
    for name in names:
      samples = []
      for repeat in range(args.repeats):
        seconds = {}
        for size, count in (("small", args.images), ("large", 2 * args.images)):
          run = options(scratch, name, f"{scratch}/out_{name}_{size}_{repeat}",
                        f"{scratch}/{size}", args.batch_size)
          start = time.perf_counter()
          metadata = encode_captioned.run(run)
          seconds[size] = time.perf_counter() - start
          assert metadata["splits"]["train"]["num_examples"] == count
        samples.append(args.images / (seconds["large"] - seconds["small"]))
        print(f"  {name} repeat {repeat}: {args.images} images in {seconds['small']:.1f} s, "
              f"{2 * args.images} in {seconds['large']:.1f} s", flush=True)
      rates[name] = statistics.median(samples)
      print(f"{name}: {rates[name]:.2f} images/s per host (median of {args.repeats}: "
            f"{', '.join(f'{r:.2f}' for r in samples)})", flush=True)
    if len(rates) == 2:
      first, second = names
      print(f"ratio {first}/{second}: {rates[first] / rates[second]:.1f}x")
  if args.aot:
    print(in_step_t5_row(args.tpu_python), flush=True)


def in_step_t5_row(tpu_python: str) -> str:
  """The AOT table row of the t2i default with T5-XXL in the step, on v5e:4x4."""
  command = [tpu_python, "-m", "self_flow.aot", "--config=configs/t2i.py", "--topology=v5e:4x4",
             "--markdown", "--config.text.encoder=t5", "--config.text.t5_config=t5-v1_1-xxl"]
  result = subprocess.run(command, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                          capture_output=True, text=True, check=False)
  rows = [line for line in result.stdout.splitlines() if line.startswith("| configs/")]
  if result.returncode or not rows:
    raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n"
                     f"{(result.stdout + result.stderr)[-3000:]}")
  return rows[0]


if __name__ == "__main__":
  main()
