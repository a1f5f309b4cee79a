"""The ADM evaluator's five metrics from InceptionV3 activations: FID, sFID, IS, precision, recall.

Follows guided-diffusion `evaluations/evaluator.py` (Dhariwal & Nichol 2021), which the paper and
its baselines report on ImageNet 256:

  FID        Fréchet distance of Gaussians fitted to the 2048-d pool_3 activations.
  sFID       the same on the 2023-d spatial features (mixed_6/conv[..., :7], 17x17).
  IS         exp(E_x KL(p(y|x) || p(y))) over splits of 5000 samples (10 splits for 50k), the
             mean over splits; p(y|x) = softmax(pool @ W) without the bias (see `inception`).
  precision  fraction of samples inside the reference manifold; recall: fraction of reference
  recall     images inside the sample manifold (Kynkäänniemi et al. 2019). A manifold is the union
             of balls around each point reaching its k = 3rd nearest neighbour (self excluded),
             in squared Euclidean pool_3 distance, computed in row x column blocks.

Reference statistics: an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) stores
mu/sigma (pool) and mu_s/sigma_s (spatial) of the whole dataset, used as stored, plus 10k images
`arr_0` whose activations give the reference manifold; any other .npz of images gets its
statistics computed. Computed activations of a reference are cached in a file keyed by the
weights, the preprocessing and the images' bytes.

Differences from the TF evaluator that can move the last digits: distances here are float32 (ADM
tries float16 first), softmax and statistics float64, and any InceptionV3 weights other than the
TF graph's give other numbers (see `self_flow.evaluation.inception`).
"""

import dataclasses
import functools
import hashlib
import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from self_flow import storage
from self_flow.evaluation import frechet, inception

IS_SPLIT_SIZE = 5000  # ADM: samples per Inception Score split (10 splits of a 50k batch).
NEIGHBOURHOOD = 3  # k of the k-NN radii (ADM's nhood_sizes=(3,)).
DISTANCE_BATCH_SIZE = 10_000  # ADM's row/column block of pairwise distances.
METRICS = ("inception_score", "fid", "sfid", "precision", "recall")


class Activations(NamedTuple):
  """Per-image InceptionV3 outputs, float32 numpy: pool (n, 2048), spatial (n, S), logits."""

  pool: np.ndarray
  spatial: np.ndarray
  logits: np.ndarray


class InceptionActivations:
  """uint8 NHWC images -> `Activations`, in fixed-size batches split over the local devices.

  One compiled shape: the last batch is padded. Grayscale (C = 1) is replicated to 3 channels.
  `fingerprint` names the weights and preprocessing, so cached activations are never reused
  with other ones."""

  def __init__(self, params: dict, *, batch_size: int, preprocessing: str = "adm",
               input_size: int = inception.INPUT_SIZE):
    devices = jax.local_devices()
    if preprocessing not in inception.PREPROCESSING:
      raise ValueError(f"preprocessing={preprocessing!r}; allowed: {inception.PREPROCESSING}.")
    if not isinstance(input_size, int) or input_size < inception.MIN_INPUT_SIZE:
      raise ValueError(f"input_size={input_size!r}; allowed: an int >= "
                       f"{inception.MIN_INPUT_SIZE} ({inception.INPUT_SIZE} for ADM numbers).")
    if not isinstance(batch_size, int) or batch_size < 1 or batch_size % len(devices):
      raise ValueError(f"batch_size={batch_size!r}; allowed: a positive multiple of the "
                       f"{len(devices)} local devices it is split over.")
    self.batch_size = batch_size
    self.fingerprint = f"{inception.fingerprint(params)}|{preprocessing}|{input_size}"
    mesh = Mesh(np.asarray(devices), ("batch",))
    replicated = NamedSharding(mesh, P())
    self._batch_sharding = NamedSharding(mesh, P("batch"))
    graphdef, state = nnx.split(inception.create_model(params))
    self._state = jax.device_put(state, replicated)

    def forward(state, images):
      model = nnx.merge(graphdef, state)
      return model(inception.preprocess(images, input_size, preprocessing))

    self._forward = jax.jit(forward, in_shardings=(replicated, self._batch_sharding),
                            out_shardings=self._batch_sharding)

  def __call__(self, images: np.ndarray) -> Activations:
    images = check_images(images)
    outputs = []
    for start in range(0, len(images), self.batch_size):
      batch = images[start:start + self.batch_size]
      count = len(batch)
      if batch.shape[-1] == 1:
        batch = np.repeat(batch, 3, axis=-1)
      batch = np.pad(batch, [(0, self.batch_size - count)] + [(0, 0)] * 3)
      result = self._forward(self._state, jax.device_put(batch, self._batch_sharding))
      outputs.append({k: np.asarray(v)[:count] for k, v in result.items()})
    return Activations(**{k: np.concatenate([o[k] for o in outputs]) for k in Activations._fields})


