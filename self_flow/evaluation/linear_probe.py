"""Linear probe of the EMA model's hidden states, block by block (the paper's Fig. 4b analogue).

The paper does not give its probe protocol (method doc §2.10); this one follows the REPA/SRA
habit (method doc §5) with a classifier that adds no noise of its own: frozen EMA weights; every
token of the image at one noise level `t` (0 = clean; Self-Flow's representation loss acts only
on noisy inputs, so t > 0 is where it can matter) with one fixed noise draw; the hidden state
after each probed block, mean-pooled over tokens; features standardised with the train-split
statistics; one ridge-regression classifier per block onto one-hot labels, solved in closed form
(exact, no step count or learning rate to tune, the same answer for the same features); top-1 on
the test split. A model whose features ignore the image scores the majority train class's share
of the test split: chance.

The same closed-form map also fits the features to a fixed reference, the cached evaluation
classifier's features of the clean image (`reference_cosine`): the mean test-split cosine between
the predicted and the true reference features says how much of an independent, supervised
representation the block carries linearly, so no variant is judged by its own teacher.

Conditioning is the *null* condition (the null class of a class-conditional DiT, the empty caption
of a text model). A DiT adds the label embedding to every block's adaLN conditioning, so with the
true label even a randomly initialised network's pooled features carry the label linearly, and
the probe would measure the conditioning path rather than what the model extracts from the image.
With the null condition every example is conditioned identically and the image is the only source
of class information.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from self_flow import train_state
from self_flow.modalities import spec as spec_lib
from self_flow.models import mmdit

# Seed of the one noise draw every evaluation uses, so runs and variants see the same inputs.
NOISE_SEED = 0


def resolve_layers(layers: Sequence[int], depth: int) -> tuple[int, ...]:
  """The probed blocks (1-based, after the block), sorted; an empty `layers` means all of them."""
  if not layers:
    return tuple(range(1, depth + 1))
  bad = [k for k in layers if isinstance(k, bool) or not isinstance(k, (int, np.integer))
         or not 1 <= k <= depth]
  if bad or len(set(layers)) != len(layers):
    raise ValueError(f"config.eval.probe_layers={tuple(layers)} must be distinct integer "
                     f"blocks in [1, {depth}] (the model's depth), or () for every block.")
  return tuple(sorted(int(k) for k in layers))


def check_timesteps(timesteps: Sequence[float]) -> None:
  """Raises ValueError unless `timesteps` (eval.probe_timesteps) are distinct numbers in [0, 1]."""
  numbers = all(isinstance(t, (int, float, np.number)) and not isinstance(t, bool)
                for t in timesteps)
  if (not timesteps or not numbers or not all(0 <= t <= 1 for t in timesteps)
      or len(set(timesteps)) != len(timesteps)):
    raise ValueError(f"config.eval.probe_timesteps={tuple(timesteps)} must be one or more "
                     "distinct noise levels in [0, 1] (0 = clean input, 1 = pure noise).")


def hidden_states(model, x, pos_ids, t_table, t_index, cond, modality: str,
                  layers: Sequence[int]) -> list[jax.Array]:
  """[(B, N, D)] hidden states of the generated tokens after each of `layers` (1-based, sorted).

  The blocks run as scanned segments between consecutive probed layers, so every block runs once
  however many layers are probed.
  """
  if isinstance(model, mmdit.SelfFlowMMDiT):
    # The MMDiT's streams, modulations and RoPE angles, which its blocks take as one dict.
    # pylint: disable-next=protected-access
    prepared = model._prepare(x, pos_ids, t_table, t_index, cond, modality)
    carry = (prepared["img"], prepared["txt"])
    advance = lambda c, start, end: model.run_blocks(c[0], c[1], prepared, start, end)
    read = lambda c: c[0]
  else:
    if modality != "image":
      raise ValueError(f"modality={modality!r}: the dit backbone generates images only.")
    rows = model.condition(t_table, cond)
    carry = model.embed_tokens(x, pos_ids)
    advance = lambda h, start, end: model.run_blocks(h, rows, t_index, start, end)
    read = lambda h: h
  states, start = [], 0
  for layer in layers:
    carry = advance(carry, start, layer)
    states.append(read(carry))
    start = layer
  return states


def make_features_fn(graphdef: nnx.GraphDef, spec: spec_lib.ModalitySpec,
                     layers: Sequence[int]):
  """features(params, x0, noise, cond, t) -> (B, len(layers), D) float32 mean-pooled hidden
  states.

  x0 and noise are tokens (B, N, C); the input is (1 - t) x0 + t noise at the scalar timestep t
  for every token (paper convention, t = 1 is noise), an argument so that one compiled program
  serves every probed t; `cond` is the (null) conditioning pytree. Pure, to be jitted by the
  caller.
  """
  pos = jnp.asarray(spec.position_ids)
  layers = tuple(layers)

  def features(params, x0, noise, cond, t):
    model = train_state.merge(graphdef, params)
    b, n, _ = x0.shape
    x_t = (1.0 - t) * x0 + t * noise
    states = hidden_states(model, x_t, jnp.broadcast_to(pos, (b, n, 3)),
                           jnp.full((b, 1), t, jnp.float32), jnp.zeros((b, n), jnp.int32), cond,
                           spec.name, layers)
    return jnp.stack([s.astype(jnp.float32).mean(axis=1) for s in states], axis=1)

  return features


def probe_noise(num_examples: int, spec: spec_lib.ModalitySpec, seed_offset: int = 0
                ) -> np.ndarray:
  """The fixed noise tokens (num_examples, N, C) the probe input is mixed with; `seed_offset`
  (config eval.seed_offset) draws another set, to measure the evaluation's own noise."""
  rng = np.random.default_rng(NOISE_SEED + seed_offset)
  return rng.standard_normal((num_examples, spec.num_tokens, spec.token_dim), np.float32)


