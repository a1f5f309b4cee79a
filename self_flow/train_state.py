"""The train state pytree {step, params, ema_params[, teacher_params], opt_state}, created sharded
from shapes.

The model is an `nnx` module split once into a static graphdef and plain nested dicts of arrays
(`params`), so the state is an ordinary pytree: `jax.jit` takes its shardings, orbax saves it,
and the teacher is just the same graphdef merged with an EMA of the params. The teacher is the
evaluation EMA `ema_params` (paper setting) unless `optim.teacher_ema_decay` asks for a second
EMA at another decay, `teacher_params` (`has_teacher_ema`). Initialisation runs inside
`jax.jit` with the target shardings, so no full copy of the model ever lives on one device.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx

from self_flow import config_resolution, sharding
from self_flow.models import factory

# {"step": int32 scalar, "nonfinite_steps": int32 scalar (steps skipped for a NaN/inf loss or
# gradient), "params", "ema_params", "opt_state"} and, with a teacher EMA of its own,
# "teacher_params".
TrainState = dict[str, Any]


class StateLayout(NamedTuple):
  """What the step and the checkpointer need to know about the state, without its values."""

  graphdef: nnx.GraphDef
  shardings: TrainState
  abstract: TrainState  # ShapeDtypeStruct leaves carrying the shardings (restore target).


def _abstract_model(config: ml_collections.ConfigDict,
                    resolved: config_resolution.ResolvedConfig | None):
  return nnx.eval_shape(lambda: factory.create_model(config, nnx.Rngs(0), resolved))


def abstract_params(config: ml_collections.ConfigDict,
                    resolved: config_resolution.ResolvedConfig | None = None) -> dict:
  """The model's parameters as a plain nested dict of ShapeDtypeStructs, without building any
  array: the tree of `params` (and, in float32, of the EMAs) that restoring or converting
  weights targets; `resolved` as in `factory.create_model`."""
  return nnx.to_pure_dict(nnx.state(_abstract_model(config, resolved), nnx.Param))


def model_graphdef(config: ml_collections.ConfigDict,
                   resolved: config_resolution.ResolvedConfig | None = None) -> nnx.GraphDef:
  """The model's static structure (no arrays); `resolved` as in `factory.create_model`."""
  graphdef, _ = nnx.split(_abstract_model(config, resolved), nnx.Param)
  return graphdef


def merge(graphdef: nnx.GraphDef, params):
  """Model with the given params (student `params` or teacher `ema_params`)."""
  return nnx.merge(graphdef, params)


def has_teacher_ema(config: ml_collections.ConfigDict) -> bool:
  """Whether the state keeps a teacher EMA apart from the evaluation EMA: only when the two
  decays differ, so equal decays give the one-EMA state (and checkpoints) of the paper setting,
  and only when there is a teacher (representation loss weight > 0)."""
  optim = config.optim
  return (config.objective.rep_loss_weight > 0 and optim.teacher_ema_decay >= 0
          and optim.teacher_ema_decay != optim.ema_decay)


def teacher_params(state: TrainState):
  """The weights the Self-Flow teacher runs with."""
  return state.get("teacher_params", state["ema_params"])


def state_layout(config: ml_collections.ConfigDict, mesh, tx: optax.GradientTransformation,
                 rules: sharding.Rules,
                 resolved: config_resolution.ResolvedConfig | None = None) -> StateLayout:
  """Graphdef, shardings and abstract shapes of the train state, from shapes alone; parameters
  are laid out by the logical-axis `rules` (`sharding.axis_rules(config.mesh)`)."""
  graphdef, abstract_params = nnx.split(_abstract_model(config, resolved), nnx.Param)
  logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
  abstract_params = nnx.to_pure_dict(abstract_params)
  param_shardings = sharding.tree_shardings(logical, abstract_params, rules, mesh)
  replicated = sharding.replicated(mesh)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = optax.tree_utils.tree_map_params(
      tx, lambda _, s: s, abstract_opt, param_shardings,
      transform_non_params=lambda leaf: jax.tree.map(lambda _: replicated, leaf))
  shardings = {"step": replicated, "nonfinite_steps": replicated, "params": param_shardings,
               "ema_params": param_shardings, "opt_state": opt_shardings}
  ema_abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32),
                              abstract_params)
  shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32),
            "nonfinite_steps": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
            "ema_params": ema_abstract, "opt_state": abstract_opt}
  if has_teacher_ema(config):
    shardings["teacher_params"] = param_shardings
    shapes["teacher_params"] = ema_abstract
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          shapes, shardings)
  return StateLayout(graphdef, shardings, abstract)


def num_bytes(tree) -> int:
  """Bytes of a pytree of arrays or ShapeDtypeStructs as a whole (before any sharding): what a
  checkpoint of the state holds, and what one chip would hold replicated."""
  return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def check_replication(config: ml_collections.ConfigDict, layout: StateLayout
                      ) -> sharding.ReplicationReport:
  """Logs how the mesh splits the parameters and refuses an FSDP layout that leaves more than
  `config.mesh.max_replicated_fraction` of them whole on every device."""
  report = sharding.replication_report(layout.abstract["params"], layout.shardings["params"])
  logging.info("Sharding (rules %r): %s", config.mesh.rules, report.summary())
  sharding.check_replication(report, config.mesh.max_replicated_fraction)
  return report


def create_train_state(config: ml_collections.ConfigDict, layout: StateLayout,
                       tx: optax.GradientTransformation,
                       resolved: config_resolution.ResolvedConfig | None = None) -> TrainState:
  """Fresh state, initialised directly into its shardings; the EMAs start as copies."""

  def init(key):
    model = factory.create_model(config, nnx.Rngs(params=key), resolved)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state = {
        "step": jnp.zeros((), jnp.int32),
        "nonfinite_steps": jnp.zeros((), jnp.int32),
        "params": params,
        "ema_params": jax.tree.map(lambda p: p.astype(jnp.float32), params),
        "opt_state": tx.init(params),
    }
    if has_teacher_ema(config):
      state["teacher_params"] = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    return state

  key = jax.random.PRNGKey(config.seed)
  return jax.jit(init, out_shardings=layout.shardings)(key)


def ema_decay_at(decay: float, update: jax.Array, warmup: bool):
  """The decay of EMA update number `update` (0-based): `decay`, or with warm-up
  min(decay, (1 + n) / (10 + n)) (0.1 at the first update, 0.5 at n = 8, 0.99 at n = 890), so the
  average covers about the last n / 9 updates until it reaches the fixed decay's window."""
  if not warmup:
    return decay
  n = update.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def update_ema(ema_params, params, decay):
  """theta' <- decay theta' + (1 - decay) theta, in float32."""
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p.astype(jnp.float32) - e),
                      ema_params, params)
