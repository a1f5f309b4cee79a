"""One Self-Flow training step as a pure function of (state, batch, rng) (method doc §1.13).

1. CFG condition dropout (labels or text), shared by student and teacher.
2. (t, s, mask) from the noising policy; shared noise x1; per-token noising.
3. Student forward on x_tau with per-token timesteps -> velocity and projected layer-l features.
4. Teacher (EMA params, stop-gradient) on all tokens at tau_min -> raw layer-k features; skipped
   entirely when gamma = 0, so the vanilla baselines pay nothing for it.
5. L = w_m (L_gen + gamma L_rep) with the modality's loss weight w_m; AdamW update; EMA updates
   (the evaluation EMA, and the teacher EMA when it has a decay of its own).

Gradient accumulation (`train.microbatches` = m): the randomness of steps 1-2 is drawn once for the
whole global batch (batch-sized arrays, cheap), then the student/teacher forward and backward run
over m equal slices in a `jax.lax.scan`, so only one microbatch's activations are alive at a
time. L_gen and L_rep are means over examples and tokens, so the mean of the m slice losses and
gradients is the full-batch loss and gradient: the step equals the large-batch step up to float
rounding, with one optimizer and one EMA update.

Each modality (image, video, audio) gets its own step function: its batch has its own shapes, so
it compiles separately, and the trainer dispatches the step of the modality drawn for that step.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from self_flow import conditioning, objectives, train_state
from self_flow.modalities import spec as spec_lib


class Examples(NamedTuple):
  """Everything the loss needs per example, leading dim = batch: data and all of its randomness.

  Drawn for the global batch before any microbatch split, so an example's noise, timesteps, mask
  and dropout do not depend on how the batch is split.
  """

  x0: jax.Array  # (B, N, C) clean tokens.
  x1: jax.Array  # (B, N, C) noise, shared by the student and teacher views.
  cond: Any  # Labels (B,) or a text dict of (B, L, ...) arrays, after CFG dropout.
  draw: objectives.TimestepDraw  # Per-token (t, s, mask) and the adaLN table/index.


def _make_draw_fn(config: ml_collections.ConfigDict, spec: spec_lib.ModalitySpec) -> Callable:
  """draw(batch, rng) -> Examples: tokenises the batch and draws its dropout, timesteps and noise
  (method doc §1.13 steps 1-2)."""
  obj = config.objective
  null_class = conditioning.model_classes(config)
  kind = config.model.conditioning
  time_kwargs = dict(distribution=obj.time_distribution, shift=spec.train_shift,
                     logit_mean=obj.logit_normal_mean, logit_std=obj.logit_normal_std)

  def draw(batch, rng) -> Examples:
    key_drop, key_time, key_noise = jax.random.split(rng, 3)
    x0 = spec.tokenize(spec.signal(batch).astype(jnp.float32))
    b, n, _ = x0.shape
    cond = conditioning.drop(key_drop, conditioning.from_batch(batch, kind),
                             probability=obj.condition_dropout, null_class=null_class)
    timesteps = objectives.draw_timesteps(key_time, b, n, policy=obj.noising,
                                          mask_ratio=spec.mask_ratio, time_kwargs=time_kwargs)
    x1 = jax.random.normal(key_noise, x0.shape, jnp.float32)
    return Examples(x0, x1, cond, timesteps)

  return draw


def make_examples_loss(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                        spec: spec_lib.ModalitySpec) -> Callable:
  """loss(params, teacher_params, examples) -> (loss, aux): the deterministic part of the loss
  (method doc §1.13 steps 3-6); every term is a mean over the examples given."""
  obj = config.objective
  pos = jnp.asarray(spec.position_ids)
  use_teacher = obj.rep_loss_weight > 0

  def loss(params, teacher_params, examples: Examples):
    x0, x1, cond, draw = examples
    b, n, _ = x0.shape
    pos_ids = jnp.broadcast_to(pos, (b, n, 3))
    x_tau, tau = objectives.noise_tokens(x0, x1, draw.t, draw.s, draw.mask)

    student = train_state.merge(graphdef, params)
    velocity, student_features = student(x_tau, pos_ids, draw.table, draw.index, cond,
                                         modality=spec.name)
    loss_gen = objectives.flow_loss(velocity, x0, x1)
    aux = {"loss_gen": loss_gen, "mask_fraction": draw.mask.mean(), "tau_mean": tau.mean()}
    if not use_teacher:
      return spec.loss_weight * loss_gen, aux

    tau_min = objectives.teacher_timestep(draw, tau, obj.teacher_time)
    x_min = objectives.teacher_view(x0, x1, tau_min)
    teacher = train_state.merge(graphdef, teacher_params)
    target = teacher.teacher_features(x_min, pos_ids, tau_min[:, None],
                                      jnp.zeros((b, n), jnp.int32), cond, modality=spec.name)
    target = jax.lax.stop_gradient(target)
    cosine = objectives.cosine_similarity(student_features, target).mean()
    loss_rep = 1.0 - cosine
    # What predicting the batch's mean target feature at each token position would reach: the
    # achieved cosine is only evidence of learned features where it beats this.
    trivial = objectives.cosine_similarity(
        jnp.broadcast_to(target.mean(axis=0, keepdims=True), target.shape), target).mean()
    aux.update(loss_rep=loss_rep, teacher_cosine=cosine, teacher_cosine_trivial=trivial,
               tau_min_mean=tau_min.mean())
    return spec.loss_weight * (loss_gen + obj.rep_loss_weight * loss_rep), aux

  return loss


def make_loss_fn(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                 spec: spec_lib.ModalitySpec) -> Callable:
  """loss_fn(params, teacher_params, batch, rng) -> (loss, aux metrics) for `spec`'s batches,
  on the whole batch at once."""
  draw = _make_draw_fn(config, spec)
  examples_loss = make_examples_loss(config, graphdef, spec)

  def loss_fn(params, teacher_params, batch, rng):
    return examples_loss(params, teacher_params, draw(batch, rng))

  return loss_fn


def split_microbatches(tree, microbatches: int):
  """(B, ...) leaves -> (microbatches, B / microbatches, ...); microbatch j = rows j, j + m, ...

  Strided, not contiguous: the batch dim arrives sharded over the mesh's (data, fsdp) axes in
  contiguous row blocks, one per device. Reshaping to (B / m, m, ...) keeps the B / m dim split
  over the same devices (each block holds whole groups of m rows), so every microbatch is spread
  over all devices and the split moves no data. Contiguous slices would put each microbatch on a
  fraction of the devices and make XLA reshard it.
  """

  def split(x):
    if x.shape[0] % microbatches:
      raise ValueError(f"train.microbatches={microbatches} must divide the batch size "
                       f"{x.shape[0]}.")
    rows = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:])
    return jnp.moveaxis(rows, 1, 0)

  return jax.tree.map(split, tree)


def accumulate(grad_fn: Callable, params, teacher_params, examples: Examples, microbatches: int):
  """((loss, aux), grads) of `grad_fn` averaged over `microbatches` equal slices of `examples`.

  A `jax.lax.scan` runs one slice's forward and backward at a time, so peak activation memory is
  one microbatch's; sums are kept in float32 and cast back to each output's dtype at the end.
  """
  if microbatches == 1:
    return grad_fn(params, teacher_params, examples)
  slices = split_microbatches(examples, microbatches)
  first = jax.tree.map(lambda x: x[0], slices)
  shapes = jax.eval_shape(grad_fn, params, teacher_params, first)

  def add(total, micro):
    out = grad_fn(params, teacher_params, micro)
    return jax.tree.map(lambda t, o: t + o.astype(jnp.float32), total, out), None

  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
  total, _ = jax.lax.scan(add, zeros, slices)
  return jax.tree.map(lambda t, s: (t / microbatches).astype(s.dtype), total, shapes)


def make_grad_fn(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                 spec: spec_lib.ModalitySpec) -> Callable:
  """grad_fn(params, teacher_params, batch, rng) -> ((loss, aux), grads w.r.t. params) of the global
  batch, as the mean over `train.microbatches` slices: the gradient the train step applies."""
  draw = _make_draw_fn(config, spec)
  value_and_grad = jax.value_and_grad(make_examples_loss(config, graphdef, spec), has_aux=True)
  microbatches = config.train.microbatches

  def grad_fn(params, teacher_params, batch, rng):
    return accumulate(value_and_grad, params, teacher_params, draw(batch, rng), microbatches)

  return grad_fn


def _shared_norms(grads_a, grads_b) -> tuple[jax.Array, jax.Array]:
  """Global norms of two gradients over the entries that both reach (both nonzero): the
  parameters the two losses compete for. Per entry, not per leaf: a scanned model stacks all
  blocks in one leaf, of which L_rep reaches only the first few."""
  total_a = total_b = jnp.zeros((), jnp.float32)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    both = (a != 0) & (b != 0)
    total_a += jnp.sum(jnp.where(both, jnp.square(a), 0.0))
    total_b += jnp.sum(jnp.where(both, jnp.square(b), 0.0))
  return jnp.sqrt(total_a), jnp.sqrt(total_b)


def make_gradient_balance_fn(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                             spec: spec_lib.ModalitySpec) -> Callable:
  """balance(state, batch, base_rng) -> {grad_norm_gen, grad_norm_rep, grad_ratio_rep_gen}:
  whether the representation loss moves the shared weights at all, at the state before the step
  that `train_step(state, batch, base_rng)` would take (same draw of noise and timesteps).

  The norms are of the gradients of L_gen and of gamma * L_rep (as they enter the update, before
  clipping) restricted to the parameters both reach: the blocks up to the student layer and the
  embeddings (the projector only sees L_rep, the later blocks and the output head only L_gen).
  Run on one microbatch of the step's batch (all of it when `train.microbatches` is 1), with the
  step's randomness, outside the train step so the update itself is unchanged.
  """
  draw = _make_draw_fn(config, spec)
  examples_loss = make_examples_loss(config, graphdef, spec)
  gamma = config.objective.rep_loss_weight
  microbatches = config.train.microbatches

  def term(name):
    return jax.grad(lambda p, teacher, ex: examples_loss(p, teacher, ex)[1][name])

  grad_gen, grad_rep = term("loss_gen"), term("loss_rep")

  def balance(state, batch, base_rng):
    params, teacher_params = state["params"], train_state.teacher_params(state)
    examples = draw(batch, jax.random.fold_in(base_rng, state["step"]))
    if microbatches > 1:
      examples = jax.tree.map(lambda x: x[0], split_microbatches(examples, microbatches))
    norm_gen, norm_rep = _shared_norms(grad_gen(params, teacher_params, examples),
                                       grad_rep(params, teacher_params, examples))
    norm_rep = gamma * norm_rep
    return {"grad_norm_gen": norm_gen, "grad_norm_rep": norm_rep,
            "grad_ratio_rep_gen": norm_rep / jnp.maximum(norm_gen, 1e-12)}

  return balance


def make_train_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                    tx: optax.GradientTransformation, schedule: optax.Schedule,
                    spec: spec_lib.ModalitySpec) -> Callable:
  """train_step(state, batch, base_rng) -> (state, metrics) for `spec`'s batches;
  rng = fold_in(base_rng, step). One optimizer and one EMA update per global batch.

  Numerical faults are detected here, on device: `metrics["finite"]` is 0 when the loss or any
  gradient is NaN/inf. With `train.nonfinite="skip"` such a step leaves params, EMA and
  optimizer state exactly as they were (the step counter still advances, so the next batch
  brings new data and new randomness) and `state["nonfinite_steps"]` counts it; with "stop" the
  update is applied and the host stops before it can be saved.
  """
  grad_fn = make_grad_fn(config, graphdef, spec)
  optim = config.optim
  skip_nonfinite = config.train.nonfinite == "skip"

  def train_step(state, batch, base_rng):
    rng = jax.random.fold_in(base_rng, state["step"])
    (loss, aux), grads = grad_fn(state["params"], train_state.teacher_params(state), batch, rng)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema_decay = train_state.ema_decay_at(optim.ema_decay, state["step"], optim.ema_warmup)
    updated = {
        "params": params,
        "ema_params": train_state.update_ema(state["ema_params"], params, ema_decay),
        "opt_state": opt_state,
    }
    if "teacher_params" in state:
      teacher_decay = train_state.ema_decay_at(optim.teacher_ema_decay, state["step"],
                                               optim.ema_warmup)
      updated["teacher_params"] = train_state.update_ema(state["teacher_params"], params,
                                                         teacher_decay)
    if skip_nonfinite:
      updated = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated,
                             {k: state[k] for k in updated})
    nonfinite_steps = state["nonfinite_steps"] + (~finite).astype(jnp.int32)
    new_state = dict(updated, step=state["step"] + 1, nonfinite_steps=nonfinite_steps)
    metrics = dict(aux, loss=loss, grad_norm=grad_norm,
                   param_norm=optax.global_norm(updated["params"]),
                   learning_rate=schedule(state["step"]), ema_decay=jnp.asarray(ema_decay),
                   finite=finite.astype(jnp.float32),
                   nonfinite_steps=nonfinite_steps)
    return new_state, metrics

  return train_step
