"""The T5 / T5 v1.1 / UMT5 text encoder in Flax NNX, loading Hugging Face weight files.

Why it is here: text-to-image models at scale condition on a frozen T5 v1.1 XXL (FLUX's
`text_encoder_2`, PixArt, SD3) or UMT5 XXL (Wan) encoder. Its per-token outputs are computed
offline by a data-encoding job (`T5TextEncoder`) or inside a jitted step (`encode`), on the same
accelerators and with the same sharding names as the trained model, and without torch: weights
are read from the `model.safetensors` / `pytorch_model.bin` files (single or sharded by an
`.index.json`) of a Hugging Face directory by `self_flow.weight_files`, local or on gs://.

The result is transformers' `T5EncoderModel(...).last_hidden_state` (or `UMT5EncoderModel`):

* token embedding `shared` (no scaling, no position embedding);
* per block: RMS norm (no mean, no bias) -> self-attention without bias and without the
  1/sqrt(d_kv) logit scale, plus a learned bias per head over bidirectional relative-position
  buckets -> residual; RMS norm -> ReLU MLP (`feed_forward_proj="relu"`, original T5) or
  tanh-GELU-gated MLP ("gated-gelu", T5 v1.1 / FLAN-T5 / UMT5) -> residual;
* final RMS norm. Dropout is off (a frozen encoder).

T5 learns one relative-position table (in block 0) and shares its bias with every block; UMT5
learns one per block. Keys where `mask` is False are hidden (logits set to the float32 minimum,
as transformers and `models.attention` do), so outputs at real positions do not depend on padded
tokens; outputs at padded positions are kept as transformers computes them. Pipelines that run
T5 without a mask (FLUX, SD3: padding attended like text) are matched by an all-True mask.

The residual stream, every norm and the attention softmax are float32 whatever `dtype`, the
compute dtype of the linear layers (bfloat16 halves their cost; the normalisation does not
lose precision to it).
Parameters carry the logical axis names of `models.layers` ("vocab", "embed", "heads", "mlp");
norm scales stay replicated, as the DiT's; `self_flow.sharding` maps names to the mesh.
"""

import dataclasses
import functools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from self_flow import sharding, storage, weight_files
from self_flow.models import layers
from self_flow.text import t5_tokenizer

CONFIG_FILE = "config.json"
# The weight layouts of a Hugging Face model directory, in the order they are looked for.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_INDEX_SUFFIX = ".index.json"
# feed_forward_proj -> (activation, gated), as transformers' T5Config reads it: "gated-gelu" runs
# `gelu_new`, the tanh approximation, and "relu" is ungated.
_FEED_FORWARD = {"relu": (jax.nn.relu, False),
                 "gated-gelu": (functools.partial(jax.nn.gelu, approximate=True), True)}
