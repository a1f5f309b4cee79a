"""The trainer's compiled program, built once: mesh, state layout and one jitted step per modality.

`train.train_and_evaluate` runs it on the local devices; `self_flow.aot` compiles the same
object for a TPU topology that is not attached (compile-only devices), so what the ahead-of-time
report measures is exactly what a pod would run. Nothing here touches data or a workdir.
"""

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from self_flow import config_resolution, optim, sharding, train_state, train_step
from self_flow.data import modality_sources
from self_flow.modalities import spec as spec_lib
from self_flow.text import in_step_encoder


class TrainProgram(NamedTuple):
  """Everything the loop needs to run steps, without any array values."""

  resolved: config_resolution.ResolvedConfig
  mesh: Mesh
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  layout: train_state.StateLayout
  batch_sharding: NamedSharding
  replicated: NamedSharding  # The step rng and the metrics.
  # modality -> jitted (state, batch, base_rng, *text_params) -> (state, metrics)
  step_fns: dict[str, Any]
  # modality -> jitted (state, batch, base_rng, *text_params) -> gradient-balance metrics;
  # empty when train.gradient_balance_every is 0 or the objective has no representation loss.
  balance_fns: dict[str, Any]
  # The frozen text encoder the steps run on caption token ids (text.encoder="t5"): its
  # parameters are the steps' last argument. None: the steps take no such argument.
  text_encoder: in_step_encoder.TextEncoderLayout | None

  @property
  def specs(self) -> dict[str, spec_lib.ModalitySpec]:
    return self.resolved.specs


def build(config: ml_collections.ConfigDict, resolved: config_resolution.ResolvedConfig,
          devices: Sequence[Any] | None = None) -> TrainProgram:
  """The program of `config` over `devices` (default: all of this process's global devices);
  `resolved` is the config's resolution (what `config_validation.validate` returned).

  Refuses an FSDP layout that leaves too much replicated (`train_state.check_replication`).
  """
  specs = resolved.specs
  mesh = sharding.create_mesh(config.mesh, devices)
  tx, schedule = optim.make_optimizer(config.optim, config.train.num_steps)
  rules = sharding.axis_rules(config.mesh)
  layout = train_state.state_layout(config, mesh, tx, rules, resolved)
  train_state.check_replication(config, layout)
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  text_encoder = (in_step_encoder.layout(config, mesh, rules) if in_step_encoder.used(config)
                  else None)
  inputs = (layout.shardings, batch_sharding, replicated)
  if text_encoder is not None:
    inputs += (text_encoder.shardings,)

  def compiled(fn, **kwargs):
    """`fn` jitted over `inputs`, embedding the captions first when the encoder is in-step."""
    if text_encoder is not None:
      fn = _embedding_captions(fn, text_encoder)
    return jax.jit(sharding.activation_sharding(mesh, rules)(fn), in_shardings=inputs,
                   compiler_options=sharding.compiler_options(config.mesh, mesh) or None, **kwargs)

  step_fns = {
      name: compiled(train_step.make_train_step(config, layout.graphdef, tx, schedule, spec),
                     out_shardings=(layout.shardings, replicated), donate_argnums=(0,))
      for name, spec in specs.items()}
  balance_fns = {}
  if config.train.gradient_balance_every and config.objective.rep_loss_weight > 0:
    balance_fns = {
        name: compiled(train_step.make_gradient_balance_fn(config, layout.graphdef, spec),
                       out_shardings=replicated)
        for name, spec in specs.items()}
  return TrainProgram(resolved, mesh, tx, schedule, layout, batch_sharding, replicated, step_fns,
                      balance_fns, text_encoder)


def _embedding_captions(fn, text_encoder: in_step_encoder.TextEncoderLayout):
  """(state, batch, rng) -> ... as (state, batch, rng, text_params) -> ..., the batch's caption
  token ids embedded by the frozen encoder first."""
  def with_text_params(state, batch, base_rng, text_params):
    return fn(state, in_step_encoder.embed_batch(text_encoder.graphdef, text_params, batch),
              base_rng)

  return with_text_params


def abstract_batch(config: ml_collections.ConfigDict, program: TrainProgram, modality: str
                   ) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch the input pipeline feeds `modality`'s step, as sharded shapes."""
  spec = program.specs[modality]
  shapes = modality_sources.batch_shapes(config, spec)
  return {key: jax.ShapeDtypeStruct((spec.global_batch_size, *shape), dtype,
                                    sharding=program.batch_sharding)
          for key, (shape, dtype) in shapes.items()}


def abstract_rng(program: TrainProgram) -> jax.ShapeDtypeStruct:
  """The replicated base PRNG key the loop passes to every step."""
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=program.replicated)


def lower(config: ml_collections.ConfigDict, program: TrainProgram, modality: str):
  """`modality`'s step lowered for abstract state, batch and rng (and text encoder parameters)
  (for AOT compilation)."""
  text = () if program.text_encoder is None else (program.text_encoder.abstract,)
  return program.step_fns[modality].lower(program.layout.abstract,
                                          abstract_batch(config, program, modality),
                                          abstract_rng(program), *text)
