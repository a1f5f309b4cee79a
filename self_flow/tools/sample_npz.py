"""CLI: N class-conditional samples of a trained model as an ADM-format .npz, on every host.

  python -m self_flow.tools.sample_npz --config=configs/c2i.py --workdir=DIR \
      --num_samples=50000 --output=samples.npz [--vae=sd_vae.safetensors] [--seed=0]
  python -m self_flow.tools.sample_npz --converted=DIR --vae=FILE --output=samples.npz

The EMA parameters come from the latest checkpoint of --workdir (with the run's --config; only
`ema_params` is read) or from a converted official checkpoint (--converted). The sampler is the
config's `sampling` section (method euler/heun/sde, num_steps, shift, cfg_scale and guidance
interval): the paper's ImageNet numbers use the SDE sampler with 250 steps and cfg_scale 1.
Labels are drawn uniformly at random (no class balancing, as the paper). Latent models decode
with --vae (latents / --latent_scale, then the autoencoder); pixel models need no decoder.

Output: `arr_0` uint8 (N, H, W, C) and `arr_1` int64 labels (N,), the ADM format. Grayscale
models keep C = 1 unless --rgb replicates it to the 3 channels InceptionV3 needs.

Determinism and hosts: sample i depends only on (seed, i): its label, initial noise and SDE
noise all come from fold_in(PRNGKey(seed), i), and each sample is integrated on its own (vmap),
so neither the process count nor the batch composition changes what is drawn (only float
round-off of differently shaped batches can differ). The index range is cut into parts of
--part_size; process p of P generates parts p, p + P, ... on its local devices and writes each
as `<output>.parts/part_<k>.npz` (atomically); a part already complete with the same settings
is kept, so a restarted job resumes. After a barrier, process 0 merges the parts into --output
and deletes them (an existing --output is replaced; the merged file is built on local disk, one
part in memory at a time, then renamed or uploaded). All processes must see the same output
directory: a shared filesystem or Cloud Storage (every path may be a gs:// URL).
"""

import functools
import json
import math
import zipfile
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags

from self_flow import checkpointing, config_resolution, sharding, storage, train_state
from self_flow.data import modality_sources
from self_flow.evaluation import chunking, generation
from self_flow.modalities import image
from self_flow.modalities import spec as spec_lib

Decode = Callable[[jax.Array], jax.Array]  # model latents (B, h, w, c) -> images in [-1, 1]


# --- Where the EMA parameters come from. ---


def restore_ema_params(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict, int]:
  """(ema_params as host numpy arrays, step) of the latest checkpoint in `workdir`.

  Reads only the `ema_params` subtree of the saved train state (no optimizer state, no data
  iterators), as numpy so that any host can hold them whatever the training mesh was."""
  directory = checkpointing.checkpoints_dir(workdir)
  step = checkpointing.latest_step(directory)
  if step is None:
    raise ValueError(f"{directory} holds no checkpoint to sample from; train first (or pass "
                     "--converted=DIR).")
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32),
                          train_state.abstract_params(config))
  restored = checkpointing.restore_state_subtree(directory, step, {"ema_params": abstract},
                                                as_numpy=True)
  return restored["ema_params"], step