# transformers' defaults per model_type: config.json leaves out the values equal to them.
_HF_DEFAULTS = {
    "t5": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
               relative_attention_num_buckets=32, relative_attention_max_distance=128,
               feed_forward_proj="relu", layer_norm_epsilon=1e-6),
    "umt5": dict(vocab_size=250112, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6),
}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Sizes of a T5-family encoder, named as in Hugging Face's config.json."""

  vocab_size: int
  d_model: int  # Width of the residual stream (and of the output).
  d_kv: int  # Width of one attention head; num_heads * d_kv need not be d_model.
  d_ff: int  # MLP hidden width.
  num_layers: int
  num_heads: int
  relative_attention_num_buckets: int
  relative_attention_max_distance: int  # Relative distances beyond it share the last bucket.
  feed_forward_proj: str  # "relu" (original T5) or "gated-gelu" (T5 v1.1, FLAN-T5, UMT5).
  layer_norm_epsilon: float
  model_type: str  # "t5": one relative-position table, shared; "umt5": one per block.

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1.")
    if self.feed_forward_proj not in _FEED_FORWARD:
      raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r} is not supported; "
                       f"allowed: {sorted(_FEED_FORWARD)}.")
    if self.model_type not in _HF_DEFAULTS:
      raise ValueError(f"model_type={self.model_type!r} is not supported; allowed: "
                       f"{sorted(_HF_DEFAULTS)}.")
    buckets, distance = self.relative_attention_num_buckets, self.relative_attention_max_distance
    # Bidirectional buckets: half per direction, half of those exact (max_exact = buckets // 4).
    if not isinstance(buckets, int) or buckets < 4:
      raise ValueError(f"relative_attention_num_buckets={buckets!r} must be an integer >= 4.")
    if not isinstance(distance, int) or distance <= buckets // 4:
      raise ValueError(f"relative_attention_max_distance={distance!r} must be an integer above "
                       f"relative_attention_num_buckets // 4 = {buckets // 4}.")
    if not self.layer_norm_epsilon > 0:
      raise ValueError(f"layer_norm_epsilon={self.layer_norm_epsilon!r} must be > 0.")

  @classmethod
  def from_huggingface(cls, hf_config: Mapping) -> "T5Config":
    """The config of a Hugging Face T5 / UMT5 config.json (keys it omits take transformers'
    defaults for its model_type)."""
    model_type = hf_config.get("model_type")
    if model_type not in _HF_DEFAULTS:
      raise ValueError(f"model_type={model_type!r} is not supported; allowed: "
                       f"{sorted(_HF_DEFAULTS)} (T5, T5 v1.1, FLAN-T5 and UMT5 encoders).")
    defaults = _HF_DEFAULTS[model_type]
    return cls(model_type=model_type, **{key: hf_config.get(key, value)
                                         for key, value in defaults.items()})


# Released encoders by name, for programs that need only their shapes (ahead-of-time
# compilation, FLOP counts) and no weights: the config.json values of google/t5-v1_1-xxl (the
# text encoder of FLUX, SD3 and PixArt) and google/umt5-xxl (Wan).
PRESETS = {
    "t5-v1_1-xxl": dict(model_type="t5", vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240,
                        num_layers=24, num_heads=64, relative_attention_num_buckets=32,
                        relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                        layer_norm_epsilon=1e-6),
    "umt5-xxl": dict(model_type="umt5", vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240,
                     num_layers=24, num_heads=64, relative_attention_num_buckets=32,
                     relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                     layer_norm_epsilon=1e-6),
}


def read_config(path: str) -> T5Config:
  """The config of the encoder at `path` (a directory or a weights file beside config.json), or
  of a `PRESETS` name."""
  if path in PRESETS:
    return T5Config(**PRESETS[path])
  config_path, _ = _locate(path)
  try:
    return T5Config.from_huggingface(storage.read_json(config_path))
  except ValueError as error:
    raise ValueError(f"{config_path}: {error}") from None


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """(length, length) int32 bucket of key position - query position, bidirectional.

  transformers' `T5Attention._relative_position_bucket` in numpy with its float32 arithmetic:
  half the buckets per direction; in each, distances below num_buckets // 4 get one bucket each
  and larger ones logarithmically wider buckets up to max_distance, beyond which all share the
  last. The table depends only on static sizes, so it is computed at trace time, identically on
  every backend (an accelerator's log could move a distance across a bucket boundary).
  """
  positions = np.arange(length)
  relative = positions[None, :] - positions[:, None]
  half = num_buckets // 2
  max_exact = half // 2
  distance = np.abs(relative)
  scaled = (np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
            / np.float32(np.log(max_distance / max_exact)) * np.float32(half - max_exact))
  large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
  buckets = (relative > 0) * half + np.where(distance < max_exact, distance, large)
  return buckets.astype(np.int32)


