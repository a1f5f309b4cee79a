"""The trainer's program built once (`train_program`): abstract batches match the real input
pipeline, and the abstract lowering is the step the loop runs."""

import jax
import numpy as np
import pytest

from configs import t2i, t2v
from conftest import write_caption_latent_shards
from self_flow import config_resolution, train_program, train_state
from self_flow.data import modality_sources, pipeline


def _first_batch(config, modality: str) -> dict[str, np.ndarray]:
  spec = config_resolution.resolve(config).spec(modality)
  preprocess, transforms = modality_sources.train_processing(config, modality)
  iterator = pipeline.make_train_iterator(
      modality_sources.open_source(config, spec, "train"),
      global_batch_size=spec.global_batch_size, seed=0, process_index=0, process_count=1,
      worker_count=0, preprocess=preprocess, transforms=transforms)
  return next(iterator)


def _assert_matches(config, modality: str, batch):
  program = train_program.build(config, config_resolution.resolve(config))
  abstract = train_program.abstract_batch(config, program, modality)
  assert set(abstract) <= set(batch), (sorted(abstract), sorted(batch))
  for key, shape in abstract.items():
    assert (shape.shape, np.dtype(shape.dtype)) == (batch[key].shape, batch[key].dtype), key


def test_abstract_batch_matches_embedded_images_with_captions(fashion_mnist_dir):
  config = t2i.get_config("local")
  config.data.data_dir = fashion_mnist_dir
  config.data.global_batch_size = 16
  _assert_matches(config, "image", _first_batch(config, "image"))


def test_abstract_batch_matches_embedded_video(video_data_dir):
  config = t2v.get_config("local")
  config.video.data_dir = video_data_dir
  config.video.global_batch_size = 8
  _assert_matches(config, "video", _first_batch(config, "video"))


def _latent_shard_config(shards: str):
  config = t2i.get_config("local")
  config.text.encoder = "precomputed"
  config.data.dataset = "latent_shards"
  config.data.data_dir = shards
  config.data.image_size = 14
  config.model.patch_size = 7
  config.data.global_batch_size = 8
  config.text.embedding_dim = 256
  config.text.max_length = 8
  return config


def test_abstract_batch_matches_latent_shards(tmp_path):
  config = _latent_shard_config(write_caption_latent_shards(str(tmp_path / "shards"), 16))
  _assert_matches(config, "image", _first_batch(config, "image"))


def test_stored_float16_caption_embeddings_train_as_their_float32_widening(tmp_path):
  """The pipeline hands caption embeddings over in their 16-bit storage dtype and the step
  widens them: the step's loss and new parameters are those of the float32 batch the host
  used to build, bit for bit."""
  config = _latent_shard_config(write_caption_latent_shards(str(tmp_path / "shards"), 16))
  batch = _first_batch(config, "image")
  assert batch["text_embedding"].dtype == np.float16
  widened = {**batch, "text_embedding": batch["text_embedding"].astype(np.float32)}
  program = train_program.build(config, config_resolution.resolve(config))
  rng = jax.device_put(jax.random.PRNGKey(0), program.replicated)
  results = []
  for host_batch in (batch, widened):
    state = train_state.create_train_state(config, program.layout, program.tx)
    device_batch = pipeline.make_global_batch(host_batch, program.batch_sharding)
    results.append(program.step_fns["image"](state, device_batch, rng))
  (state_16, metrics_16), (state_32, metrics_32) = results
  assert float(metrics_16["loss"]) == float(metrics_32["loss"])
  for leaf_16, leaf_32 in zip(jax.tree.leaves(state_16["params"]),
                              jax.tree.leaves(state_32["params"])):
    np.testing.assert_array_equal(np.asarray(leaf_16), np.asarray(leaf_32))


def test_abstract_lowering_is_the_step_the_loop_compiles(make_config):
  """Lowered from shapes alone, the step takes exactly the state and batch layout that real
  arrays give it (same shardings), so an AOT compile is the loop's compile."""
  config = make_config()
  program = train_program.build(config, config_resolution.resolve(config))
  compiled = train_program.lower(config, program, "image").compile()
  (state_shardings, batch_shardings, rng_sharding), _ = compiled.input_shardings
  assert jax.tree.leaves(state_shardings) == jax.tree.leaves(program.layout.shardings)
  assert all(s == program.batch_sharding for s in jax.tree.leaves(batch_shardings))
  assert rng_sharding == program.replicated
  state = train_state.create_train_state(config, program.layout, program.tx)
  batch = {k: jax.device_put(np.zeros(v.shape, v.dtype), v.sharding)
           for k, v in train_program.abstract_batch(config, program, "image").items()}
  rng = jax.device_put(jax.random.PRNGKey(0), program.replicated)
  new_state, metrics = compiled(state, batch, rng)
  assert int(new_state["step"]) == 1 and np.isfinite(float(metrics["loss"]))


def test_build_refuses_a_mostly_replicated_fsdp_layout(make_config):
  config = make_config()
  config.mesh.data, config.mesh.fsdp = 1, 8
  config.mesh.rules = "dp"
  with pytest.raises(ValueError, match="replicated"):
    train_program.build(config, config_resolution.resolve(config))
