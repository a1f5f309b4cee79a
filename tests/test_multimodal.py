"""Joint multi-modal training: the modality mixture, per-modality specs and model projections."""

from absl.testing import flagsaver
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from configs import multimodal
from self_flow import config_resolution, mixture, train, train_step
from self_flow.modalities import spec as spec_lib
from self_flow.models import factory
from self_flow.tools import write_latent_shards
from conftest import random_params, tiny

PAPER = {"image": 0.57, "video": 0.30, "audio": 0.13}


def test_schedule_draws_the_configured_frequencies():
  schedule = mixture.ModalitySchedule(PAPER, seed=3)
  draws = schedule.sequence(0, 20_000)
  for name, p in PAPER.items():
    frequency = draws.count(name) / len(draws)
    # 4 binomial standard deviations (<= 0.014 at n = 20k): fails for any real bias.
    assert abs(frequency - p) < 4 * np.sqrt(p * (1 - p) / len(draws)), (name, frequency)


def test_schedule_is_a_function_of_seed_and_step():
  a, b = mixture.ModalitySchedule(PAPER, seed=3), mixture.ModalitySchedule(PAPER, seed=3)
  assert a.sequence(100, 200) == [b(step) for step in range(100, 200)]
  assert a.sequence(0, 200) != mixture.ModalitySchedule(PAPER, seed=4).sequence(0, 200)
  # No hidden state: asking out of order gives the same answers.
  assert [a(s) for s in reversed(range(50))] == list(reversed(a.sequence(0, 50)))


def test_single_modality_schedule():
  assert set(mixture.ModalitySchedule({"video": 1.0}, seed=0).sequence(0, 50)) == {"video"}


@pytest.mark.parametrize("probabilities", [{}, {"image": 0.5, "video": 0.6},
                                           {"image": 1.0, "audio": 0.0}])
def test_schedule_rejects_bad_probabilities(probabilities):
  with pytest.raises(ValueError, match="must be > 0 and sum to 1"):
    mixture.ModalitySchedule(probabilities, seed=0)


def tiny_multimodal_config():
  """configs/multimodal.py:local shrunk to a few milliseconds per step, with captions of 8 tokens
  as the latent shards written below carry (text_max_length=8)."""
  return tiny(multimodal.get_config("local"), {"text.max_length": 8})


def _random_batch(spec, batch, max_length, seed):
  rng = np.random.default_rng(seed)
  return {spec.signal_key: rng.uniform(-1, 1, (batch, *spec.signal_shape)).astype(np.float32),
          "label": np.zeros((batch,), np.int32),
          "text_tokens": rng.integers(1, 200, (batch, max_length)).astype(np.int32),
          "text_mask": np.ones((batch, max_length), bool)}


@pytest.mark.parametrize("name", spec_lib.MODALITIES)
def test_specs_tokenize_round_trip_with_one_position_per_token(name):
  spec = spec_lib.modality_specs(tiny_multimodal_config())[name]
  signal = np.random.default_rng(0).normal(size=(2, *spec.signal_shape)).astype(np.float32)
  tokens = spec.tokenize(signal)
  assert tokens.shape == (2, spec.num_tokens, spec.token_dim)
  np.testing.assert_array_equal(spec.detokenize(tokens), signal)
  assert spec.position_ids.shape == (spec.num_tokens, 3)
  assert len({tuple(p) for p in spec.position_ids}) == spec.num_tokens  # all distinct


def test_each_modality_has_its_own_projections_and_shares_the_rest():
  config = tiny_multimodal_config()
  config.objective.condition_dropout = 0.0
  specs = spec_lib.modality_specs(config)
  graphdef, params = random_params(factory.create_model(config, nnx.Rngs(0)), 0.05)
  assert set(params["inputs"]) == set(params["outputs"]) == set(spec_lib.MODALITIES)
  loss_fn = train_step.make_loss_fn(config, graphdef, specs["video"])
  batch = _random_batch(specs["video"], 4, config.text.max_length, seed=1)
  grads = jax.grad(lambda p: loss_fn(p, params, batch, jax.random.PRNGKey(0))[0])(params)
  norm = lambda tree: float(optax.global_norm(tree))
  assert norm(grads["inputs"]["video"]) > 0 and norm(grads["outputs"]["video"]) > 0
  for other in ("image", "audio"):  # untouched by a video batch
    assert norm(grads["inputs"][other]) == 0 and norm(grads["outputs"][other]) == 0
  assert norm(grads["single_blocks"]) > 0 and norm(grads["double_blocks"]) > 0  # shared
  with pytest.raises(ValueError, match="modality='smell' is not trained"):
    config_resolution.resolve(config).spec("smell")


