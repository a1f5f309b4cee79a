"""The optimizer chain: global-norm clipping then AdamW on a learning-rate schedule (Adam's first
moment optionally stored in bfloat16)."""

import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("constant", "cosine")
# optim.moment_dtype -> dtype of Adam's first moment (mu). optax's Adam keeps the second moment
# (nu) in the params' dtype (it has no nu_dtype), so only mu can be narrowed.
MOMENT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  if optim.schedule == "constant":
    decay = optax.constant_schedule(optim.learning_rate)
  elif optim.schedule == "cosine":
    decay = optax.cosine_decay_schedule(optim.learning_rate, max(1, num_steps - optim.warmup_steps))
  else:
    raise ValueError(f"optim.schedule={optim.schedule!r}; allowed: {SCHEDULES}.")
  if optim.warmup_steps <= 0:
    return decay
  warmup = optax.linear_schedule(0.0, optim.learning_rate, optim.warmup_steps)
  return optax.join_schedules([warmup, decay], [optim.warmup_steps])


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int):
  """Returns (optax transformation, learning-rate schedule for logging)."""
  schedule = learning_rate_schedule(optim, num_steps)
  parts = []
  if optim.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  if optim.moment_dtype not in MOMENT_DTYPES:
    raise ValueError(f"optim.moment_dtype={optim.moment_dtype!r}; allowed: {tuple(MOMENT_DTYPES)}.")
  parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           mu_dtype=MOMENT_DTYPES[optim.moment_dtype],
                           weight_decay=optim.weight_decay))
  return optax.chain(*parts), schedule
