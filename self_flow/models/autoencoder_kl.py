"""The Stable Diffusion VAE (diffusers `AutoencoderKL`) in Flax NNX, with a torch-free loader.

Why it is here: the paper's ImageNet-256 runs train on SD-VAE latents (`stabilityai/sd-vae-ft-ema`,
32x32x4 for 256x256 images, scaled by `SD_VAE_SCALE`) and decode samples with the same VAE. The
images are encoded once (`self_flow.tools.encode_latents`) and samples decoded by the evaluation
tools, so the trainer never runs it. There is no torch in this project: weights are read from the
diffusers `diffusion_pytorch_model.safetensors` file (or an `.npz` holding the same tensors) by
the small reader below, and converted from PyTorch layouts.

Architecture (NHWC, `AutoencoderConfig` gives the sizes; SD-VAE: channels 128, 256, 512, 512):

* encoder: conv_in 3x3 -> one down block per channel count (`layers_per_block` ResnetBlocks, then
  a 3x3 stride-2 conv on the input padded by one row and column at the bottom and right, except
  after the last block) -> mid block (ResnetBlock, single-head self-attention, ResnetBlock) ->
  GroupNorm + SiLU + conv_out 3x3 to 2 * latent channels; then quant_conv 1x1. The first half of
  the channels is the posterior mean, the second its log-variance.
* decoder: post_quant_conv 1x1 -> conv_in 3x3 -> mid block -> one up block per channel count in
  reverse (`layers_per_block + 1` ResnetBlocks, then nearest 2x upsampling + 3x3 conv, except
  after the last block) -> GroupNorm + SiLU + conv_out 3x3 to the image channels.

Every GroupNorm has eps 1e-6 and runs in float32. Parameter names follow diffusers', except that
single-element module lists are plain attributes (`downsamplers.0.conv` is `downsample`,
`upsamplers.0.conv` is `upsample`, `attentions.0` is `attention`, `to_out.0` is `to_out`);
`torch_name` maps one to the other.
"""

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx, traverse_util

from self_flow import storage, weight_files

