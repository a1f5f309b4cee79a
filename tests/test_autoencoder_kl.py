"""Tests for the Flax SD-VAE, its diffusers weight loader, the latent encoding tool, posterior
sampling in the trainer's shard pipeline, and the ImageNet-256 config training on encoded shards.

The diffusers layout is spelled out independently here (`diffusers_shapes`) and the layers are
checked against plain numpy written from the PyTorch definitions, so a naming or layout slip in
the loader cannot cancel out.
"""

import json
import os
import threading

from absl import flags
import jax
import ml_dtypes
import numpy as np
from flax import nnx
from PIL import Image
import pytest

from configs import c2i_imagenet256
from self_flow import base_config, config_resolution, config_validation, train
from self_flow.data import modality_sources, pipeline, sources
from self_flow.data.latent_shards import encoders, reader, writer
from self_flow.modalities import spec
from self_flow.models import autoencoder_kl, presets
from self_flow.tools import encode_latents
from tiny_hf_dirs import (diffusers_shapes, random_tensors, write_diffusers_dir,
                           write_safetensors)
from conftest import tiny

# Two levels (one downsample), one resnet per encoder level: 16x16 images -> 8x8x4 latents.
_TINY = autoencoder_kl.AutoencoderConfig(block_out_channels=(8, 16), layers_per_block=1,
                                         norm_num_groups=4)
# Four levels like SD-VAE (factor 8): 64x64 images -> 8x8x4 latents.
_TOOL_VAE = autoencoder_kl.AutoencoderConfig(block_out_channels=(8, 8, 16, 16),
                                             layers_per_block=1, norm_num_groups=4)


# --- Plain numpy layers from the PyTorch definitions (NHWC activations, PyTorch weights). ---


def _np_conv(x, weight, bias, stride=1, padding=((1, 1), (1, 1))):
  """Cross-correlation of NHWC `x` with an OIHW `weight`, explicit (before, after) padding."""
  _, _, kh, kw = weight.shape
  x = np.pad(x, ((0, 0), *padding, (0, 0)))
  out_h, out_w = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, weight.shape[0])) + bias
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
      out += patch @ weight[:, :, i, j].T
  return out


