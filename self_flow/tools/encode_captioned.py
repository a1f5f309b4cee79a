"""CLI: encodes a user's captioned images once into latent shards for text-to-image training.

The pod-scale text-to-image config (configs/t2i.py) trains on SD-VAE latents and T5-class
caption embeddings read from latent shards (`self_flow.data.latent_shards`). This job writes
them from the user's own data, on every host of a pod at once, like training:

  python -m self_flow.tools.encode_captioned --source=webdataset \
      --inputs='gs://BUCKET/raw/{00000..01999}.tar' --output_dir=gs://BUCKET/shards \
      --vae_path=gs://BUCKET/weights/sd-vae-ft-ema --text_encoder_path=gs://BUCKET/weights/t5 \
      --captions_per_example=4 --text_max_length=128 --text_dtype=bfloat16
  python launch/tpu_pod.py encode --name=... --zone=... --source=parquet --inputs=... ...

Sources (`self_flow.data.captioned`): webdataset tars (`key.jpg` + `key.txt` / `key.json`),
parquet files (an image column and caption columns), a TFDS dataset with image and text
features, or a folder of images with sidecar `name.txt` / `name.json` captions; local or gs://.
Each input unit (a tar, a parquet file, a slice of a TFDS split, a chunk of a folder) becomes one
output shard; host p of P encodes units p, p + P, ..., reading no other host's input. Images are
decoded and center-cropped (ADM) in --num_workers threads, then the VAE and the text encoder run
batched on the host's own accelerators.

What is stored per image: the SD-VAE posterior mean and std (* --latent_scale), and for up to
--captions_per_example captions either their T5 embeddings (--text_output=embedding, the
default: `text.encoder="precomputed"` at training) or their token ids (--text_output=tokens: the
frozen T5 runs inside the train step). The job prints the bytes per example and for the whole
dataset before it encodes anything; --dry_run stops there.

Bad input never stops the job hours in (unless --bad_input=error): an undecodable image, a
record without an image or a caption, an image below --image_size (unless --upscale_small) is
counted and skipped; each shard's manifest and the split's metadata.json say how many, by reason.

Resuming: the input units are listed once, by process 0, into `manifests/<split>.inputs.json`
under --output_dir; a rerun after a preemption reads that list back and encodes only the shards
without a manifest (`latent_shards.writer`). A rerun on other inputs or settings is refused
unless --overwrite.
"""

from collections.abc import Callable, Iterator, Sequence
import functools
import hashlib
import json
import math
from typing import Any

from absl import app, flags, logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from self_flow import distributed, storage
from self_flow.data import captioned
from self_flow.data.captioned import prepare, sources
from self_flow.data.latent_shards import layout, writer
from self_flow.models import autoencoder_kl, factory
from self_flow.text import t5_encoder
from self_flow.tools import encode_latents

TEXT_OUTPUTS = ("embedding", "tokens")
BAD_INPUT = ("skip", "error")
# Where process 0 records the input units of a split, for the other hosts and for reruns.
INPUTS_FILE = "{split}.inputs.json"


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the CLI flags on `flag_values` (tests pass their own)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_enum("source", None, list(sources.KINDS), "Kind of input data.", **fv)
  flags.DEFINE_string("inputs", None, "webdataset/parquet: files (glob, {000..099} ranges, comma "
                      "list or a directory); folder: the image directory; tfds: the dataset "
                      "name. Local or gs://.", **fv)
  flags.DEFINE_string("output_dir", None, "Latent-shard directory to write (local or gs://).",
                      **fv)
  flags.DEFINE_string("split", "train", "Split name in the shards (and the TFDS split read).",
                      **fv)
  flags.DEFINE_string("tfds_data_dir", None, "--source=tfds: its data directory.", **fv)
  flags.DEFINE_list("caption_keys", list(captioned.DEFAULT_JSON_CAPTION_KEYS),
                    "JSON keys holding captions (webdataset .json members, folder sidecars).",
                    **fv)
  flags.DEFINE_string("image_column", None, "parquet: the image column (default: image, jpg or "
                      "png); tfds: the image feature (default: the first Image feature).", **fv)
  flags.DEFINE_list("caption_columns", None, "parquet: caption columns (default: caption); tfds: "
                    "text features (default: every Text feature).", **fv)
  flags.DEFINE_integer("examples_per_unit", 1000, "tfds, folder: images per input unit (= per "
                       "output shard).", lower_bound=1, **fv)
  flags.DEFINE_integer("image_size", 256, "Side of the center crop that is encoded.",
                       lower_bound=8, **fv)
  flags.DEFINE_string("vae_path", None, "Hugging Face / diffusers VAE: a directory with "
                      "config.json and its weights, or a weights file (local or gs://).", **fv)
  flags.DEFINE_float("latent_scale", None, "Stored latents = posterior * latent_scale (default: "
                     "SD-VAE's 0.18215).", **fv)
  flags.DEFINE_string("text_encoder_path", None, "Hugging Face T5 / UMT5 encoder directory: "
                      "config.json, weights, tokenizer.json (local or gs://).", **fv)
  flags.DEFINE_integer("text_max_length", 128, "Tokens per caption (T5's, </s> included).",
                       lower_bound=1, **fv)
  flags.DEFINE_enum("text_output", "embedding", list(TEXT_OUTPUTS), "Store caption embeddings, "
                    "or token ids for a text encoder run in the train step.", **fv)
  flags.DEFINE_enum("text_dtype", "float16", list(writer.TEXT_DTYPES), "Storage dtype of "
                    "caption embeddings.", **fv)
  flags.DEFINE_integer("captions_per_example", 1, "Captions kept per image (more are dropped); "
                       "training draws one per epoch.", lower_bound=1, **fv)
  flags.DEFINE_enum("compute_dtype", "float32", list(factory.DTYPES), "Compute dtype of the VAE "
                    "and the text encoder.", **fv)
  flags.DEFINE_integer("batch_size", 64, "Images per encoder call on each host; a multiple of "
                       "its local device count.", lower_bound=1, **fv)
  flags.DEFINE_integer("num_workers", 8, "Threads decoding and cropping images.", lower_bound=1,
                       **fv)
  flags.DEFINE_enum("bad_input", "skip", list(BAD_INPUT), "What an unusable record does: "
                    "skipped and counted, or the job stops naming it.", **fv)
  flags.DEFINE_bool("upscale_small", False, "Upscale images below --image_size instead of "
                    "skipping them.", **fv)
  flags.DEFINE_bool("dry_run", False, "Print the storage estimate and stop.", **fv)
  flags.DEFINE_bool("overwrite", False, "Replace a split --output_dir holds from another job.",
                    **fv)
  distributed.define_flags(flag_values)


