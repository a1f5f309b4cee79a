"""The jitted train step: teacher gradients, baselines reducing to vanilla FM, mesh equivalence,
gradient accumulation and bfloat16 Adam moments."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from self_flow import (config_resolution, config_validation, optim, sharding, train_state,
                       train_step)
from equivalence import assert_equivalent, assert_fault_detected, rounding_bound


def _spec(config):
  """The spec of the config's (only) modality."""
  return config_resolution.resolve(config).first_spec


def _setup(config, devices=None):
  mesh = sharding.create_mesh(config.mesh, devices)
  tx, schedule = optim.make_optimizer(config.optim, config.train.num_steps)
  layout = train_state.state_layout(config, mesh, tx, sharding.axis_rules(config.mesh))
  state = train_state.create_train_state(config, layout, tx)
  return mesh, tx, schedule, layout, state


def _batch(config, seed=0):
  b, size = config.data.global_batch_size, config.data.image_size
  images = jax.random.uniform(jax.random.PRNGKey(seed), (b, size, size, 1)) * 2 - 1
  return {"image": images, "label": jnp.arange(b, dtype=jnp.int32) % config.data.num_classes}


def _perturbed(state, scale=0.05):
  """Moves params and EMA apart (and off the zero init) so the teacher path is non-trivial."""
  leaves, treedef = jax.tree.flatten(state["params"])
  keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
  params = jax.tree.unflatten(treedef, [p + scale * jax.random.normal(k, p.shape)
                                        for k, p in zip(keys, leaves)])
  ema = jax.tree.map(lambda p: p * 0.9, params)
  return dict(state, params=params, ema_params=ema)


def test_no_gradient_reaches_the_teacher(make_config):
  config = make_config()
  _, _, _, layout, state = _setup(config)
  state = _perturbed(state)
  loss_fn = train_step.make_loss_fn(config, layout.graphdef, _spec(config))
  grads_student, grads_teacher = jax.grad(lambda p, e: loss_fn(p, e, _batch(config),
                                                                 jax.random.PRNGKey(0))[0],
                                          argnums=(0, 1))(state["params"], state["ema_params"])
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads_teacher))
  assert float(optax.global_norm(grads_student["projector"])) > 0  # L_rep trains the projector
  assert float(optax.global_norm(grads_student["blocks"])) > 0


def test_gamma_zero_and_mask_zero_is_vanilla_flow_matching(make_config):
  """Same gradients up to the backward pass's rounding (two forward chains of 960 roundings plus
  the sum over the batch's 128 tokens); gamma = 0.8 instead of 0 moves them by far more."""
  vanilla = make_config("vanilla")
  reduced = make_config("self_flow")
  reduced.objective.rep_loss_weight = 0.0
  reduced.objective.mask_ratio = 0.0
  with_rep = make_config("self_flow")
  with_rep.objective.mask_ratio = 0.0
  results = []
  for config in (vanilla, reduced, with_rep):
    _, _, _, layout, state = _setup(config)
    state = _perturbed(state)
    loss_fn = train_step.make_loss_fn(config, layout.graphdef, _spec(config))
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["ema_params"], _batch(config), jax.random.PRNGKey(3))
    results.append((loss, grads))
  assert float(results[0][0]) == pytest.approx(float(results[1][0]), rel=1e-6)
  bound = rounding_bound(2 * 960 + 128)
  assert_equivalent(results[1][1], results[0][1], bound=bound)
  assert_fault_detected(results[2][1], results[0][1], bound=bound,
                        fault="the representation loss left on (gamma = 0.8)")


def test_rep_loss_changes_the_objective(make_config):
  """The control for the test above: with gamma > 0 the loss does differ from vanilla."""
  config = make_config("self_flow")
  _, _, _, layout, state = _setup(config)
  state = _perturbed(state)
  loss_fn = train_step.make_loss_fn(config, layout.graphdef, _spec(config))
  loss, aux = loss_fn(state["params"], state["ema_params"], _batch(config), jax.random.PRNGKey(3))
  assert float(loss) == pytest.approx(float(aux["loss_gen"] + 0.8 * aux["loss_rep"]), rel=1e-6)
  assert float(aux["loss_rep"]) > 0.01