# Latents are multiplied by this before diffusion training (and divided before decoding).
SD_VAE_SCALE = 0.18215
# The weight file inside a diffusers model directory, and its architecture description.
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
CONFIG_FILE = "config.json"
# diffusers clips the posterior log-variance to this range before taking exp.
LOGVAR_RANGE = (-30.0, 20.0)
_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """Sizes of the autoencoder; the defaults are SD-VAE's (sd-vae-ft-ema / sd-vae-ft-mse)."""

  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # Channels per resolution level.
  layers_per_block: int = 2  # ResnetBlocks per encoder level (the decoder has one more).
  latent_channels: int = 4  # Channels of the latent; the encoder predicts twice as many.
  image_channels: int = 3  # Channels of the images (diffusers' in_channels / out_channels).
  norm_num_groups: int = 32  # Groups of every GroupNorm; must divide every channel count.

  def __post_init__(self):
    channels = tuple(self.block_out_channels)
    object.__setattr__(self, "block_out_channels", channels)
    if not channels or any(not isinstance(c, int) or c < 1 for c in channels):
      raise ValueError(f"block_out_channels={channels} must be one or more positive integers.")
    for name in ("layers_per_block", "latent_channels", "image_channels", "norm_num_groups"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1.")
    bad = [c for c in channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every entry of "
                       f"block_out_channels={channels}; it does not divide {bad}.")

  @property
  def downsampling_factor(self) -> int:
    """Image side / latent side (8 for SD-VAE)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, diffusers_config: Mapping) -> "AutoencoderConfig":
    """The config of a diffusers `AutoencoderKL` config.json, refusing layouts not built here."""
    expected = {"_class_name": "AutoencoderKL", "act_fn": "silu", "mid_block_add_attention": True,
                "use_quant_conv": True, "use_post_quant_conv": True}
    for key, value in expected.items():
      if key in diffusers_config and diffusers_config[key] != value:
        raise ValueError(f"diffusers config {key}={diffusers_config[key]!r} is not supported; "
                         f"this AutoencoderKL implements {key}={value!r}.")
    for key, block in (("down_block_types", "DownEncoderBlock2D"),
                       ("up_block_types", "UpDecoderBlock2D")):
      kinds = diffusers_config.get(key, [block])
      if any(kind != block for kind in kinds):
        raise ValueError(f"diffusers config {key}={kinds} is not supported; only {block}.")
    in_channels = diffusers_config.get("in_channels", 3)
    if diffusers_config.get("out_channels", in_channels) != in_channels:
      raise ValueError(f"diffusers config in_channels={in_channels} and out_channels="
                       f"{diffusers_config['out_channels']} differ; they must be equal.")
    defaults = cls()
    return cls(
        block_out_channels=tuple(diffusers_config.get("block_out_channels",
                                                      defaults.block_out_channels)),
        layers_per_block=diffusers_config.get("layers_per_block", defaults.layers_per_block),
        latent_channels=diffusers_config.get("latent_channels", defaults.latent_channels),
        image_channels=in_channels,
        norm_num_groups=diffusers_config.get("norm_num_groups", defaults.norm_num_groups),
    )


class GroupNorm(nnx.GroupNorm):
  """GroupNorm in float32 (two-pass variance, as torch) whatever the compute dtype."""

  def __init__(self, channels: int, groups: int, rngs: nnx.Rngs):
    super().__init__(channels, num_groups=groups, epsilon=_NORM_EPS, dtype=jnp.float32,
                     use_fast_variance=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return super().__call__(x.astype(jnp.float32)).astype(x.dtype)


def _conv(in_ch: int, out_ch: int, kernel: int, rngs: nnx.Rngs, dtype, *, stride: int = 1,
          padding="SAME") -> nnx.Conv:
  return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=stride, padding=padding, dtype=dtype,
                  rngs=rngs)


class ResnetBlock(nnx.Module):
  """diffusers ResnetBlock2D without time embedding: x + conv2(act(norm2(conv1(act(norm1(x))))))
  with a 1x1 conv on the shortcut when the channel count changes."""

  def __init__(self, in_ch: int, out_ch: int, groups: int, dtype, rngs: nnx.Rngs):
    self.norm1 = GroupNorm(in_ch, groups, rngs)
    self.conv1 = _conv(in_ch, out_ch, 3, rngs, dtype)
    self.norm2 = GroupNorm(out_ch, groups, rngs)
    self.conv2 = _conv(out_ch, out_ch, 3, rngs, dtype)
    self.conv_shortcut = _conv(in_ch, out_ch, 1, rngs, dtype) if in_ch != out_ch else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
    return shortcut + h


class AttentionBlock(nnx.Module):
  """Single-head self-attention over all positions, GroupNorm first, residual added back.

  The logits and softmax are float32 (diffusers upcasts the softmax of this block).
  """

  def __init__(self, channels: int, groups: int, dtype, rngs: nnx.Rngs):
    self.group_norm = GroupNorm(channels, groups, rngs)
    linear = lambda: nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)  # noqa: E731
    self.to_q, self.to_k, self.to_v, self.to_out = linear(), linear(), linear(), linear()

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    tokens = self.group_norm(x).reshape(batch, height * width, channels)
    q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits / math.sqrt(channels), axis=-1)
    attended = jnp.einsum("bqk,bkc->bqc", weights.astype(v.dtype), v)
    return x + self.to_out(attended).reshape(batch, height, width, channels)


class MidBlock(nnx.Module):
  """ResnetBlock, attention, ResnetBlock at the lowest resolution."""

  def __init__(self, channels: int, groups: int, dtype, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(channels, channels, groups, dtype, rngs)
                             for _ in range(2)])
    self.attention = AttentionBlock(channels, groups, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.resnets[1](self.attention(self.resnets[0](x)))


class DownBlock(nnx.Module):
  """ResnetBlocks, then (except at the last level) a stride-2 conv halving the resolution."""

  def __init__(self, in_ch: int, out_ch: int, num_layers: int, downsample: bool, groups: int,
               dtype, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, dtype, rngs)
                             for i in range(num_layers)])
    # diffusers pads (0, 1, 0, 1): one zero row at the bottom and one column at the right only.
    self.downsample = (_conv(out_ch, out_ch, 3, rngs, dtype, stride=2,
                             padding=((0, 1), (0, 1))) if downsample else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    return x if self.downsample is None else self.downsample(x)


class UpBlock(nnx.Module):
  """ResnetBlocks, then (except at the last level) nearest 2x upsampling and a 3x3 conv."""

  def __init__(self, in_ch: int, out_ch: int, num_layers: int, upsample: bool, groups: int,
               dtype, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, dtype, rngs)
                             for i in range(num_layers)])
    self.upsample = _conv(out_ch, out_ch, 3, rngs, dtype) if upsample else None

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    if self.upsample is None:
      return x
    return self.upsample(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Encoder(nnx.Module):
  """Images (B, H, W, image_channels) -> (B, H/f, W/f, 2 * latent_channels) moments."""

  def __init__(self, config: AutoencoderConfig, dtype, rngs: nnx.Rngs):
    channels, groups = config.block_out_channels, config.norm_num_groups
    self.conv_in = _conv(config.image_channels, channels[0], 3, rngs, dtype)
    self.down_blocks = nnx.List([
        DownBlock(channels[max(i - 1, 0)], out_ch, config.layers_per_block,
                  i < len(channels) - 1, groups, dtype, rngs)
        for i, out_ch in enumerate(channels)])
    self.mid_block = MidBlock(channels[-1], groups, dtype, rngs)
    self.conv_norm_out = GroupNorm(channels[-1], groups, rngs)
    self.conv_out = _conv(channels[-1], 2 * config.latent_channels, 3, rngs, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """Latents (B, h, w, latent_channels) -> images (B, h*f, w*f, image_channels)."""

  def __init__(self, config: AutoencoderConfig, dtype, rngs: nnx.Rngs):
    channels, groups = config.block_out_channels[::-1], config.norm_num_groups
    self.conv_in = _conv(config.latent_channels, channels[0], 3, rngs, dtype)
    self.mid_block = MidBlock(channels[0], groups, dtype, rngs)
    self.up_blocks = nnx.List([
        UpBlock(channels[max(i - 1, 0)], out_ch, config.layers_per_block + 1,
                i < len(channels) - 1, groups, dtype, rngs)
        for i, out_ch in enumerate(channels)])
    self.conv_norm_out = GroupNorm(channels[-1], groups, rngs)
    self.conv_out = _conv(channels[-1], config.image_channels, 3, rngs, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(x))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """The KL autoencoder: `encode` gives the diagonal Gaussian posterior, `decode` the images.

  Parameters are float32; `dtype` is the compute dtype of the convolutions and linears (float32
  by default: latents are written once, so exactness beats speed; bfloat16 for fast decoding).
  """

  def __init__(self, config: AutoencoderConfig = AutoencoderConfig(), *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = config
    latent = config.latent_channels
    self.encoder = Encoder(config, dtype, rngs)
    self.decoder = Decoder(config, dtype, rngs)
    self.quant_conv = _conv(2 * latent, 2 * latent, 1, rngs, dtype)
    self.post_quant_conv = _conv(latent, latent, 1, rngs, dtype)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images (B, H, W, C) in [-1, 1] -> float32 (mean, std), each (B, H/f, W/f, latent).

    The log-variance is clipped to `LOGVAR_RANGE` before std = exp(logvar / 2), as diffusers'
    DiagonalGaussianDistribution does. Latents are unscaled (multiply by SD_VAE_SCALE to train).
    """
    moments = self.quant_conv(self.encoder(images)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.exp(0.5 * jnp.clip(logvar, *LOGVAR_RANGE))

  def decode(self, latents: jax.Array) -> jax.Array:
    """Unscaled latents (B, h, w, latent) -> float32 images (B, h*f, w*f, C) clipped to [-1, 1]."""
    images = self.decoder(self.post_quant_conv(latents)).astype(jnp.float32)
    return jnp.clip(images, -1.0, 1.0)


# --- Weights: the conversion from diffusers' PyTorch state dict. ---

# nnx attribute -> diffusers module path, for the single-element lists diffusers keeps.
_TORCH_MODULES = {"downsample": "downsamplers.0.conv", "upsample": "upsamplers.0.conv",
                  "attention": "attentions.0", "to_out": "to_out.0"}
# Current diffusers attention names -> the names of older checkpoints (diffusers AttentionBlock).
_LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
# How many names of each kind an error lists before summarising the rest as a count.
_MAX_LISTED = 8


def read_weights(path: str) -> dict[str, np.ndarray]:
  """A PyTorch-layout state dict as float32 numpy, from a .safetensors (diffusers), .npz or
  torch .pt/.bin file (`self_flow.weight_files`, which never runs code from the file)."""
  weights = weight_files.load_state_dict(path)
  return {name: np.asarray(value, np.float32) for name, value in weights.items()}


def torch_name(path: tuple) -> str:
  """The diffusers state-dict name of the nnx parameter at `path` (e.g. ('encoder', 'conv_in',
  'kernel') -> 'encoder.conv_in.weight')."""
  *modules, leaf = (str(part) for part in path)
  leaf = "weight" if leaf in ("kernel", "scale") else leaf
  return ".".join([_TORCH_MODULES.get(module, module) for module in modules] + [leaf])


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape of a parameter of nnx shape `shape`: OIHW convs, (out, in) linears."""
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:
    return (shape[1], shape[0])
  return shape


def _from_torch(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
  """`value` in PyTorch layout -> nnx layout of `shape`, or None if the shapes do not match.

  Attention projections are linears (out, in) in current diffusers files and 1x1 convs
  (out, in, 1, 1) in older ones; both are accepted.
  """
  if len(shape) == 2 and value.ndim == 4 and value.shape[2:] == (1, 1):
    value = value[:, :, 0, 0]
  if value.ndim != len(shape):
    return None
  if len(shape) == 4:
    value = value.transpose(2, 3, 1, 0)
  elif len(shape) == 2:
    value = value.T
  return value if value.shape == shape else None


def _candidates(name: str) -> list[str]:
  """Names `name` may have in a checkpoint: itself, or its older (AttentionBlock) name."""
  for new, old in _LEGACY_ATTENTION.items():
    marker = f".attentions.0.{new}."
    if marker in name:
      return [name, name.replace(marker, f".attentions.0.{old}.")]
  return [name]


def _listed(names: list[str]) -> str:
  shown = ", ".join(names[:_MAX_LISTED])
  return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def load_state_dict(model: AutoencoderKL, weights: Mapping[str, np.ndarray],
                    source: str = "the state dict") -> None:
  """Sets every parameter of `model` from a diffusers `AutoencoderKL` state dict (PyTorch layout).

  Raises:
    ValueError: naming every missing, unexpected and wrongly shaped key at once.
  """
  params = nnx.state(model, nnx.Param)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(params))
  missing, wrong_shape, loaded, used = [], [], {}, set()
  for path, current in flat.items():
    name = torch_name(path)
    found = next((n for n in _candidates(name) if n in weights), None)
    if found is None:
      missing.append(name)
      continue
    used.add(found)
    value = _from_torch(np.asarray(weights[found]), tuple(current.shape))
    if value is None:
      wrong_shape.append(f"{found} has shape {tuple(np.shape(weights[found]))}, the model needs "
                         f"{_torch_shape(tuple(current.shape))}")
      continue
    loaded[path] = jnp.asarray(value, current.dtype)
  unexpected = sorted(set(weights) - used)
  if missing or unexpected or wrong_shape:
    problems = [f"{len(names)} {kind}: {_listed(names)}" for kind, names in (
        ("missing keys", missing), ("unexpected keys", unexpected),
        ("wrongly shaped keys", wrong_shape)) if names]
    raise ValueError(f"Cannot load {source} into AutoencoderKL({model.config}): "
                     + "; ".join(problems) + ". Is it a diffusers AutoencoderKL of this config?")
  nnx.replace_by_pure_dict(params, traverse_util.unflatten_dict(loaded))
  nnx.update(model, params)


def _resolve_paths(path: str) -> tuple[str, str | None]:
  """(weight file, its config.json or None) for a weight file or a diffusers model directory,
  local or a URL (gs://...)."""
  if storage.is_dir(path):
    weights = storage.join(path, WEIGHTS_FILE)
    if not storage.exists(weights):
      raise FileNotFoundError(f"{path!r} is a directory without {WEIGHTS_FILE}; pass the "
                              "diffusers VAE directory (e.g. sd-vae-ft-ema/) or a weight file.")
  elif storage.exists(path):
    weights = path
  else:
    raise FileNotFoundError(f"VAE weights {path!r} do not exist.")
  config = storage.join(epath.Path(weights).parent, CONFIG_FILE)
  return weights, config if storage.exists(config) else None


def load_autoencoder(path: str, config: AutoencoderConfig | None = None, *,
                     dtype=jnp.float32) -> AutoencoderKL:
  """The AutoencoderKL with the weights of a diffusers VAE.

  Args:
    path: A diffusers VAE directory (holding diffusion_pytorch_model.safetensors and
      config.json, e.g. a download of stabilityai/sd-vae-ft-ema), a .safetensors file, or an
      .npz of the same tensor names in PyTorch layout; local or a URL (gs://...).
    config: The architecture; default: the config.json next to the weights when there is one,
      else SD-VAE's.
    dtype: Compute dtype (parameters stay float32).

  Raises:
    FileNotFoundError: nothing at `path`.
    ValueError: an unsupported config, or weights that do not fit it (every bad key named).
  """
  weights_path, config_path = _resolve_paths(path)
  if config is None and config_path is not None:
    config = AutoencoderConfig.from_diffusers(storage.read_json(config_path))
  config = config or AutoencoderConfig()
  # Built abstractly: every parameter is replaced by the file's, so random init would be waste.
  model = nnx.eval_shape(lambda: AutoencoderKL(config, dtype=dtype, rngs=nnx.Rngs(0)))
  load_state_dict(model, read_weights(weights_path), source=repr(weights_path))
  return model
