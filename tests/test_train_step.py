"""The jitted train step: teacher gradients, baselines reducing to vanilla FM, mesh equivalence,
gradient accumulation and bfloat16 Adam moments."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from self_flow import config_validation, optim, sharding, train_state, train_step


def _setup(config, devices=None):
  mesh = sharding.create_mesh(config.mesh, devices)
  tx, schedule = optim.make_optimizer(config.optim, config.train.num_steps)
  layout = train_state.state_layout(config, mesh, tx)
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
  loss_fn = train_step.make_loss_fn(config, layout.graphdef)
  grads_student, grads_teacher = jax.grad(lambda p, e: loss_fn(p, e, _batch(config),
                                                                 jax.random.PRNGKey(0))[0],
                                          argnums=(0, 1))(state["params"], state["ema_params"])
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads_teacher))
  assert float(optax.global_norm(grads_student["projector"])) > 0  # L_rep trains the projector
  assert float(optax.global_norm(grads_student["blocks"])) > 0


def test_gamma_zero_and_mask_zero_is_vanilla_flow_matching(make_config):
  vanilla = make_config("vanilla")
  reduced = make_config("self_flow")
  reduced.objective.rep_loss_weight = 0.0
  reduced.objective.mask_ratio = 0.0
  results = []
  for config in (vanilla, reduced):
    _, _, _, layout, state = _setup(config)
    state = _perturbed(state)
    loss_fn = train_step.make_loss_fn(config, layout.graphdef)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["ema_params"], _batch(config), jax.random.PRNGKey(3))
    results.append((loss, grads))
  assert float(results[0][0]) == pytest.approx(float(results[1][0]), rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               results[0][1], results[1][1])


def test_rep_loss_changes_the_objective(make_config):
  """The control for the test above: with gamma > 0 the loss does differ from vanilla."""
  config = make_config("self_flow")
  _, _, _, layout, state = _setup(config)
  state = _perturbed(state)
  loss_fn = train_step.make_loss_fn(config, layout.graphdef)
  loss, aux = loss_fn(state["params"], state["ema_params"], _batch(config), jax.random.PRNGKey(3))
  assert float(loss) == pytest.approx(float(aux["loss_gen"] + 0.8 * aux["loss_rep"]), rel=1e-6)
  assert float(aux["loss_rep"]) > 0.01


def _one_step(config, devices):
  mesh, tx, schedule, layout, state = _setup(config, devices)
  step = jax.jit(train_step.make_train_step(config, layout.graphdef, tx, schedule),
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
  layout = train_state.state_layout(config, mesh, tx)
  state = _perturbed(train_state.create_train_state(config, layout, tx))
  schedule = optax.constant_schedule(0.1)
  step = jax.jit(train_step.make_train_step(config, layout.graphdef, tx, schedule),
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
      for key in full:
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
  step = jax.jit(train_step.make_train_step(config, layout.graphdef, tx, schedule),
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
