"""Caption embeddings of a frozen encoder, computed once per set of captions and cached on disk.

The embedded datasets draw their captions from a few hundred fixed phrasings, so every caption a
run can see is known up front: `CaptionTable` embeds all of them in one batch, stores them in
`<cache_dir>/text_<encoder>_<key>.npz` (key: sha256 of the encoder's name and version and the
sorted captions) and afterwards only looks vectors up. Resumed and repeated runs read the same
file, so their conditioning is bit-identical even if the encoder's threaded arithmetic is not;
another encoder or version gets another file. The cache directory may be local or a URL
(gs://...).
"""

import hashlib
import json
from collections.abc import Iterable, Sequence

import numpy as np
from absl import logging

from self_flow import storage
from self_flow.text import frozen_encoders


def cache_key(encoder_name: str, encoder_version: str, captions: Sequence[str]) -> str:
  payload = json.dumps([encoder_name, encoder_version, sorted(set(captions))])
  return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_path(cache_dir: str, encoder_name: str, key: str) -> str:
  return storage.join(cache_dir, f"text_{encoder_name}_{key}.npz")


class CaptionTable:
  """{caption: (dim,) float32} for a fixed set of captions, loaded from or written to the cache.

  Picklable (plain arrays), so grain worker processes can hold it."""

  def __init__(self, encoder_name: str, captions: Iterable[str], cache_dir: str):
    unique = sorted(set(captions))
    if not unique:
      raise ValueError("CaptionTable needs at least one caption.")
    encoder = frozen_encoders.load(encoder_name)
    self.encoder_name, self.version = encoder_name, encoder.version
    self.path = cache_path(cache_dir, encoder_name, cache_key(encoder_name, encoder.version,
                                                              unique))
    embeddings = self._read(unique)
    if embeddings is None:
      embeddings = encoder(unique)
      self._write(unique, embeddings)
      logging.info("Embedded %d captions with %s; cached in %s.", len(unique), encoder.version,
                   self.path)
    self.dim = embeddings.shape[1]
    self._rows = {caption: row for row, caption in enumerate(unique)}
    self._embeddings = embeddings

  def _read(self, captions: list[str]) -> np.ndarray | None:
    if not storage.exists(self.path):
      return None
    saved = storage.load_npz(self.path)
    if list(saved["captions"]) != captions:  # a hash collision or a hand-edited file
      raise ValueError(f"{self.path} holds other captions than its key says; delete it.")
    return saved["embeddings"]

  def _write(self, captions: list[str], embeddings: np.ndarray) -> None:
    """Atomically (`storage.save_npz`): concurrent processes each write a whole file."""
    storage.save_npz(self.path, {"captions": np.asarray(captions),
                                 "embeddings": embeddings.astype(np.float32)})

  def __contains__(self, caption: str) -> bool:
    return caption in self._rows

  def __len__(self) -> int:
    return len(self._rows)

  def vector(self, caption: str) -> np.ndarray:
    if caption not in self._rows:
      raise KeyError(f"caption {caption!r} was not embedded for this run ({self.path}); the "
                     "table holds the captions the data and the evaluation can draw.")
    return self._embeddings[self._rows[caption]]

  def condition(self, captions: Sequence[str]) -> dict[str, np.ndarray]:
    """The model's text condition for `captions`: one pooled token each, {"embedding" (n, 1,
    dim) float32, "mask" (n, 1) bool}."""
    embedding = np.stack([self.vector(c) for c in captions])[:, None, :]
    return {"embedding": embedding.astype(np.float32), "mask": np.ones((len(captions), 1), bool)}

  def __repr__(self) -> str:  # stable across processes: grain compares transform reprs
    return f"CaptionTable({self.path!r}, {len(self)} captions)"