def _np_group_norm(x, groups, weight, bias, eps=1e-6):
  b, h, w, c = x.shape
  grouped = x.reshape(b, h, w, groups, c // groups)
  mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
  var = grouped.var(axis=(1, 2, 4), keepdims=True)
  return ((grouped - mean) / np.sqrt(var + eps)).reshape(x.shape) * weight + bias


def _silu(x):
  return x / (1 + np.exp(-x))


def _np_resnet(x, t, name, groups):
  h = _np_conv(_silu(_np_group_norm(x, groups, t[f"{name}.norm1.weight"],
                                    t[f"{name}.norm1.bias"])),
               t[f"{name}.conv1.weight"], t[f"{name}.conv1.bias"])
  h = _np_conv(_silu(_np_group_norm(h, groups, t[f"{name}.norm2.weight"],
                                    t[f"{name}.norm2.bias"])),
               t[f"{name}.conv2.weight"], t[f"{name}.conv2.bias"])
  if f"{name}.conv_shortcut.weight" in t:
    x = _np_conv(x, t[f"{name}.conv_shortcut.weight"], t[f"{name}.conv_shortcut.bias"],
                 padding=((0, 0), (0, 0)))
  return x + h


def _np_attention(x, t, name, groups, names=("to_q", "to_k", "to_v", "to_out.0")):
  b, h, w, c = x.shape
  tokens = _np_group_norm(x, groups, t[f"{name}.group_norm.weight"],
                          t[f"{name}.group_norm.bias"]).reshape(b, h * w, c)
  q, k, v, o = ((t[f"{name}.{n}.weight"].reshape(c, c), t[f"{name}.{n}.bias"]) for n in names)
  query, key, value = (tokens @ wt.T + bias for wt, bias in (q, k, v))
  logits = query @ key.transpose(0, 2, 1) / np.sqrt(c)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return x + ((weights @ value) @ o[0].T + o[1]).reshape(b, h, w, c)


# --- The model. ---


_encode = jax.jit(lambda model, images: model.encode(images))


def test_tiny_vae_encodes_and_decodes_with_diffusers_shapes_and_ranges(tmp_path):
  # Random weights from numpy: Flax's random init compiles one PRNG program per parameter shape
  # (about 18 s for this tiny model on the test machine), loading them takes a second.
  np.savez(tmp_path / "vae.npz", **random_tensors(diffusers_shapes(_TINY)))
  model = autoencoder_kl.load_autoencoder(str(tmp_path / "vae.npz"), _TINY)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  mean, std = _encode(model, images)
  assert mean.shape == std.shape == (2, 8, 8, 4) and mean.dtype == np.float32
  assert np.isfinite(mean).all() and (np.asarray(std) > 0).all()
  decoded = jax.jit(lambda m, z: m.decode(z))(model, mean)
  assert decoded.shape == (2, 16, 16, 3) and decoded.dtype == np.float32
  assert -1.0 <= float(decoded.min()) and float(decoded.max()) <= 1.0
  # The log-variance (second half of quant_conv's output) is clipped to [-30, 20].
  model.quant_conv.kernel.value = np.zeros((1, 1, 8, 8), np.float32)
  for logvar, clipped in ((100.0, 20.0), (-100.0, -30.0), (3.0, 3.0)):
    model.quant_conv.bias.value = np.array([0.5] * 4 + [logvar] * 4, np.float32)
    mean, std = _encode(model, images)
    np.testing.assert_allclose(mean, 0.5)
    np.testing.assert_allclose(std, np.exp(clipped / 2), rtol=1e-6)


def test_loader_puts_diffusers_weights_where_the_layers_use_them(tmp_path):
  # Encoder attention in the older names as 1x1 convs, decoder attention as linears.
  shapes = diffusers_shapes(_TINY, legacy_attention=frozenset({"encoder"}))
  tensors = random_tensors(shapes)
  low_precision = {"encoder.conv_in.bias": "F16", "post_quant_conv.weight": "BF16"}
  path = str(tmp_path / "vae.safetensors")
  write_safetensors(path, tensors, low_precision)
  model = autoencoder_kl.load_autoencoder(path, _TINY)
  groups = _TINY.norm_num_groups
  rng = np.random.default_rng(1)

  # Half-precision tensors arrive as float32 of their rounded values.
  tensors["encoder.conv_in.bias"] = tensors["encoder.conv_in.bias"].astype(np.float16)
  tensors["post_quant_conv.weight"] = tensors["post_quant_conv.weight"].astype(
      ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(model.encoder.conv_in.bias.value,
                                tensors["encoder.conv_in.bias"])
  x = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  np.testing.assert_allclose(
      model.encoder.conv_in(x),
      _np_conv(x, tensors["encoder.conv_in.weight"], tensors["encoder.conv_in.bias"]),
      rtol=1e-4, atol=1e-4)
  h = rng.normal(size=(2, 16, 16, 8)).astype(np.float32)
  name = "encoder.down_blocks.0.downsamplers.0.conv"
  np.testing.assert_allclose(  # stride 2, one zero row/column at the bottom/right only
      model.encoder.down_blocks[0].downsample(h),
      _np_conv(h, tensors[f"{name}.weight"], tensors[f"{name}.bias"], stride=2,
               padding=((0, 1), (0, 1))), rtol=1e-4, atol=1e-4)
  h = rng.normal(size=(2, 8, 8, 8)).astype(np.float32)
  np.testing.assert_allclose(  # 8 -> 16 channels: with conv_shortcut
      model.encoder.down_blocks[1].resnets[0](h),
      _np_resnet(h, tensors, "encoder.down_blocks.1.resnets.0", groups), rtol=1e-4, atol=1e-4)
  h = rng.normal(size=(2, 8, 8, 16)).astype(np.float32)
  np.testing.assert_allclose(
      model.encoder.mid_block.attention(h),
      _np_attention(h, tensors, "encoder.mid_block.attentions.0", groups,
                    ("query", "key", "value", "proj_attn")), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
      model.decoder.mid_block.attention(h),
      _np_attention(h, tensors, "decoder.mid_block.attentions.0", groups), rtol=1e-4, atol=1e-4)
  latents = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  np.testing.assert_allclose(
      model.post_quant_conv(latents),
      _np_conv(latents, tensors["post_quant_conv.weight"], tensors["post_quant_conv.bias"],
               padding=((0, 0), (0, 0))), rtol=1e-4, atol=1e-4)

  # The same tensors from an .npz give the same model.
  np.savez(tmp_path / "vae.npz", **tensors)
  from_npz = autoencoder_kl.load_autoencoder(str(tmp_path / "vae.npz"), _TINY)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param),
               nnx.state(from_npz, nnx.Param))


