"""One Self-Flow training step as a pure function of (state, batch, rng) (method doc §1.13).

1. CFG condition dropout (labels or text), shared by student and teacher.
2. (t, s, mask) from the noising policy; shared noise x1; per-token noising.
3. Student forward on x_tau with per-token timesteps -> velocity and projected layer-l features.
4. Teacher (EMA params, stop-gradient) on all tokens at tau_min -> raw layer-k features; skipped
   entirely when gamma = 0, so the vanilla baselines pay nothing for it.
5. L = w_m (L_gen + gamma L_rep) with the modality's loss weight w_m; AdamW update; EMA update.

Each modality (image, video, audio) gets its own step function: its batch has its own shapes, so
it compiles separately, and the trainer dispatches the step of the modality drawn for that step.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from self_flow import conditioning, objectives, train_state
from self_flow.modalities import spec as spec_lib


def _modality(config: ml_collections.ConfigDict, modality: str | None) -> spec_lib.ModalitySpec:
  specs = spec_lib.modality_specs(config)
  if modality is None:
    return next(iter(specs.values()))
  if modality not in specs:
    raise ValueError(f"modality={modality!r} is not trained by this config; modalities="
                     f"{tuple(specs)}.")
  return specs[modality]


def make_loss_fn(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                 modality: str | None = None) -> Callable:
  """loss_fn(params, ema_params, batch, rng) -> (loss, aux metrics) for one modality's batches
  (default: the config's first modality)."""
  spec = _modality(config, modality)
  obj = config.objective
  pos = jnp.asarray(spec.position_ids)
  null_class = config.data.num_classes
  kind = config.model.conditioning
  use_teacher = obj.rep_loss_weight > 0
  time_kwargs = dict(distribution=obj.time_distribution, shift=spec.train_shift,
                     logit_mean=obj.logit_normal_mean, logit_std=obj.logit_normal_std)

  def loss_fn(params, ema_params, batch, rng):
    key_drop, key_time, key_noise = jax.random.split(rng, 3)
    x0 = spec.tokenize(spec.signal(batch).astype(jnp.float32))
    b, n, _ = x0.shape
    pos_ids = jnp.broadcast_to(pos, (b, n, 3))
    cond = conditioning.drop(key_drop, conditioning.from_batch(batch, kind),
                             probability=obj.condition_dropout, null_class=null_class)
    draw = objectives.draw_timesteps(key_time, b, n, policy=obj.noising,
                                     mask_ratio=spec.mask_ratio, time_kwargs=time_kwargs)
    x1 = jax.random.normal(key_noise, x0.shape, jnp.float32)
    x_tau, tau = objectives.noise_tokens(x0, x1, draw.t, draw.s, draw.mask)

    student = train_state.merge(graphdef, params)
    velocity, student_features = student(x_tau, pos_ids, draw.table, draw.index, cond,
                                         modality=spec.name)
    loss_gen = objectives.flow_loss(velocity, x0, x1)
    aux = {"loss_gen": loss_gen, "mask_fraction": draw.mask.mean(), "tau_mean": tau.mean()}
    if not use_teacher:
      return spec.loss_weight * loss_gen, aux

    x_min, tau_min = objectives.teacher_view(x0, x1, tau)
    teacher = train_state.merge(graphdef, ema_params)
    target = teacher.teacher_features(x_min, pos_ids, tau_min[:, None],
                                      jnp.zeros((b, n), jnp.int32), cond, modality=spec.name)
    target = jax.lax.stop_gradient(target)
    cosine = objectives.cosine_similarity(student_features, target).mean()
    loss_rep = 1.0 - cosine
    aux.update(loss_rep=loss_rep, teacher_cosine=cosine, tau_min_mean=tau_min.mean())
    return spec.loss_weight * (loss_gen + obj.rep_loss_weight * loss_rep), aux

  return loss_fn


def make_train_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                    tx: optax.GradientTransformation, schedule: optax.Schedule,
                    modality: str | None = None) -> Callable:
  """train_step(state, batch, base_rng) -> (state, metrics) for `modality`'s batches;
  rng = fold_in(base_rng, step)."""
  loss_fn = make_loss_fn(config, graphdef, modality)
  ema_decay = config.optim.ema_decay

  def train_step(state, batch, base_rng):
    rng = jax.random.fold_in(base_rng, state["step"])
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["ema_params"], batch, rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {
        "step": state["step"] + 1,
        "params": params,
        "ema_params": train_state.update_ema(state["ema_params"], params, ema_decay),
        "opt_state": opt_state,
    }
    metrics = dict(aux, loss=loss, grad_norm=optax.global_norm(grads),
                   param_norm=optax.global_norm(params), learning_rate=schedule(state["step"]))
    return new_state, metrics

  return train_step
