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


def tiny_config(method: str = "self_flow"):
  """A model small enough for many compiles per test run (about 10 ms per step)."""
  config = c2i.get_config(f"local,method={method}")
  config.model.hidden_size = 32
  config.model.depth = 4
  config.model.num_heads = 2
  config.model.patch_size = 7
  config.data.global_batch_size = 8
  config.optim.warmup_steps = 0
  config.mesh.data = -1
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
  from self_flow.data import latent_shards  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  examples = [{"image": rng.integers(0, 256, (28, 28, 1), dtype=np.uint8),
               "caption": f"a photo of item {i}", "label": i % 10} for i in range(num_examples)]
  latent_shards.write_shards(
      examples, output_dir=output_dir, split="train", num_shards=num_shards,
      signal_encoder=latent_shards.avgpool2_encoder,
      text_encoder=latent_shards.bytes_text_encoder(8),
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
