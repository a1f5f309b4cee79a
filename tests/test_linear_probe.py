"""Linear probe (per-layer features, the probe classifier, the null condition) and the loss
stratified by timestep."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import t2i
from self_flow import objectives, train_state
from self_flow.evaluation import linear_probe, stratified_loss
from self_flow.modalities import spec as spec_lib
from self_flow.models import factory
from conftest import random_params, tiny
from equivalence import assert_equivalent, assert_fault_detected, rounding_bound

NUM_CLASSES = 10


def _random_model(config, scale: float):
  """(graphdef, params) with every parameter random (conftest.random_params), built under jit:
  several times faster than building eagerly op by op on 8 fake devices."""
  init = lambda: random_params(factory.create_model(config, nnx.Rngs(0)), scale)[1]
  return train_state.model_graphdef(config), jax.jit(init)()


def _dit(make_config):
  config = make_config()
  graphdef, params = _random_model(config, 0.2)
  return config, graphdef, params, spec_lib.modality_specs(config)["image"]


def _pattern_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Float images (n, 28, 28, 1) in [-1, 1]: faint noise plus, on one random 7x7 patch (a token
  of the tiny model), a fixed random +-1 pattern per class. Pooling over tokens keeps the
  pattern, so pooled features of any model that does not destroy its input carry the class."""
  patterns = np.sign(np.random.default_rng(0).normal(size=(NUM_CLASSES, 7, 7, 1)))
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, NUM_CLASSES, n)
  images = rng.uniform(-0.3, 0.3, (n, 28, 28, 1)).astype(np.float32)
  for picture, label, (row, col) in zip(images, labels, 7 * rng.integers(0, 4, (n, 2))):
    picture[row:row + 7, col:col + 7] = patterns[label]
  return images, labels


def _features(graphdef, params, spec, images, labels, layers, t=0.0):
  """(layers, n, D) pooled features conditioned on `labels`."""
  tokens = spec.tokenize(jnp.asarray(images))
  fn = jax.jit(linear_probe.make_features_fn(graphdef, spec, layers))
  noise = linear_probe.probe_noise(len(images), spec)
  return np.asarray(fn(params, tokens, noise, jnp.asarray(labels), t)).transpose(1, 0, 2)


@functools.partial(jax.jit, static_argnums=0)
def _teacher_features_jitted(graphdef, params, x, pos, t, cond):
  b, n, _ = x.shape
  return nnx.merge(graphdef, params).teacher_features(
      x, pos, jnp.full((b, 1), t), jnp.zeros((b, n), jnp.int32), cond)


def _teacher_features(graphdef, params, spec, x, t, cond):
  """The model's own teacher forward (hidden state after `teacher_layer`) at timestep t."""
  pos = jnp.broadcast_to(spec.position_ids, x.shape[:2] + (3,))
  return _teacher_features_jitted(graphdef, params, x, pos, t, cond)


# The probe classifier on synthetic features.


def test_probe_sees_which_layer_is_linearly_separable():
  rng = np.random.default_rng(0)
  n, dim = 600, 16
  labels = rng.integers(0, NUM_CLASSES, 2 * n)
  noise = rng.normal(size=(2, 2 * n, dim))
  class_means = 3.0 * rng.normal(size=(NUM_CLASSES, dim))
  separable = noise[1] + class_means[labels]
  features = np.stack([noise[0], separable]).astype(np.float32)  # layer 0 random, layer 1 not
  accuracy = linear_probe.fit_and_score(features[:, :n], labels[:n], features[:, n:], labels[n:],
                                        num_classes=NUM_CLASSES, ridge=1e-3)
  assert accuracy.shape == (2,)
  assert accuracy[1] > 0.95
  assert accuracy[0] < 0.2  # chance is 0.1
  # Closed form: the same features give the same accuracy, with nothing to tune.
  np.testing.assert_array_equal(accuracy, linear_probe.fit_and_score(
      features[:, :n], labels[:n], features[:, n:], labels[n:], num_classes=NUM_CLASSES,
      ridge=1e-3))


