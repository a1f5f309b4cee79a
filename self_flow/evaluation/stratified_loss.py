"""The EMA model's flow-matching loss on held-out data, stratified by timestep.

The training loss of a run mixes timesteps from its own p(t) and, for the Self-Flow variants,
two timesteps per image, so it cannot be compared across variants. This evaluation can: every
run sees the same held-out examples, the same noise (fixed seed), and the same timesteps, drawn
uniformly inside each of `num_bins` equal bins of t with vanilla single-t noising (every token
at t). The loss per bin, `eval/<modality>/loss_t<lo>-<hi>`, shows where in the noise range a
variant is better; their mean, `eval/<modality>/loss`, is the held-out loss under uniform t.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from self_flow import train_state
from self_flow.modalities import spec as spec_lib

# Seed of the timesteps and noise every evaluation uses, so runs and variants see the same draw.
NOISE_SEED = 0


def bin_edges(num_bins: int) -> np.ndarray:
  """num_bins + 1 equally spaced edges of [0, 1]."""
  if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
    raise ValueError(f"num_bins={num_bins!r} must be an integer >= 1.")
  return np.linspace(0.0, 1.0, num_bins + 1)


def _decimals(edges: np.ndarray) -> int:
  """Decimals that print the edges: the fewest (at least 1) that print every edge exactly (0.1
  for 10 bins, 0.25 for 4), else the fewest from 2 that keep the edges distinct (3 bins: 0.33)."""
  for decimals in range(1, 7):
    if np.allclose(np.round(edges, decimals), edges, rtol=0.0, atol=1e-9):
      return decimals
  return next(d for d in range(2, 10) if len(set(np.round(edges, d))) == len(edges))


def metric_names(modality: str, num_bins: int) -> list[str]:
  """`eval/<modality>/loss_t<lo>-<hi>` for each bin, e.g. loss_t0.0-0.1 ... loss_t0.9-1.0."""
  edges = bin_edges(num_bins)
  d = _decimals(edges)
  return [f"eval/{modality}/loss_t{lo:.{d}f}-{hi:.{d}f}" for lo, hi in zip(edges[:-1], edges[1:])]


def draw(num_examples: int, num_bins: int, spec: spec_lib.ModalitySpec, seed_offset: int = 0
         ) -> tuple[np.ndarray, np.ndarray]:
  """(t (num_bins, num_examples) uniform inside each bin, noise tokens (num_examples, N, C)).

  One noise draw serves every bin, so bins differ only in t; `seed_offset` (config
  eval.seed_offset) draws another set, to measure the evaluation's own noise.
  """
  edges = bin_edges(num_bins)
  rng = np.random.default_rng(NOISE_SEED + seed_offset)
  u = rng.uniform(size=(num_bins, num_examples))
  t = (edges[:-1, None] + u * np.diff(edges)[:, None]).astype(np.float32)
  noise = rng.standard_normal((num_examples, spec.num_tokens, spec.token_dim), np.float32)
  return t, noise


def make_loss_fn(graphdef: nnx.GraphDef, spec: spec_lib.ModalitySpec):
  """loss(params, x0, noise, t, cond) -> (B,) per-example mean squared velocity error.

  x0 and noise are tokens (B, N, C), t is (B,): x_t = (1 - t) x0 + t noise for every token and
  the target velocity is noise - x0, as in training. Pure, to be jitted by the caller.
  """
  pos = jnp.asarray(spec.position_ids)

  def loss(params, x0, noise, t, cond):
    model = train_state.merge(graphdef, params)
    b, n, _ = x0.shape
    x_t = (1.0 - t[:, None, None]) * x0 + t[:, None, None] * noise
    velocity, _ = model(x_t, jnp.broadcast_to(pos, (b, n, 3)), t[:, None],
                        jnp.zeros((b, n), jnp.int32), cond, modality=spec.name)
    return jnp.mean(jnp.square(velocity.astype(jnp.float32) - (noise - x0)), axis=(1, 2))

  return loss