def load_converted(directory: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(config, params) of a converted official checkpoint."""
  from self_flow.tools import convert_official_checkpoint  # pylint: disable=g-import-not-at-top
  return convert_official_checkpoint.load_converted(directory)


def vae_decoder(path: str, latent_scale: float | None, mesh: jax.sharding.Mesh) -> Decode:
  """Jitted model latents -> images in [-1, 1] with the autoencoder at `path` (an nnx module
  whose `decode` takes UNSCALED NHWC latents), its weights replicated on `mesh`."""
  from self_flow.models import autoencoder_kl  # pylint: disable=g-import-not-at-top
  scale = autoencoder_kl.SD_VAE_SCALE if latent_scale is None else latent_scale
  graphdef, state = nnx.split(autoencoder_kl.load_autoencoder(path))
  state = jax.device_put(state, sharding.replicated(mesh))
  decode = jax.jit(lambda st, z: nnx.merge(graphdef, st).decode(z / scale),
                   out_shardings=sharding.batch_sharding(mesh))
  return lambda latents: decode(state, latents)


# --- Per-index sampling. ---


def _sample_keys(seed, index):
  """(label key, noise key, SDE key) of sample `index`: a function of (seed, index) only."""
  return jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), index), 3)


@functools.partial(jax.jit, static_argnames="num_classes")
def class_labels(seed, indices, num_classes: int):
  """Uniform random labels in [0, num_classes) of the samples `indices`."""
  return jax.vmap(lambda i: jax.random.randint(_sample_keys(seed, i)[0], (), 0, num_classes))(
      indices)


def make_index_sampler(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                       spec: spec_lib.ModalitySpec):
  """sample(params, labels (B,), indices (B,), seed) -> model signals (B, *signal_shape).

  Each sample is integrated alone under `vmap` with noise from its own keys, so a sample does
  not depend on which others share its batch (unlike `generation.make_sampler`, whose one key
  draws the whole batch's noise). The model still sees one batched computation."""

  def sample(params, labels, indices, seed):
    model = train_state.merge(graphdef, params)

    def one(label, index):
      _, key_noise, key_sde = _sample_keys(seed, index)
      return generation.sample_signals(model, spec, config.sampling, config.data.num_classes,
                                       label[None], key_noise, key_sde)[0]

    return jax.vmap(one)(labels, indices)

  return sample


# --- Parts and the merged file. ---


def _parts_dir(output: str) -> epath.Path:
  return epath.Path(f"{output}.parts")


def _part_path(output: str, part: int) -> epath.Path:
  return _parts_dir(output) / f"part_{part:06d}.npz"


def _write_npz(path: epath.Path, **arrays) -> None:
  """Writes the .npz `path` (local or a URL) all at once, so a file that exists is complete."""
  with storage.local_output(path) as local, open(local, "wb") as f:
    np.savez(f, **arrays)


def _read_part(path: epath.Path, settings: str, count: int) -> bool:
  """True if `path` is a complete part of `count` samples made with `settings`."""
  if not path.exists():
    return False
  with path.open("rb") as f, np.load(f, allow_pickle=False) as npz:
    if str(npz["settings"]) != settings:
      raise ValueError(f"{path} was sampled with other settings ({npz['settings']}; now "
                       f"{settings}); delete {path.parent} or choose another --output.")
    return len(npz["labels"]) == count


def _read_array(path: epath.Path, name: str) -> np.ndarray:
  """The array `name` of the .npz `path`, reading no other."""
  with path.open("rb") as f, np.load(f, allow_pickle=False) as npz:
    return npz[name]


def write_samples(config: ml_collections.ConfigDict, params: dict, *, output: str,
                  num_samples: int, seed: int, batch_size: int, part_size: int,
                  source: str, process_index: int = 0, process_count: int = 1,
                  decode: Decode | None = None, rgb: bool = False,
                  barrier: Callable[[str], None] | None = None) -> str | None:
  """Generates this process's parts of `num_samples` and, on process 0, merges all of them.

  Args:
    config: the model's config; its `sampling` section is the sampler.
    params: the EMA parameters (the trainer's plain nested dict).
    output: the .npz to write; parts live in `<output>.parts/` until merged.
    num_samples, seed: sample i of range(num_samples) depends only on (seed, i).
    batch_size: samples per jitted call, a multiple of the local device count.
    part_size: samples per part file.
    source: what the parameters are (checkpoint, step); a part made from another source or
      with other settings is refused rather than silently mixed in.
    process_index, process_count: this process's place among those sharing the work (the CLI
      passes jax.process_index() / jax.process_count(); tests simulate several).
    decode: latents -> images in [-1, 1] for latent models (None for pixel models).
    rgb: replicate single-channel images to 3 channels.
    barrier: called with a name where every process must arrive (before and after process 0
      merges), e.g. multihost_utils.sync_global_devices; None for one process.

  Returns: `output` on process 0 (after merging), None elsewhere.
  """
  resolved = _check_config(config, decode)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in [0, process_count="
                     f"{process_count}).")
  if not 0 <= seed < 2**31:
    raise ValueError(f"seed={seed}; allowed: an int in [0, 2**31) (an int32 inside the sampler).")
  devices = jax.local_devices()
  if batch_size % len(devices):
    raise ValueError(f"batch_size={batch_size} must be a multiple of the {len(devices)} local "
                     "devices the batch is split over.")
  mesh = sharding.create_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)
  batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  sampler = jax.jit(make_index_sampler(config, train_state.model_graphdef(config, resolved),
                                       resolved.spec("image")),
                    in_shardings=(replicated, batch, batch, replicated), out_shardings=batch)
  settings = json.dumps({"seed": seed, "part_size": part_size, "rgb": rgb, "source": source,
                         "sampling": config.sampling.to_dict()}, sort_keys=True)
  num_parts = math.ceil(num_samples / part_size)
  _parts_dir(output).mkdir(parents=True, exist_ok=True)
  device_params = jax.device_put(params, replicated)

  def draw(_, batch_labels, batch_indices):
    signals = sampler(device_params, batch_labels, batch_indices, seed)
    pixels = signals if decode is None else decode(signals)
    return image.to_uint8(np.asarray(pixels))  # rounds and clips

  for part in range(process_index, num_parts, process_count):
    start, stop = part * part_size, min((part + 1) * part_size, num_samples)
    path = _part_path(output, part)
    if _read_part(path, settings, stop - start):
      logging.info("Part %d (samples %d-%d) is already complete.", part, start, stop - 1)
      continue
    indices = np.arange(start, stop, dtype=np.int32)
    labels = np.asarray(class_labels(seed, indices, config.data.num_classes))
    images = chunking.map_in_chunks(draw, (labels, indices), batch_size, batch)
    if rgb and images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    _write_npz(path, images=images, labels=labels.astype(np.int64), settings=np.asarray(settings))
    logging.info("Wrote part %d (samples %d-%d) to %s.", part, start, stop - 1, path)
  if barrier is not None:
    barrier("self_flow: sample parts written")
  merged = _merge_parts(output, num_parts) if process_index == 0 else None
  if barrier is not None:  # The others wait, so no process exits while process 0 merges.
    barrier("self_flow: sample parts merged")
  return merged


def _merge_parts(output: str, num_parts: int) -> str:
  """Concatenates parts 0..num_parts-1 into `output` (arr_0 images, arr_1 labels); deletes them."""
  parts = [_part_path(output, k) for k in range(num_parts)]
  missing = [str(path) for path in parts if not path.exists()]
  if missing:
    raise RuntimeError(f"{len(missing)} part(s) are missing, e.g. {missing[:3]}: did every "
                       "process finish (and do all share the output directory)?")
  with storage.local_output(output) as local:
    count = _write_merged(local, parts)
  _parts_dir(output).rmtree()
  logging.info("Wrote %d samples to %s.", count, output)
  return output


def _write_merged(local: str, parts: Sequence[epath.Path]) -> int:
  """Writes the ADM .npz `local` from the parts, holding one part's images at a time (50k
  ImageNet samples are ~10 GB): `arr_0`'s header announces every sample, then each part's
  images are streamed into the archive. Returns the number of samples."""
  labels = np.concatenate([_read_array(path, "labels") for path in parts])
  with zipfile.ZipFile(local, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
    with archive.open("arr_0.npy", "w", force_zip64=True) as member:
      header = None
      for path in parts:
        images = np.ascontiguousarray(_read_array(path, "images"))
        if header is None:
          header = np.lib.format.header_data_from_array_1_0(images)
          header["shape"] = (len(labels),) + images.shape[1:]
          np.lib.format.write_array_header_1_0(member, header)
        if (images.shape[1:], images.dtype) != (header["shape"][1:], np.dtype(header["descr"])):
          raise ValueError(f"{path} holds {images.dtype} images of shape {images.shape[1:]}, "
                           f"unlike {parts[0]}; were the parts sampled by one model?")
        member.write(images.data)
    with archive.open("arr_1.npy", "w", force_zip64=True) as member:
      np.lib.format.write_array(member, labels)
  return len(labels)


def _check_config(config: ml_collections.ConfigDict, decode: Decode | None
                  ) -> config_resolution.ResolvedConfig:
  """The resolution of a class-conditional image model's config; the decoder must match its
  data."""
  if "image" not in config.modalities or config.model.conditioning != "class":
    raise ValueError(f"sample_npz draws class-conditional images; this config trains "
                     f"modalities={tuple(config.modalities)} with model.conditioning="
                     f"{config.model.conditioning!r} (needs 'image' and 'class').")
  latent = modality_sources.uses_latent_shards(config, "image")
  if latent and decode is None:
    raise ValueError("this model generates latents (data.dataset='latent_shards'); pass the "
                     "autoencoder with --vae=FILE to decode them into images.")
  if not latent and decode is not None:
    raise ValueError(f"this model generates pixels (data.dataset={config.data.dataset!r}); "
                     "it needs no decoder (drop --vae).")
  return config_resolution.resolve(config)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the CLI flags on `flag_values`.

  Called only when run as a program (or by tests on their own FlagValues): other tools loaded
  in the same process define flags of the same names (e.g. --batch_size, --config)."""
  fv = dict(flag_values=flag_values)
  config_flags.DEFINE_config_file("config", None, "The run's configuration file (with "
                                  "--workdir).", lock_config=True, **fv)
  flags.DEFINE_string("workdir", None, "Training workdir: the EMA params of its latest "
                      "checkpoint.", **fv)
  flags.DEFINE_string("converted", None, "Directory of a converted official checkpoint "
                      "(instead of --config and --workdir).", **fv)
  flags.DEFINE_integer("num_samples", 50_000, "Samples to generate.", lower_bound=1, **fv)
  flags.DEFINE_string("output", "samples.npz", "The .npz to write, local or gs://... (parts go "
                      "to <output>.parts/).", **fv)
  flags.DEFINE_integer("seed", 0, "Seed of the labels and noise; sample i depends on (seed, i).",
                       **fv)
  flags.DEFINE_integer("batch_size", 256, "Samples per sampler call on one host (a multiple of "
                       "its local device count).", lower_bound=1, **fv)
  flags.DEFINE_integer("part_size", 1000, "Samples per part file (the unit of resuming and of "
                       "splitting the work over hosts).", lower_bound=1, **fv)
  flags.DEFINE_string("vae", None, "Autoencoder weights for latent models "
                      "(self_flow.models.autoencoder_kl.load_autoencoder).", **fv)
  flags.DEFINE_float("latent_scale", None, "Model latents = autoencoder latents * latent_scale "
                     "(default: autoencoder_kl.SD_VAE_SCALE, 0.18215).", **fv)
  flags.DEFINE_bool("rgb", False, "Replicate single-channel images to 3 channels "
                    "(InceptionV3 needs 3).", **fv)
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host; "
                    "JAX detects TPU pods, SLURM, ...).", **fv)
  define_guidance_flags(flag_values)


def define_guidance_flags(flag_values: flags.FlagValues) -> None:
  """--cfg_scale, --guidance_low and --guidance_high on `flag_values`: the guidance of a
  converted checkpoint (whose config has none) or of a run's config, as `with_guidance` reads
  them (every sampling tool takes them)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_float("cfg_scale", None, "Classifier-free guidance scale (default: the config's "
                     "sampling.cfg_scale; 1 = none, as the paper's metrics).", **fv)
  flags.DEFINE_float("guidance_low", None, "Guidance applies for paper-convention t in "
                     "[guidance_low, guidance_high] (default: the config's).", **fv)
  flags.DEFINE_float("guidance_high", None, "Upper end of the guidance interval (default: the "
                     "config's; the authors' released sampler uses 0.7).", **fv)


def with_guidance(config: ml_collections.ConfigDict, options: flags.FlagValues
                  ) -> ml_collections.ConfigDict:
  """`config` with the --cfg_scale / --guidance_low / --guidance_high that were given."""
  config = config.copy_and_resolve_references()
  s = config.sampling
  for name in ("cfg_scale", "guidance_low", "guidance_high"):
    if options[name].value is not None:
      setattr(s, name, options[name].value)
  if s.cfg_scale < 0:
    raise app.UsageError(f"--cfg_scale={s.cfg_scale}; allowed: >= 0 (1 = no guidance).")
  if not 0.0 <= s.guidance_low < s.guidance_high <= 1.0:
    raise app.UsageError(f"guidance interval [{s.guidance_low}, {s.guidance_high}]; allowed: "
                         "0 <= --guidance_low < --guidance_high <= 1.")
  return config


def run(options: flags.FlagValues) -> str | None:
  """Loads the model, samples this process's parts and (process 0) merges them."""
  if options.converted and (options.config or options.workdir):
    raise app.UsageError("pass either --converted or --config with --workdir, not both.")
  if options.converted:
    config, params = load_converted(options.converted)
    source = f"converted:{storage.resolve(options.converted)}"
  elif options.config and options.workdir:
    config = options.config
    params, step = restore_ema_params(config, options.workdir)
    source = f"workdir:{storage.resolve(options.workdir)}@{step}"
  else:
    raise app.UsageError("pass --config and --workdir (a training run), or --converted=DIR.")
  config = with_guidance(config, options)
  decode = None
  if options.vae:
    mesh = sharding.create_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())
    decode = vae_decoder(options.vae, options.latent_scale, mesh)
    source += f"|vae:{storage.resolve(options.vae)}|latent_scale:{options.latent_scale}"
  process_count = jax.process_count()
  return write_samples(
      config, params, output=options.output, num_samples=options.num_samples,
      seed=options.seed, batch_size=options.batch_size, part_size=options.part_size,
      source=source, process_index=jax.process_index(), process_count=process_count,
      decode=decode, rgb=options.rgb,
      barrier=multihost_utils.sync_global_devices if process_count > 1 else None)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if flags.FLAGS.distributed:
    jax.distributed.initialize()
  run(flags.FLAGS)


if __name__ == "__main__":
  define_flags()
  app.run(main)
