"""The Self-Flow objective: timestep draws, dual-timestep noising, teacher view, losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import t2v
from conftest import random_params, tiny
from self_flow import config_resolution, objectives, train_state, train_step
from self_flow.models import factory

UNIFORM = dict(distribution="uniform")


def _draw(policy, batch=4096, tokens=16, ratio=0.25, key=0, time_kwargs=UNIFORM):
  return objectives.draw_timesteps(jax.random.PRNGKey(key), batch, tokens, policy=policy,
                                   mask_ratio=ratio, time_kwargs=time_kwargs)


def test_t_and_s_are_not_sorted():
  draw = _draw("dual_timestep")
  t, s = np.asarray(draw.table[:, 0]), np.asarray(draw.table[:, 1])
  frac_s_cleaner = np.mean(s < t)
  assert 0.45 < frac_s_cleaner < 0.55, frac_s_cleaner


def test_token_marginal_follows_p_t():
  """Unsorted i.i.d. t, s => every token's timestep is distributed as p(t) (uniform here)."""
  draw = _draw("dual_timestep")
  x = jnp.zeros((4096, 16, 1))
  _, tau = objectives.noise_tokens(x, x, draw.t, draw.s, draw.mask)
  hist, _ = np.histogram(np.asarray(tau).ravel(), bins=10, range=(0, 1))
  np.testing.assert_allclose(hist / hist.sum(), 0.1, atol=0.01)
  # Masked tokens alone are also uniform (they carry s, which is not the cleaner one by design).
  masked = np.asarray(tau)[np.asarray(draw.mask)]
  assert abs(masked.mean() - 0.5) < 0.02


def test_logit_normal_and_shift():
  kw = dict(distribution="logit_normal", logit_mean=0.0, logit_std=1.0, shift=3.0)
  t = objectives.sample_time(jax.random.PRNGKey(0), (100_000,), **kw)
  # Shifting logit-normal by alpha gives logit-normal with mean log(alpha).
  logits = np.log(np.asarray(t) / (1 - np.asarray(t)))
  assert abs(logits.mean() - np.log(3.0)) < 0.02 and abs(logits.std() - 1.0) < 0.02
  with pytest.raises(ValueError, match="gamma"):
    objectives.sample_time(jax.random.PRNGKey(0), (2,), distribution="gamma")


def test_mask_is_bernoulli_per_token():
  draw = _draw("dual_timestep", batch=2000, tokens=64, ratio=0.25)
  counts = np.asarray(draw.mask).sum(1)
  assert abs(counts.mean() - 16) < 0.3
  assert counts.std() > 2.5  # Binomial(64, .25) has std 3.46; a fixed count would give 0.


def test_noised_tokens_match_table_and_formula():
  key = jax.random.PRNGKey(1)
  x0, x1 = jax.random.normal(key, (2, 3, 16, 4))
  draw = _draw("dual_timestep", batch=3, tokens=16, ratio=0.5)
  x_tau, tau = objectives.noise_tokens(x0, x1, draw.t, draw.s, draw.mask)
  expected_tau = jnp.take_along_axis(draw.table, draw.index, axis=1)
  np.testing.assert_array_equal(tau, expected_tau)
  np.testing.assert_allclose(x_tau, (1 - tau[..., None]) * x0 + tau[..., None] * x1, atol=1e-6)


def test_teacher_sees_the_cleaner_timestep():
  draw = _draw("dual_timestep", batch=512, tokens=64)
  x = jnp.zeros((512, 64, 2))
  _, tau = objectives.noise_tokens(x, x, draw.t, draw.s, draw.mask)
  t, s = draw.table[:, 0], draw.table[:, 1]
  has_mask = np.asarray(draw.mask).any(1)
  for rule in objectives.TEACHER_TIMES:  # both rules agree where the mask chose some tokens
    tau_min = objectives.teacher_timestep(draw, tau, rule)
    np.testing.assert_array_equal(np.asarray(tau_min)[has_mask], np.minimum(t, s)[has_mask])
  # Paper convention: smaller t is cleaner, i.e. closer to x0.
  x0, x1 = jnp.zeros((1, 4, 1)), jnp.ones((1, 4, 1))
  np.testing.assert_allclose(objectives.teacher_view(x0, x1, jnp.array([0.2])), 0.2)


def _all_t_and_all_s_draw(num_tokens: int) -> objectives.TimestepDraw:
  """Sample 0: t = 0.8, s = 0.3, no token masked (every token at t); sample 1: t = 0.2, s = 0.7,
  every token masked (every token at s)."""
  t, s = jnp.array([0.8, 0.2]), jnp.array([0.3, 0.7])
  mask = jnp.stack([jnp.zeros(num_tokens, bool), jnp.ones(num_tokens, bool)])
  shape = (2, num_tokens)
  return objectives.TimestepDraw(jnp.broadcast_to(t[:, None], shape),
                                 jnp.broadcast_to(s[:, None], shape), mask,
                                 jnp.stack([t, s], -1), mask.astype(jnp.int32))


