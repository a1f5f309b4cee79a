"""CLI: encodes an image dataset once with the SD-VAE into latent shards (ImageNet 256).

The paper's ImageNet runs (configs/c2i_imagenet256.py) train on SD-VAE latents; the trainer
reads them from latent shards (`self_flow.data.latent_shards`) and never runs the VAE. This tool
writes those shards from TFDS `imagenet2012` or from an image folder, with the Flax
`AutoencoderKL` loaded from a local diffusers VAE (e.g. a download of stabilityai/sd-vae-ft-ema):

  python -m self_flow.tools.encode_latents --vae_path=/data/sd-vae-ft-ema \
      --source=tfds --tfds_data_dir=/data/tensorflow_datasets --split=train \
      --output_dir=/data/imagenet256_sdvae --num_shards=256 --batch_size=256
  python -m self_flow.tools.encode_latents --vae_path=/data/sd-vae-ft-ema \
      --source=folder --image_dir=/data/imagenet/train --split=train --output_dir=...

Images are cropped as ADM does (`center_crop`) to --image_size (256 -> 32x32x4 latents), scaled
to [-1, 1] and encoded in batches by a jitted encoder over this host's devices. --flip adds a
horizontally flipped copy of every image (the split doubles: all originals, then all flips).

What is stored per example: `latent` = posterior mean * --latent_scale (0.18215) and
`latent_std` = posterior std * --latent_scale, float16, so the trainer can train on the mean
(config data.latent_sampling="mean") or draw mean + std * eps afresh every epoch ("posterior",
the REPA recipe the paper follows). `label` is the class (TFDS label, or the index of the class
folder in sorted order; -1 for a flat folder without classes) and `caption` the class name.
There is no caption embedding: `text_embedding` is one zero token with a False mask (the empty
caption), so the shards suit class-conditional training only.

Multi-host: run the same command on every host of a pod, writing to shared storage (a gs://
--output_dir, or a mount). With P processes, process p writes shards p, p + P, ..., each a
contiguous block of examples it alone reads; process 0 writes metadata.json last, after a
barrier. A rerun after a preemption writes only the shards that are missing
(`latent_shards.writer`). `jax.distributed.initialize()` is called on TPU pods or when
JAX_COORDINATOR_ADDRESS is set (or with --distributed / --coordinator_address).
"""

from collections.abc import Callable, Iterable, Iterator, Sequence
import collections
import concurrent.futures
import functools
import io
from typing import Any

from absl import app, flags, logging
from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
from etils import epath
from PIL import Image
import tensorflow_datasets as tfds

from self_flow import distributed, storage
from self_flow.data.captioned.prepare import center_crop
from self_flow.data.latent_shards import encoders, writer
from self_flow.models import autoencoder_kl