def test_loss_weight_scales_only_its_modality():
  config = tiny_multimodal_config()
  graphdef, params = random_params(factory.create_model(config, nnx.Rngs(0)), 0.05)
  specs = spec_lib.modality_specs(config)
  batch = _random_batch(specs["audio"], 4, config.text.max_length, seed=2)
  loss = lambda c: float(train_step.make_loss_fn(
      c, graphdef, config_resolution.resolve(c).spec("audio"))(
      params, params, batch, jax.random.PRNGKey(0))[0])
  base = loss(config)
  config.mixture.loss_weights.audio = 0.25
  np.testing.assert_allclose(loss(config), 0.25 * base, rtol=1e-5)
  config.mixture.loss_weights.image = 7.0
  np.testing.assert_allclose(loss(config), 0.25 * base, rtol=1e-5)


def test_joint_run_resumes_the_same_modality_sequence(tmp_path, fashion_mnist_dir,
                                                      video_data_dir, audio_data_dir):
  """8 steps straight vs 4 steps + restart to 8: same modality per step, same losses. (The
  evaluation of every modality, with its samples, is tests/test_notebooks.py's multimodal run.)"""
  config = tiny_multimodal_config()
  config.data.data_dir, config.data.source = fashion_mnist_dir, "debian"
  config.video.data_dir, config.audio.data_dir = video_data_dir, audio_data_dir
  config.mixture.probabilities.update(image=0.4, video=0.3, audio=0.3)
  config.train.num_steps = 8
  config.train.checkpoint_every = 4
  config.train.log_every = 2
  config.eval.enabled = False
  straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
  expected = mixture.ModalitySchedule(
      {n: s.probability for n, s in spec_lib.modality_specs(config).items()},
      config.seed).sequence(0, 8)
  assert [straight["modalities"][s] for s in range(1, 9)] == expected
  assert set(expected) == set(spec_lib.MODALITIES)  # the test exercises all three

  config.train.num_steps = 4
  train.train_and_evaluate(config, str(tmp_path / "restarted"))
  config.train.num_steps = 8
  resumed = train.train_and_evaluate(config, str(tmp_path / "restarted"))
  assert sorted(resumed["losses"]) == [5, 6, 7, 8] and resumed["eval"] is None
  for step in range(5, 9):
    assert resumed["modalities"][step] == straight["modalities"][step]
    np.testing.assert_allclose(resumed["losses"][step], straight["losses"][step], rtol=1e-5)


def test_joint_run_from_video_and_audio_latent_shards(tmp_path, video_data_dir, audio_data_dir):
  """The pod path: clips and speech pre-encoded by the CLI train one model jointly and resume."""
  for modality, data_dir in (("video", video_data_dir), ("audio", audio_data_dir)):
    with flagsaver.flagsaver(output_dir=str(tmp_path / modality), modality=modality,
                             data_dir=data_dir, splits=["train"], num_shards=2,
                             text_max_length=8, max_examples=16, batch_size=16):
      write_latent_shards.main(["write_latent_shards"])
  config = tiny_multimodal_config()
  config.modalities = ("video", "audio")
  config.mixture.probabilities.update(video=0.5, audio=0.5)
  for section in (config.video, config.audio):
    section.dataset = "latent_shards"
  config.video.data_dir, config.audio.data_dir = str(tmp_path / "video"), str(tmp_path / "audio")
  config.video.image_size = 16  # 32x32 frames pooled 2x2 by the built-in avgpool2 encoder
  config.text.encoder = "precomputed"  # the shards carry caption embeddings
  config.text.embedding_dim = 256  # from the CLI's bytes text encoder
  config.train.num_steps = 4
  config.train.checkpoint_every = 2
  config.train.log_every = 1
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  expected = mixture.ModalitySchedule(
      {n: s.probability for n, s in spec_lib.modality_specs(config).items()},
      config.seed).sequence(0, 4)
  assert [result["modalities"][s] for s in range(1, 5)] == expected
  assert set(expected) == {"video", "audio"}  # both streams were read
  assert sorted(result["losses"]) == [1, 2, 3, 4] and result["eval"] is None
  assert all(np.isfinite(v) for v in result["losses"].values())
  config.train.num_steps = 5
  resumed = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert sorted(resumed["losses"]) == [5]
