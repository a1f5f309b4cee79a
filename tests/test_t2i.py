"""Text-to-image: MMDiT per-token conditioning, text tokens as pure conditioning, CFG, presets."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import t2i
from self_flow import conditioning, config_resolution, objectives, sampling, train_step
from self_flow.modalities import image
from self_flow.models import factory
from conftest import random_params, tiny, write_caption_latent_shards
from equivalence import assert_equivalent, assert_fault_detected, rounding_bound


def _config(encoder="precomputed"):
  return tiny(t2i.get_config("local"), {"text.encoder": encoder, "text.embedding_dim": 8,
                                        "data.global_batch_size": 4,
                                        "optim.warmup_steps": 100})  # as t2i local


def _randomised(model, seed=0):
  return random_params(model, 0.1, seed)


def _text(batch=3, length=6, dim=8, seed=1):
  emb = jax.random.normal(jax.random.PRNGKey(seed), (batch, length, dim))
  mask = jnp.arange(length)[None, :] < jnp.array([6, 3, 1])[:batch, None]
  return {"embedding": emb, "mask": mask}


def _forward_terms(config, image_tokens: int, text_tokens: int = 6) -> int:
  """Roundings in the longest float32 chain of an MMDiT forward: per block the qkv and output
  projections (hidden), the MLP (hidden + 4 x hidden) and the joint attention sum (tokens)."""
  hidden = config.model.hidden_size
  return config.model.depth * (7 * hidden + image_tokens + text_tokens)


def _image_inputs(config, batch=3):
  size, p = config.data.image_size, config.model.patch_size
  x = image.patchify(jax.random.normal(jax.random.PRNGKey(2), (batch, size, size, 1)), p)
  pos = jnp.broadcast_to(image.position_ids(size, size, p), x.shape[:2] + (3,))
  return x, pos


def test_paper_preset_is_about_625m_parameters():
  config = t2i.get_config("default")
  abstract = nnx.eval_shape(lambda: factory.create_model(config, nnx.Rngs(0)))
  shapes = jax.tree.leaves(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  count = sum(int(np.prod(s.shape)) for s in shapes)
  print(f"t2i default: {count / 1e6:.1f}M parameters")
  assert abs(count - 625e6) / 625e6 < 0.10
  model = abstract
  assert (model.num_double, model.depth, model.student_layer, model.teacher_layer) == (7, 21, 6, 15)


def test_distinct_condition_modulation_equals_per_token():
  """The MMDiT's gathered modulation rows equal one row per token, up to rounding (scaled error
  2e-7 on jax 0.10.2, 2.5e-7 on 0.12.1; bound 982 x eps = 1.2e-4). A gather index shifted by one
  token moves the outputs by 0.019 of their scale, 160 x the bound."""
  config = _config()
  graphdef, params = _randomised(factory.create_model(config, nnx.Rngs(0)))
  model = nnx.merge(graphdef, params)
  x, pos = _image_inputs(config)
  b, n, _ = x.shape
  draw = objectives.draw_timesteps(jax.random.PRNGKey(3), b, n, policy="dual_timestep",
                                   mask_ratio=0.5, time_kwargs=dict(distribution="uniform"))
  tau = jnp.where(draw.mask, draw.s, draw.t)
  fast = model(x, pos, draw.table, draw.index, _text())
  naive = model(x, pos, tau, jnp.broadcast_to(jnp.arange(n), (b, n)), _text())
  bound = rounding_bound(_forward_terms(config, n))
  assert_equivalent(fast, naive, bound=bound)
  shifted = model(x, pos, draw.table, jnp.roll(draw.index, 1, axis=1), _text())
  assert_fault_detected(shifted, fast, bound=bound, fault="a gather index shifted by one token")


def test_unrolled_blocks_give_the_scanned_outputs():
  """model.scan_layers=False runs the double and single blocks unrolled: the same numbers up to
  rounding (scaled error 2e-7 on jax 0.10.2 and 0.12.1; bound 1.2e-4). The two single-stream
  blocks swapped move the outputs by 0.087 of their scale, 750 x the bound."""
  config = _config()
  config.model.scan_layers = False
  assert not nnx.eval_shape(lambda: factory.create_model(config, nnx.Rngs(0))).scan_layers
  graphdef, params = _randomised(factory.create_model(_config(), nnx.Rngs(0)))
  x, pos = _image_inputs(config)
  t, idx = jnp.full((3, 1), 0.4), jnp.zeros(x.shape[:2], jnp.int32)

  @functools.partial(jax.jit, static_argnums=0)
  def forward(scan_layers, params):
    model = nnx.merge(graphdef, params)
    model.scan_layers = scan_layers
    return (*model(x, pos, t, idx, _text()), model.teacher_features(x, pos, t, idx, _text()))

  scanned, unrolled = forward(True, params), forward(False, params)
  bound = rounding_bound(_forward_terms(config, x.shape[1]))
  assert_equivalent(unrolled, scanned, bound=bound)
  swap = jnp.array([1, 0])
  swapped = dict(params, single_blocks=jax.tree.map(lambda a: a[swap], params["single_blocks"]))
  assert_fault_detected(forward(False, swapped), scanned, bound=bound,
                        fault="the two single-stream blocks swapped")


def test_teacher_stops_at_its_layer_in_the_single_stream():
  config = _config()  # 2 double + 2 single blocks; teacher layer round(0.7 * 4) = 3.
  graphdef, params = _randomised(factory.create_model(config, nnx.Rngs(0)))
  x, pos = _image_inputs(config)
  t, idx = jnp.full((3, 1), 0.4), jnp.zeros(x.shape[:2], jnp.int32)
  before = nnx.merge(graphdef, params).teacher_features(x, pos, t, idx, _text())
  changed = dict(params)
  changed["single_blocks"] = jax.tree.map(lambda a: a.at[1].add(1.0), params["single_blocks"])
  after = nnx.merge(graphdef, changed).teacher_features(x, pos, t, idx, _text())
  np.testing.assert_array_equal(before, after)
  changed["single_blocks"] = jax.tree.map(lambda a: a.at[0].add(1.0), params["single_blocks"])
  moved = nnx.merge(graphdef, changed).teacher_features(x, pos, t, idx, _text())
  assert float(jnp.abs(moved - before).max()) > 1e-3


def test_padded_text_is_ignored_and_text_matters():
  config = _config()
  graphdef, params = _randomised(factory.create_model(config, nnx.Rngs(0)))
  model = nnx.merge(graphdef, params)
  x, pos = _image_inputs(config)
  t, idx = jnp.full((3, 1), 0.5), jnp.zeros(x.shape[:2], jnp.int32)
  text = _text()
  v, _ = model(x, pos, t, idx, text)
  # Masked keys get exactly zero attention weight, so padding changes no bit of the output.
  garbage = dict(text, embedding=jnp.where(text["mask"][..., None], text["embedding"], 9.0))
  np.testing.assert_array_equal(model(x, pos, t, idx, garbage)[0], v)
  leaky = dict(garbage, mask=garbage["mask"].at[2, 1].set(True))  # one padded key let through
  assert float(jnp.abs(model(x, pos, t, idx, leaky)[0] - v).max()) > 1e-3
  other = dict(text, embedding=text["embedding"] + 1.0)
  assert float(jnp.abs(model(x, pos, t, idx, other)[0] - v).max()) > 1e-3


def test_text_tokens_are_not_noised_masked_or_in_the_flow_loss(monkeypatch):
  """The step hands the model clean text and noises/masks only image tokens; the velocity (and so
  L_gen) covers image tokens only."""
  config = _config()
  config.objective.condition_dropout = 0.0
  model = factory.create_model(config, nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  seen = {}
  cls = type(model)
  original_call = cls.__call__

  def spy(self, x, pos_ids, t_table, t_index, text, modality):
    seen.update(x=x, t_index=t_index, text=text, modality=modality)
    return original_call(self, x, pos_ids, t_table, t_index, text, modality)

  monkeypatch.setattr(cls, "__call__", spy)
  size = config.data.image_size
  text = _text()
  batch = {"image": jnp.zeros((3, size, size, 1)), "text_embedding": text["embedding"],
           "text_mask": text["mask"]}
  loss_fn = train_step.make_loss_fn(config, graphdef, config_resolution.resolve(config).first_spec)
  loss, aux = loss_fn(params, params, batch, jax.random.PRNGKey(0))
  n_img = (size // config.model.patch_size) ** 2
  np.testing.assert_array_equal(seen["text"]["embedding"], text["embedding"])  # not noised
  np.testing.assert_array_equal(seen["text"]["mask"], text["mask"])
  assert seen["x"].shape[1] == n_img and seen["t_index"].shape == (3, n_img)  # mask: image only
  assert np.isfinite(float(loss)) and float(aux["loss_rep"]) >= 0


def test_changing_the_caption_changes_samples_and_cfg_one_is_conditional():
  config = _config()
  graphdef, params = _randomised(factory.create_model(config, nnx.Rngs(0)))
  model = nnx.merge(graphdef, params)
  x, pos = _image_inputs(config)
  text = _text()

  def velocity_fn(xs, t, cond):
    b, n, _ = xs.shape
    return model(xs, jnp.broadcast_to(pos[0], (b, n, 3)), t[:, None], jnp.zeros((b, n), jnp.int32),
                 cond)[0]

  x1 = jax.random.normal(jax.random.PRNGKey(5), x.shape)
  base = sampling.sample_ode(velocity_fn, x1, text, num_steps=4)
  other = dict(text, embedding=text["embedding"][::-1])
  changed = sampling.sample_ode(velocity_fn, x1, other, num_steps=4)
  assert float(jnp.abs(changed - base).max()) > 1e-3
  guided = sampling.guided_velocity_fn(velocity_fn, cfg_scale=1.0,
                                       null_cond=conditioning.null_like(text, 0))
  t = jnp.full((3,), 0.6)
  np.testing.assert_array_equal(guided(x1, t, text), velocity_fn(x1, t, text))
  strong = sampling.guided_velocity_fn(velocity_fn, cfg_scale=3.0,
                                       null_cond=conditioning.null_like(text, 0))
  assert float(jnp.abs(strong(x1, t, text) - velocity_fn(x1, t, text)).max()) > 1e-3


def test_text_dropout_is_the_empty_caption():
  text = {"tokens": jnp.ones((4, 3), jnp.int32), "mask": jnp.ones((4, 3), bool)}
  null = conditioning.null_like(text, 0)
  assert not bool(null["mask"].any()) and int(null["tokens"].max()) == 0
  dropped = conditioning.drop(jax.random.PRNGKey(0), {"tokens": jnp.ones((10_000, 2), jnp.int32),
                                                      "mask": jnp.ones((10_000, 2), bool)},
                              probability=0.1, null_class=0)
  assert abs(float((~dropped["mask"].any(1)).mean()) - 0.1) < 0.01
  labels = conditioning.drop(jax.random.PRNGKey(0), jnp.zeros((10_000,), jnp.int32),
                             probability=0.1, null_class=10)
  assert abs(float((labels == 10).mean()) - 0.1) < 0.01


def test_rope_lets_other_resolutions_be_sampled():
  config = _config()
  model = factory.create_model(config, nnx.Rngs(0))
  big = 42  # 6x6 patches instead of 4x4
  x = image.patchify(jnp.ones((3, big, big, 1)), config.model.patch_size)
  pos = jnp.broadcast_to(image.position_ids(big, big, config.model.patch_size), x.shape[:2] + (3,))
  v, _ = model(x, pos, jnp.full((3, 1), 0.5), jnp.zeros(x.shape[:2], jnp.int32), _text())
  assert v.shape == x.shape and bool(jnp.isfinite(v).all())


@pytest.mark.parametrize("bad", [(4, 4, 4), (2, 6)])
def test_bad_rope_dims_are_named(bad):
  config = _config(encoder="bytes")
  config.model.rope_axes_dims = bad
  with pytest.raises(ValueError, match="rope_axes_dims"):
    from self_flow import config_validation
    config_validation.validate(config, num_devices=8)


def test_train_a_few_steps_from_latent_shards(tmp_path):
  """Round trip: write latent + caption-embedding shards, then train and resume from them."""
  from self_flow import train
  shards = write_caption_latent_shards(str(tmp_path / "shards"), 40, num_shards=2)
  config = _config()
  config.data.dataset = "latent_shards"
  config.data.data_dir = shards
  config.data.image_size = 14  # 28x28 pixels -> 14x14x1 latents
  config.data.global_batch_size = 8
  config.text.embedding_dim = 256
  config.text.max_length = 8
  config.train.num_steps = 3
  config.train.log_every = 1
  config.train.checkpoint_every = 2
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert sorted(result["losses"]) == [1, 2, 3] and result["eval"] is None
  assert all(np.isfinite(v) for v in result["losses"].values())
  config.train.num_steps = 4
  resumed = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert sorted(resumed["losses"]) == [4]