def _one_step(config, devices):
  mesh, tx, schedule, layout, state = _setup(config, devices)
  step = jax.jit(train_step.make_train_step(config, layout.graphdef, tx, schedule, _spec(config)),
                 in_shardings=(layout.shardings, sharding.batch_sharding(mesh), None),
                 out_shardings=(layout.shardings, None), donate_argnums=0)
  batch = jax.device_put(_batch(config), sharding.batch_sharding(mesh))
  state, metrics = step(state, batch, jax.random.PRNGKey(0))
  state, metrics = step(state, batch, jax.random.PRNGKey(0))
  return jax.device_get(state), jax.device_get(metrics), state


def test_one_device_and_eight_device_mesh_agree(make_config):
  assert jax.device_count() == 8, "conftest must provide 8 fake CPU devices"
  single = make_config()
  single.mesh.update(data=1, fsdp=1, tensor=1)
  sharded = make_config()
  sharded.mesh.update(data=2, fsdp=2, tensor=2)
  host_a, metrics_a, _ = _one_step(single, jax.devices()[:1])
  host_b, metrics_b, device_state = _one_step(sharded, jax.devices())
  assert metrics_a["loss"] == pytest.approx(metrics_b["loss"], rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               host_a["params"], host_b["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               host_a["ema_params"], host_b["ema_params"])
  # The big kernels really are split over fsdp and tensor.
  qkv = device_state["params"]["blocks"]["attn"]["qkv"]["kernel"]
  assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert len(qkv.addressable_shards) == 8 and qkv.addressable_shards[0].data.shape == (4, 16, 48)


def test_step_counter_and_ema(make_config):
  config = make_config()
  config.optim.ema_decay = 0.5
  host, metrics, _ = _one_step(config, jax.devices()[:1])
  assert int(host["step"]) == 2
  assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0


def test_ema_update_math():
  ema = {"w": jnp.array([1.0, 2.0])}
  params = {"w": jnp.array([3.0, 6.0])}
  out = train_state.update_ema(ema, params, 0.75)
  np.testing.assert_allclose(out["w"], [1.5, 3.0])


def test_ema_warmup_schedule():
  """min(decay, (1 + n) / (10 + n)) per update n; the fixed decay without warm-up."""
  updates = jnp.array([0, 1, 8, 90, 890, 1790, 5000])
  warm = np.asarray(train_state.ema_decay_at(0.995, updates, warmup=True))
  np.testing.assert_allclose(warm, [0.1, 2 / 11, 0.5, 0.91, 0.99, 0.995, 0.995], rtol=1e-6)
  assert train_state.ema_decay_at(0.995, updates, warmup=False) == 0.995


def test_train_step_uses_the_warmup_decay(make_config):
  """The step's EMA update uses the decay of its update index: after update 0 (decay 0.1) the
  EMA is 0.1 init + 0.9 params."""
  config = make_config()
  config.optim.ema_warmup = True
  config.optim.teacher_ema_decay = -1.0
  mesh, tx, schedule, layout, state = _setup(config, jax.devices()[:1])
  init = jax.device_get(state["ema_params"])
  step = jax.jit(train_step.make_train_step(config, layout.graphdef, tx, schedule, _spec(config)))
  state, metrics = step(state, _batch(config), jax.random.PRNGKey(0))
  assert float(metrics["ema_decay"]) == pytest.approx(0.1)
  jax.tree.map(lambda e, i, p: np.testing.assert_allclose(e, 0.1 * i + 0.9 * p, rtol=1e-5,
                                                          atol=1e-7),
               jax.device_get(state["ema_params"]), init, jax.device_get(state["params"]))
  state, metrics = step(state, _batch(config), jax.random.PRNGKey(0))
  assert float(metrics["ema_decay"]) == pytest.approx(2 / 11)


def _run_steps(config, num_steps=3):
  _, tx, schedule, layout, state = _setup(config, jax.devices()[:1])
  step = jax.jit(train_step.make_train_step(config, layout.graphdef, tx, schedule, _spec(config)))
  losses = []
  for i in range(num_steps):
    state, metrics = step(state, _batch(config, seed=i), jax.random.PRNGKey(0))
    losses.append(float(metrics["loss"]))
  return jax.device_get(state), losses


def test_equal_decays_keep_one_ema(make_config):
  config = make_config()
  config.optim.update(ema_decay=0.9, teacher_ema_decay=0.9)
  assert not train_state.has_teacher_ema(config)
  _, tx, _, layout, _ = _setup(config, jax.devices()[:1])
  assert "teacher_params" not in layout.abstract
  config.optim.teacher_ema_decay = 0.5
  assert "teacher_params" in train_state.state_layout(
      config, sharding.create_mesh(config.mesh, jax.devices()[:1]), tx,
      sharding.axis_rules(config.mesh)).abstract
  config.objective.rep_loss_weight = 0.0  # no representation loss, no teacher to keep
  assert not train_state.has_teacher_ema(config)


def test_two_emas_with_equal_decays_equal_one_ema_bit_exactly(make_config, monkeypatch):
  """The two-EMA code path, forced on with equal decays, keeps a teacher EMA identical to the
  evaluation EMA, bit for bit, and trains exactly as the one-EMA state does."""
  config = make_config()
  config.optim.update(ema_decay=0.9, teacher_ema_decay=0.9, ema_warmup=True)
  one_state, one_losses = _run_steps(config)
  monkeypatch.setattr(train_state, "has_teacher_ema", lambda config: True)
  two_state, two_losses = _run_steps(config)
  assert "teacher_params" in two_state and "teacher_params" not in one_state
  assert two_losses == one_losses
  for part in ("params", "ema_params"):
    jax.tree.map(np.testing.assert_array_equal, two_state[part], one_state[part])
  jax.tree.map(np.testing.assert_array_equal, two_state["teacher_params"],
               two_state["ema_params"])
  # The control: another teacher decay does change the teacher and the training.
  config.optim.teacher_ema_decay = 0.0
  other_state, other_losses = _run_steps(config)
  assert other_losses[0] == one_losses[0] and other_losses[2] != one_losses[2]
  # Decay 0: the teacher is the live student (e + (p - e) rounds to p within an ulp or so).
  jax.tree.map(lambda t, p: np.testing.assert_allclose(t, p, rtol=1e-5, atol=1e-9),
               other_state["teacher_params"], other_state["params"])


def test_trivial_cosine_is_the_per_position_mean_target(make_config):
  """train/teacher_cosine_trivial: the cosine of the teacher target with its batch mean at each
  token position, recomputed here from the teacher's features."""
  config = make_config()
  _, _, _, layout, state = _setup(config)
  state = _perturbed(state)
  loss_fn = train_step.make_loss_fn(config, layout.graphdef, _spec(config))
  _, aux = loss_fn(state["params"], state["ema_params"], _batch(config), jax.random.PRNGKey(3))
  assert 0.0 < float(aux["teacher_cosine_trivial"]) < 1.0
  assert float(aux["teacher_cosine_trivial"]) != pytest.approx(float(aux["teacher_cosine"]))


def test_gradient_balance_matches_separate_gradients(make_config):
  """The diagnostic's norms are those of grad L_gen and gamma grad L_rep over the leaves both
  reach; the projector (L_rep only) and the output head (L_gen only) are left out."""
  config = make_config()
  _, _, _, layout, state = _setup(config, jax.devices()[:1])
  state = _perturbed(state)
  batch, rng = _batch(config), jax.random.PRNGKey(5)
  balance = train_step.make_gradient_balance_fn(config, layout.graphdef, _spec(config))(
      state, batch, rng)
  loss_fn = train_step.make_loss_fn(config, layout.graphdef, _spec(config))
  step_rng = jax.random.fold_in(rng, state["step"])
  teacher = train_state.teacher_params(state)
  assert teacher is state["teacher_params"]  # the tiny config keeps a teacher EMA of its own
  grads = {name: jax.grad(lambda p, n=name: loss_fn(p, teacher, batch,
                                                    step_rng)[1][n])(state["params"])
           for name in ("loss_gen", "loss_rep")}
  flat = {n: {jax.tree_util.keystr(k): np.asarray(v) for k, v in
              jax.tree_util.tree_leaves_with_path(g)} for n, g in grads.items()}
  both = {k: (g != 0) & (flat["loss_rep"][k] != 0) for k, g in flat["loss_gen"].items()}
  reached = {k for k, m in both.items() if m.any()}
  assert any("projector" in k for k, g in flat["loss_rep"].items() if g.any())
  assert not any("projector" in k for k in reached)
  # Blocks are stacked (depth, ...): L_rep reaches blocks 1..student_layer only.
  qkv = next(k for k in reached if "qkv" in k and "kernel" in k)
  assert both[qkv][0].all() and not both[qkv][-1].any()
  gen = np.sqrt(sum(np.sum(np.where(m, flat["loss_gen"][k], 0) ** 2) for k, m in both.items()))
  rep = 0.8 * np.sqrt(sum(np.sum(np.where(m, flat["loss_rep"][k], 0) ** 2)
                          for k, m in both.items()))
  assert float(balance["grad_norm_gen"]) == pytest.approx(gen, rel=1e-4)
  assert float(balance["grad_norm_rep"]) == pytest.approx(rep, rel=1e-4)
  assert float(balance["grad_ratio_rep_gen"]) == pytest.approx(rep / gen, rel=1e-4)


def test_bad_mesh_sizes_are_named():
  with pytest.raises(ValueError, match="'fsdp': 3"):
    sharding.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="at most one may be -1"):
    sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)