def check_images(images: np.ndarray, name: str = "images") -> np.ndarray:
  """uint8 (n >= 1, H, W, C in {1, 3}), the ADM .npz layout; a clear error otherwise."""
  if (not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4
      or images.shape[0] < 1 or images.shape[-1] not in (1, 3)):
    raise ValueError(f"{name} must be uint8 (n >= 1, H, W, C) with C = 3 (or 1, replicated) as in "
                     f"the ADM .npz format; got {getattr(images, 'dtype', type(images))} "
                     f"{getattr(images, 'shape', '')}.")
  return images


def read_npz_images(path: str) -> np.ndarray:
  """`arr_0` of an ADM-format .npz, local or a URL (class labels, if any, are `arr_1` and not
  needed here). Streamed: only `arr_0` is read, once."""
  with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as npz:
    if "arr_0" not in npz.files:
      raise ValueError(f"{path} has no images 'arr_0' (keys: {npz.files}); ADM .npz batches store "
                       "uint8 NHWC images as arr_0.")
    return check_images(npz["arr_0"], f"{path} arr_0")


# --- Fréchet statistics (FID, sFID). ---


@dataclasses.dataclass(frozen=True)
class FrechetStatistics:
  """Mean and covariance of pool (mu, sigma) and spatial (mu_s, sigma_s) activations."""

  mu: np.ndarray
  sigma: np.ndarray
  mu_s: np.ndarray
  sigma_s: np.ndarray

  @classmethod
  def from_activations(cls, activations: Activations) -> "FrechetStatistics":
    mu, sigma = frechet.feature_statistics(activations.pool)
    mu_s, sigma_s = frechet.feature_statistics(activations.spatial)
    return cls(mu, sigma, mu_s, sigma_s)


def fid(a: FrechetStatistics, b: FrechetStatistics) -> float:
  return frechet.frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def sfid(a: FrechetStatistics, b: FrechetStatistics) -> float:
  return frechet.frechet_distance(a.mu_s, a.sigma_s, b.mu_s, b.sigma_s)