def _check_flags(options: flags.FlagValues) -> None:
  """Refuses a bad command line before anything is read or written."""
  missing = [name for name in ("source", "inputs", "output_dir", "vae_path", "text_encoder_path")
             if not options[name].value]
  if missing:
    raise app.UsageError(f"missing {', '.join('--' + m for m in missing)}.")


def open_source(options: flags.FlagValues):
  """The captioned source the flags describe."""
  kind = options.source
  settings: dict[str, Any] = {}
  if kind in ("webdataset", "folder"):
    settings["caption_keys"] = tuple(options.caption_keys)
  if kind in ("tfds", "folder"):
    settings["examples_per_unit"] = options.examples_per_unit
  if kind == "tfds":
    settings.update(split=options.split, data_dir=options.tfds_data_dir)
  if kind in ("parquet", "tfds"):
    if options.image_column:
      settings["image_column" if kind == "parquet" else "image_feature"] = options.image_column
    if options.caption_columns:
      settings["caption_columns" if kind == "parquet" else "caption_features"] = tuple(
          options.caption_columns)
  return sources.open_source(kind, options.inputs, **settings)


def planned_units(source, output_dir: str, split: str, process_index: int,
                  barrier: Callable[[str], None] | None, overwrite: bool) -> dict[str, Any]:
  """The job's inputs, {"spec": repr(source), "source": its description, "units": [...]}.

  Process 0 lists the units once (listing a bucket or a folder tree is slow) into
  `manifests/<split>.inputs.json`, which every process reads. A rerun (after a preemption)
  reads the recorded plan back, so files added to the bucket meanwhile do not change the job
  it finishes; `overwrite` lists afresh. A rerun with other source settings is refused before
  anything is written."""
  path = storage.join(output_dir, layout.MANIFEST_DIR, INPUTS_FILE.format(split=split))
  if process_index == 0:
    recorded = None if overwrite or not storage.exists(path) else storage.read_json(path)
    if recorded is None:
      storage.write_json(path, {"spec": repr(source), "source": source.describe(),
                                "units": source.units()})
    elif recorded["spec"] != repr(source):
      raise app.UsageError(
          f"{path} records the inputs of this split's job as {recorded['spec']}, not "
          f"{source!r}; its shards are kept. Rerun with the recorded inputs, pass --overwrite "
          "to replace the split, or write to another --output_dir.")
  if barrier:
    barrier(f"encode_captioned {output_dir} {split}: inputs listed")
  return storage.read_json(path)


def example_bytes(latent_shape: Sequence[int], text_shape: Sequence[int], text_output: str,
                  text_dtype: str) -> dict[str, int]:
  """Bytes one example takes in the shards, per field (the record overhead excluded): latent
  mean and std in float16; per caption row either (L, D) embeddings in `text_dtype` or (L,)
  int32 ids; the (C, L) mask in bytes."""
  captions, length = text_shape[0], text_shape[1]
  latent = 2 * math.prod(latent_shape)
  text = (captions * length * text_shape[2] * np.dtype(writer.TEXT_DTYPES[text_dtype]).itemsize
          if text_output == "embedding" else captions * length * 4)
  return {"latent": latent, "latent_std": latent, "text": text, "text_mask": captions * length}


