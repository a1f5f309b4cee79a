"""Sharding: rule presets, activation constraints, the replication check, multi-slice meshes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import c2i_imagenet256, multimodal, t2a, t2i, t2v
from conftest import tiny, tiny_config
from equivalence import assert_equivalent, assert_fault_detected, rounding_bound
from self_flow import (config_resolution, config_validation, optim, sharding, train_state,
                       train_step)
from self_flow.models import factory, layers


def _layout(config):
  mesh = sharding.create_mesh(config.mesh)
  tx, schedule = optim.make_optimizer(config.optim, config.train.num_steps)
  return mesh, tx, schedule, train_state.state_layout(config, mesh, tx,
                                                     sharding.axis_rules(config.mesh))


def _train(config, state=None, num_steps=3):
  """Losses of `num_steps` steps on the config's 8-device mesh, activations constrained, from
  `state` (moved onto this mesh) or a fresh one."""
  mesh, tx, schedule, layout = _layout(config)
  report = train_state.check_replication(config, layout)
  if state is None:
    state = train_state.create_train_state(config, layout, tx)
  state = jax.device_put(state, layout.shardings)
  step = jax.jit(
      sharding.activation_sharding(mesh, sharding.axis_rules(config.mesh))(
          train_step.make_train_step(config, layout.graphdef, tx, schedule,
                                     config_resolution.resolve(config).first_spec)),
      in_shardings=(layout.shardings, sharding.batch_sharding(mesh), None),
      out_shardings=(layout.shardings, None), donate_argnums=0)
  losses = []
  for i in range(num_steps):
    key = jax.random.PRNGKey(i)
    b, size = config.data.global_batch_size, config.data.image_size
    batch = {"image": jax.random.uniform(key, (b, size, size, 1)) * 2 - 1,
             "label": jnp.arange(b, dtype=jnp.int32) % config.data.num_classes}
    state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)), key)
    losses.append(float(metrics["loss"]))
  return losses, state, report


def test_fsdp_tp_mesh_trains_like_data_parallel():
  split = tiny_config()
  split.mesh.update(data=1, fsdp=4, tensor=2, rules="fsdp_tp")
  plain = tiny_config()
  plain.mesh.update(data=8, fsdp=1, tensor=1, rules="dp")
  _, tx, _, layout = _layout(split)
  initial = jax.device_get(train_state.create_train_state(split, layout, tx))  # one init
  rng = np.random.default_rng(0)  # off the adaLN-zero init, so every block acts from step 1
  for key in ("params", "ema_params"):
    initial[key] = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape, p.dtype),
                                initial[key])
  split_losses, state, report = _train(split, initial)
  plain_losses, _, plain_report = _train(plain, initial)
  np.testing.assert_allclose(split_losses, plain_losses, rtol=1e-4)
  assert split_losses[-1] != split_losses[0]  # the steps really updated the weights
  # Only biases stay whole (2.3% of this width-32 model); a big kernel is split both ways.
  assert 0 < report.replicated_fraction < split.mesh.max_replicated_fraction
  assert all(path.endswith("bias") for path, _, _ in report.largest_replicated)
  assert report.bytes_per_device < report.total_bytes / 6
  assert plain_report.replicated_fraction == 1.0  # reported, but dp on fsdp=1 is not refused
  mlp = state["params"]["blocks"]["mlp"]["fc1"]["kernel"]  # (layers, embed, mlp)
  assert mlp.sharding.spec == P(None, "fsdp", "tensor")
  assert mlp.addressable_shards[0].data.shape == (4, 8, 64)
  ema = state["ema_params"]["blocks"]["modulation"]["kernel"]
  assert ema.sharding.spec == P(None, "fsdp", "tensor")


def test_replication_check_refuses_replicated_fsdp():
  config = tiny_config()
  config.mesh.update(data=1, fsdp=4, tensor=2, rules="dp")
  _, _, _, layout = _layout(config)
  with pytest.raises(ValueError, match=r"100\.00% of the parameter bytes .*"
                     r"max_replicated_fraction=0\.05.*blocks/modulation/kernel 96\.00 KiB"):
    train_state.check_replication(config, layout)
  config.mesh.max_replicated_fraction = 1.0  # an explicit tolerance lets it through
  assert train_state.check_replication(config, layout).replicated_fraction == 1.0


def test_paper_t2i_model_is_almost_fully_split():
  """From shapes alone: 0.07% of the ~625M-parameter MMDiT (biases) stays whole."""
  config = t2i.get_config("default")
  config.mesh.update(data=1, fsdp=4, tensor=2)
  _, _, _, layout = _layout(config)
  report = train_state.check_replication(config, layout)
  assert report.replicated_fraction < 0.001
  assert report.bytes_per_device < 1.02 * report.total_bytes / 8


@pytest.mark.parametrize("get_config", [
    t2i.get_config, t2v.get_config, t2a.get_config, multimodal.get_config,
    lambda: multimodal.get_config("4b"), c2i_imagenet256.get_config])
def test_paper_presets_split_the_state_over_every_chip(get_config):
  """Pod defaults (configs/base.py:use_pod_layout): no chip holds the whole state. On the 8 fake
  devices the argument state per device is about 1/8 of the total, not all of it."""
  config = get_config()
  assert config.mesh.fsdp == -1 or config.mesh.fsdp * config.mesh.tensor > 1
  assert config.model.attention == "auto"
  if config.mesh.tensor > 1:  # the 4B preset: fsdp 32 x tensor 2 needs 64 chips
    config.mesh.update(data=1, fsdp=4, tensor=2)
  mesh, _, _, layout = _layout(config)
  assert mesh.shape["data"] == 1
  leaves = jax.tree.leaves(layout.abstract)
  total = sum(a.size * a.dtype.itemsize for a in leaves)
  per_device = sum(np.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in leaves)
  assert per_device < 1.05 * total / 8


@pytest.mark.parametrize("switch", [True, False])
def test_collective_matmul_switch_gives_no_options_off_tpu(switch):
  """The switch names libtpu flags, which XLA:CPU refuses ("No such compile option"): off TPU
  the train step is compiled with no extra options either way (tests/test_aot.py shows the
  switch's effect on the TPU compiler)."""
  config = tiny_config()
  config.mesh.collective_matmul = switch
  mesh = sharding.create_mesh(config.mesh)
  assert sharding.compiler_options(config.mesh, mesh) == {}


@pytest.mark.parametrize("key,value,message", [
    ("rules", "zero3", r"config.mesh.rules='zero3' is not allowed.*\['dp', 'fsdp', 'fsdp_tp'\]"),
    ("logical_axis_rules", (("embed", "model"),), r"\('embed', 'model'\) must be \(name, axes\)"),
    ("logical_axis_rules", (("embed", ("fsdp", "fsdp")),), r"tuple of distinct"),
    ("max_replicated_fraction", 1.5, r"max_replicated_fraction=1.5.*\[0, 1\]"),
    ("dcn_data", 3, r"dcn_data=3 slices must divide mesh data=8"),
])
def test_bad_mesh_settings_are_named(key, value, message):
  config = tiny_config()
  config.mesh[key] = value
  with pytest.raises(ValueError, match=message):
    config_validation.validate(config, num_devices=8)


def test_explicit_rules_replace_the_preset_entries_of_their_names():
  mesh = sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  config = tiny_config()
  config.mesh.logical_axis_rules = (("embed", None), ("mlp", "fsdp"))
  rules = sharding.axis_rules(config.mesh)
  spec = lambda names, shape: sharding.logical_to_mesh_spec(names, shape, rules, mesh)
  assert spec(("embed", "mlp"), (32, 128)) == P(None, "fsdp")
  assert spec(("embed", "heads"), (32, 96)) == P(None, "tensor")  # the preset's entry stays
  with pytest.raises(ValueError, match="'expert' has no entry"):
    spec(("expert",), (8,))


def test_candidates_fall_back_when_an_axis_is_taken_or_does_not_divide():
  mesh = sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding.RULE_PRESETS["fsdp"]
  spec = lambda names, shape: sharding.logical_to_mesh_spec(names, shape, rules, mesh)
  assert spec(("embed", "mlp"), (32, 128)) == P("fsdp", None)  # fsdp taken by embed
  assert spec(("embed", "mlp"), (33, 128)) == P(None, "fsdp")  # 33 does not divide: next dim
  assert spec(tuple(layers.TOKENS), (8, 5, 32)) == P(("data", "fsdp"), None, None)
  assert spec(tuple(layers.TOKENS), (6, 5, 32)) == P(None, None, None)  # 6 % (2 x 2) != 0


def test_constrain_is_a_noop_without_rules_and_pins_activations_with_them():
  mesh = sharding.create_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  mlp = layers.Mlp(32, 64, nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
  x = jnp.ones((8, 5, 32))
  count = lambda: str(jax.make_jaxpr(lambda v: mlp(v))(x)).count("sharding_constraint")
  assert count() == 0
  with sharding.activation_sharding(mesh, sharding.RULE_PRESETS["fsdp_tp"]):
    assert count() == 1
    hidden = jax.jit(lambda v: sharding.constrain(v, layers.HIDDEN))(jnp.ones((8, 5, 64)))
  assert hidden.addressable_shards[0].data.shape == (2, 5, 32)  # batch / fsdp, mlp / tensor
  assert sharding.constrain(x, layers.TOKENS) is x


def test_mmdit_forward_is_unchanged_by_activation_constraints():
  config = tiny(t2i.get_config("local"), {"model.depth": 3, "model.num_double": 1,
                                          "text.encoder": "precomputed", "text.embedding_dim": 8})
  abstract = nnx.eval_shape(lambda: factory.create_model(config, nnx.Rngs(0)))
  graphdef, shapes = nnx.split(abstract, nnx.Param)
  rng = np.random.default_rng(0)  # numpy: no compile per shape; random adaLN: blocks act
  normal = lambda *shape: jnp.asarray(0.1 * rng.standard_normal(shape), jnp.float32)
  params = jax.tree.map(lambda x: normal(*x.shape), nnx.to_pure_dict(shapes))
  b, n = 8, 16
  args = (normal(b, n, 49), jnp.zeros((b, n, 3), jnp.int32), jnp.asarray(rng.uniform(size=(b, 2))),
          jnp.arange(b * n).reshape(b, n) % 2,
          {"embedding": normal(b, 6, 8), "mask": jnp.ones((b, 6), bool)})
  forward = lambda p, *a: nnx.merge(graphdef, p)(*a)[0]
  mesh = sharding.create_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  constrained = sharding.activation_sharding(mesh, sharding.RULE_PRESETS["fsdp_tp"])(forward)
  traced = jax.jit(constrained).trace(params, *args)
  assert str(traced.jaxpr).count("sharding_constraint") >= 10  # streams, MLP hidden, q/k/v heads
  # Rounding bound of the forward: per block the projections and MLP (7 x hidden) and the
  # attention sum over 6 text + 16 image tokens (measured: under 1e-6 of the output's scale).
  bound = rounding_bound(config.model.depth * (7 * config.model.hidden_size + 6 + n))
  want = jax.jit(forward)(params, *args)
  assert_equivalent(traced.lower().compile()(params, *args), want, bound=bound)
  shifted = (*args[:3], jnp.roll(args[3], 1, axis=1), args[4])  # per-token timesteps moved
  assert_fault_detected(jax.jit(forward)(params, *shifted), want, bound=bound,
                        fault="a timestep index shifted by one token")


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """What mesh_utils reads from a device on a platform it has no topology handler for."""

  id: int
  slice_index: int
  platform: str = "fake"
  device_kind: str = "fake"


def test_multi_slice_devices_get_a_hybrid_mesh_with_slices_along_data():
  devices = [FakeDevice(i, slice_index=i % 2) for i in range(8)]  # interleaved on purpose
  grid = sharding.device_grid({"data": 4, "fsdp": 2, "tensor": 1, "dcn_data": -1}, devices)
  assert grid.shape == (4, 2, 1)
  slices = np.vectorize(lambda d: d.slice_index)(grid)
  assert (slices[:2] == 0).all() and (slices[2:] == 1).all()  # DCN only between data halves
  with pytest.raises(ValueError, match="dcn_data=4: the devices form 2 slice"):
    sharding.device_grid({"data": 4, "fsdp": 2, "tensor": 1, "dcn_data": 4}, devices)
  with pytest.raises(ValueError, match="dcn_data=2: the devices form 1 slice"):
    sharding.create_mesh({"data": 8, "fsdp": 1, "tensor": 1, "dcn_data": 2})