# Image files the folder source reads (any letter case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SOURCES = ("tfds", "folder")
VAE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# () -> (decoded image, label): one image of a source, loaded in a worker thread.
Loader = Callable[[], tuple[Image.Image, int]]


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the CLI flags on `flag_values`.

  Called only when run as a program (or by tests on their own FlagValues), because other tools
  loaded in the same process (e.g. by pytest) define flags of the same names.
  """
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("output_dir", None, "Latent-shard directory to write (created if missing).",
                      **fv)
  flags.DEFINE_string("vae_path", None, "Local diffusers VAE: a directory with "
                      "diffusion_pytorch_model.safetensors and config.json, a .safetensors file "
                      "or an .npz of the same tensors.", **fv)
  flags.DEFINE_enum("source", "tfds", list(SOURCES), "Where the images come from.", **fv)
  flags.DEFINE_string("tfds_name", "imagenet2012", "TFDS dataset (--source=tfds).", **fv)
  flags.DEFINE_string("tfds_data_dir", None, "TFDS data directory holding the prepared dataset "
                      "(--source=tfds; default: TFDS's own).", **fv)
  flags.DEFINE_string("image_dir", None, "--source=folder: a directory of class folders "
                      "(class_name/*.jpg|png; labels = sorted class names) or of images "
                      "(no labels).", **fv)
  flags.DEFINE_string("split", "train", "TFDS split to read (e.g. train, validation), and the "
                      "split name in the shards.", **fv)
  flags.DEFINE_integer("image_size", 256, "Side of the center crop that is encoded.",
                       lower_bound=1, **fv)
  flags.DEFINE_bool("flip", False, "Also encode a horizontally flipped copy of every image.",
                    **fv)
  flags.DEFINE_integer("num_shards", 256, "Shard files of the split.", lower_bound=1, **fv)
  flags.DEFINE_integer("batch_size", 64, "Images per encoder call on each host; a multiple of "
                       "its local device count.", lower_bound=1, **fv)
  flags.DEFINE_integer("max_examples", None, "Encode only the first this many images (default: "
                       "all).", lower_bound=1, **fv)
  flags.DEFINE_float("latent_scale", None, "Stored latents = posterior mean * latent_scale "
                     "(default: SD-VAE's 0.18215).", **fv)
  flags.DEFINE_enum("vae_dtype", "float32", list(VAE_DTYPES), "Compute dtype of the VAE.", **fv)
  flags.DEFINE_integer("num_workers", 8, "Threads decoding and cropping images.", lower_bound=1,
                       **fv)
  flags.DEFINE_bool("overwrite", False, "Replace a split that --output_dir holds from another "
                    "job (other VAE, scale or sizes); without it such shards are kept and the job "
                    "stops.", **fv)
  distributed.define_flags(flag_values)
  flags.mark_flags_as_required(["output_dir", "vae_path"], flag_values=flag_values)


def _load_file(path: str, label: int) -> tuple[Image.Image, int]:
  with epath.Path(path).open("rb") as f, Image.open(f) as image:  # local or gs://
    image.load()
    return image, label


def _load_bytes(encoded: bytes, label: int) -> tuple[Image.Image, int]:
  return Image.open(io.BytesIO(encoded)), label


def _load_record(source, index: int) -> tuple[Image.Image, int]:
  """Example `index` of a TFDS data source (decoded by TFDS to a uint8 array)."""
  record = source[index]
  array = np.asarray(record["image"])
  return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array), int(record["label"])


class FolderSource:
  """Images of a directory (local or gs://): `class_name/*.jpg|png` (label = index of the sorted
  class name), or images directly in it (label -1). Files are taken in sorted order."""

  def __init__(self, directory: str):
    if not storage.is_dir(directory):
      raise FileNotFoundError(f"--image_dir={directory!r} is not a directory.")
    entries = storage.list_names(directory)
    is_image = lambda name: name.lower().endswith(IMAGE_EXTENSIONS)  # noqa: E731
    classes = [e for e in entries if storage.is_dir(storage.join(directory, e))]
    flat = [e for e in entries if is_image(e)]
    if classes and flat:
      raise ValueError(f"{directory!r} holds both class folders ({classes[:3]}) and images "
                       f"({flat[:3]}); use one layout: class_name/*.jpg or a flat folder.")
    self.class_names = classes
    if classes:
      self._items = [(storage.join(directory, c, f), label) for label, c in enumerate(classes)
                     for f in storage.list_names(storage.join(directory, c)) if is_image(f)]
    else:
      self._items = [(storage.join(directory, f), -1) for f in flat]
    if not self._items:
      raise ValueError(f"{directory!r} holds no {'/'.join(IMAGE_EXTENSIONS)} images.")

  def __len__(self) -> int:
    return len(self._items)

  def loaders(self, start: int, stop: int) -> Iterator[Loader]:
    """Loaders of images start, ..., stop - 1."""
    for path, label in self._items[start:stop]:
      yield functools.partial(_load_file, path, label)


class TfdsSource:
  """A prepared TFDS image dataset (e.g. imagenet2012) read in order, images still encoded when
  the files allow (ArrayRecord files are read with random access, TFRecord ones in sequence)."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    self._builder = tfds.builder(name, data_dir=data_dir)
    splits, features = self._builder.info.splits, self._builder.info.features
    if split not in splits:
      raise ValueError(f"TFDS {name!r} has no split {split!r}; it has {sorted(splits)}.")
    if not {"image", "label"} <= set(features):
      raise ValueError(f"TFDS {name!r} has features {sorted(features)}; this tool needs "
                       "'image' and 'label'.")
    self._split = split
    self._length = splits[split].num_examples
    self.class_names = list(getattr(features["label"], "names", []))

  def __len__(self) -> int:
    return self._length

  def loaders(self, start: int, stop: int) -> Iterator[Loader]:
    """Loaders of examples start, ..., stop - 1 (TFRecord files: only those holding them)."""
    if self._builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
      source = self._builder.as_data_source(split=self._split)
      for index in range(start, stop):
        yield functools.partial(_load_record, source, index)
      return
    dataset = self._builder.as_dataset(  # a split slice: TFDS opens only the files it spans
        split=f"{self._split}[{start}:{stop}]", shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()})  # JPEG bytes: decoded by our threads
    for record in tfds.as_numpy(dataset):
      yield functools.partial(_load_bytes, record["image"], int(record["label"]))