def _check_features(train: np.ndarray, test: np.ndarray) -> None:
  if train.ndim != 3 or test.ndim != 3:
    raise ValueError(f"features must be (layers, examples, dim); got train {train.shape} and "
                     f"test {test.shape}.")
  if train.shape[0] != test.shape[0] or train.shape[2] != test.shape[2]:
    raise ValueError(f"train features {train.shape} and test features {test.shape} must agree "
                     "in layers and dim.")


def ridge_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                  ridge: float) -> np.ndarray:
  """Test-split predictions (n_test, K) of the ridge regression of targets `train_y` (n, K) on
  features `train_x` (n, D), solved exactly in float64.

  Features are standardised with the train split's mean and std (a constant feature becomes 0);
  the intercept is the train targets' mean, unpenalised; the penalty `ridge` is relative to the
  standardised features' unit variance: W = (X'X + ridge n I)^-1 X'(Y - mean Y).
  """
  train_x = np.asarray(train_x, np.float64)
  test_x = np.asarray(test_x, np.float64)
  train_y = np.asarray(train_y, np.float64)
  mean, std = train_x.mean(axis=0), train_x.std(axis=0)
  scale = np.where(std > 0, std, 1.0)
  x = (train_x - mean) / scale
  x_test = (test_x - mean) / scale
  y_mean = train_y.mean(axis=0)
  n, d = x.shape
  weights = np.linalg.solve(x.T @ x + ridge * n * np.eye(d), x.T @ (train_y - y_mean))
  return x_test @ weights + y_mean


def fit_and_score(train_features: np.ndarray, train_labels: np.ndarray,
                  test_features: np.ndarray, test_labels: np.ndarray, *, num_classes: int,
                  ridge: float) -> np.ndarray:
  """Top-1 test accuracy (L,) of one closed-form ridge classifier per layer (`ridge_predict`
  onto one-hot labels, the arg max of the prediction). Features are (L, n, D) per split."""
  _check_features(train_features, test_features)
  for name, labels, features in (("train", train_labels, train_features),
                                 ("test", test_labels, test_features)):
    if labels.shape != (features.shape[1],) or labels.min() < 0 or labels.max() >= num_classes:
      raise ValueError(f"{name} labels (shape {labels.shape}) must be one integer in "
                       f"[0, {num_classes}) per example ({features.shape[1]}).")
  if not ridge > 0:
    raise ValueError(f"ridge={ridge} must be > 0.")
  one_hot = np.eye(num_classes)[train_labels]
  return np.array([np.mean(ridge_predict(train, one_hot, test, ridge).argmax(-1) == test_labels)
                   for train, test in zip(train_features, test_features)])


def reference_cosine(train_features: np.ndarray, train_reference: np.ndarray,
                     test_features: np.ndarray, test_reference: np.ndarray, *,
                     ridge: float) -> np.ndarray:
  """Mean test-split cosine (L,) between the reference features (n, R) and their ridge
  prediction from each layer's features (L, n, D), fitted on the train split."""
  _check_features(train_features, test_features)
  if (train_reference.shape[0] != train_features.shape[1]
      or test_reference.shape[0] != test_features.shape[1]):
    raise ValueError(f"reference features (train {train_reference.shape}, test "
                     f"{test_reference.shape}) need one row per example (train "
                     f"{train_features.shape[1]}, test {test_features.shape[1]}).")
  target = np.asarray(test_reference, np.float64)
  cosines = []
  for train, test in zip(train_features, test_features):
    predicted = ridge_predict(train, train_reference, test, ridge)
    norms = np.linalg.norm(predicted, axis=-1) * np.linalg.norm(target, axis=-1)
    cosines.append(np.mean(np.sum(predicted * target, axis=-1) / np.maximum(norms, 1e-12)))
  return np.array(cosines)


def _t_label(t: float) -> str:
  return f"{float(t):g}"


def metric_names(modality: str, t: float, layers: Sequence[int]) -> list[str]:
  """`eval/<modality>/probe_t<t>_layer<k>` for each probed block k (1-based) at noise level t."""
  return [f"eval/{modality}/probe_t{_t_label(t)}_layer{k}" for k in layers]


def reference_metric_name(modality: str, t: float) -> str:
  """`eval/<modality>/reference_cosine_t<t>`: `reference_cosine` of the student tap's features
  (model.student_layer, where the representation loss acts) at noise level t."""
  return f"eval/{modality}/reference_cosine_t{_t_label(t)}"