def _sgd_steps(config, devices, microbatches):
  """State and metrics after two jitted steps from a perturbed state (non-trivial teacher).

  Plain SGD, not AdamW: its update is linear in the gradient, so the new params carry the
  gradient's float32 rounding only. (Adam divides each element by its own magnitude, which turns
  the rounding of a near-zero element into a visible part of one update.)
  """
  config.train.microbatches = microbatches
  config_validation.validate(config, num_devices=len(devices))
  mesh = sharding.create_mesh(config.mesh, devices)
  tx = optax.sgd(0.1)
  layout = train_state.state_layout(config, mesh, tx, sharding.axis_rules(config.mesh))
  state = _perturbed(train_state.create_train_state(config, layout, tx))
  schedule = optax.constant_schedule(0.1)
  step = jax.jit(train_step.make_train_step(config, layout.graphdef, tx, schedule, _spec(config)),
                 in_shardings=(layout.shardings, sharding.batch_sharding(mesh), None),
                 out_shardings=(layout.shardings, None), donate_argnums=0)
  state = jax.device_put(state, layout.shardings)
  batch = jax.device_put(_batch(config), sharding.batch_sharding(mesh))
  metrics = []
  for _ in range(2):
    state, step_metrics = step(state, batch, jax.random.PRNGKey(0))
    metrics.append(jax.device_get(step_metrics))
  return jax.device_get(state), metrics


