"""Checks a run config before any state, file or device buffer is created.

Each failure names the key, the bad value and what is allowed, so a typo on the command line
costs seconds, not a TPU allocation. The choices and the structural rules belong to the modules
that use them (`factory.check_config`, `modality_sources.check_config`, the tuples of allowed
values each module defines): this module composes them, so a rule cannot drift from its use.
`validate` returns the config's resolution (`config_resolution.resolve`), which the trainer
passes on instead of deriving it again.
"""

import jax
import ml_collections

from self_flow import (base_config, conditioning, config_resolution, nonfinite, objectives, optim,
                       sampling, sharding)
from self_flow.data import modality_sources, sources
from self_flow.data.latent_shards import reader
from self_flow.evaluation import linear_probe
from self_flow.modalities import spec as spec_lib
from self_flow.models import attention, dit, factory, scanning

CHOICES = {
    "model.attention": attention.IMPLEMENTATIONS,
    "model.remat_policy": tuple(scanning.REMAT_POLICIES),
    "model.compute_dtype": tuple(factory.DTYPES),
    "model.param_dtype": tuple(factory.DTYPES),
    "objective.noising": objectives.NOISING_POLICIES,
    "objective.time_distribution": objectives.TIME_DISTRIBUTIONS,
    "objective.teacher_time": objectives.TEACHER_TIMES,
    "optim.schedule": optim.SCHEDULES,
    "optim.moment_dtype": tuple(optim.MOMENT_DTYPES),
    "sampling.method": sampling.METHODS,
    "data.source": sources.SOURCES,
    "data.latent_sampling": modality_sources.LATENT_SAMPLING,
    "model.architecture": factory.ARCHITECTURES,
    "model.timestep_input": dit.TIMESTEP_INPUTS,
    "model.position_embedding_order": tuple(factory.POSITION_ORDERS),
    "model.conditioning": conditioning.KINDS,
    "mesh.rules": tuple(sharding.RULE_PRESETS),
    "text.encoder": factory.TEXT_ENCODERS,
    "train.nonfinite": nonfinite.POLICIES,
    "data.bad_records": reader.BAD_RECORD_POLICIES,
}

