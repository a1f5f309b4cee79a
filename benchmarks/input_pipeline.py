"""Examples per second that one host's training input pipeline delivers, per paper preset, beside
what the preset consumes per host at its step-time band's lower bound.

  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
    python benchmarks/input_pipeline.py --root=/tmp/input_bench --workers=0,2,4 \
      [--aot_json=t2i.json,...] [--presets=t2i,c2i_imagenet256,t2a,t2v]
  # the same from the Cloud Storage emulator (tests/gcs_emulator.py, a real GCS server on
  # loopback that every client of the trainer reaches by its gs:// path):
  python tests/gcs_emulator.py --bucket bench -- \
    python benchmarks/input_pipeline.py --root=gs://bench/input --workers=0,2,4

Per preset it writes `--examples` latent-shard records with the preset's shapes (its default
config's latents and stored caption embeddings, float16 as the encoders store them; random
values: the pipeline's cost does not depend on them) into `--shards` ArrayRecord shards under
`--root` (a rerun finds them written; shards of another job there stop it, nothing is
overwritten), then times the trainer's own iterator (`train` opens it the same way: the config's
source, `modality_sources.train_processing`, `pipeline.make_train_iterator`) as host 0 of the
preset's documented slice (`PRESETS`: 8 chips per host on v5e and v6e, 4 on v5p, as the Cloud
TPU documentation's chip tables give them): read, decode, caption draw, latents to float32
(caption embeddings stay float16), batch, this host's rows of every global batch. After
`--warmup` batches, `--batches` batches are timed, `--repeats` times; the median is printed in
examples/s.

Demand: global batch / step time / hosts, at the lower bound of the band that `python -m
self_flow.aot --json=...` wrote (`--aot_json`, one file per preset, matched by config name);
headroom = delivered / demanded (the issue asks for at least 3x).
"""

import argparse
import importlib
import json
import os
import statistics
import sys
import time

import numpy as np
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# pylint: disable=g-import-not-at-top,wrong-import-position
from self_flow import config_resolution, storage
from self_flow.data import modality_sources, pipeline
from self_flow.data.latent_shards import writer

# Preset -> (config module, its documented slice, hosts of that slice: 8 chips per v5e host, 4
# per v5p host).
PRESETS = {
    "t2i": ("t2i", "v5e:4x4", 2),
    "c2i_imagenet256": ("c2i_imagenet256", "v5p:2x2x4", 4),
    "t2a": ("t2a", "v5e:4x4", 2),
    "t2v": ("t2v", "v5p:2x2x4", 4),
}


def preset_config(name: str):
  module = importlib.import_module(f"configs.{PRESETS[name][0]}")
  return module.get_config()


def write_preset_shards(config, spec, directory: str, num_examples: int, num_shards: int
                        ) -> int:
  """Random records of `spec`'s latent shape and the config's stored caption embeddings; returns
  the bytes of one record's arrays as stored."""
  shapes = modality_sources.batch_shapes(config, spec)
  latent_shape = shapes["latent"][0]
  # A class-conditional preset's shards carry no caption the step reads: one stored token.
  text = config.model.conditioning == "text"
  length, dim = (config.text.max_length, config.text.embedding_dim) if text else (1, 1)
  rng = np.random.default_rng(0)
  # Posterior sampling (c2i_imagenet256) stores each latent's std beside its mean.
  posterior = spec.name == "image" and config.data.latent_sampling == "posterior"

  def signal_encoder(signals):
    mean = rng.standard_normal((len(signals), *latent_shape), np.float32)
    return (mean, np.abs(mean) * 0.1) if posterior else mean

  def text_encoder(captions):
    return (rng.standard_normal((len(captions), length, dim), np.float32),
            np.ones((len(captions), length), bool))

  modality = spec.name
  signal = {"image": ("image", np.zeros((1, 1, 1), np.uint8)),
            "video": ("video", np.zeros((1, 1, 1, 1), np.uint8)),
            "audio": ("waveform", np.zeros((16,), np.int16))}[modality]
  examples = [{signal[0]: signal[1], "caption": f"example {i}", "label": i % 1000}
              for i in range(num_examples)]
  writer.write_shards(
      examples, num_shards=num_shards, output_dir=directory, split="train",
      signal_encoder=signal_encoder, text_encoder=text_encoder, batch_size=64,
      signal_encoder_name="random", text_encoder_name="random", modality=modality)
  return (int(np.prod(latent_shape)) * 4 * (2 if posterior else 1) + length * dim * 2
          + length)


def time_iterator(config, spec, hosts: int, workers: int, warmup: int, batches: int) -> float:
  """Seconds per local batch of host 0 of `hosts`, after `warmup` batches."""
  preprocess, transforms = modality_sources.train_processing(config, spec.name)
  iterator = pipeline.make_train_iterator(
      modality_sources.open_source(config, spec, "train"),
      global_batch_size=spec.global_batch_size, seed=0, process_index=0, process_count=hosts,
      worker_count=workers, worker_buffer_size=config.data.worker_buffer_size,
      preprocess=preprocess, transforms=transforms)
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return (time.perf_counter() - start) / batches


def lower_bounds(paths: list[str]) -> dict[str, float]:
  """{config name: band lower bound in s} from `self_flow.aot --json` files (one step each)."""
  bounds = {}
  for path in paths:
    for report in json.loads(storage.read_bytes(path)):
      if report.get("band"):
        bounds[report["config_name"]] = report["band"]["lower"]
  return bounds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--root", required=True, help="Where the shards go (local or gs://).")
  parser.add_argument("--presets", default=",".join(PRESETS))
  parser.add_argument("--workers", default="0,2,4", help="grain worker counts to time.")
  parser.add_argument("--examples", type=int, default=512)
  parser.add_argument("--shards", type=int, default=8)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--batches", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--aot_json", default="", help="Comma-separated self_flow.aot JSON files.")
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
  bounds = lower_bounds([p for p in args.aot_json.split(",") if p])
  print("| preset | storage | workers | record KiB | local batch | examples/s per host (median) "
        "| demand per host at the band's lower bound | headroom |")
  print("|---|---|---|---|---|---|---|---|")
  for name in args.presets.split(","):
    config = preset_config(name)
    spec = config_resolution.resolve(config).first_spec
    section = config[modality_sources.SECTIONS[spec.name]]
    section.data_dir = storage.join(args.root, name)
    record = write_preset_shards(config, spec, section.data_dir, args.examples, args.shards)
    _, _, hosts = PRESETS[name]
    local_batch = spec.global_batch_size // hosts
    lower = bounds.get(f"configs/{PRESETS[name][0]}.py")
    demand = spec.global_batch_size / lower / hosts if lower else None
    for workers in (int(w) for w in args.workers.split(",")):
      seconds = statistics.median(
          time_iterator(config, spec, hosts, workers, args.warmup, args.batches)
          for _ in range(args.repeats))
      rate = local_batch / seconds
      print(f"| {name} | {'gs://' if storage.is_url(args.root) else 'local disk'} | {workers} | "
            f"{record / 1024:.0f} | {local_batch} | {rate:.0f} | "
            f"{f'{demand:.0f}' if demand else '—'} | "
            f"{f'{rate / demand:.1f}x' if demand else '—'} |", flush=True)


if __name__ == "__main__":
  main()