# (data, fsdp, tensor): 1 device, and 8 devices with the batch over fsdp = 2 (8 examples =
# 4 microbatches x 2 shards) and the MLP over tensor = 4.
@pytest.mark.parametrize("mesh_sizes", [(1, 1, 1), (1, 2, 4)])
def test_accumulated_step_equals_large_batch_step(make_config, mesh_sizes):
  """Same rng and global batch: 2 or 4 microbatches give the 1-microbatch step (loss, every
  metric, params, EMA) up to float32 rounding, because all per-example randomness is drawn
  before the split and every loss term is a mean over examples."""
  config = make_config()
  config.mesh.update(data=mesh_sizes[0], fsdp=mesh_sizes[1], tensor=mesh_sizes[2])
  devices = jax.devices()[:int(np.prod(mesh_sizes))]
  full_state, full_metrics = _sgd_steps(config, devices, 1)
  assert full_metrics[0]["loss_rep"] > 0.01  # the teacher path is exercised
  for microbatches in (2, 4):
    state, metrics = _sgd_steps(config, devices, microbatches)
    for full, acc in zip(full_metrics, metrics):
      assert set(full) == set(acc)
      for key in full.keys() - {"teacher_cosine_trivial"}:  # its mean target is per microbatch
        np.testing.assert_allclose(acc[key], full[key], rtol=1e-5, atol=1e-7, err_msg=key)
    for part in ("params", "ema_params"):
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                   state[part], full_state[part])
    assert int(state["step"]) == 2


