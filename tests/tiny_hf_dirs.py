"""Tiny Hugging Face model directories written by tests, with no download and no torch.

The captioned-data tests need what a user downloads from the Hub: a T5 encoder directory
(config.json, model.safetensors, tokenizer.json) and a diffusers VAE directory (its state dict
spelled out independently of the loader). These writers
produce the same files with random weights from numpy and the `tokenizers` library, so the
loaders read them through their real code paths.
"""

import json
import os
import string

import ml_dtypes
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from self_flow.models import autoencoder_kl
from self_flow.text import t5_encoder, t5_tokenizer

EOS, PAD = 1, 0
# Word pieces of the default tokenizer: every lowercase letter (so any lowercase caption
# tokenizes without <unk>) plus a few whole words.
_PIECES = (["▁a", "▁cat", "▁dog", "▁on", "▁the", "▁mat", "▁red", "s", "▁"]
           + list(string.ascii_lowercase) + list(string.digits))


def write_tokenizer(directory: str, pieces=_PIECES, post_processor: bool = True) -> str:
  """A T5-style tokenizer.json (Unigram pieces with <pad>, </s>, <unk> first; whitespace and
  metaspace pre-tokenizer; `$A </s>` post-processor unless told not) and tokenizer_config.json."""
  vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [
      (piece, -1.0 - 0.1 * i) for i, piece in enumerate(dict.fromkeys(pieces))]
  tokenizer = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.WhitespaceSplit(),
      pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
  tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
  if post_processor:
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", EOS)])
  tokenizer.add_special_tokens([tokenizers.AddedToken(token, special=True)
                                for token in ("<pad>", "</s>", "<unk>")])
  os.makedirs(directory, exist_ok=True)
  tokenizer.save(os.path.join(directory, t5_tokenizer.TOKENIZER_FILE))
  with open(os.path.join(directory, t5_tokenizer.TOKENIZER_CONFIG_FILE), "w") as f:
    json.dump({"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>",
               "unk_token": "<unk>", "extra_ids": 0, "model_max_length": 512}, f)
  return directory


def write_t5_dir(directory: str, *, d_model: int = 32, d_ff: int = 48, num_layers: int = 2,
                 num_heads: int = 4, d_kv: int = 8, num_buckets: int = 8,
                 seed: int = 0) -> str:
  """A T5 v1.1 encoder directory (gated-GELU) with random weights under transformers' names."""
  vocab_size = 64 + len(_PIECES)
  shapes = {"shared.weight": (vocab_size, d_model),
            "encoder.final_layer_norm.weight": (d_model,),
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
                (num_buckets, num_heads)}
  inner = num_heads * d_kv
  for block in range(num_layers):
    prefix = f"encoder.block.{block}.layer"
    shapes.update({f"{prefix}.0.SelfAttention.{name}.weight": (inner, d_model)
                   for name in ("q", "k", "v")})
    shapes.update({f"{prefix}.0.SelfAttention.o.weight": (d_model, inner),
                   f"{prefix}.0.layer_norm.weight": (d_model,),
                   f"{prefix}.1.DenseReluDense.wi_0.weight": (d_ff, d_model),
                   f"{prefix}.1.DenseReluDense.wi_1.weight": (d_ff, d_model),
                   f"{prefix}.1.DenseReluDense.wo.weight": (d_model, d_ff),
                   f"{prefix}.1.layer_norm.weight": (d_model,)})
  os.makedirs(directory, exist_ok=True)
  write_safetensors(os.path.join(directory, "model.safetensors"),
                     random_tensors(shapes, seed))
  with open(os.path.join(directory, t5_encoder.CONFIG_FILE), "w") as f:
    json.dump({"model_type": "t5", "architectures": ["T5EncoderModel"], "vocab_size": vocab_size,
               "d_model": d_model, "d_kv": d_kv, "d_ff": d_ff, "num_layers": num_layers,
               "num_heads": num_heads, "relative_attention_num_buckets": num_buckets,
               "relative_attention_max_distance": 20, "feed_forward_proj": "gated-gelu",
               "layer_norm_epsilon": 1e-6, "pad_token_id": PAD, "eos_token_id": EOS}, f)
  return write_tokenizer(directory)


