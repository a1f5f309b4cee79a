"""train_and_evaluate(config, workdir): the training loop, importable from scripts and Colab.

Order of work: validate the config (before anything is created), build the mesh and the state
layout, open data, restore the latest checkpoint of `workdir` (or initialise), then loop:
dispatch step i, read back step i-1's metrics (the host never waits on the step it just
dispatched), save on the interval or on SIGTERM, evaluate on the interval and at the end.
"""

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from self_flow import (checkpointing, config_validation, optim, preemption, reporting, sharding,
                       train_state, train_step)
from self_flow.data import captions, latent_shards, pipeline, sources
from self_flow.evaluation import evaluator as evaluator_lib


def _open_train_data(config: ml_collections.ConfigDict):
  """The resumable training iterator: embedded images (+ generated captions) or latent shards."""
  data = config.data
  kwargs = dict(global_batch_size=data.global_batch_size, seed=data.shuffle_seed,
                process_index=jax.process_index(), process_count=jax.process_count(),
                worker_count=data.worker_count, worker_buffer_size=data.worker_buffer_size)
  if data.dataset == "latent_shards":
    source = latent_shards.LatentShardSource(data.data_dir, "train")
    return pipeline.make_train_iterator(source, preprocess=pipeline.preprocess_latents, **kwargs)
  source = sources.open_image_source(data.dataset, "train", data.data_dir, data.source)
  transforms = ()
  if config.model.conditioning == "text":
    transforms = (captions.CaptionTokens(config.text.max_length),)
  return pipeline.make_train_iterator(source, transforms=transforms, **kwargs)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints) and evaluates.

  Returns {"losses": {step: loss}, "eval": final evaluation metrics} for scripts and tests.
  """
  config_validation.validate(config)
  if "://" not in workdir:  # orbax needs absolute local paths
    workdir = os.path.abspath(workdir)
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  num_steps = config.train.num_steps

  mesh = sharding.create_mesh(config.mesh)
  tx, schedule = optim.make_optimizer(config.optim, num_steps)
  layout = train_state.state_layout(config, mesh, tx)
  batch_sharding = sharding.batch_sharding(mesh)
  train_iter = _open_train_data(config)

  checkpointer = checkpointing.Checkpointer(
      str(workdir / "checkpoints"), save_every=config.train.checkpoint_every,
      keep=config.train.keep_checkpoints)
  start_step = checkpointer.latest_step()
  if start_step is None:
    start_step = 0
    state = train_state.create_train_state(config, layout, tx)
  else:
    logging.info("Resuming from the checkpoint of step %d in %s.", start_step, workdir)
    state = checkpointer.restore(start_step, layout.abstract, train_iter)

  writer = reporting.create_writer(str(workdir))
  writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})
  # Latent shards have no decoder here, so pixel-space evaluation runs on embedded data only.
  evaluator = None
  if config.data.dataset != "latent_shards":
    evaluator = evaluator_lib.ImageEvaluator(config, layout.graphdef, str(workdir), mesh)
  base_rng = jax.device_put(jax.random.PRNGKey(config.seed), sharding.replicated(mesh))
  p_train_step = jax.jit(
      train_step.make_train_step(config, layout.graphdef, tx, schedule),
      in_shardings=(layout.shardings, batch_sharding, sharding.replicated(mesh)),
      out_shardings=(layout.shardings, sharding.replicated(mesh)), donate_argnums=(0,))

  losses: dict[int, float] = {}
  window: list[dict[str, np.ndarray]] = []
  pending = None  # (step, device metrics) of the step dispatched last.
  compiled = None
  step_flops = None
  peak = reporting.peak_tflops_per_device(config.train.peak_tflops_per_device)
  hooks = reporting.periodic_hooks(num_steps, writer, str(workdir), config.train.profile)
  window_start = time.time()

  def drain(entry):
    """Host copy of a finished step's metrics; writes the window at log steps."""
    nonlocal window_start
    step, device_metrics = entry
    host = jax.device_get(device_metrics)
    losses[step] = float(host["loss"])
    window.append(host)
    if step % config.train.log_every == 0 or step == num_steps:
      elapsed = time.time() - window_start
      scalars = {f"train/{k}": v for k, v in reporting.mean_metrics(window).items()}
      steps_per_sec = len(window) / max(elapsed, 1e-9)
      scalars["perf/steps_per_sec"] = steps_per_sec
      scalars.update(reporting.throughput_metrics(step_flops, steps_per_sec, peak))
      writer.write_scalars(step, scalars)
      window.clear()
      window_start = time.time()
    if not np.isfinite(losses[step]):
      raise FloatingPointError(f"loss is {losses[step]} at step {step}; stopping before saving.")

  with preemption.PreemptionGuard() as guard:
    for step in range(start_step, num_steps):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = pipeline.make_global_batch(next(train_iter), batch_sharding)
        if compiled is None:
          compiled = p_train_step.lower(state, batch, base_rng).compile()
          step_flops = reporting.compiled_flops(compiled)
          logging.info("Compiled the train step: %s FLOPs per step per device.", step_flops)
        state, metrics = compiled(state, batch, base_rng)
      if pending is not None:
        drain(pending)
      pending = (step + 1, metrics)
      for hook in hooks:
        hook(step + 1)
      if guard.requested:
        drain(pending)
        pending = None
        checkpointer.save(step + 1, state, train_iter, config, force=True)
        checkpointer.wait()
        logging.warning("Saved step %d after SIGTERM; exiting.", step + 1)
        writer.flush()
        return {"losses": losses, "eval": None, "preempted_at": step + 1}
      checkpointer.save(step + 1, state, train_iter, config)
      every = config.train.eval_every
      if evaluator and every and (step + 1) % every == 0 and step + 1 < num_steps:
        evaluator.evaluate(state["ema_params"], step + 1, writer)
    if pending is not None:
      drain(pending)

  if checkpointer.latest_step() != num_steps:
    checkpointer.save(num_steps, state, train_iter, config, force=True)
  checkpointer.wait()
  final = None
  if evaluator:
    final = evaluator.evaluate(state["ema_params"], num_steps, writer)
    logging.info("Final evaluation at step %d: %s", num_steps,
                 " ".join(f"{k}={v:.4f}" for k, v in sorted(final.items())))
  writer.flush()
  checkpointer.close()
  return {"losses": losses, "eval": final}


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  """Nested config dict -> {"a.b": value} with values TensorBoard's hparams accept."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
  return flat