# --- Inception Score. ---


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
  """Mean over consecutive splits of `split_size` of exp(mean_x KL(p(y|x) || mean_x p(y|x))).

  As ADM (and improved-GAN): the last split may be shorter. Zero probabilities contribute 0 to
  the KL (p log p -> 0), where ADM's float32 formula would give NaN."""
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or logits.shape[0] < 1:
    raise ValueError(f"logits must have shape (n >= 1, classes); got {logits.shape}.")
  if not isinstance(split_size, int) or split_size < 1:
    raise ValueError(f"split_size={split_size!r}; allowed: a positive int.")
  shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs = shifted / shifted.sum(axis=1, keepdims=True)
  scores = []
  for start in range(0, len(probs), split_size):
    part = probs[start:start + split_size]
    marginal = part.mean(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
      terms = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
    scores.append(np.exp(terms.sum(axis=1).mean()))
  return float(np.mean(scores))


# --- Improved precision and recall (k-NN manifolds). ---


@jax.jit
def _squared_distances(a, b):
  """(R, C) squared Euclidean distances |a_i|^2 - 2 a_i.b_j + |b_j|^2, clipped at 0 (ADM's)."""
  dot = jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(jnp.sum(a * a, 1)[:, None] - 2.0 * dot + jnp.sum(b * b, 1)[None, :], 0.0)


@functools.partial(jax.jit, static_argnames="count")
def _smallest(values, count: int):
  """The `count` smallest entries of each row, ascending."""
  return -jax.lax.top_k(-values, count)[0]


def manifold_radii(features: np.ndarray, k: int = NEIGHBOURHOOD,
                   batch_size: int = DISTANCE_BATCH_SIZE) -> np.ndarray:
  """(n,) squared distance from each point to its k-th nearest neighbour in `features`.

  The point itself is the 0th neighbour (distance 0), as in ADM's np.partition over a row."""
  features = np.asarray(features, np.float32)
  if features.ndim != 2 or features.shape[0] <= k:
    raise ValueError(f"features must have shape (n > k = {k}, F) for k-NN radii; got "
                     f"{features.shape}.")
  radii = []
  for row in range(0, len(features), batch_size):
    rows = features[row:row + batch_size]
    nearest = None  # (rows, k + 1) smallest distances so far, ascending.
    for col in range(0, len(features), batch_size):
      distances = _squared_distances(rows, features[col:col + batch_size])
      candidates = distances if nearest is None else jnp.concatenate([nearest, distances], 1)
      nearest = _smallest(candidates, count=min(k + 1, candidates.shape[1]))
    radii.append(np.asarray(nearest[:, k]))
  return np.concatenate(radii)


@jax.jit
def _inside_blocks(reference, reference_radii, samples, sample_radii):
  """(reference rows inside some sample ball, samples inside some reference ball) of a block."""
  distances = _squared_distances(reference, samples)
  return (jnp.any(distances <= sample_radii[None, :], axis=1),
          jnp.any(distances <= reference_radii[:, None], axis=0))


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = NEIGHBOURHOOD,
                     batch_size: int = DISTANCE_BATCH_SIZE) -> tuple[float, float]:
  """(precision, recall) of `samples` against `reference` pool features (ADM's evaluate_pr)."""
  reference, samples = np.asarray(reference, np.float32), np.asarray(samples, np.float32)
  if reference.ndim != 2 or samples.ndim != 2 or reference.shape[1] != samples.shape[1]:
    raise ValueError(f"reference and samples must be (n, F) features of one F; got "
                     f"{reference.shape} and {samples.shape}.")
  reference_radii = manifold_radii(reference, k, batch_size)
  sample_radii = manifold_radii(samples, k, batch_size)
  reference_inside = np.zeros(len(reference), bool)
  samples_inside = np.zeros(len(samples), bool)
  for row in range(0, len(reference), batch_size):
    rows = slice(row, row + batch_size)
    for col in range(0, len(samples), batch_size):
      cols = slice(col, col + batch_size)
      ref_in, sample_in = _inside_blocks(reference[rows], reference_radii[rows], samples[cols],
                                         sample_radii[cols])
      reference_inside[rows] |= np.asarray(ref_in)
      samples_inside[cols] |= np.asarray(sample_in)
  return float(samples_inside.mean()), float(reference_inside.mean())


# --- Reference batches. ---


@dataclasses.dataclass(frozen=True)
class Reference:
  """What the metrics need of a reference batch: Fréchet statistics, the pool activations of its
  images (the precision/recall manifold; None without images) and where the statistics came
  from ("stored" in the file, or "computed" from its images)."""

  statistics: FrechetStatistics
  pool: np.ndarray | None
  origin: str


_STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def default_cache_path(reference_path: str) -> str:
  """`<reference without .npz>.inception_cache.npz` (a string edit: a URL stays a URL)."""
  return f"{os.path.splitext(reference_path)[0]}.inception_cache.npz"