def _precision(dtype):
  """float32 compute means float32 products on every backend (TPU and GPU default to bfloat16
  or TF32 passes, an error of 1e-3 in embeddings that are written once); other dtypes use the
  backend's default."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _linear(in_dim: int, out_dim: int, axes: tuple[str, str], rngs: nnx.Rngs, *, dtype,
            param_dtype) -> layers.Dense:
  """A bias-free Linear with logical axis names on its kernel."""
  return layers.Dense(in_dim, out_dim, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                      precision=_precision(dtype),
                      kernel_init=nnx.with_partitioning(layers.xavier, axes), rngs=rngs)


class RMSNorm(nnx.Module):
  """T5's LayerNorm: x / sqrt(mean(x^2) + eps) * scale in float32 (no mean, no bias)."""

  def __init__(self, dim: int, eps: float, *, param_dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(variance + self.eps) * self.scale.value.astype(jnp.float32)


class SelfAttention(nnx.Module):
  """Unscaled multi-head self-attention with an additive relative-position bias per head."""

  def __init__(self, config: T5Config, has_relative_bias: bool, rngs: nnx.Rngs, *, dtype,
               param_dtype):
    self.config = config
    self.dtype = dtype
    inner = config.num_heads * config.d_kv
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.q = _linear(config.d_model, inner, ("embed", "heads"), rngs, **kw)
    self.k = _linear(config.d_model, inner, ("embed", "heads"), rngs, **kw)
    self.v = _linear(config.d_model, inner, ("embed", "heads"), rngs, **kw)
    self.o = _linear(inner, config.d_model, ("heads", "embed"), rngs, **kw)
    self.relative_attention_bias = nnx.Embed(
        config.relative_attention_num_buckets, config.num_heads, dtype=jnp.float32,
        param_dtype=param_dtype, embedding_init=nnx.with_partitioning(
            layers.normal_002, (None, "heads")), rngs=rngs) if has_relative_bias else None

  def position_bias(self, length: int) -> jax.Array:
    """(num_heads, length, length) float32 bias from this block's relative-position table."""
    buckets = relative_position_buckets(length, self.config.relative_attention_num_buckets,
                                        self.config.relative_attention_max_distance)
    return jnp.transpose(self.relative_attention_bias(jnp.asarray(buckets)), (2, 0, 1))

  def __call__(self, x: jax.Array, mask: jax.Array, position_bias: jax.Array) -> jax.Array:
    batch, length, _ = x.shape
    heads = (batch, length, self.config.num_heads, self.config.d_kv)
    q, k, v = (proj(x).reshape(heads) for proj in (self.q, self.k, self.v))
    precision = _precision(self.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision,
                        preferred_element_type=jnp.float32) + position_bias
    logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=precision)
    return self.o(out.reshape(batch, length, -1))


class FeedForward(nnx.Module):
  """transformers' DenseReluDense: wo(act(wi x)), or wo(act(wi_0 x) * wi_1 x) when gated."""

  def __init__(self, config: T5Config, rngs: nnx.Rngs, *, dtype, param_dtype):
    self.activation, self.gated = _FEED_FORWARD[config.feed_forward_proj]
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    if self.gated:
      self.wi_0 = _linear(config.d_model, config.d_ff, ("embed", "mlp"), rngs, **kw)
      self.wi_1 = _linear(config.d_model, config.d_ff, ("embed", "mlp"), rngs, **kw)
    else:
      self.wi = _linear(config.d_model, config.d_ff, ("embed", "mlp"), rngs, **kw)
    self.wo = _linear(config.d_ff, config.d_model, ("mlp", "embed"), rngs, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.gated:
      hidden = self.activation(self.wi_0(x)) * self.wi_1(x)
    else:
      hidden = self.activation(self.wi(x))
    return self.wo(sharding.constrain(hidden, layers.HIDDEN))


class T5Block(nnx.Module):
  """x + attention(norm(x)), then x + MLP(norm(x)); the residual stream stays float32."""

  def __init__(self, config: T5Config, has_relative_bias: bool, rngs: nnx.Rngs, *, dtype,
               param_dtype):
    self.dtype = dtype
    eps, kw = config.layer_norm_epsilon, dict(dtype=dtype, param_dtype=param_dtype)
    self.attention_norm = RMSNorm(config.d_model, eps, param_dtype=param_dtype)
    self.attention = SelfAttention(config, has_relative_bias, rngs, **kw)
    self.mlp_norm = RMSNorm(config.d_model, eps, param_dtype=param_dtype)
    self.mlp = FeedForward(config, rngs, **kw)

  def __call__(self, x: jax.Array, mask: jax.Array, position_bias: jax.Array) -> jax.Array:
    attended = self.attention(self.attention_norm(x).astype(self.dtype), mask, position_bias)
    x = x + attended.astype(jnp.float32)
    x = x + self.mlp(self.mlp_norm(x).astype(self.dtype)).astype(jnp.float32)
    return sharding.constrain(x, layers.TOKENS)


class T5Encoder(nnx.Module):
  """Token ids (B, L) and mask (B, L) -> transformers' `last_hidden_state` (B, L, d_model)
  float32. `dtype` is the compute dtype of the linear layers; parameters are `param_dtype`."""

  def __init__(self, config: T5Config, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = config
    self.shared = nnx.Embed(
        config.vocab_size, config.d_model, dtype=jnp.float32, param_dtype=param_dtype,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0), ("vocab", "embed")),
        rngs=rngs)
    self.blocks = nnx.List([
        T5Block(config, config.model_type == "umt5" or i == 0, rngs, dtype=dtype,
                param_dtype=param_dtype)
        for i in range(config.num_layers)])
    self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon,
                                    param_dtype=param_dtype)

  def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    if tokens.ndim != 2 or tokens.shape != mask.shape:
      raise ValueError(f"tokens shape {tokens.shape} and mask shape {mask.shape} must be the "
                       "same (B, L).")
    mask = mask.astype(bool)
    x = sharding.constrain(self.shared(tokens.astype(jnp.int32)), layers.TOKENS)
    position_bias = None
    for block in self.blocks:
      if block.attention.relative_attention_bias is not None:  # T5: block 0 only; UMT5: all.
        position_bias = block.attention.position_bias(tokens.shape[1])
      x = block(x, mask, position_bias)
    return self.final_layer_norm(x)


