"""Tests for self_flow.sampling against closed-form velocity fields, so every check is exact.

For data x0 ~ N(mu, s^2) per dimension, x_t = (1 - t) x0 + t x1 is Gaussian and the exact
paper-convention velocity E[x1 - x0 | x_t = x] is linear in x; its ODE flow maps the noise point
x1 to mu + s x1, which gives the samplers an exact target.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from self_flow import sampling
from equivalence import assert_equivalent, assert_fault_detected, rounding_bound

MU = jnp.array([1.0, -2.0])
STD = jnp.array([0.5, 2.0])
NUM_SAMPLES = 4096


def gaussian_velocity(x, t, mu, std):
  """E[x1 - x0 | x_t = x] for x0 ~ N(mu, std^2): Cov(x1 - x0, x_t) / Var(x_t) (x - E x_t) - mu."""
  t = t.reshape(t.shape + (1,) * (x.ndim - 1))
  var = (1 - t) ** 2 * std**2 + t**2
  return -mu + (t - (1 - t) * std**2) / var * (x - (1 - t) * mu)


def velocity_fn(x, t, cond):
  del cond
  return gaussian_velocity(x, t, MU, STD)


# Per-class means for the guidance tests; label 2 is the null class (the data mean).
CLASS_MU = jnp.array([[1.0, -1.0], [-1.0, 2.0], [0.0, 0.5]])
NULL_LABEL = 2


def class_velocity_fn(x, t, cond):
  return gaussian_velocity(x, t, CLASS_MU[cond["label"]], STD)


@pytest.fixture(scope="module")
def noise():
  return jax.random.normal(jax.random.key(0), (NUM_SAMPLES, 2))


def jitted_sample(fn, method, num_steps, shift=1.0):
  return jax.jit(functools.partial(sampling.sample, fn, method=method, num_steps=num_steps,
                                   shift=shift))


def test_time_grid_endpoints_monotone_and_shift():
  uniform = np.asarray(sampling.time_grid(4, 1.0))
  np.testing.assert_allclose(uniform, [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-7)
  shifted = np.asarray(sampling.time_grid(8, 3.0))
  assert shifted.shape == (9,) and shifted[0] == 1.0 and shifted[-1] == 0.0
  assert np.all(np.diff(shifted) < 0)
  # a > 1 pulls every interior point toward noise, so the first (noisiest) steps are smallest.
  assert np.all(shifted[1:-1] > np.asarray(sampling.time_grid(8, 1.0))[1:-1])
  assert -np.diff(shifted)[0] < -np.diff(shifted)[-1]


@pytest.mark.parametrize("kwargs", [dict(num_steps=0, shift=1.0), dict(num_steps=4, shift=0.0),
                                    dict(num_steps=2.5, shift=1.0)])
def test_time_grid_rejects_bad_input(kwargs):
  with pytest.raises(ValueError, match="num_steps|shift"):
    sampling.time_grid(**kwargs)


@pytest.mark.parametrize("method,num_steps", [("euler", 200), ("heun", 20)])
def test_ode_transports_noise_to_data(noise, method, num_steps):
  out = jitted_sample(velocity_fn, method, num_steps, shift=2.0)(noise, None, jax.random.key(1))
  # The sample statistics are those of mu + std * noise up to the integration error.
  np.testing.assert_allclose(out.mean(0), MU + STD * noise.mean(0), atol=0.02)
  np.testing.assert_allclose(out.std(0), STD * noise.std(0), rtol=0.02)
  np.testing.assert_allclose(out, MU + STD * noise, atol=0.1)


def test_heun_is_more_accurate_than_euler(noise):
  exact = MU + STD * noise
  errors = {m: float(jnp.abs(sampling.sample_ode(velocity_fn, noise, None, num_steps=10,
                                                 method=m) - exact).max())
            for m in ("euler", "heun")}
  assert errors["heun"] < 0.1 * errors["euler"], errors


def test_sde_matches_data_distribution(noise):
  out = jitted_sample(velocity_fn, "sde", 250)(noise, None, jax.random.key(1))
  np.testing.assert_allclose(out.mean(0), MU, atol=0.1)
  np.testing.assert_allclose(out.std(0), STD, rtol=0.05)


def test_sde_follows_official_update():
  """Three steps by hand: u-grid [0, 0.48, 0.96], two Euler–Maruyama steps, one mean step."""
  x1 = jax.random.normal(jax.random.key(3), (5, 2))
  rng = jax.random.key(4)
  out = sampling.sample_sde(velocity_fn, x1, None, rng, num_steps=3, last_step_size=0.04)

  def sit_drift(x, u):
    v_sit = -velocity_fn(x, jnp.full((5,), 1.0 - u), None)
    return v_sit + (1 - u) * (u * v_sit - x) / (1 - u)

  x = x1
  for i, u in enumerate([0.0, 0.48]):
    eps = jax.random.normal(jax.random.fold_in(rng, i), x.shape)
    x = x + sit_drift(x, u) * 0.48 + jnp.sqrt(2 * (1 - u) * 0.48) * eps
  expected = x + sit_drift(x, 0.96) * 0.04
  # Three steps of a few elementwise operations each: a bound of 64 float32 roundings.
  bound = rounding_bound(64)
  assert_equivalent(out, expected, bound=bound)
  wrong_noise = x1
  for i, u in enumerate([0.0, 0.48]):  # the fault: the two steps' noise draws swapped
    eps = jax.random.normal(jax.random.fold_in(rng, 1 - i), x.shape)
    wrong_noise = wrong_noise + sit_drift(wrong_noise, u) * 0.48 + jnp.sqrt(
        2 * (1 - u) * 0.48) * eps
  wrong_noise = wrong_noise + sit_drift(wrong_noise, 0.96) * 0.04
  assert_fault_detected(wrong_noise, expected, bound=bound, fault="the noise draws swapped")


def test_cfg_scale_one_is_exactly_unguided(noise):
  cond = {"label": jnp.arange(NUM_SAMPLES) % 2}
  guided = sampling.guided_velocity_fn(class_velocity_fn, cfg_scale=1.0, null_cond={"label": 2},
                                       guidance_interval=(0.2, 0.6))
  for method in ("heun", "sde"):
    plain = jitted_sample(class_velocity_fn, method, 8)(noise, cond, jax.random.key(2))
    with_cfg = jitted_sample(guided, method, 8)(noise, cond, jax.random.key(2))
    np.testing.assert_array_equal(plain, with_cfg)


def test_cfg_extrapolates_in_one_batched_call():
  batch_sizes = []

  def spy(x, t, cond):
    batch_sizes.append(x.shape[0])
    return class_velocity_fn(x, t, cond)

  x = jnp.array([[0.3, -0.7], [1.5, 0.2]])
  t = jnp.array([0.4, 0.9])
  cond = {"label": jnp.array([0, 1])}
  guided = sampling.guided_velocity_fn(spy, cfg_scale=4.0, null_cond={"label": NULL_LABEL})
  v = jax.jit(guided)(x, t, cond)
  v_c = class_velocity_fn(x, t, cond)
  v_u = class_velocity_fn(x, t, {"label": jnp.full((2,), NULL_LABEL)})
  np.testing.assert_allclose(v, v_u + 4.0 * (v_c - v_u), rtol=1e-6)
  assert not np.allclose(v, v_c)
  assert batch_sizes == [4]


def test_cfg_interval_turns_guidance_off_outside():
  x = jnp.tile(jnp.array([[0.3, -0.7]]), (4, 1))
  t = jnp.array([0.1, 0.2, 0.5, 0.8])  # outside, at lo, inside, outside (interval [0.2, 0.5]).
  cond = {"label": jnp.zeros((4,), jnp.int32)}
  guided = sampling.guided_velocity_fn(class_velocity_fn, cfg_scale=3.0,
                                       null_cond={"label": jnp.full((4,), NULL_LABEL)},
                                       guidance_interval=(0.2, 0.5))
  v = guided(x, t, cond)
  v_c = class_velocity_fn(x, t, cond)
  v_u = class_velocity_fn(x, t, {"label": jnp.full((4,), NULL_LABEL)})
  inside = jnp.array([False, True, True, False])[:, None]
  np.testing.assert_allclose(v, jnp.where(inside, v_u + 3.0 * (v_c - v_u), v_c), rtol=1e-6)
  np.testing.assert_array_equal(v[jnp.array([0, 3])], v_c[jnp.array([0, 3])])


@pytest.mark.parametrize("kwargs,match", [
    (dict(cfg_scale=-1.0), "cfg_scale"),
    (dict(cfg_scale=2.0, guidance_interval=(0.6, 0.2)), "guidance_interval"),
    (dict(cfg_scale=2.0, guidance_interval=(0.0, 1.5)), "guidance_interval"),
])
def test_guidance_rejects_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sampling.guided_velocity_fn(class_velocity_fn, null_cond={"label": NULL_LABEL}, **kwargs)


def test_unknown_method_is_named_in_error(noise):
  with pytest.raises(ValueError, match="'rk4'"):
    sampling.sample(velocity_fn, noise, None, jax.random.key(0), method="rk4", num_steps=4,
                    shift=1.0)
  with pytest.raises(ValueError, match="'sde'"):
    sampling.sample_ode(velocity_fn, noise, None, num_steps=4, method="sde")
  with pytest.raises(ValueError, match="last_step_size"):
    sampling.sample_sde(velocity_fn, noise, None, jax.random.key(0), num_steps=4,
                        last_step_size=0.0)
