"""A frozen T5 encoder run inside the jitted train step, on caption token ids from the shards.

Precomputed caption embeddings cost storage: 128 x 4096 bfloat16 is 1 MiB per caption, 80 TB for
the paper's 20M images x 4 captions. With `text.encoder="t5"` the shards hold token ids (512 bytes
per caption at 128 tokens) and the step embeds them: the encoder's parameters are a second
argument of the step, laid out on the mesh by the same logical-axis rules as the model's (FSDP
splits them), never differentiated, never checkpointed (they are read again from `text.t5_path`
on every start), and its forward FLOPs count in the step's (`flops.text_encoder_forward`).

Model code stays mesh-free: this module builds shapes and shardings from the config, the
trainer places the weights, and `embed_batch` is a pure function of (params, batch).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from self_flow import sharding
from self_flow.models import factory
from self_flow.text import t5_encoder

# text.encoder of the in-step encoder.
NAME = "t5"


class TextEncoderLayout(NamedTuple):
  """The in-step encoder without weights: its graph, parameter shardings and abstract shapes."""

  config: t5_encoder.T5Config
  graphdef: nnx.GraphDef
  shardings: Any  # pytree of NamedSharding, like `abstract`
  abstract: Any  # pytree of jax.ShapeDtypeStruct with shardings


def used(config: ml_collections.ConfigDict) -> bool:
  return config.text.encoder == NAME


def encoder_config(config: ml_collections.ConfigDict) -> t5_encoder.T5Config:
  """The encoder's sizes: `text.t5_config` (a `t5_encoder.PRESETS` name) or the config.json of
  `text.t5_path`; its width must be `text.embedding_dim`, the width the model projects."""
  text = config.text
  encoder = t5_encoder.read_config(text.t5_config or text.t5_path)
  if encoder.d_model != text.embedding_dim:
    raise ValueError(f"config.text.embedding_dim={text.embedding_dim}, but the T5 encoder "
                     f"{text.t5_config or text.t5_path!r} outputs width {encoder.d_model}; set "
                     f"--config.text.embedding_dim={encoder.d_model}.")
  return encoder


def layout(config: ml_collections.ConfigDict, mesh: Mesh, rules: sharding.Rules
           ) -> TextEncoderLayout:
  """Graph, shardings and abstract parameters of `config`'s in-step encoder on `mesh`."""
  encoder = encoder_config(config)
  dtype = factory.parse_dtype(config.text.t5_dtype, "config.text.t5_dtype")
  model = nnx.eval_shape(lambda: t5_encoder.T5Encoder(encoder, dtype=dtype, param_dtype=dtype,
                                                      rngs=nnx.Rngs(0)))
  graphdef, abstract = nnx.split(model, nnx.Param)
  logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract))
  abstract = nnx.to_pure_dict(abstract)
  shardings = sharding.tree_shardings(logical, abstract, rules, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return TextEncoderLayout(encoder, graphdef, shardings, abstract)


def load_params(config: ml_collections.ConfigDict, encoder_layout: TextEncoderLayout):
  """The weights of `text.t5_path`, placed by the layout's shardings (every process reads the
  files and keeps the slices its devices hold)."""
  if config.text.t5_config:
    raise ValueError(f"config.text.t5_config={config.text.t5_config!r} names shapes only (for "
                     "ahead-of-time compilation); training needs the weights: set "
                     "config.text.t5_path to the Hugging Face encoder directory and "
                     "config.text.t5_config=''.")
  dtype = factory.parse_dtype(config.text.t5_dtype, "config.text.t5_dtype")
  model = t5_encoder.load_t5_encoder(config.text.t5_path, dtype=dtype, param_dtype=dtype)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  logging.info("In-step text encoder: %s, %.2fB parameters (%s), from %s.",
               encoder_layout.config.model_type,
               sum(np.size(a) for a in jax.tree.leaves(params)) / 1e9, config.text.t5_dtype,
               config.text.t5_path)
  return jax.tree.map(
      lambda value, target: jax.make_array_from_callback(
          target.shape, target.sharding, lambda index, value=value: np.asarray(value)[index]),
      params, encoder_layout.abstract)


def embed_batch(graphdef: nnx.GraphDef, params, batch: dict[str, jax.Array]
                ) -> dict[str, jax.Array]:
  """`batch` with its `text_tokens` replaced by the frozen encoder's `text_embedding` (float32,
  no gradient), as the model reads precomputed embeddings."""
  batch = dict(batch)
  tokens = batch.pop("text_tokens")
  model = nnx.merge(graphdef, params)
  embedding = model(tokens, batch["text_mask"])
  batch["text_embedding"] = jax.lax.stop_gradient(embedding.astype(jnp.float32))
  return batch