def encode(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array,
           mask: jax.Array) -> jax.Array:
  """`T5Encoder` as a pure function of its split state (`nnx.split(model)`), for jitted steps
  that hold the frozen encoder's parameters as arrays: (B, L, d_model) float32."""
  return nnx.merge(graphdef, state)(tokens, mask)


# --- Weights: Hugging Face's PyTorch state dict. ---

# nnx attribute -> transformers module path.
_TORCH_MODULES = {"blocks": "encoder.block", "attention_norm": "layer.0.layer_norm",
                  "attention": "layer.0.SelfAttention", "mlp_norm": "layer.1.layer_norm",
                  "mlp": "layer.1.DenseReluDense", "final_layer_norm": "encoder.final_layer_norm"}
# The tied copy of `shared.weight` some files hold instead of it (or beside it: `shared` wins).
_ALIASES = {"encoder.embed_tokens.weight": "shared.weight"}
# Tensors of a full encoder-decoder checkpoint (T5ForConditionalGeneration) that are not used.
_OTHER_PARTS = ("decoder.", "lm_head.")
_MAX_LISTED = 8  # How many names of each kind an error lists before giving a count.


def torch_name(path: tuple) -> str:
  """The transformers state-dict name of the nnx parameter at `path` (e.g. ('blocks', 0, 'mlp',
  'wo', 'kernel') -> 'encoder.block.0.layer.1.DenseReluDense.wo.weight')."""
  *modules, _ = (str(part) for part in path)  # kernel, scale and embedding are all `weight`.
  return ".".join([_TORCH_MODULES.get(module, module) for module in modules] + ["weight"])