def test_loader_reads_a_diffusers_directory_with_its_config(tmp_path):
  write_diffusers_dir(tmp_path / "vae", _TOOL_VAE)
  model = autoencoder_kl.load_autoencoder(str(tmp_path / "vae"))
  assert model.config == _TOOL_VAE and model.config.downsampling_factor == 8
  mean, _ = jax.eval_shape(model.encode, jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32))
  assert mean.shape == (1, 8, 8, 4)
  with pytest.raises(ValueError, match="down_block_types"):
    autoencoder_kl.AutoencoderConfig.from_diffusers({"down_block_types": ["CrossAttnDownBlock2D"]})
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
    autoencoder_kl.load_autoencoder(str(tmp_path))


def test_loader_errors_name_every_bad_key(tmp_path):
  tensors = random_tensors(diffusers_shapes(_TINY))
  del tensors["decoder.conv_out.bias"]
  tensors["encoder.extra.weight"] = np.zeros(3, np.float32)
  tensors["quant_conv.weight"] = np.zeros((8, 8, 3, 3), np.float32)
  path = str(tmp_path / "bad.safetensors")
  write_safetensors(path, tensors)
  with pytest.raises(ValueError) as error:
    autoencoder_kl.load_autoencoder(path, _TINY)
  message = str(error.value)
  assert "1 missing keys: decoder.conv_out.bias" in message
  assert "1 unexpected keys: encoder.extra.weight" in message
  assert "quant_conv.weight has shape (8, 8, 3, 3), the model needs (8, 8, 1, 1)" in message

  with open(path, "r+b") as f:  # a dtype the reader does not know
    header_size = int.from_bytes(f.read(8), "little")
    header = f.read(header_size).replace(b'"F32"', b'"C64"', 1)
    f.seek(8)
    f.write(header)
  with pytest.raises(ValueError, match="has dtype 'C64'"):
    autoencoder_kl.read_weights(path)
  (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
  with pytest.raises(ValueError, match="header length .* exceeds the file size 64"):
    autoencoder_kl.read_weights(str(tmp_path / "junk.safetensors"))
  with pytest.raises(ValueError, match=r"unknown weights format '\.h5'"):
    autoencoder_kl.read_weights(str(tmp_path / "vae.h5"))


# --- The ImageNet-256 config. ---


@pytest.mark.parametrize("variant,layers", [("XL", (8, 20)), ("L", (7, 17)), ("B", (4, 8)),
                                            ("S", (4, 8))])
@pytest.mark.parametrize("method", sorted(base_config.METHODS))
def test_imagenet256_variants_validate_with_the_paper_settings(variant, layers, method):
  config = c2i_imagenet256.get_config(f"{variant},method={method}")
  with pytest.raises(ValueError, match="data_dir is empty"):  # the shard path is required
    config_validation.validate(config, num_devices=8)
  config.data.data_dir = "/shards"
  config_validation.validate(config, num_devices=8)
  dims = presets.resolve_dims(config.model.preset)
  assert presets.feature_layers(dims.depth) == layers and config.model.preset == variant
  assert spec.modality_specs(config)["image"].num_tokens == 256
  assert config.objective.noising == base_config.METHODS[method]["noising"]
  assert (config.data.image_size, config.data.num_channels, config.data.num_classes) == (
      32, 4, 1000)
  assert (config.sampling.method, config.sampling.num_steps) == ("sde", 250)
  assert config.data.latent_sampling == "posterior" and not config.eval.enabled
  with pytest.raises(ValueError, match="allowed: XL, L, B, S"):
    c2i_imagenet256.get_config("XXL")


# --- Preprocessing and the encode tool. ---


def test_adm_center_crop_keeps_the_central_square():
  red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
  wide = np.zeros((200, 400, 3), np.uint8)  # 100 red | 200 green | 100 blue columns
  wide[:, :100], wide[:, 100:300], wide[:, 300:] = red, green, blue
  for image in (wide, wide.transpose(1, 0, 2)):  # landscape and portrait
    crop = encode_latents.center_crop(Image.fromarray(image), 64)
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    # Only the green square survives (bicubic mixes colours at the crop edges only).
    interior = crop[3:-3, 3:-3].reshape(-1, 3).astype(int)
    assert np.abs(interior - green).max() <= 2
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  np.testing.assert_array_equal(encode_latents.center_crop(Image.fromarray(noise), 64), noise)
  grey = encode_latents.center_crop(Image.fromarray(noise[..., 0]), 32)
  assert grey.shape == (32, 32, 3) and (grey[..., 0] == grey[..., 2]).all()
  small = encode_latents.center_crop(Image.fromarray(noise[:20, :30]), 64)  # upsampled
  assert small.shape == (64, 64, 3)


def _image_folder(root, sizes_per_class: dict) -> list[str]:
  """class_name/i.png|jpg random images; returns the files in the tool's (sorted) order."""
  rng = np.random.default_rng(0)
  files = []
  for name, sizes in sorted(sizes_per_class.items()):
    os.makedirs(root / name)
    for i, (h, w) in enumerate(sizes):
      path = str(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
      Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
      files.append(path)
  return files


def test_shard_blocks_of_the_examples_make_up_the_whole_split(tmp_path):
  """The writer reads each shard's block as a slice: any cut into blocks (including one across
  the originals/flips boundary) gives the examples of the whole split, in order."""
  files = _image_folder(tmp_path / "images", {"a": [(12, 12)] * 3, "b": [(12, 16)] * 4})
  source = encode_latents.FolderSource(str(tmp_path / "images"))
  assert source.class_names == ["a", "b"] and len(source) == len(files)
  examples = encode_latents.CroppedExamples(source, len(files), True, 8, 2)
  whole = list(examples[0:len(examples)])  # all originals, then all flips
  assert len(examples) == len(whole) == 2 * len(files)
  assert [e["label"] for e in whole] == [0, 0, 0, 1, 1, 1, 1] * 2
  np.testing.assert_array_equal(whole[len(files)]["image"], whole[0]["image"][:, ::-1])
  for cuts in ((0, 3, 9, 14), (0, 7, 14), (0, 1, 2, 13, 14)):
    blocks = [item for a, b in zip(cuts, cuts[1:]) for item in examples[a:b]]
    for got, want in zip(blocks, whole, strict=True):
      np.testing.assert_array_equal(got["image"], want["image"])
      assert (got["label"], got["caption"]) == (want["label"], want["caption"])
  np.testing.assert_array_equal(examples[8]["image"], whole[8]["image"])


def test_processes_write_one_split_together(tmp_path):
  """Two writer processes (threads with a barrier) give the shards one process would write."""
  rng = np.random.default_rng(0)
  examples = [{"image": rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), "caption": "",
               "label": i} for i in range(11)]
  barrier = threading.Barrier(2)
  errors = []

  def write(index):
    try:
      writer.write_shards(
          examples, output_dir=str(tmp_path), split="train", num_shards=3,
          signal_encoder=encoders.avgpool2_encoder,
          text_encoder=encode_latents.no_text_encoder, batch_size=3,
          signal_encoder_name="avgpool2", text_encoder_name="none", process_index=index,
          process_count=2, barrier=lambda name: barrier.wait(timeout=60))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
      barrier.abort()

  threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not errors, errors
  source = reader.LatentShardSource(str(tmp_path), "train")
  assert [int(source[k]["label"]) for k in range(len(source))] == list(range(11))
  # 3 shards need not divide over 2 processes; each shard is a block, with its manifest.
  manifests = [json.loads((tmp_path / "manifests" / f"train-{i:05d}-of-00003.array_record.json"
                           ).read_text()) for i in range(3)]
  assert [m["num_records"] for m in manifests] == [3, 4, 4]


def _constant_posterior(signals):
  """Example k (an image filled with k) -> mean 10 k, std 0.5 everywhere."""
  mean = np.round((signals + 1.0) * 127.5) * 10.0
  return mean, np.full_like(mean, 0.5)


def _posterior_config(directory, sampling: str):
  config = c2i_imagenet256.get_config("S")
  config.data.data_dir = str(directory)
  config.data.image_size = 2
  config.data.num_channels = 4
  config.data.latent_sampling = sampling
  return config


def _epochs(config, seed: int, count: int, state=None):
  source = modality_sources.open_source(config, config_resolution.resolve(config).spec("image"),
                                        "train")
  preprocess, transforms = modality_sources.train_processing(config, "image")
  iterator = pipeline.make_train_iterator(
      source, global_batch_size=len(source), seed=seed, process_index=0, process_count=1,
      worker_count=0, preprocess=preprocess, transforms=transforms)
  if state is not None:
    iterator.set_state(state)
  return [next(iterator)["latent"] for _ in range(count)], iterator.get_state()


def test_posterior_sampling_is_fixed_by_seed_example_and_epoch(tmp_path):
  examples = [{"image": np.full((2, 2, 4), k, np.uint8), "caption": "", "label": 0}
              for k in range(12)]
  kwargs = dict(split="train", num_shards=2, text_encoder=encode_latents.no_text_encoder,
                batch_size=5, signal_encoder_name="constant", text_encoder_name="none")
  writer.write_shards(examples, output_dir=str(tmp_path / "posterior"),
                             signal_encoder=_constant_posterior, **kwargs)
  config = _posterior_config(tmp_path / "posterior", "posterior")

  (first, second), _ = _epochs(config, seed=3, count=2)  # one batch = one epoch
  again, _ = _epochs(config, seed=3, count=2)
  np.testing.assert_array_equal(np.stack(again), np.stack([first, second]))

  def noise_by_example(latents):  # example k has mean 10 k and std 0.5
    examples = np.round(latents.mean(axis=(1, 2, 3)) / 10).astype(int)
    assert sorted(examples) == list(range(12))
    return ((latents - 10.0 * examples[:, None, None, None]) / 0.5)[np.argsort(examples)]

  noise_first, noise_second = noise_by_example(first), noise_by_example(second)
  assert abs(noise_first.mean()) < 0.3 and 0.8 < noise_first.std() < 1.2
  assert not np.allclose(noise_first, noise_second)  # a fresh draw every epoch
  other_seed, _ = _epochs(config, seed=4, count=1)
  assert not np.allclose(noise_by_example(other_seed[0]), noise_first)
  _, state = _epochs(config, seed=3, count=1)  # resumed after epoch 0: epoch 1 as before
  resumed, _ = _epochs(config, seed=3, count=1, state=state)
  np.testing.assert_array_equal(resumed[0], second)

  (means,), _ = _epochs(_posterior_config(tmp_path / "posterior", "mean"), seed=3, count=1)
  np.testing.assert_array_equal(np.sort(means.mean(axis=(1, 2, 3))), 10.0 * np.arange(12))
  writer.write_shards(examples, output_dir=str(tmp_path / "means_only"),
                             signal_encoder=lambda s: _constant_posterior(s)[0], **kwargs)
  with pytest.raises(ValueError, match="latent_sampling='posterior' needs shards with"):
    config = _posterior_config(tmp_path / "means_only", "posterior")
    modality_sources.open_source(config, config_resolution.resolve(config).spec("image"), "train")


def test_encode_tool_writes_shards_the_imagenet_config_trains_on(tmp_path):
  files = _image_folder(tmp_path / "images", {"cat": [(64, 64)] * 3, "dog": [(64, 80)] * 3})
  write_diffusers_dir(tmp_path / "tiny-vae", _TOOL_VAE)
  output_dir = str(tmp_path / "latents")
  options = flags.FlagValues()
  encode_latents.define_flags(options)
  options(["encode_latents", f"--output_dir={output_dir}", f"--vae_path={tmp_path / 'tiny-vae'}",
           "--source=folder", f"--image_dir={tmp_path / 'images'}", "--image_size=64",
           "--flip", "--num_shards=2", "--batch_size=8", "--num_workers=2"])
  metadata = encode_latents.run(options)

  assert metadata["splits"]["train"]["num_examples"] == 2 * len(files)
  assert metadata["fields"]["latent"] == metadata["fields"]["latent_std"] == {
      "shape": [8, 8, 4], "dtype": "float16"}
  assert metadata["latent_scale"] == pytest.approx(0.18215)
  assert metadata["signal_encoder"] == "autoencoder_kl:tiny-vae"
  source = reader.LatentShardSource(output_dir, "train")
  model = autoencoder_kl.load_autoencoder(str(tmp_path / "tiny-vae"))
  checked = [0, 4, 6, 11]  # cat, dog, flipped cat, flipped dog
  images = [encode_latents.center_crop(Image.open(files[k % len(files)]), 64) for k in checked]
  images = [image[:, ::-1] if k >= len(files) else image for image, k in zip(images, checked)]
  means, stds = _encode(model, np.stack(images).astype(np.float32) / 127.5 - 1.0)
  for index, mean, std in zip(checked, means, stds):
    record = source[index]
    np.testing.assert_allclose(record["latent"], 0.18215 * mean, rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(record["latent_std"], 0.18215 * std, rtol=2e-3, atol=2e-4)
    assert int(record["label"]) == (index % len(files) >= 3)
    assert record["caption"] == ("dog" if index % len(files) >= 3 else "cat")

  # The tiny model on the 8x8x4 latents (the preset's patch 2), in float32.
  config = tiny(c2i_imagenet256.get_config("S"), {
      "model.depth": 3,  # feature layers 1 and 2 by the 0.3/0.7 rule
      "model.patch_size": 2, "model.compute_dtype": "float32", "data.data_dir": output_dir,
      "data.image_size": 8, "data.num_classes": 2, "data.worker_count": 0,
      "train.num_steps": 2, "train.log_every": 1})
  result = train.train_and_evaluate(config, str(tmp_path / "workdir"))
  assert sorted(result["losses"]) == [1, 2] and result["eval"] is None
  assert all(np.isfinite(loss) for loss in result["losses"].values())


def test_tfds_source_reads_images_labels_and_class_names(fashion_mnist_dir):
  source = encode_latents.TfdsSource("fashion_mnist_local", "train", fashion_mnist_dir)
  assert len(source) == 60_000 and source.class_names[:2] == ["t-shirt/top", "trouser"]
  records = sources.open_image_source("fashion_mnist", "train", fashion_mnist_dir, "debian")
  for index, loader in zip(range(5, 20), source.loaders(5, 20), strict=True):
    image, label = loader()
    assert label == int(records[index]["label"])
    np.testing.assert_array_equal(np.asarray(image), records[index]["image"][..., 0])
  examples = list(encode_latents.CroppedExamples(source, 3, False, 16, 2)[0:3])
  assert [e["caption"] for e in examples] == [source.class_names[e["label"]] for e in examples]
  assert examples[0]["image"].shape == (16, 16, 3)
