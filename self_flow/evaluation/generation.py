"""Sampling the EMA model for evaluation, for any modality, and writing what it produced.

The sampler works on tokens with the modality's position ids and turns them back into the
modality's signal (images, clips, log-mel spectrograms); every evaluator shares the chunked,
mesh-sharded generation and the artifact writing here.
"""

import io

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from PIL import Image, PngImagePlugin

from self_flow import conditioning, sampling, sharding, train_state
from self_flow.data import modality_sources
from self_flow.evaluation import chunking
from self_flow.modalities import spec as spec_lib
from self_flow.text import frozen_encoders, tokenizer


def sample_signals(model, spec: spec_lib.ModalitySpec, sampling_config: ml_collections.ConfigDict,
                   num_classes: int, cond, noise_key: jax.Array, sde_key: jax.Array) -> jax.Array:
  """Signals (B, *spec.signal_shape) that `model` draws for `cond` (B conditions), unclipped.

  The one sampler body (velocity field, guidance, integration, detokenizing) of every way of
  drawing samples: a batch per key here, one sample per key under vmap in sample_npz.
  """
  pos = jnp.asarray(spec.position_ids)
  s = sampling_config

  def velocity_fn(x, t, c):
    b, n, _ = x.shape
    velocity, _ = model(x, jnp.broadcast_to(pos, (b, n, 3)), t[:, None],
                        jnp.zeros((b, n), jnp.int32), c, modality=spec.name)
    return velocity

  guided = sampling.guided_velocity_fn(
      velocity_fn, cfg_scale=s.cfg_scale, null_cond=conditioning.null_like(cond, num_classes),
      guidance_interval=(s.guidance_low, s.guidance_high))
  batch = jax.tree.leaves(cond)[0].shape[0]
  x1 = jax.random.normal(noise_key, (batch, spec.num_tokens, spec.token_dim))
  tokens = sampling.sample(guided, x1, cond, sde_key, method=s.method, num_steps=s.num_steps,
                           shift=spec.sample_shift)
  return spec.detokenize(tokens)


def make_sampler(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                 mesh: jax.sharding.Mesh, spec: spec_lib.ModalitySpec):
  """sample(ema_params, cond, rng) -> signals (B, *spec.signal_shape) in [-1, 1], jitted.

  `cond` is the model's conditioning pytree (labels (B,) or a text dict); it (hence the samples)
  is split over the mesh's batch axes, and the samples come back replicated so every process can
  read them.
  """

  def sample(params, cond, rng):
    noise_key, sde_key = jax.random.split(rng)
    signals = sample_signals(train_state.merge(graphdef, params), spec, config.sampling,
                             conditioning.model_classes(config), cond, noise_key, sde_key)
    return jnp.clip(signals, -1.0, 1.0)

  return jax.jit(sample, in_shardings=(None, sharding.batch_sharding(mesh),
                                       sharding.replicated(mesh)),
                 out_shardings=sharding.replicated(mesh))


class Generator:
  """Generates samples of one modality for host conditioning, in `eval.batch_size` chunks."""

  def __init__(self, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
               mesh: jax.sharding.Mesh, spec: spec_lib.ModalitySpec):
    self.config = config
    self.spec = spec
    self._sample = make_sampler(config, graphdef, mesh, spec)
    self._batch_sharding = sharding.batch_sharding(mesh)
    self._caption_table = None  # a frozen encoder's embeddings, loaded on first use

  def text_condition(self, captions: list[str]) -> dict[str, np.ndarray]:
    if self.config.text.encoder in frozen_encoders.DIMS:
      if self._caption_table is None:
        self._caption_table = modality_sources.caption_table(self.config)
      return self._caption_table.condition(captions)
    tokens, mask = tokenizer.tokenize(captions, self.config.text.max_length)
    return {"tokens": tokens, "mask": mask}

  def __call__(self, ema_params, cond, seed: int) -> np.ndarray:
    """Samples in [-1, 1] for a host conditioning pytree (labels or a text dict); chunk i of
    `eval.batch_size` draws with fold_in(PRNGKey(seed), i)."""
    key = jax.random.PRNGKey(seed)
    return chunking.map_in_chunks(
        lambda i, part: self._sample(ema_params, part, jax.random.fold_in(key, i)), (cond,),
        self.config.eval.batch_size, self._batch_sharding)


def samples_dir(workdir: str) -> epath.Path:
  directory = epath.Path(workdir) / "samples"
  directory.mkdir(parents=True, exist_ok=True)
  return directory


def write_png(workdir: str, name: str, pixels: np.ndarray, prompts: list[str] | None,
              prompt_axis: str = "column") -> None:
  """`samples/<name>.png` (uint8 (H, W, C)); prompts go into its text chunk and a .txt beside it
  (one line per `prompt_axis`, i.e. grid column or strip row).

  Process 0 only, so a pod writes each file once."""
  if jax.process_index() != 0:
    return
  directory = samples_dir(workdir)
  if prompts:
    (directory / f"{name}.txt").write_text(
        "".join(f"{prompt_axis} {i}: {p}\n" for i, p in enumerate(prompts)))
  (directory / f"{name}.png").write_bytes(png_bytes(pixels, prompts))


def png_bytes(pixels: np.ndarray, prompts: list[str] | None) -> bytes:
  """A PNG of uint8 (H, W, C) pixels with the prompts (if any) in its `prompts` text chunk."""
  info = PngImagePlugin.PngInfo()
  if prompts:
    info.add_text("prompts", "\n".join(prompts))
  buffer = io.BytesIO()
  Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(
      buffer, "PNG", pnginfo=info)
  return buffer.getvalue()