class CroppedExamples(Sequence):
  """The split as `write_shards` examples: example k < num_images is image k center-cropped;
  with `flip`, example num_images + i is image i flipped. A slice loads its images in
  `num_workers` threads, in order, reading only its own block of the source."""

  def __init__(self, source, num_images: int, flip: bool, image_size: int, num_workers: int):
    self._source, self._num_images, self._flip = source, num_images, flip
    self._image_size, self._num_workers = image_size, num_workers

  def __len__(self) -> int:
    return self._num_images * (2 if self._flip else 1)

  def _load(self, item: tuple[Loader, bool]) -> dict[str, Any]:
    loader, flipped = item
    image, label = loader()
    image = center_crop(image, self._image_size)
    names = self._source.class_names
    return {"image": np.ascontiguousarray(image[:, ::-1] if flipped else image),
            "caption": names[label] if 0 <= label < len(names) else "", "label": label}

  def _items(self, start: int, stop: int) -> Iterator[tuple[Loader, bool]]:
    for copy in range(2 if self._flip else 1):
      offset = copy * self._num_images
      first, last = max(start - offset, 0), min(stop - offset, self._num_images)
      if first < last:
        for loader in self._source.loaders(first, last):
          yield loader, bool(copy)

  def __getitem__(self, index):
    if isinstance(index, slice):
      start, stop, step = index.indices(len(self))
      if step != 1:
        raise ValueError("CroppedExamples slices must be contiguous.")
      return ordered_parallel_map(self._load, self._items(start, stop), self._num_workers)
    return next(iter(self[index:index + 1]))


def ordered_parallel_map(fn: Callable, items: Iterable, num_workers: int) -> Iterator:
  """fn over items in `num_workers` threads (PIL decodes and resizes without the GIL), in order,
  with at most 4 * num_workers items in flight."""
  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= 4 * num_workers:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def no_text_encoder(captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """The empty caption for every example: one zero token, masked out (class-conditional data)."""
  return np.zeros((len(captions), 1, 1), np.float32), np.zeros((len(captions), 1), bool)


def vae_signal_encoder(model, batch_size: int) -> encoders.SignalEncoder:
  """(B, H, W, 3) float32 images in [-1, 1] -> (mean, std) numpy, jitted over local devices.

  Each host encodes its own images on its own devices (no cross-host communication), the batch
  split over them and the VAE replicated.
  """
  devices = jax.local_devices()
  if batch_size % len(devices):
    raise ValueError(f"--batch_size={batch_size} must be a multiple of this host's "
                     f"{len(devices)} devices.")
  mesh = Mesh(np.array(devices), ("batch",))
  batch_sharding = NamedSharding(mesh, PartitionSpec("batch"))
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))

  @jax.jit
  def encode(state, images):
    return nnx.merge(graphdef, state).encode(images)

  def signal_encoder(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = encode(state, jax.device_put(images, batch_sharding))
    return np.asarray(mean), np.asarray(std)

  return signal_encoder


def _open_source(options: flags.FlagValues):
  if options.source == "folder":
    if not options.image_dir:
      raise app.UsageError("--source=folder needs --image_dir.")
    return FolderSource(options.image_dir)
  return TfdsSource(options.tfds_name, options.split, options.tfds_data_dir)


def run(options: flags.FlagValues) -> dict[str, Any]:
  """Encodes the split the parsed `options` (see `define_flags`) describe; returns the metadata."""
  model = autoencoder_kl.load_autoencoder(options.vae_path, dtype=VAE_DTYPES[options.vae_dtype])
  factor = model.config.downsampling_factor
  if options.image_size % factor:
    raise app.UsageError(f"--image_size={options.image_size} must be a multiple of the VAE's "
                         f"downsampling factor {factor}.")
  source = _open_source(options)
  num_images = min(len(source), options.max_examples or len(source))
  process_index, process_count = jax.process_index(), jax.process_count()
  latent_scale = (autoencoder_kl.SD_VAE_SCALE if options.latent_scale is None
                  else options.latent_scale)
  vae_path = epath.Path(options.vae_path)
  vae_name = (vae_path.parent if vae_path.is_file() else vae_path).name
  logging.info("Process %d/%d: encoding %d%s images of split %r into %s.", process_index,
               process_count, num_images, " (+ flips)" if options.flip else "", options.split,
               options.output_dir)
  return writer.write_shards(
      CroppedExamples(source, num_images, options.flip, options.image_size, options.num_workers),
      output_dir=options.output_dir,
      split=options.split,
      num_shards=options.num_shards,
      signal_encoder=vae_signal_encoder(model, options.batch_size),
      text_encoder=no_text_encoder,
      batch_size=options.batch_size,
      latent_scale=latent_scale,
      signal_encoder_name=f"autoencoder_kl:{vae_name}",
      text_encoder_name="none",
      modality="image",
      process_index=process_index,
      process_count=process_count,
      barrier=multihost_utils.sync_global_devices if process_count > 1 else None,
      overwrite=options.overwrite,
  )


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  distributed.initialize(flags.FLAGS)
  run(flags.FLAGS)


if __name__ == "__main__":
  define_flags()
  app.run(main)
