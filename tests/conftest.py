"""Test session set-up: 8 fake CPU devices (before JAX is first used) and tiny configs."""

import tempfile

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
# Tests that restart a run compile the same steps again; a session-wide persistent cache turns
# those recompiles (about 50 s each for a tiny 3-modality model on 8 fake devices) into loads.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="jax_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

import os  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402
import pytest  # noqa: E402

import self_flow  # noqa: E402,F401  (sets the Flax flags the package needs)
from configs import c2i  # noqa: E402
from self_flow.data import fashion_mnist_local, moving_sprites, sources, spoken_words  # noqa: E402

# grain starts worker processes outside an absl app in tests.
flags.FLAGS.mark_as_parsed()


# The tiny model every test shrinks its run config to: small enough for many compiles per test
# run (about 10 ms per step). Dotted keys, so that the tests of the command line and of the
# notebooks pass the very same model as flags or overrides. Data parallel whatever the preset's
# layout: a tiny model has nothing worth sharding.
TINY_MODEL = {
    "model.preset": "custom", "model.hidden_size": 32, "model.num_heads": 2, "model.depth": 4,
    "model.patch_size": 7, "data.global_batch_size": 8, "optim.warmup_steps": 0,
    "mesh.data": -1, "mesh.fsdp": 1}
# Added for an MMDiT: 2 double + 2 single blocks, a 3-D RoPE over the 16-dim heads (images use
# only the row and column axes) and a small byte-level text encoder.
TINY_MMDIT = {"model.num_double": 2, "model.rope_axes_dims": (2, 6, 8), "text.width": 16,
              "text.max_length": 6}


def override(config, overrides: dict):
  """`config` with each dotted key of `overrides` ("optim.warmup_steps") set, in place. A key
  the config lacks is an error, so that a misspelt override cannot silently test nothing."""
  for key, value in overrides.items():
    *sections, name = key.split(".")
    target = config
    for section in sections:
      target = target[section]
    if name not in target:
      raise KeyError(f"the config has no key {key!r}")
    target[name] = value
  return config


def tiny_overrides(config) -> dict:
  """The dotted keys that shrink run config `config` to the tiny model, by what it runs: the
  MMDiT keys for an MMDiT, and a batch for every modality of a joint model."""
  keys = dict(TINY_MODEL)
  if config.model.architecture == "mmdit":
    keys.update(TINY_MMDIT)
  for name in config.modalities:
    if name != "image":  # the image batch is data.global_batch_size
      keys[f"{name}.global_batch_size"] = TINY_MODEL["data.global_batch_size"]
  if "video" in config.modalities:
    keys["model.rope_axes_dims"] = (4, 6, 6)  # more of each head on the clips' time axis
  return keys


def tiny(config, overrides: dict | None = None):
  """Any run config (c2i, t2i, multimodal, ...) shrunk to the tiny model, then a test's own
  `overrides` (dotted keys), which win."""
  return override(config, {**tiny_overrides(config), **(overrides or {})})


def tiny_config(method: str = "self_flow", overrides: dict | None = None):
  """configs/c2i.py:local with `method`, shrunk to the tiny model."""
  return tiny(c2i.get_config(f"local,method={method}"), overrides)


def tiny_run_config(data_dir: str, tmp_path, num_steps: int, method: str = "self_flow"):
  """The tiny c2i config as a whole run on embedded Fashion-MNIST (`data_dir`): `num_steps`
  steps, a checkpoint every 3, and a small final evaluation whose classifier is cached under
  `tmp_path`."""
  config = tiny_config(method)
  config.data.data_dir = data_dir
  config.data.source = "debian"
  config.train.num_steps = num_steps
  config.train.log_every = 1
  config.train.checkpoint_every = 3
  config.eval.num_samples = 24
  config.eval.batch_size = 24  # divisible by the 8-device batch axes
  config.eval.grid_rows = 1
  config.eval.classifier_steps = 30
  config.eval.cache_dir = str(tmp_path / "eval_cache")
  config.sampling.num_steps = 3
  return config


def random_params(model, scale: float, seed: int = 0):
  """(graphdef, params) of `model` with every parameter, including the zero-initialised adaLN,
  replaced by noise, so that tests see non-trivial modulation."""
  graphdef, params = nnx.split(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(params))
  # numpy's generator: jax.random eagerly compiles one program per distinct leaf shape (~7 s for
  # the tiny MMDiT's 48 leaves on one core).
  rng = np.random.default_rng(seed)
  return graphdef, jax.tree.unflatten(
      treedef, [jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype) for x in leaves])


def write_caption_latent_shards(output_dir: str, num_examples: int, num_shards: int = 1) -> str:
  """Latent shards of random 28x28 images (avgpool2 -> 14x14x1 latents) with byte-encoded
  caption embeddings (8 x 256), for text-to-image runs from shards."""
  from self_flow.data.latent_shards import encoders, writer  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  examples = [{"image": rng.integers(0, 256, (28, 28, 1), dtype=np.uint8),
               "caption": f"a photo of item {i}", "label": i % 10} for i in range(num_examples)]
  writer.write_shards(
      examples, output_dir=output_dir, split="train", num_shards=num_shards,
      signal_encoder=encoders.avgpool2_encoder,
      text_encoder=encoders.bytes_text_encoder(8),
      batch_size=16, signal_encoder_name="avgpool2", text_encoder_name="bytes")
  return output_dir


@pytest.fixture
def make_config():
  return tiny_config


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory):
  """One TFDS data dir with Fashion-MNIST built from the Debian files, shared by all tests."""
  if not os.path.isdir(fashion_mnist_local.DEBIAN_DIR):
    pytest.skip(f"{fashion_mnist_local.DEBIAN_DIR} is absent: the README's test command installs "
                "it (apt-get install -y dataset-fashion-mnist).")
  path = str(tmp_path_factory.mktemp("tfds"))
  sources.open_image_source("fashion_mnist", "train", path, source="debian")
  return path


@pytest.fixture(scope="session")
def video_data_dir(tmp_path_factory):
  """A TFDS data dir with the moving-sprites clips (built in seconds from the Debian files)."""
  path = str(tmp_path_factory.mktemp("tfds_video"))
  moving_sprites.open_video_source("train", path)
  return path


@pytest.fixture(scope="session")
def audio_data_dir(tmp_path_factory):
  """A TFDS data dir with the spoken words (espeak-ng, about 8 s on 2 cores)."""
  path = str(tmp_path_factory.mktemp("tfds_audio"))
  spoken_words.open_audio_source("train", path)
  return path