def _size(num_bytes: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
    if num_bytes < 1024 or unit == "PiB":
      return f"{num_bytes:.1f} {unit}"
    num_bytes /= 1024
  raise AssertionError("unreachable")


def count_records(source, units: Sequence[str]) -> tuple[int, str]:
  """(records of the dataset, how it was counted): exactly where the source can count without
  reading the data, else about the first unit's records times the number of units (a tar has
  no index: counting all would read them all)."""
  if hasattr(source, "num_records"):
    return source.num_records(), "counted"
  first = sum(1 for _ in source.read(units[0]))
  return first * len(units), f"estimated: {first} in the first of {len(units)} input units"


def storage_estimate(per_example: dict[str, int], num_examples: int, how: str,
                     global_batch_size: int = 256) -> str:
  """The plan a user needs before paying for the job: bytes per example, for the dataset and
  per training step."""
  each = sum(per_example.values())
  parts = ", ".join(f"{name} {_size(n)}" for name, n in per_example.items())
  return (f"storage: {_size(each)} per example ({parts}); {num_examples} examples ({how}): "
          f"{_size(each * num_examples)}; a global batch of {global_batch_size} reads "
          f"{_size(each * global_batch_size)} per step.")


def _prepared(source, unit: str, options: flags.FlagValues) -> Iterator[Any]:
  """The unit's records decoded and cropped in threads, in order; `Skipped` markers pass on
  (or stop the job with --bad_input=error: `prepare` raises for them)."""
  prepared = functools.partial(prepare.prepare, image_size=options.image_size,
                               bad_input=options.bad_input, upscale_small=options.upscale_small)
  for item in encode_latents.ordered_parallel_map(prepared, source.read(unit),
                                                  options.num_workers):
    yield item if isinstance(item, captioned.Skipped) else {
        "image": item["image"], "captions": item["captions"], "label": item["label"]}


def text_stage(options: flags.FlagValues):
  """(callable captions -> stored text fields, the encoder's name, its width)."""
  path = storage.resolve(options.text_encoder_path)
  dtype = factory.DTYPES[options.compute_dtype]
  encoder = t5_encoder.T5TextEncoder(path, options.text_max_length, dtype=dtype,
                                     batch_size=options.batch_size * options.captions_per_example,
                                     devices=jax.local_devices())
  encode = encoder if options.text_output == "embedding" else encoder.tokenize
  return encode, f"t5:{path}", encoder.dim


def run(options: flags.FlagValues) -> dict[str, Any]:
  """Encodes the split the parsed `options` describe; returns the metadata."""
  _check_flags(options)
  process_index, process_count = jax.process_index(), jax.process_count()
  barrier = multihost_utils.sync_global_devices if process_count > 1 else None
  source = open_source(options)
  plan = planned_units(source, options.output_dir, options.split, process_index, barrier,
                       options.overwrite)
  units = plan["units"]
  vae = autoencoder_kl.load_autoencoder(options.vae_path,
                                        dtype=factory.DTYPES[options.compute_dtype])
  factor = vae.config.downsampling_factor
  if options.image_size % factor:
    raise app.UsageError(f"--image_size={options.image_size} must be a multiple of the VAE's "
                         f"downsampling factor {factor}.")
  encode_text, text_name, text_dim = text_stage(options)
  side = options.image_size // factor
  per_example = example_bytes(
      (side, side, vae.config.latent_channels),
      (options.captions_per_example, options.text_max_length, text_dim), options.text_output,
      options.text_dtype)
  if process_index == 0:  # one host counts (a tar has to be read to be counted)
    logging.info("encode_captioned: %d input units of %s; %s", len(units), source,
                 storage_estimate(per_example, *count_records(source, units)))
  if options.dry_run:
    return {}
  latent_scale = (autoencoder_kl.SD_VAE_SCALE if options.latent_scale is None
                  else options.latent_scale)
  metadata = writer.write_units(
      [lambda unit=unit: _prepared(source, unit, options) for unit in units],
      inputs={"source": plan["source"], "num_units": len(units),
              "units_sha256": hashlib.sha256(json.dumps(units).encode()).hexdigest(),
              "image_size": options.image_size, "upscale_small": options.upscale_small},
      output_dir=options.output_dir,
      split=options.split,
      signal_encoder=encode_latents.vae_signal_encoder(vae, options.batch_size),
      text_encoder=encode_text,
      batch_size=options.batch_size,
      latent_scale=latent_scale,
      signal_encoder_name=f"autoencoder_kl:{storage.resolve(options.vae_path)}",
      text_encoder_name=text_name,
      modality="image",
      captions_per_example=options.captions_per_example,
      text_dtype=options.text_dtype,
      process_index=process_index,
      process_count=process_count,
      barrier=barrier,
      overwrite=options.overwrite,
  )
  info = metadata["splits"][options.split]
  logging.info("encode_captioned: split %r: %d examples kept, skipped %s.", options.split,
               info["num_examples"], json.dumps(info["skipped"]))
  return metadata


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  distributed.initialize(flags.FLAGS)
  run(flags.FLAGS)


if __name__ == "__main__":
  define_flags()
  app.run(main)
