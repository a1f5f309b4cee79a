"""Flow-matching objective with Self-Flow's Dual-Timestep Scheduling and representation loss.

Convention (paper §3.1): x_t = (1 - t) x0 + t x1, t = 1 is pure noise, velocity target x1 - x0.
Under this convention the *cleaner* timestep is the minimum, so the teacher sees tau_min:
min(t, s) per sample (paper Fig. 3, `teacher_time="min_ts"`), also when the mask happens to put
every token at t or every token at s, or the minimum of the timesteps the tokens actually took
(`"realised"`, this project's rule before issue 31; it differs only for those samples).

Every noising policy is the same per-token function (`noise_token`, vmapped over tokens and
batch) fed by a different draw of (t, s, mask); the policies only differ in `draw_timesteps`:

  single             vanilla flow matching: every token at t.
  dual_timestep      Self-Flow: tokens with mask bit (Bernoulli(R_M)) at s, the rest at t;
                     t and s i.i.d. from p(t) and NOT sorted, so each token's marginal is p(t).
  full_masking       masked tokens at t = 1 (pure noise), the rest at t.
  diffusion_forcing  an independent t per token.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

NOISING_POLICIES = ("single", "dual_timestep", "full_masking", "diffusion_forcing")
TEACHER_TIMES = ("min_ts", "realised")
TIME_DISTRIBUTIONS = ("uniform", "logit_normal")


def timeshift(t, alpha: float):
  """s(alpha, t) = alpha t / (1 + (alpha - 1) t); alpha > 1 moves mass toward noise (t -> 1)."""
  return alpha * t / (1.0 + (alpha - 1.0) * t)


def sample_time(key, shape, *, distribution: str, shift: float = 1.0, logit_mean: float = 0.0,
                logit_std: float = 1.0):
  """Draws t ~ p(t) in [0, 1]: uniform or logit-normal, then the trainshift."""
  if distribution == "uniform":
    t = jax.random.uniform(key, shape)
  elif distribution == "logit_normal":
    t = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, shape))
  else:
    raise ValueError(f"objective.time_distribution={distribution!r}; "
                     f"allowed: {TIME_DISTRIBUTIONS}.")
  return timeshift(t, shift)


class TimestepDraw(NamedTuple):
  """One batch's per-token timesteps, in the two forms the step needs.

  t, s, mask (B, N) feed the per-token noising function; table (B, K) with index (B, N) is the
  same information as the model's conditioning (K distinct timesteps per sample), so that adaLN
  is computed K times, not N times, per sample.
  """

  t: jax.Array
  s: jax.Array
  mask: jax.Array
  table: jax.Array
  index: jax.Array


def draw_timesteps(key, batch: int, num_tokens: int, *, policy: str, mask_ratio: float,
                   time_kwargs: dict) -> TimestepDraw:
  """Draws (t, s, mask) for one batch under a noising policy.

  Keys are split identically for every policy, so two policies that coincide (e.g. dual_timestep
  with mask_ratio 0 and single) see the same random numbers.
  """
  key_t, key_s, key_mask = jax.random.split(key, 3)
  shape = (batch, num_tokens)
  t = sample_time(key_t, (batch,), **time_kwargs)
  s = sample_time(key_s, (batch,), **time_kwargs)
  mask = jax.random.uniform(key_mask, shape) < mask_ratio
  zeros_index = jnp.zeros(shape, jnp.int32)
  t_tok = jnp.broadcast_to(t[:, None], shape)
  if policy == "single":
    no_mask = jnp.zeros(shape, bool)
    return TimestepDraw(t_tok, t_tok, no_mask, t[:, None], zeros_index)
  if policy == "dual_timestep":
    s_tok = jnp.broadcast_to(s[:, None], shape)
    return TimestepDraw(t_tok, s_tok, mask, jnp.stack([t, s], -1), mask.astype(jnp.int32))
  if policy == "full_masking":
    ones = jnp.ones((batch,), t.dtype)
    return TimestepDraw(t_tok, jnp.ones(shape, t.dtype), mask, jnp.stack([t, ones], -1),
                        mask.astype(jnp.int32))
  if policy == "diffusion_forcing":
    per_token = sample_time(key_t, shape, **time_kwargs)
    index = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), shape)
    return TimestepDraw(per_token, per_token, jnp.zeros(shape, bool), per_token, index)
  raise ValueError(f"objective.noising={policy!r}; allowed: {NOISING_POLICIES}.")


def noise_token(x0, x1, t, s, masked):
  """One token: (clean token, noise token, t, s, mask bit) -> (noised token, its timestep)."""
  tau = jnp.where(masked, s, t)
  return (1.0 - tau) * x0 + tau * x1, tau


# vmapped over tokens, then over the batch: (B, N, C) x2, (B, N) x3 -> (B, N, C), (B, N).
noise_tokens = jax.vmap(jax.vmap(noise_token))


def teacher_timestep(draw: TimestepDraw, tau, rule: str):
  """tau_min (B,), the timestep of the teacher's view, under `rule` (objective.teacher_time).

  min_ts: the minimum over tokens of min(t, s), i.e. min(t, s) of the sample for dual-timestep
  noising whatever its mask drew (paper Fig. 3: "the teacher input is noised with tau_min =
  min{t, s}"); t for single-timestep and full masking; the smallest per-token t for diffusion
  forcing. realised: the minimum over the per-token tau (B, N) the student saw, which is t, not
  min(t, s), for a sample whose mask chose no token (and s when it chose every token).
  """
  if rule == "min_ts":
    return jnp.minimum(draw.t, draw.s).min(axis=1)
  if rule == "realised":
    return tau.min(axis=1)
  raise ValueError(f"objective.teacher_time={rule!r}; allowed: {TEACHER_TIMES}.")


def teacher_view(x0, x1, tau_min):
  """The teacher's input (B, N, C): every token of the sample noised to its tau_min (B,)."""
  tau_tok = jnp.broadcast_to(tau_min[:, None], x0.shape[:2])
  x_min, _ = noise_tokens(x0, x1, tau_tok, tau_tok, jnp.zeros(tau_tok.shape, bool))
  return x_min


def flow_loss(velocity, x0, x1):
  """L_gen: mean over batch, tokens and channels of ||v - (x1 - x0)||^2 (float32)."""
  target = (x1 - x0).astype(jnp.float32)
  return jnp.mean(jnp.square(velocity.astype(jnp.float32) - target))


def cosine_similarity(a, b, eps: float = 1e-6):
  """Per-token cosine over the feature dimension (last axis), float32."""
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  num = jnp.sum(a * b, axis=-1)
  den = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
  return num / jnp.maximum(den, eps)


def representation_loss(student_features, teacher_features):
  """L_rep = mean over batch and tokens of (1 - cos) over the feature dim (maintainer, issue #7)."""
  return jnp.mean(1.0 - cosine_similarity(student_features, teacher_features))
