"""Tiny Hugging Face model directories written by tests, with no download and no torch.

The captioned-data tests need what a user downloads from the Hub: a T5 encoder directory
(config.json, model.safetensors, tokenizer.json) and a diffusers VAE directory. These writers
produce the same files with random weights from numpy and the `tokenizers` library, so the
loaders read them through their real code paths.
"""

import json
import os
import string

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from self_flow.models import autoencoder_kl
from self_flow.text import t5_encoder, t5_tokenizer
from test_autoencoder_kl import _random_tensors, _write_diffusers_dir, _write_safetensors

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
  _write_safetensors(os.path.join(directory, "model.safetensors"),
                     _random_tensors(shapes, seed))
  with open(os.path.join(directory, t5_encoder.CONFIG_FILE), "w") as f:
    json.dump({"model_type": "t5", "architectures": ["T5EncoderModel"], "vocab_size": vocab_size,
               "d_model": d_model, "d_kv": d_kv, "d_ff": d_ff, "num_layers": num_layers,
               "num_heads": num_heads, "relative_attention_num_buckets": num_buckets,
               "relative_attention_max_distance": 20, "feed_forward_proj": "gated-gelu",
               "layer_norm_epsilon": 1e-6, "pad_token_id": PAD, "eos_token_id": EOS}, f)
  return write_tokenizer(directory)


def write_vae_dir(directory: str, config: autoencoder_kl.AutoencoderConfig, seed: int = 0) -> str:
  """A diffusers VAE directory (config.json + safetensors) with random weights."""
  _write_diffusers_dir(directory, config, seed)
  return directory
