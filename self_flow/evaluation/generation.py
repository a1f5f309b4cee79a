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
from self_flow.modalities import spec as spec_lib
from self_flow.text import frozen_encoders, tokenizer


def make_sampler(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                 mesh: jax.sharding.Mesh, spec: spec_lib.ModalitySpec):
  """sample(ema_params, cond, rng) -> signals (B, *spec.signal_shape) in [-1, 1], jitted.

  `cond` is the model's conditioning pytree (labels (B,) or a text dict); it (hence the samples)
  is split over the mesh's batch axes, and the samples come back replicated so every process can
  read them.
  """
  pos = jnp.asarray(spec.position_ids)
  s = config.sampling

  def sample(params, cond, rng):
    model = train_state.merge(graphdef, params)
    key_noise, key_sde = jax.random.split(rng)
    batch = jax.tree.leaves(cond)[0].shape[0]

    def velocity_fn(x, t, c):
      b, n, _ = x.shape
      velocity, _ = model(x, jnp.broadcast_to(pos, (b, n, 3)), t[:, None],
                          jnp.zeros((b, n), jnp.int32), c, modality=spec.name)
      return velocity

    guided = sampling.guided_velocity_fn(
        velocity_fn, cfg_scale=s.cfg_scale,
        null_cond=conditioning.null_like(cond, config.data.num_classes),
        guidance_interval=(s.guidance_low, s.guidance_high))
    x1 = jax.random.normal(key_noise, (batch, spec.num_tokens, spec.token_dim))
    tokens = sampling.sample(guided, x1, cond, key_sde, method=s.method,
                             num_steps=s.num_steps, shift=spec.sample_shift)
    return jnp.clip(spec.detokenize(tokens), -1.0, 1.0)

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
    """Samples in [-1, 1] for a host conditioning pytree (labels or a text dict)."""
    chunk = self.config.eval.batch_size
    total = jax.tree.leaves(cond)[0].shape[0]
    outputs = []
    for i, start in enumerate(range(0, total, chunk)):
      part = jax.tree.map(lambda a, s=start: a[s:s + chunk], cond)
      count = jax.tree.leaves(part)[0].shape[0]
      # One compiled shape for every chunk: pad the last one.
      padded = jax.tree.map(
          lambda a, c=count: np.pad(a, [(0, chunk - c)] + [(0, 0)] * (a.ndim - 1)), part)
      # Every process holds the same values; each contributes the shards its devices own.
      global_cond = jax.tree.map(
          lambda a: jax.make_array_from_callback(a.shape, self._batch_sharding,
                                                 lambda index, a=a: a[index]), padded)
      rng = jax.random.fold_in(jax.random.PRNGKey(seed), i)
      outputs.append(np.asarray(self._sample(ema_params, global_cond, rng))[:count])
    return np.concatenate(outputs)


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
  info = PngImagePlugin.PngInfo()
  if prompts:
    info.add_text("prompts", "\n".join(prompts))
    (directory / f"{name}.txt").write_text(
        "".join(f"{prompt_axis} {i}: {p}\n" for i, p in enumerate(prompts)))
  buffer = io.BytesIO()
  Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(
      buffer, "PNG", pnginfo=info)
  (directory / f"{name}.png").write_bytes(buffer.getvalue())
