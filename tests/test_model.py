"""The token DiT: per-token adaLN equivalence, feature taps, teacher truncation, presets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from self_flow import objectives
from self_flow.modalities import image
from self_flow.models import factory, presets
from conftest import random_params
from equivalence import assert_equivalent, assert_fault_detected, rounding_bound


def _random_params(model, seed=0):
  return random_params(model, 0.2, seed)


def _inputs(config, batch=3, seed=1):
  size, p = config.data.image_size, config.model.patch_size
  images = jax.random.normal(jax.random.PRNGKey(seed), (batch, size, size, 1))
  x = image.patchify(images, p)
  pos = jnp.broadcast_to(image.position_ids(size, size, p), x.shape[:2] + (3,))
  labels = jnp.arange(batch) % config.data.num_classes
  return x, pos, labels


def _forward_terms(config) -> int:
  """Roundings in the longest float32 chain of a forward: per block the qkv and output
  projections (hidden), the MLP (hidden + 4 x hidden) and the attention sum (tokens)."""
  m, tokens = config.model, (config.data.image_size // config.model.patch_size) ** 2
  return m.depth * (3 * m.hidden_size + 4 * m.hidden_size + tokens)


def test_distinct_condition_adaln_equals_per_token(make_config):
  """The gather of K distinct adaLN rows equals one row per token, up to rounding (scaled error
  0 on jax 0.10.2, 1.2e-6 on 0.12.1; bound 960 x eps = 1.1e-4). A gather index shifted by one
  token moves the outputs by 0.17 of their scale, 1500 x the bound."""
  config = make_config()
  graphdef, params = _random_params(factory.create_model(config, nnx.Rngs(0)))
  model = nnx.merge(graphdef, params)
  x, pos, labels = _inputs(config)
  b, n, _ = x.shape
  draw = objectives.draw_timesteps(jax.random.PRNGKey(2), b, n, policy="dual_timestep",
                                   mask_ratio=0.5, time_kwargs=dict(distribution="uniform"))
  tau = jnp.where(draw.mask, draw.s, draw.t)
  fast_v, fast_f = model(x, pos, draw.table, draw.index, labels)
  # Naive: one conditioning row per token (K = N), the computation the gather replaces.
  naive_index = jnp.broadcast_to(jnp.arange(n), (b, n))
  naive_v, naive_f = model(x, pos, tau, naive_index, labels)
  bound = rounding_bound(_forward_terms(config))
  assert_equivalent((fast_v, fast_f), (naive_v, naive_f), bound=bound)
  shifted = model(x, pos, draw.table, jnp.roll(draw.index, 1, axis=1), labels)
  assert_fault_detected(shifted, (fast_v, fast_f), bound=bound,
                        fault="a gather index shifted by one token")
  # And per-token conditioning matters: a scalar t for everyone gives a different output.
  scalar_v, _ = model(x, pos, draw.table[:, :1], jnp.zeros((b, n), jnp.int32), labels)
  assert np.abs(np.asarray(scalar_v - fast_v)).max() > 1e-3


def test_outputs_and_feature_taps(make_config):
  config = make_config()
  model = factory.create_model(config, nnx.Rngs(0))
  x, pos, labels = _inputs(config)
  t = jnp.full((3, 1), 0.5)
  idx = jnp.zeros(x.shape[:2], jnp.int32)
  velocity, features = model(x, pos, t, idx, labels)
  assert velocity.shape == x.shape and velocity.dtype == jnp.float32
  assert features.shape == x.shape[:2] + (config.model.hidden_size,)
  assert model.student_layer == 1 and model.teacher_layer == 3  # round(0.3*4), round(0.7*4)
  teacher = model.teacher_features(x, pos, t, idx, labels)
  assert teacher.shape == features.shape


def test_teacher_forward_stops_at_its_layer(make_config):
  config = make_config()
  graphdef, params = _random_params(factory.create_model(config, nnx.Rngs(0)))
  x, pos, labels = _inputs(config)
  t, idx = jnp.full((3, 1), 0.3), jnp.zeros(x.shape[:2], jnp.int32)
  before = nnx.merge(graphdef, params).teacher_features(x, pos, t, idx, labels)
  k = config.model.depth - 1  # teacher_layer = 3 of 4: block index 3 must not matter.
  changed = jax.tree.map(lambda a: a, params)
  changed["blocks"] = jax.tree.map(lambda a: a.at[k].set(a[k] + 1.0), params["blocks"])
  changed["final_layer"] = jax.tree.map(lambda a: a + 1.0, params["final_layer"])
  after = nnx.merge(graphdef, changed).teacher_features(x, pos, t, idx, labels)
  np.testing.assert_array_equal(before, after)
  # ... while the block before it does matter.
  changed["blocks"] = jax.tree.map(lambda a: a.at[k - 1].set(a[k - 1] + 1.0), params["blocks"])
  moved = nnx.merge(graphdef, changed).teacher_features(x, pos, t, idx, labels)
  assert np.abs(np.asarray(moved - before)).max() > 1e-3


def test_remat_policies_and_unrolled_blocks_agree(make_config):
  """Same gradients whatever the rematerialisation and whether blocks are scanned or unrolled,
  up to rounding: the backward pass is two forward chains plus the sum over the batch's tokens
  for each weight (bound 1968 x eps = 2.3e-4; measured at most 2.3e-7 on jax 0.10.2 and
  0.12.1). Swapping two blocks' weights moves the gradients by 0.45 of their scale."""
  config = make_config()
  config.model.remat_policy, config.model.scan_layers = "dots", False
  built = nnx.eval_shape(lambda: factory.create_model(config, nnx.Rngs(0)))
  assert (built.remat_policy, built.scan_layers) == ("dots", False)  # the config reaches the model
  graphdef, params = _random_params(factory.create_model(make_config(), nnx.Rngs(0)))
  x, pos, labels = _inputs(config)
  outputs = []
  for policy, scan_layers in (("none", True), ("full", True), ("dots", True), ("none", False)):

    def loss(p):
      model = nnx.merge(graphdef, p)
      model.remat_policy, model.scan_layers = policy, scan_layers
      v, f = model(x, pos, jnp.full((3, 1), 0.4), jnp.zeros(x.shape[:2], jnp.int32), labels)
      return jnp.mean(v ** 2) + jnp.mean(f ** 2)

    outputs.append(jax.jit(jax.grad(loss))(params))
  bound = rounding_bound(2 * _forward_terms(config) + x.shape[0] * x.shape[1])
  for other in outputs[1:]:
    assert_equivalent(other, outputs[0], bound=bound)
  swapped = dict(params, blocks=jax.tree.map(lambda a: a[jnp.array([0, 2, 1, 3])],
                                             params["blocks"]))
  assert_fault_detected(jax.jit(jax.grad(loss))(swapped), outputs[0], bound=bound,
                        fault="blocks 1 and 2 swapped")


def test_presets_and_layer_rule():
  assert presets.resolve_dims("XL") == presets.ModelDims(1152, 28, 16)
  assert presets.feature_layers(28) == (8, 20)
  assert presets.feature_layers(12) == (4, 8)
  assert presets.feature_layers(21) == (6, 15)
  with pytest.raises(ValueError, match="'XXL'"):
    presets.resolve_dims("XXL")
  with pytest.raises(ValueError, match="teacher_layer=3"):
    presets.feature_layers(12, student_layer=5, teacher_layer=3)


def test_patchify_round_trip():
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 28, 28, 3))
  tokens = image.patchify(images, 4)
  assert tokens.shape == (2, 49, 48)
  np.testing.assert_array_equal(image.unpatchify(tokens, 4, 28, 28), images)
  ids = image.position_ids(28, 28, 4)
  assert ids.shape == (49, 3) and int(ids[8, 1]) == 1 and int(ids[8, 2]) == 1