def load_reference(path: str, extractor: InceptionActivations, cache_path: str | None = None
                   ) -> Reference:
  """The reference batch at `path`, with its activations computed once and cached.

  Stored mu/sigma/mu_s/sigma_s are used as stored (ADM's read_statistics); otherwise they are
  computed from `arr_0`. The pool activations of `arr_0` (precision/recall) and any computed
  statistics go to `cache_path` (default: beside the reference), keyed by the extractor's
  fingerprint and a hash of the images, and are reused while both match; `cache_path=""` turns
  caching off. Both paths may be local or URLs (gs://...)."""
  with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as npz:
    stored = {k: npz[k] for k in _STAT_KEYS if k in npz.files}
    images = check_images(npz["arr_0"], f"{path} arr_0") if "arr_0" in npz.files else None
  if stored and len(stored) != len(_STAT_KEYS):
    raise ValueError(f"{path} stores {sorted(stored)} of the statistics {_STAT_KEYS}; an ADM "
                     "reference batch has all four (or none, with images arr_0).")
  if images is None:
    if not stored:
      raise ValueError(f"{path} has neither statistics {_STAT_KEYS} nor images 'arr_0'.")
    logging.warning("%s has no images: precision and recall cannot be computed.", path)
    return Reference(FrechetStatistics(**stored), None, "stored")
  cache_path = default_cache_path(path) if cache_path is None else cache_path
  key = hashlib.sha256(f"{extractor.fingerprint}|stored={bool(stored)}|".encode()
                       + images.tobytes()).hexdigest()
  cached = _read_cache(cache_path, key)
  if cached is None:
    activations = extractor(images)
    cached = {"pool": activations.pool}
    if not stored:
      cached.update(dataclasses.asdict(FrechetStatistics.from_activations(activations)))
    _write_cache(cache_path, key, cached)
  if stored:
    return Reference(FrechetStatistics(**stored), cached["pool"], "stored")
  return Reference(FrechetStatistics(**{k: cached[k] for k in _STAT_KEYS}), cached["pool"],
                   "computed")


def _read_cache(cache_path: str, key: str) -> dict[str, np.ndarray] | None:
  if not cache_path or not storage.exists(cache_path):
    return None
  with epath.Path(cache_path).open("rb") as f, np.load(f, allow_pickle=False) as npz:
    if str(npz["key"]) != key:
      logging.info("%s belongs to other weights, preprocessing or images; recomputing.",
                   cache_path)
      return None
    logging.info("Reference activations from the cache %s.", cache_path)
    return {k: npz[k] for k in npz.files if k != "key"}


def _write_cache(cache_path: str, key: str, arrays: dict[str, np.ndarray]) -> None:
  """Atomic write (`storage.save_npz`); an unwritable location only skips caching."""
  if not cache_path:
    return
  try:
    storage.save_npz(cache_path, {"key": np.asarray(key), **arrays})
  # A cache is optional: whatever refuses the write (an OSError here, a tf.errors.OpError from
  # Cloud Storage, which is no OSError) must not cost the metrics already computed.
  except Exception as error:  # pylint: disable=broad-except
    logging.warning("Could not cache reference activations at %s (%s: %s).", cache_path,
                    type(error).__name__, error)


# --- All five. ---


def evaluate(samples: np.ndarray, reference: Reference, extractor: InceptionActivations,
             split_size: int = IS_SPLIT_SIZE, distance_batch_size: int = DISTANCE_BATCH_SIZE
             ) -> dict[str, float | None]:
  """{inception_score, fid, sfid, precision, recall} of uint8 sample images against `reference`
  (precision and recall are None for a reference without images)."""
  activations = extractor(check_images(samples, "samples"))
  statistics = FrechetStatistics.from_activations(activations)
  results = {"inception_score": inception_score(activations.logits, split_size),
             "fid": fid(statistics, reference.statistics),
             "sfid": sfid(statistics, reference.statistics),
             "precision": None, "recall": None}
  if reference.pool is not None:
    results["precision"], results["recall"] = precision_recall(
        reference.pool, activations.pool, batch_size=distance_batch_size)
  return results


def write_json(path: str, results: dict) -> None:
  """`results` as sorted, indented JSON at `path` (local or a URL), written all at once."""
  storage.write_text(path, json.dumps(results, indent=2, sort_keys=True) + "\n")