def test_teacher_time_rules_for_all_t_and_all_s_samples():
  draw = _all_t_and_all_s_draw(16)
  x = jnp.zeros((2, 16, 1))
  _, tau = objectives.noise_tokens(x, x, draw.t, draw.s, draw.mask)
  np.testing.assert_allclose(objectives.teacher_timestep(draw, tau, "min_ts"), [0.3, 0.2])
  np.testing.assert_allclose(objectives.teacher_timestep(draw, tau, "realised"), [0.8, 0.7])
  with pytest.raises(ValueError, match="teacher_time='max'.*min_ts"):
    objectives.teacher_timestep(draw, tau, "max")


@pytest.mark.parametrize("rule, expected", [(None, (0.3, 0.2)), ("realised", (0.8, 0.7))])
def test_video_step_teacher_sees_min_t_s_for_all_t_and_all_s_clips(rule, expected):
  """A tiny text-to-video config's loss: the teacher's view of a clip whose mask chose no token,
  and of one whose mask chose every token, is at min(t, s) by default (paper Fig. 3) and at the
  realised minimum with objective.teacher_time="realised"; the teacher's input follows."""
  config = tiny(t2v.get_config("local"))
  if rule:
    config.objective.teacher_time = rule
  resolved = config_resolution.resolve(config)
  spec = resolved.spec("video")
  graphdef, params = random_params(factory.create_model(config, nnx.Rngs(0), resolved), 0.02)
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.standard_normal((2, spec.num_tokens, spec.token_dim)), jnp.float32)
  x1 = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
  cond = {"tokens": jnp.zeros((2, config.text.max_length), jnp.int32),
          "mask": jnp.ones((2, config.text.max_length), bool)}
  examples = train_step.Examples(x0, x1, cond, _all_t_and_all_s_draw(spec.num_tokens))
  loss = train_step.make_examples_loss(config, graphdef, spec)
  _, aux = loss(params, params, examples)
  assert float(aux["tau_min_mean"]) == pytest.approx(np.mean(expected), abs=1e-6)
  # The teacher's features are those of the clips at the expected timesteps.
  model = train_state.merge(graphdef, params)
  pos = jnp.broadcast_to(jnp.asarray(spec.position_ids), (2, spec.num_tokens, 3))
  tau_min = jnp.asarray(expected, jnp.float32)
  target = model.teacher_features(objectives.teacher_view(x0, x1, tau_min), pos, tau_min[:, None],
                                  jnp.zeros((2, spec.num_tokens), jnp.int32), cond,
                                  modality="video")
  _, student_features = model(
      objectives.noise_tokens(x0, x1, examples.draw.t, examples.draw.s, examples.draw.mask)[0],
      pos, examples.draw.table, examples.draw.index, cond, modality="video")
  cosine = objectives.cosine_similarity(student_features, target).mean()
  assert float(aux["teacher_cosine"]) == pytest.approx(float(cosine), rel=1e-5)


def test_policies():
  single = _draw("single", batch=8)
  assert single.table.shape == (8, 1) and not np.asarray(single.mask).any()
  full = _draw("full_masking", batch=8)
  x0, x1 = jnp.zeros((8, 16, 1)), jnp.ones((8, 16, 1))
  _, tau = objectives.noise_tokens(x0, x1, full.t, full.s, full.mask)
  np.testing.assert_array_equal(np.asarray(tau)[np.asarray(full.mask)], 1.0)
  forcing = _draw("diffusion_forcing", batch=8)
  assert forcing.table.shape == (8, 16)
  assert len(np.unique(np.asarray(forcing.t)[0])) == 16  # independent t per token
  with pytest.raises(ValueError, match="bogus"):
    _draw("bogus")


def test_zero_mask_ratio_equals_single():
  dual = _draw("dual_timestep", ratio=0.0, batch=16)
  single = _draw("single", batch=16)
  np.testing.assert_array_equal(dual.t, single.t)
  assert not np.asarray(dual.mask).any()


def test_representation_loss_is_mean_one_minus_cosine_over_features():
  a = jnp.array([[[1.0, 0.0], [0.0, 2.0]]])
  b = jnp.array([[[1.0, 0.0], [3.0, 0.0]]])
  assert float(objectives.representation_loss(a, b)) == pytest.approx(0.5)  # (0 + 1) / 2
  assert float(objectives.representation_loss(a, 5 * a)) == pytest.approx(0.0, abs=1e-6)


def test_flow_loss_target_is_noise_minus_data():
  x0, x1 = jnp.zeros((1, 2, 3)), jnp.ones((1, 2, 3))
  assert float(objectives.flow_loss(jnp.ones((1, 2, 3)), x0, x1)) == 0.0
  assert float(objectives.flow_loss(-jnp.ones((1, 2, 3)), x0, x1)) == pytest.approx(4.0)