def test_ridge_is_the_least_squares_solution():
  """With a vanishing penalty the ridge map recovers an exact linear target (intercept
  included), and the reference cosine of features that determine the reference is 1."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(200, 5))
  weights, intercept = rng.normal(size=(5, 3)), rng.normal(size=3)
  y = x @ weights + intercept
  np.testing.assert_allclose(linear_probe.ridge_predict(x, y, x[:7], 1e-12), y[:7], atol=1e-8)
  cosine = linear_probe.reference_cosine(x[None, :150], y[:150], x[None, 150:], y[150:],
                                         ridge=1e-12)
  assert cosine.shape == (1,) and cosine[0] == pytest.approx(1.0, abs=1e-9)
  unrelated = linear_probe.reference_cosine(x[None, :150], y[:150], x[None, 150:],
                                            rng.normal(size=(50, 3)), ridge=1e-3)
  assert abs(unrelated[0]) < 0.5


def test_probe_rejects_bad_inputs():
  features = np.zeros((2, 8, 4), np.float32)
  labels = np.zeros(8, np.int64)
  with pytest.raises(ValueError, match=r"agree in layers and dim"):
    linear_probe.fit_and_score(features, labels, features[:1], labels, num_classes=2,
                               ridge=1e-3)
  with pytest.raises(ValueError, match=r"train labels .* in \[0, 2\)"):
    linear_probe.fit_and_score(features, labels + 5, features, labels, num_classes=2,
                               ridge=1e-3)
  with pytest.raises(ValueError, match="ridge=0"):
    linear_probe.fit_and_score(features, labels, features, labels, num_classes=2, ridge=0)
  with pytest.raises(ValueError, match="one row per example"):
    linear_probe.reference_cosine(features, np.zeros((3, 2)), features, np.zeros((8, 2)),
                                  ridge=1e-3)
  for bad in ((), (0.5, 0.5), (1.5,), ("0.5",)):
    with pytest.raises(ValueError, match="probe_timesteps=.*distinct noise levels in"):
      linear_probe.check_timesteps(bad)
  linear_probe.check_timesteps((0, 0.25, 1.0))


def test_resolve_layers():
  assert linear_probe.resolve_layers((), 4) == (1, 2, 3, 4)
  assert linear_probe.resolve_layers((3, 1), 4) == (1, 3)
  for bad in ((0,), (5,), (2, 2), (1.5,)):
    with pytest.raises(ValueError, match=r"probe_layers=.*\[1, 4\]"):
      linear_probe.resolve_layers(bad, 4)


# Layer features of real models.


def test_dit_features_are_the_pooled_block_outputs(make_config):
  config, graphdef, params, spec = _dit(make_config)
  images, _ = _pattern_images(4, seed=1)
  null = np.full(4, NUM_CLASSES)
  t = 0.3
  every = _features(graphdef, params, spec, images, null, (1, 2, 3, 4), t)
  some = _features(graphdef, params, spec, images, null, (2, 3), t)
  assert every.shape == (4, 4, config.model.hidden_size)
  # Same model, other set of taps: equal up to the forward's rounding (bound 960 x eps).
  bound = rounding_bound(config.model.depth * (7 * config.model.hidden_size + 16))
  assert_equivalent(some, every[1:3], bound=bound)
  assert_fault_detected(every[0:2], every[1:3], bound=bound, fault="the taps one layer off")
  # Layer 3 is the teacher layer of the tiny model: the teacher forward on the same input.
  tokens = spec.tokenize(jnp.asarray(images))
  x_t = (1 - t) * tokens + t * linear_probe.probe_noise(4, spec)
  teacher = _teacher_features(graphdef, params, spec, x_t, t, null)
  assert nnx.merge(graphdef, params).teacher_layer == 3
  assert_equivalent(every[2], np.asarray(teacher).mean(1), bound=bound)
  assert_fault_detected(every[1], np.asarray(teacher).mean(1), bound=bound,
                        fault="the tap one layer before the teacher's")
  assert np.abs(every[0] - every[3]).max() > 1e-3  # the layers do differ


def test_mmdit_features_are_the_pooled_block_outputs():
  config = tiny(t2i.get_config("local"), {"model.depth": 3, "model.num_double": 1,
                                          "text.encoder": "bytes"})
  graphdef, params = _random_model(config, 0.1)
  spec = spec_lib.modality_specs(config)["image"]
  images, _ = _pattern_images(3, seed=2)
  tokens = spec.tokenize(jnp.asarray(images))
  null_text = {"tokens": np.zeros((3, 6), np.int32), "mask": np.zeros((3, 6), bool)}
  fn = jax.jit(linear_probe.make_features_fn(graphdef, spec, (1, 2, 3)))
  features = np.asarray(fn(params, tokens, np.zeros_like(tokens), null_text, 0.0))
  teacher = _teacher_features(graphdef, params, spec, tokens, 0.0, null_text)
  # Block 2 is a single-stream block: the image part of [text, image].
  assert nnx.merge(graphdef, params).teacher_layer == 2
  bound = rounding_bound(config.model.depth * (7 * config.model.hidden_size + 6 + 16))
  assert_equivalent(features[:, 1], np.asarray(teacher).mean(1), bound=bound)
  assert_fault_detected(features[:, 0], np.asarray(teacher).mean(1), bound=bound,
                        fault="the tap one layer before the teacher's")


def test_probe_on_a_tiny_model_tells_real_labels_from_shuffled(make_config):
  """Class-dependent images through a random tiny DiT: the probe finds the class in the
  features of every probed layer, and nothing when the labels carry no information."""
  _, graphdef, params, spec = _dit(make_config)
  images, labels = _pattern_images(600, seed=3)
  features = _features(graphdef, params, spec, images, np.full(600, NUM_CLASSES), (2, 4))
  shuffled = np.random.default_rng(4).permutation(labels)

  def probe(targets):
    return linear_probe.fit_and_score(features[:, :450], targets[:450], features[:, 450:],
                                      targets[450:], num_classes=NUM_CLASSES, ridge=1e-3)

  assert probe(labels).min() > 0.5
  assert probe(shuffled).max() < 0.25  # chance is 0.1


@pytest.mark.parametrize("t", [0.25, 0.5, 0.75])
def test_probe_of_a_model_that_ignores_its_input_scores_chance_under_noise(make_config, t):
  """The same tiny DiT with its input projection zeroed sees only positions and t: its pooled
  features are the same for every image, and the probe at noise level t scores what predicting
  the train split's majority class scores on the test split. The intact model, on the same
  noised inputs, is the control (its class pattern on every token, so that it survives t =
  0.75)."""
  _, graphdef, params, spec = _dit(make_config)
  _, labels = _pattern_images(2000, seed=3)
  patterns = np.sign(np.random.default_rng(0).normal(size=(NUM_CLASSES, 7, 7, 1)))
  images = np.tile(patterns[labels], (1, 4, 4, 1)).astype(np.float32)
  null = np.full(2000, NUM_CLASSES)
  blind = jax.tree.map(lambda p: p, params)
  blind["input_proj"] = jax.tree.map(jnp.zeros_like, params["input_proj"])

  def probe(model_params):
    features = _features(graphdef, model_params, spec, images, null, (2, 4), t)
    return linear_probe.fit_and_score(features[:, :1500], labels[:1500], features[:, 1500:],
                                      labels[1500:], num_classes=NUM_CLASSES, ridge=1e-3)

  majority = np.bincount(labels[:1500], minlength=NUM_CLASSES).argmax()
  chance = np.mean(labels[1500:] == majority)
  blind_accuracy, accuracy = probe(blind), probe(params)
  np.testing.assert_allclose(blind_accuracy, chance, atol=0.02)  # 500 test images: sd 0.013
  assert accuracy.min() > chance + 0.1


def test_true_labels_would_leak_through_the_conditioning(make_config):
  """Why the probe feeds the null class: on images with no class information, features
  conditioned on the true label are linearly separable by label; with the null class they are
  not."""
  _, graphdef, params, spec = _dit(make_config)
  rng = np.random.default_rng(5)
  images = rng.uniform(-1, 1, (300, 28, 28, 1)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, 300)
  settings = dict(num_classes=NUM_CLASSES, ridge=1e-3)

  def probe(cond):
    features = _features(graphdef, params, spec, images, cond, (1,))
    return linear_probe.fit_and_score(features[:, :200], labels[:200], features[:, 200:],
                                      labels[200:], **settings)[0]

  assert probe(labels) > 0.9
  assert probe(np.full(300, NUM_CLASSES)) < 0.3


# Stratified loss.


def test_bin_names_and_timesteps(make_config):
  assert stratified_loss.metric_names("image", 10)[0] == "eval/image/loss_t0.0-0.1"
  assert stratified_loss.metric_names("image", 10)[-1] == "eval/image/loss_t0.9-1.0"
  assert stratified_loss.metric_names("video", 4) == [
      "eval/video/loss_t0.00-0.25", "eval/video/loss_t0.25-0.50", "eval/video/loss_t0.50-0.75",
      "eval/video/loss_t0.75-1.00"]
  spec = spec_lib.modality_specs(make_config())["image"]
  t, noise = stratified_loss.draw(50, 5, spec)
  assert t.shape == (5, 50) and noise.shape == (50, spec.num_tokens, spec.token_dim)
  for k, row in enumerate(t):
    assert np.all((row >= k / 5) & (row < (k + 1) / 5))
    assert row.std() > 0.02  # spread inside the bin, not its centre
  again_t, again_noise = stratified_loss.draw(50, 5, spec)
  np.testing.assert_array_equal(t, again_t)  # the same draw for every run
  np.testing.assert_array_equal(noise, again_noise)
  with pytest.raises(ValueError, match="num_bins=0"):
    stratified_loss.bin_edges(0)


def test_stratified_loss_is_the_flow_loss_at_the_bin_timesteps(make_config):
  config, graphdef, params, spec = _dit(make_config)
  images, labels = _pattern_images(6, seed=6)
  x0 = spec.tokenize(jnp.asarray(images))
  timesteps, noise = stratified_loss.draw(6, 2, spec)
  loss = jax.jit(stratified_loss.make_loss_fn(graphdef, spec))
  pos = jnp.broadcast_to(spec.position_ids, x0.shape[:2] + (3,))

  @jax.jit
  def training_loss(params, t):
    """The training objective's own noising and loss, with every token at t."""
    t_tok = jnp.broadcast_to(t[:, None], x0.shape[:2])
    x_t, _ = objectives.noise_tokens(x0, noise, t_tok, t_tok, jnp.zeros(x0.shape[:2], bool))
    velocity, _ = nnx.merge(graphdef, params)(x_t, pos, t[:, None],
                                              jnp.zeros(x0.shape[:2], jnp.int32), labels)
    return objectives.flow_loss(velocity, x0, noise)

  per_bin = []
  for t in timesteps:
    per_example = np.asarray(loss(params, x0, noise, t, labels))
    assert per_example.shape == (6,)
    np.testing.assert_allclose(per_example.mean(), training_loss(params, t), rtol=1e-5)
    per_bin.append(per_example.mean())
  assert abs(per_bin[0] - per_bin[1]) > 1e-4  # the bins see different timesteps
