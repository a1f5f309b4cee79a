"""Linear probe of the EMA model's hidden states, block by block (the paper's Fig. 4b analogue).

The paper does not give its probe protocol (method doc §2.10); this one follows the REPA/SRA
habit (method doc §5): frozen EMA weights; the image at a fixed noise level `t` (0 = clean) with
one fixed noise draw; the hidden state after each probed block, mean-pooled over tokens; features
standardised with the train-split statistics; a linear softmax classifier per block, trained by
full-batch Adam for a fixed number of steps on train-split labels; top-1 on the test split.

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
import optax
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
                     layers: Sequence[int], t: float):
  """features(params, x0, noise, cond) -> (B, len(layers), D) float32 mean-pooled hidden states.

  x0 and noise are tokens (B, N, C); the input is (1 - t) x0 + t noise at timestep t for every
  token (paper convention, t = 1 is noise); `cond` is the (null) conditioning pytree. Pure, to be
  jitted by the caller.
  """
  pos = jnp.asarray(spec.position_ids)
  layers = tuple(layers)

  def features(params, x0, noise, cond):
    model = train_state.merge(graphdef, params)
    b, n, _ = x0.shape
    x_t = (1.0 - t) * x0 + t * noise
    states = hidden_states(model, x_t, jnp.broadcast_to(pos, (b, n, 3)),
                           jnp.full((b, 1), t, jnp.float32), jnp.zeros((b, n), jnp.int32), cond,
                           spec.name, layers)
    return jnp.stack([s.astype(jnp.float32).mean(axis=1) for s in states], axis=1)

  return features


def probe_noise(num_examples: int, spec: spec_lib.ModalitySpec) -> np.ndarray:
  """The fixed noise tokens (num_examples, N, C) the probe input is mixed with."""
  rng = np.random.default_rng(NOISE_SEED)
  return rng.standard_normal((num_examples, spec.num_tokens, spec.token_dim), np.float32)


def _standardise(train: jax.Array, test: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Both splits scaled by the train split's per-dimension mean and std."""
  mean = train.mean(axis=0)
  std = train.std(axis=0) + 1e-6
  return (train - mean) / std, (test - mean) / std


def fit_and_score(train_features: np.ndarray, train_labels: np.ndarray,
                  test_features: np.ndarray, test_labels: np.ndarray, *, num_classes: int,
                  num_steps: int, learning_rate: float) -> np.ndarray:
  """Top-1 test accuracy (L,) of one linear classifier per layer.

  Features are (L, n, D) per split; each layer's classifier starts at zero (the problem is convex,
  so the result depends on the data and the step count only) and takes `num_steps` full-batch
  Adam steps on the softmax cross-entropy. All layers train at once under `vmap`.
  """
  if train_features.ndim != 3 or test_features.ndim != 3:
    raise ValueError(f"features must be (layers, examples, dim); got train "
                     f"{train_features.shape} and test {test_features.shape}.")
  if train_features.shape[0] != test_features.shape[0] or (
      train_features.shape[2] != test_features.shape[2]):
    raise ValueError(f"train features {train_features.shape} and test features "
                     f"{test_features.shape} must agree in layers and dim.")
  for name, labels, features in (("train", train_labels, train_features),
                                 ("test", test_labels, test_features)):
    if labels.shape != (features.shape[1],) or labels.min() < 0 or labels.max() >= num_classes:
      raise ValueError(f"{name} labels (shape {labels.shape}) must be one integer in "
                       f"[0, {num_classes}) per example ({features.shape[1]}).")
  if num_steps < 1:
    raise ValueError(f"num_steps={num_steps} must be >= 1.")
  tx = optax.adam(learning_rate)
  train_y = jnp.asarray(train_labels, jnp.int32)
  test_y = jnp.asarray(test_labels, jnp.int32)

  def one_layer(train_x, test_x):
    train_x, test_x = _standardise(train_x, test_x)
    params = {"w": jnp.zeros((train_x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}

    def loss(p):
      logits = train_x @ p["w"] + p["b"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, train_y).mean()

    def step(_, carry):
      p, opt_state = carry
      updates, opt_state = tx.update(jax.grad(loss)(p), opt_state, p)
      return optax.apply_updates(p, updates), opt_state

    params, _ = jax.lax.fori_loop(0, num_steps, step, (params, tx.init(params)))
    predictions = (test_x @ params["w"] + params["b"]).argmax(-1)
    return jnp.mean(predictions == test_y)

  accuracy = jax.jit(jax.vmap(one_layer))(jnp.asarray(train_features, jnp.float32),
                                          jnp.asarray(test_features, jnp.float32))
  return np.asarray(accuracy, np.float64)


def metric_names(modality: str, layers: Sequence[int]) -> list[str]:
  """`eval/<modality>/probe_layer<k>` for each probed block k (1-based)."""
  return [f"eval/{modality}/probe_layer{k}" for k in layers]