def diffusers_shapes(config, legacy_attention: frozenset = frozenset()) -> dict:
  """name -> PyTorch shape of every tensor of diffusers' AutoencoderKL with `config`.

  Mid-block attention of the parts in `legacy_attention` ("encoder", "decoder") uses the names
  and 1x1-conv shapes of older checkpoints (diffusers AttentionBlock).
  """
  shapes = {}
  latent, image = config.latent_channels, config.image_channels

  def conv(name, cin, cout, k):
    shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

  def norm(name, c):
    shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

  def resnet(name, cin, cout):
    norm(f"{name}.norm1", cin)
    conv(f"{name}.conv1", cin, cout, 3)
    norm(f"{name}.norm2", cout)
    conv(f"{name}.conv2", cout, cout, 3)
    if cin != cout:
      conv(f"{name}.conv_shortcut", cin, cout, 1)

  def mid(part, c):
    name = f"{part}.mid_block"
    resnet(f"{name}.resnets.0", c, c)
    norm(f"{name}.attentions.0.group_norm", c)
    legacy = part in legacy_attention
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                     ("to_out.0", "proj_attn")):
      shapes[f"{name}.attentions.0.{old if legacy else new}.weight"] = (
          (c, c, 1, 1) if legacy else (c, c))
      shapes[f"{name}.attentions.0.{old if legacy else new}.bias"] = (c,)
    resnet(f"{name}.resnets.1", c, c)

  channels = config.block_out_channels
  conv("encoder.conv_in", image, channels[0], 3)
  previous = channels[0]
  for i, c in enumerate(channels):
    for j in range(config.layers_per_block):
      resnet(f"encoder.down_blocks.{i}.resnets.{j}", previous if j == 0 else c, c)
    if i < len(channels) - 1:
      conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c, 3)
    previous = c
  mid("encoder", channels[-1])
  norm("encoder.conv_norm_out", channels[-1])
  conv("encoder.conv_out", channels[-1], 2 * latent, 3)
  conv("quant_conv", 2 * latent, 2 * latent, 1)
  conv("post_quant_conv", latent, latent, 1)
  reversed_channels = channels[::-1]
  conv("decoder.conv_in", latent, reversed_channels[0], 3)
  mid("decoder", reversed_channels[0])
  previous = reversed_channels[0]
  for i, c in enumerate(reversed_channels):
    for j in range(config.layers_per_block + 1):
      resnet(f"decoder.up_blocks.{i}.resnets.{j}", previous if j == 0 else c, c)
    if i < len(channels) - 1:
      conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c, 3)
    previous = c
  norm("decoder.conv_norm_out", channels[0])
  conv("decoder.conv_out", channels[0], image, 3)
  return shapes


def random_tensors(shapes: dict, seed: int = 0) -> dict:
  """Random float32 tensors of `shapes`: fan-in scaled weights, norm scales near 1."""
  rng = np.random.default_rng(seed)
  tensors = {}
  for name, shape in shapes.items():
    if len(shape) > 1:
      value = rng.normal(size=shape) / np.sqrt(np.prod(shape[1:]))
    elif "norm" in name and name.endswith(".weight"):
      value = 1.0 + 0.2 * rng.normal(size=shape)
    else:
      value = 0.2 * rng.normal(size=shape)
    tensors[name] = value.astype(np.float32)
  return tensors


def write_safetensors(path, tensors: dict, dtypes: dict | None = None) -> None:
  """Writes a safetensors file; `dtypes` maps names to F16 or BF16 (default F32)."""
  numpy_dtypes = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
  header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
  for name, value in tensors.items():
    kind = (dtypes or {}).get(name, "F32")
    raw = np.ascontiguousarray(value.astype(numpy_dtypes[kind])).tobytes()
    header[name] = {"dtype": kind, "shape": list(value.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  encoded = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(len(encoded).to_bytes(8, "little") + encoded + b"".join(chunks))


def write_diffusers_dir(directory, config, seed: int = 0) -> dict:
  """A diffusers VAE directory (config.json + safetensors) with random weights."""
  os.makedirs(directory, exist_ok=True)
  tensors = random_tensors(diffusers_shapes(config), seed)
  write_safetensors(os.path.join(directory, autoencoder_kl.WEIGHTS_FILE), tensors)
  with open(os.path.join(directory, autoencoder_kl.CONFIG_FILE), "w") as f:
    json.dump({"_class_name": "AutoencoderKL", "act_fn": "silu",
               "block_out_channels": list(config.block_out_channels),
               "down_block_types": ["DownEncoderBlock2D"] * len(config.block_out_channels),
               "up_block_types": ["UpDecoderBlock2D"] * len(config.block_out_channels),
               "in_channels": 3, "out_channels": 3, "latent_channels": config.latent_channels,
               "layers_per_block": config.layers_per_block,
               "norm_num_groups": config.norm_num_groups, "scaling_factor": 0.18215}, f)
  return tensors