def _listed(names: Sequence[str]) -> str:
  shown = ", ".join(names[:_MAX_LISTED])
  return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def load_state_dict(model: T5Encoder,
                    weights: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
                    source: str = "the state dict") -> None:
  """Sets every parameter of `model` from a transformers T5 / UMT5 state dict (PyTorch layout).

  Args:
    model: The encoder (abstract from `nnx.eval_shape`, or concrete).
    weights: {name: array}, or (name, array) pairs: a stream lets a sharded checkpoint be read
      one shard at a time. Decoder and LM-head tensors of a full T5 checkpoint are skipped.
    source: What the weights are, for error messages.

  Raises:
    ValueError: naming every missing, unexpected and wrongly shaped tensor at once.
  """
  params = nnx.state(model, nnx.Param)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(params))
  paths = {torch_name(path): path for path in flat}
  loaded, found, unexpected, wrong_shape = {}, set(), [], []
  for name, value in weights.items() if isinstance(weights, Mapping) else weights:
    if name.startswith(_OTHER_PARTS):
      continue
    target = _ALIASES.get(name, name)
    if target not in paths:
      unexpected.append(name)
      continue
    path = paths[target]
    if name != target and path in loaded:
      continue
    found.add(path)
    current, is_kernel = flat[path], path[-1] == "kernel"
    expected = tuple(current.shape)[::-1] if is_kernel else tuple(current.shape)
    if np.shape(value) != expected:
      wrong_shape.append(f"{name} has shape {np.shape(value)}, the model needs {expected}")
      continue
    value = np.asarray(value).T if is_kernel else value  # torch's Linear weight is (out, in).
    loaded[path] = jnp.asarray(value, current.dtype)
  missing = sorted(torch_name(path) for path in flat if path not in found)
  if missing or unexpected or wrong_shape:
    problems = [f"{len(names)} {kind}: {_listed(names)}" for kind, names in (
        ("missing tensors", missing), ("unexpected tensors", sorted(unexpected)),
        ("wrongly shaped tensors", wrong_shape)) if names]
    raise ValueError(f"Cannot load {source} into T5Encoder({model.config}): "
                     + "; ".join(problems) + ". Is it a T5 encoder of this config.json?")
  nnx.replace_by_pure_dict(params, traverse_util.unflatten_dict(loaded))
  nnx.update(model, params)


def _locate(path: str) -> tuple[str, str]:
  """(config.json, weights file or shard index) of a model directory or of a weights file in
  one, local or a URL."""
  if storage.is_dir(path):
    names = storage.list_names(path)
    found = [name for name in WEIGHT_FILES if name in names]
    if not found:
      raise FileNotFoundError(
          f"{path!r} holds none of {list(WEIGHT_FILES)}: pass a Hugging Face T5 encoder "
          f"directory or one of its weight files (the directory holds {_listed(names)}).")
    directory, weights = path, storage.join(path, found[0])
  elif storage.exists(path):
    directory, weights = os.fspath(epath.Path(path).parent), path
  else:
    raise FileNotFoundError(f"T5 encoder {path!r} does not exist.")
  config = storage.join(directory, CONFIG_FILE)
  if not storage.exists(config):
    raise FileNotFoundError(f"{config!r} is missing: the T5 weights {weights!r} need their "
                            "model's config.json (sizes, feed_forward_proj, model_type).")
  return config, weights


def _read_weights(weights: str) -> Iterator[tuple[str, np.ndarray]]:
  """(name, array) pairs of a weights file, or of the shards its .index.json maps names to,
  read one shard at a time; shards holding only decoder tensors are not read at all."""
  if not weights.endswith(_INDEX_SUFFIX):
    yield from weight_files.load_state_dict(weights).items()
    return
  weight_map = storage.read_json(weights).get("weight_map")
  if not isinstance(weight_map, dict):
    raise ValueError(f"{weights!r} has no 'weight_map' of tensor name -> shard file.")
  shards = {}
  for name, file in weight_map.items():
    if not name.startswith(_OTHER_PARTS):
      shards.setdefault(file, []).append(name)
  directory = os.fspath(epath.Path(weights).parent)
  for file, names in shards.items():
    shard = storage.join(directory, file)
    if not storage.exists(shard):
      raise FileNotFoundError(f"{shard!r}, a shard listed by {weights!r}, is missing.")
    arrays = weight_files.load_state_dict(shard)
    absent = [name for name in names if name not in arrays]
    if absent:
      raise ValueError(f"{weights!r} places {_listed(absent)} in {shard!r}, which lacks them.")
    for name in names:
      yield name, arrays[name]