def test_microbatches_keep_the_batch_spread_over_devices(make_config):
  """Pure data parallelism on 4 devices: the strided microbatch split moves no batch rows, so
  the only collectives of the compiled step are the gradient all-reduces."""
  config = make_config()
  config.mesh.update(data=4, fsdp=1, tensor=1)
  config.train.microbatches = 2
  mesh, tx, schedule, layout, state = _setup(config, jax.devices()[:4])
  step = jax.jit(train_step.make_train_step(config, layout.graphdef, tx, schedule, _spec(config)),
                 in_shardings=(layout.shardings, sharding.batch_sharding(mesh), None),
                 out_shardings=(layout.shardings, None))
  batch = jax.device_put(_batch(config), sharding.batch_sharding(mesh))
  hlo = step.lower(state, batch, jax.random.PRNGKey(0)).compile().as_text()
  assert "all-reduce" in hlo
  for collective in ("all-gather", "all-to-all", "collective-permute"):
    assert collective not in hlo, collective


def test_bfloat16_first_moment(make_config):
  config = make_config()
  config.optim.moment_dtype = "bfloat16"
  config_validation.validate(config, num_devices=8)
  host, metrics, _ = _one_step(config, jax.devices()[:1])
  mu = jax.tree.leaves(optax.tree.get(host["opt_state"], "mu"))
  nu = jax.tree.leaves(optax.tree.get(host["opt_state"], "nu"))
  assert mu and all(x.dtype == jnp.bfloat16 for x in mu)
  assert nu and all(x.dtype == jnp.float32 for x in nu)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((host["params"],
                                                              host["ema_params"])))
  assert np.isfinite(metrics["loss"]) and any(float(np.abs(x).max()) > 0 for x in mu)


@pytest.mark.parametrize("microbatches,mesh_data,message", [
    (0, 1, "config.train.microbatches=0 is not allowed; it must be an integer >= 1"),
    (3, 1, r"config.train.microbatches=3 is not allowed with config.data.global_batch_size=8"),
    (2, 8, r"microbatches x mesh data\*fsdp = 2 x 8"),
])
def test_bad_microbatch_counts_are_named(make_config, microbatches, mesh_data, message):
  config = make_config()
  config.mesh.update(data=mesh_data, fsdp=1, tensor=1)
  config.train.microbatches = microbatches
  with pytest.raises(ValueError, match=message):
    config_validation.validate(config, num_devices=mesh_data)


def test_bad_moment_dtype_is_named(make_config):
  config = make_config()
  config.optim.moment_dtype = "float16"
  with pytest.raises(ValueError, match="config.optim.moment_dtype='float16' is not allowed"):
    config_validation.validate(config, num_devices=8)