# key -> (predicate, description of what is allowed)
RANGES = {
    "objective.mask_ratio": (lambda v: 0.0 <= v <= 0.5, "a float in [0, 0.5] (paper: R_M <= 0.5)"),
    "objective.rep_loss_weight": (lambda v: v >= 0.0, "a float >= 0"),
    "objective.train_shift": (lambda v: v > 0.0, "a float > 0"),
    "objective.logit_normal_std": (lambda v: v > 0.0, "a float > 0"),
    "objective.condition_dropout": (lambda v: 0.0 <= v < 1.0, "a float in [0, 1)"),
    "model.mlp_ratio": (lambda v: v > 0, "a number > 0"),
    "model.projector_hidden_mult": (lambda v: v >= 1, "an integer >= 1"),
    "data.global_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "data.image_size": (lambda v: v >= 1, "an integer >= 1"),
    "data.num_channels": (lambda v: v >= 1, "an integer >= 1"),
    "data.num_classes": (lambda v: v >= 1, "an integer >= 1"),
    "data.worker_count": (lambda v: v >= 0, "an integer >= 0"),
    "data.worker_buffer_size": (lambda v: v >= 1, "an integer >= 1"),
    "optim.learning_rate": (lambda v: v > 0, "a float > 0"),
    "optim.warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "optim.b1": (lambda v: 0 <= v < 1, "a float in [0, 1)"),
    "optim.b2": (lambda v: 0 <= v < 1, "a float in [0, 1)"),
    "optim.eps": (lambda v: v > 0, "a float > 0"),
    "optim.weight_decay": (lambda v: v >= 0, "a float >= 0"),
    "optim.grad_clip_norm": (lambda v: v >= 0, "a float >= 0 (0 disables clipping)"),
    "optim.ema_decay": (lambda v: 0 <= v < 1, "a float in [0, 1)"),
    "optim.teacher_ema_decay": (lambda v: v == -1 or 0 <= v < 1,
                                "-1 (the teacher is the evaluation EMA) or a float in [0, 1)"),
    "train.gradient_balance_every": (lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "train.microbatches": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "train.max_nonfinite_in_a_row": (lambda v: v >= 1, "an integer >= 1"),
    "mesh.dcn_data": (lambda v: v == -1 or v >= 1, "-1 (every slice) or an integer >= 1"),
    "mesh.max_replicated_fraction": (lambda v: 0 <= v <= 1, "a float in [0, 1]"),
    "train.num_steps": (lambda v: v >= 1, "an integer >= 1"),
    "train.log_every": (lambda v: v >= 1, "an integer >= 1"),
    "train.checkpoint_every": (lambda v: v >= 1, "an integer >= 1"),
    "train.keep_checkpoints": (lambda v: v >= 1, "an integer >= 1"),
    "train.eval_every": (lambda v: v >= 0, "an integer >= 0 (0 = evaluate only at the end)"),
    "train.peak_tflops_per_device": (lambda v: v >= 0, "a float >= 0 (0 = look up)"),
    "train.lease_timeout_s": (lambda v: v > 0, "a float > 0 (seconds)"),
    "train.restore_attempts": (lambda v: v >= 1, "an integer >= 1"),
    "train.restore_retry_wait_s": (lambda v: v >= 0, "a float >= 0 (seconds)"),
    "sampling.num_steps": (lambda v: v >= 1, "an integer >= 1"),
    "sampling.shift": (lambda v: v > 0, "a float > 0"),
    "sampling.cfg_scale": (lambda v: v >= 0, "a float >= 0"),
    "sampling.guidance_low": (lambda v: 0 <= v <= 1, "a float in [0, 1]"),
    "sampling.guidance_high": (lambda v: 0 <= v <= 1, "a float in [0, 1]"),
    "model.num_double": (lambda v: v >= 0, "an integer >= 0"),
    "text.max_length": (lambda v: v >= 1, "an integer >= 1"),
    "text.width": (lambda v: v >= 1, "an integer >= 1"),
    "text.depth": (lambda v: v >= 0, "an integer >= 0"),
    "text.num_heads": (lambda v: v >= 1, "an integer >= 1"),
    "text.embedding_dim": (lambda v: v >= 1, "an integer >= 1"),
    "eval.num_samples": (lambda v: v >= 2, "an integer >= 2"),
    "eval.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "eval.grid_rows": (lambda v: v >= 1, "an integer >= 1"),
    "eval.grid_classes_per_row": (lambda v: v >= 1, "an integer >= 1"),
    "eval.classifier_steps": (lambda v: v >= 1, "an integer >= 1"),
    "eval.classifier_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "eval.classifier_learning_rate": (lambda v: v > 0, "a float > 0"),
    "eval.probe_examples": (lambda v: v == 0 or v >= 2, "0 (no probe) or an integer >= 2"),
    "eval.probe_ridge": (lambda v: v > 0, "a float > 0"),
    "eval.seed_offset": (lambda v: v >= 0, "an integer >= 0"),
    "eval.loss_bins": (lambda v: v >= 0, "an integer >= 0 (0 = no stratified loss)"),
    **{f"{section}.{key}": (lambda v: v >= 1, "an integer >= 1")
       for section, keys in (("video", ("num_frames", "image_size", "num_channels", "patch_time",
                                        "patch_size", "global_batch_size")),
                             ("audio", ("num_frames", "num_channels", "frames_per_token",
                                        "global_batch_size")))
       for key in keys},
    **{f"{section}.mask_ratio": (lambda v: 0.0 <= v <= 0.5, "a float in [0, 0.5]")
       for section in ("video", "audio")},
    **{f"{section}.{key}": (lambda v: v > 0.0, "a float > 0")
       for section in ("video", "audio") for key in ("train_shift", "sample_shift")},
    **{f"mixture.{table}.{name}": (lambda v: v >= 0.0, "a float >= 0")
       for table in ("probabilities", "loss_weights") for name in spec_lib.MODALITIES},
}


def _get(config: ml_collections.ConfigDict, dotted: str):
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def _type_name(value) -> str:
  return {bool: "a bool", int: "an int", float: "a float", str: "a string", tuple: "a tuple",
          list: "a list"}.get(type(value), type(value).__name__)


def _type_ok(value, reference) -> bool:
  """Whether `value` may stand where the base config has `reference` (ints pass as floats)."""
  if isinstance(reference, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(reference, bool)
  if isinstance(reference, float):
    return isinstance(value, (int, float))
  if isinstance(reference, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(reference))


def check_keys_and_types(config: ml_collections.ConfigDict, reference=None,
                         prefix: str = "") -> None:
  """Every key must exist in `base_config.py` and hold a value of that key's type there.

  Configs built from `get_base_config()` are locked against new keys, but a config assembled
  elsewhere (a notebook dict, a JSON of an old run) is not: this catches the typo `lerning_rate`
  that would otherwise be ignored, and a "1e-4" string where a float belongs."""
  reference = base_config.get_base_config() if reference is None else reference
  for key in config.keys():
    name = f"{prefix}{key}"
    if key not in reference:
      known = ", ".join(sorted(reference.keys()))
      raise ValueError(f"config.{name} is not a config key; "
                       f"{f'config.{prefix[:-1]}' if prefix else 'config'} has: {known}.")
    value, want = config[key], reference[key]
    if isinstance(want, ml_collections.ConfigDict):
      if not isinstance(value, (ml_collections.ConfigDict, dict)):
        raise ValueError(f"config.{name}={value!r} is not allowed; it must be a section "
                         f"(ConfigDict) with keys {sorted(want.keys())}.")
      check_keys_and_types(ml_collections.ConfigDict(value) if isinstance(value, dict) else value,
                           want, name + ".")
    elif not _type_ok(value, want):
      raise ValueError(f"config.{name}={value!r} has the wrong type: it must be "
                       f"{_type_name(want)} (default {want!r}), not {_type_name(value)}.")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None
             ) -> config_resolution.ResolvedConfig:
  """The config's resolution; raises ValueError naming the first bad key, its value and what is
  allowed."""
  check_keys_and_types(config)
  for key, allowed in CHOICES.items():
    value = _get(config, key)
    if value not in allowed:
      raise ValueError(f"config.{key}={value!r} is not allowed; choose one of {list(allowed)}.")
  for key, (ok, allowed) in RANGES.items():
    value = _get(config, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
      raise ValueError(f"config.{key}={value!r} is not allowed; it must be {allowed}.")
  resolved = config_resolution.resolve(config)  # sizes, layers, patches, mixture
  linear_probe.resolve_layers(config.eval.probe_layers, resolved.dims.depth)
  linear_probe.check_timesteps(config.eval.probe_timesteps)
  factory.check_config(config, resolved)
  modality_sources.check_config(config, tuple(resolved.specs))
  if config.sampling.guidance_low > config.sampling.guidance_high:
    raise ValueError(f"config.sampling.guidance_low={config.sampling.guidance_low} must not "
                     f"exceed config.sampling.guidance_high={config.sampling.guidance_high}.")
  num_devices = jax.device_count() if num_devices is None else num_devices
  shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, num_devices)))
  batch_shards = shape["data"] * shape["fsdp"]
  for name, spec in resolved.specs.items():
    key = f"config.{modality_sources.SECTIONS[name]}.global_batch_size"
    if spec.global_batch_size % batch_shards:
      raise ValueError(f"{key}={spec.global_batch_size} must be divisible by mesh "
                       f"data*fsdp={batch_shards} (mesh {shape}).")
    if spec.global_batch_size % (config.train.microbatches * batch_shards):
      raise ValueError(f"config.train.microbatches={config.train.microbatches} is not allowed "
                       f"with {key}={spec.global_batch_size}: the batch must be divisible by "
                       f"microbatches x mesh data*fsdp = {config.train.microbatches} x "
                       f"{batch_shards}, so each microbatch spreads over every device.")
    if spec.global_batch_size % jax.process_count():
      raise ValueError(f"{key}={spec.global_batch_size} must be divisible by the process count "
                       f"{jax.process_count()}.")
  if config.eval.batch_size % batch_shards:
    raise ValueError(f"config.eval.batch_size={config.eval.batch_size} must be divisible by mesh "
                     f"data*fsdp={batch_shards} (mesh {shape}).")
  sharding.check_rules(config.mesh.logical_axis_rules)
  if shape["data"] % max(config.mesh.dcn_data, 1):
    raise ValueError(f"config.mesh.dcn_data={config.mesh.dcn_data} slices must divide mesh "
                     f"data={shape['data']} (mesh {shape}).")
  return resolved