def load_t5_encoder(path: str, *, dtype=jnp.float32, param_dtype=jnp.float32) -> T5Encoder:
  """The T5Encoder with the weights of a Hugging Face T5 / T5 v1.1 / UMT5 encoder.

  Args:
    path: A model directory holding config.json and one of WEIGHT_FILES (a T5EncoderModel,
      e.g. FLUX's text_encoder_2, or a full T5ForConditionalGeneration, e.g. google/t5-v1_1-xxl,
      whose decoder is skipped), or one weights file (.safetensors, .bin, .npz or .index.json)
      beside its config.json; local or a URL (gs://...).
    dtype: Compute dtype of the linear layers (norms, softmax and residuals stay float32).
    param_dtype: Dtype the parameters are stored in (bfloat16 halves an XXL encoder's memory).

  Raises:
    FileNotFoundError: no model, config.json or weights at `path` (the message names which).
    ValueError: an unsupported config.json, or weights that do not fit it (every bad tensor
      named).
  """
  config = read_config(path)
  _, weights = _locate(path)
  # Built abstractly: every parameter is replaced by the file's, so random init would be waste.
  model = nnx.eval_shape(lambda: T5Encoder(config, dtype=dtype, param_dtype=param_dtype,
                                           rngs=nnx.Rngs(0)))
  load_state_dict(model, _read_weights(weights), source=repr(weights))
  return model


class T5TextEncoder:
  """A frozen T5 encoder with its tokenizer: captions -> per-token embeddings and mask, for a
  job that encodes a dataset's captions once (and stores the token ids beside them).

  The model runs jitted, once compiled per batch shape; with `batch_size`, captions run in
  batches of exactly that many (the last filled with padding rows), so one compilation serves
  any number of captions. With `devices` (e.g. a host's `jax.local_devices()`), each batch is
  split over them and the weights replicated: every chip of the host encodes.
  """

  def __init__(self, path: str, max_length: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, batch_size: int | None = None,
               tokenizer_path: str | None = None, devices: Sequence[jax.Device] = ()):
    """Loads the encoder at `path` (see `load_t5_encoder`) and the tokenizer.json of
    `tokenizer_path`, default the encoder's directory (diffusers pipelines keep it apart:
    FLUX's text_encoder_2/ goes with tokenizer_2/)."""
    if not isinstance(max_length, int) or max_length < 1:
      raise ValueError(f"max_length={max_length!r} must be an integer >= 1.")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
      raise ValueError(f"batch_size={batch_size!r} must be None or an integer >= 1.")
    if devices and (batch_size is None or batch_size % len(devices)):
      raise ValueError(f"batch_size={batch_size!r} must be a multiple of the {len(devices)} "
                       "devices the batches are split over.")
    model = load_t5_encoder(path, dtype=dtype, param_dtype=param_dtype)
    directory = path if storage.is_dir(path) else os.fspath(epath.Path(path).parent)
    self.tokenizer = t5_tokenizer.T5Tokenizer.from_directory(tokenizer_path or directory)
    self.name = f"{model.config.model_type}:{epath.Path(directory).name}"
    self.dim = model.config.d_model
    self.max_length = max_length
    self.batch_size = batch_size
    graphdef, self._state = nnx.split(model)
    self._encode = jax.jit(functools.partial(encode, graphdef))
    if devices:
      mesh = Mesh(np.array(devices), ("batch",))
      whole = NamedSharding(mesh, PartitionSpec())
      rows = NamedSharding(mesh, PartitionSpec("batch"))
      self._state = jax.device_put(self._state, whole)
      self._encode = jax.jit(functools.partial(encode, graphdef),
                             in_shardings=(whole, rows, rows), out_shardings=rows)

  def tokenize(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Captions -> (ids int32 (B, max_length), mask bool (B, max_length)), as transformers'
    tokenizer pads and truncates them (`T5Tokenizer.tokenize`)."""
    return self.tokenizer.tokenize(captions, self.max_length)

  def __call__(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Captions -> (embeddings float32 (B, max_length, dim), mask bool (B, max_length))."""
    ids, mask = self.tokenize(captions)
    step = self.batch_size or max(len(ids), 1)
    outputs = [np.zeros((0, self.max_length, self.dim), np.float32)]
    for start in range(0, len(ids), step):
      rows = min(step, len(ids) - start)
      fill = ((0, step - rows), (0, 0))
      batch_ids = np.pad(ids[start:start + rows], fill, constant_values=self.tokenizer.pad_id)
      batch_mask = np.pad(mask[start:start + rows], fill)
      embeddings = self._encode(self._state, batch_ids, batch_mask)
      outputs.append(np.asarray(embeddings[:rows], np.float32))
    return np.concatenate(outputs), mask
