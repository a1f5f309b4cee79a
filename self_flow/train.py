"""train_and_evaluate(config, workdir): the training loop, importable from scripts and Colab.

Order of work: validate the config (before anything is created), build the mesh and the state
layout, open one data stream per modality, restore the latest checkpoint of `workdir` (or
initialise), then loop: pick the step's modality (a pure function of seed and step), dispatch
step i with that modality's compiled step, read back step i-1's metrics (the host never waits
on the step it just dispatched), save on the interval or on SIGTERM, evaluate every modality on
the interval and at the end.
"""

import contextlib
import errno
import shutil
import time
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
import numpy as np

from self_flow import (accelerators, checkpointing, config_resolution, config_validation, flops,
                       mixture, nonfinite, preemption, reporting, run_compatibility, storage,
                       train_program, train_state, workdir_lease)
from self_flow.data import modality_sources, pipeline
from self_flow.evaluation import audio_evaluator, evaluator, student, video_evaluator
from self_flow.modalities import spec as spec_lib
from self_flow.text import in_step_encoder

_EVALUATORS = {"image": evaluator.ImageEvaluator, "video": video_evaluator.VideoEvaluator,
               "audio": audio_evaluator.AudioEvaluator}


def _open_train_data(config: ml_collections.ConfigDict, spec: spec_lib.ModalitySpec,
                     start_batch: int = 0):
  """The resumable training iterator of one modality (embedded data or latent shards), starting
  at global batch `start_batch`."""
  data = config.data
  preprocess, transforms = modality_sources.train_processing(config, spec.name)
  return pipeline.make_train_iterator(
      modality_sources.open_source(config, spec, "train"),
      global_batch_size=spec.global_batch_size, seed=data.shuffle_seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      worker_count=data.worker_count, worker_buffer_size=data.worker_buffer_size,
      preprocess=preprocess, transforms=transforms, start_batch=start_batch)


def _data_position(config, specs, batches: dict[str, int]) -> checkpointing.DataPosition:
  """This run's data-reading layout, with the streams at `batches`."""
  return checkpointing.DataPosition(
      batches=dict(batches), global_batch_sizes={n: s.global_batch_size for n, s in specs.items()},
      worker_count=config.data.worker_count, process_count=jax.process_count())


def _prepare_data(config: ml_collections.ConfigDict,
                  specs: dict[str, spec_lib.ModalitySpec]) -> None:
  """With several processes, process 0 builds the embedded datasets before the others open them.

  Processes sharing a filesystem would otherwise all build the same dataset at once; on
  per-host disks the others build their own copy after the barrier."""
  if jax.process_count() == 1:
    return
  if jax.process_index() == 0:
    for spec in specs.values():
      modality_sources.open_source(config, spec, "train")
  multihost_utils.sync_global_devices("self_flow: training data prepared")


def create_evaluators(config, resolved: config_resolution.ResolvedConfig, graphdef,
                       workdir: str, mesh) -> dict[str, Any]:
  """One evaluator per modality on embedded data (latent shards have no decoder here)."""
  if not config.eval.enabled:
    return {}
  return {name: _EVALUATORS[name](config, resolved, graphdef, workdir, mesh)
          for name in config.modalities if not modality_sources.uses_latent_shards(config, name)}


def _evaluate(evaluators, state, step: int, writer, with_student: bool,
              final: bool) -> dict[str, float]:
  """Every modality's metrics of the EMA weights and, `with_student`, of the live params too
  (`student.student_metrics`); `final` (the run's last evaluation) adds the metrics an
  evaluator computes only then (the image probe, unless eval.probe_every_evaluation)."""
  results = {}
  for name, modality_evaluator in evaluators.items():
    results.update(modality_evaluator.evaluate(state["ema_params"], step, writer, final))
    if with_student:
      student_results = student.student_metrics(
          modality_evaluator.metrics(state["params"], final), name)
      writer.write_scalars(step, student_results)
      results.update(student_results)
    logging.info("Evaluation of %s at step %d: %s", name, step, " ".join(
        f"{k}={v:.4f}" for k, v in sorted(results.items()) if k.startswith(f"eval/{name}/")))
  return results


def _sigterm_guard():
  """Watches SIGTERM on a single process. With several, JAX's preemption sync manager already
  catches it (`_preempted`), and a Python handler would replace JAX's."""
  return contextlib.nullcontext() if jax.process_count() > 1 else preemption.PreemptionGuard()


def _preempted(guard, checkpointer: checkpointing.Checkpointer, step: int) -> bool:
  """Whether to save and exit after `step`. Processes must agree on the step: one saving alone
  would wait forever for the others, already in the next step's collectives."""
  if guard is None:
    return checkpointer.reached_preemption(step)
  return guard.requested


def _prepare_workdir(workdir: str) -> epath.Path:
  """Creates `workdir` and proves it writable (a probe file), before any work is done.

  A read-only mount, a path under a file or a bucket without write access would otherwise
  surface only at the first checkpoint, after the set-up and the first interval of training."""
  workdir = storage.resolve(workdir)  # orbax needs absolute local paths
  path = epath.Path(workdir)
  probe = path / f".write_probe_{jax.process_index()}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("self_flow")
    probe.unlink()
  except OSError as err:
    raise OSError(err.errno or errno.EACCES,
                  f"--workdir={workdir} is not writable ({type(err).__name__}: {err}); "
                  "checkpoints, logs and samples go there. Pick a directory this process can "
                  "create and write.") from err
  return path


def _check_free_space(workdir: epath.Path, abstract_state, keep: int) -> None:
  """Refuses a local workdir without room for one checkpoint; warns below `keep` + 1 of them."""
  if "://" in str(workdir):
    return
  needed = train_state.num_bytes(abstract_state)
  free = shutil.disk_usage(str(workdir)).free
  if free < needed:
    raise OSError(errno.ENOSPC, f"--workdir={workdir} has {free / 2**20:.1f} MiB free; one "
                  f"checkpoint of this run needs about {needed / 2**20:.1f} MiB. Free space or "
                  "use another directory.")
  if free < (keep + 1) * needed:
    logging.warning("%s has %.1f MiB free: fewer than train.keep_checkpoints + 1 = %d "
                    "checkpoints of %.1f MiB fit.", workdir, free / 2**20, keep + 1,
                    needed / 2**20)


def _restore_or_init(config, program: train_program.TrainProgram,
                     checkpointer: checkpointing.Checkpointer, workdir: epath.Path,
                     modality_of: mixture.ModalitySchedule):
  """(start step, state, training iterators, global batches each has yielded): the newest
  readable checkpoint of `workdir` if its arrays fit this config (else an error naming the
  differing keys, before anything is written), otherwise a fresh state, optionally initialised
  from another run (`train.init_from`), and streams at their start."""
  specs = program.resolved.specs

  def check(step, saved_config, saved_shapes):
    run_compatibility.check_resumable(
        workdir=str(workdir), step=step, saved_config=saved_config, saved_shapes=saved_shapes,
        config_dict=config.to_dict(), abstract_state=program.layout.abstract)

  step, state, saved_position = checkpointer.restore_latest(program.layout.abstract, check=check)
  if step is not None:
    logging.info("Resuming from the checkpoint of step %d in %s.", step, workdir)
    if config.train.init_from:
      logging.warning("config.train.init_from=%r is ignored: %s already has a checkpoint.",
                      config.train.init_from, workdir)
    # A checkpoint without a saved position: the batches each stream yielded follow from the
    # step, since the step's modality is a pure function of (seed, step).
    batches = saved_position.batches if saved_position else {
        name: modality_of.sequence(0, step).count(name) for name in specs}
    iterators = checkpointer.restore_iterators(
        step, saved_position, _data_position(config, specs, batches),
        lambda name, start: _open_train_data(config, specs[name], start))
    return step, state, iterators, dict(batches)
  state = train_state.create_train_state(config, program.layout, program.tx, program.resolved)
  if config.train.init_from:
    state, _, _ = run_compatibility.restore_matching(config.train.init_from, state,
                                                     program.layout.abstract)
  return 0, state, {n: _open_train_data(config, s) for n, s in specs.items()}, dict.fromkeys(
      specs, 0)


@contextlib.contextmanager
def _held_lease(workdir: epath.Path, timeout_s: float):
  """The workdir's lease (`workdir_lease`), held by process 0 for the whole run; every process
  raises WorkdirBusyError if another live run holds it. Yields the lease (None off process 0)."""
  lease, busy = None, ""
  if jax.process_index() == 0:
    lease = workdir_lease.WorkdirLease(str(workdir), timeout_s)
    try:
      lease.acquire()
    except workdir_lease.WorkdirBusyError as err:
      lease, busy = None, str(err)
  if jax.process_count() > 1:
    refused = int(multihost_utils.broadcast_one_to_all(np.int32(bool(busy))))
    busy = busy or ("another live run holds the lease of this workdir (see process 0's log)."
                    if refused else "")
  if busy:
    raise workdir_lease.WorkdirBusyError(busy)
  try:
    yield lease
  finally:
    if lease is not None:
      lease.release()


class _Readback:
  """The step dispatched last, whose metrics the host reads only after dispatching the next one,
  so the host never waits on the step it just dispatched."""

  def __init__(self, on_metrics):
    self._on_metrics = on_metrics  # (step, modality, host metrics) -> None
    self._pending = None  # (step, modality, device metrics)

  def push(self, step: int, modality: str, device_metrics) -> None:
    """Reads back the previous step, then holds this one."""
    self.flush()
    self._pending = (step, modality, device_metrics)

  def flush(self) -> None:
    """Reads back the held step, if any (before a save, so the saved state was checked)."""
    if self._pending is not None:
      step, modality, device_metrics = self._pending
      self._pending = None
      self._on_metrics(step, modality, jax.device_get(device_metrics))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints) and evaluates.

  Returns {"losses": {step: loss}, "modalities": {step: modality}, "eval": final evaluation
  metrics} for scripts and tests (plus "preempted_at" after a SIGTERM).
  """
  resolved = config_validation.validate(config)  # specs and sizes, built once for the run
  unused_accelerator = accelerators.unused_accelerator_warning(jax.default_backend())
  if unused_accelerator:
    logging.warning("NO ACCELERATOR IN USE. %s", unused_accelerator)
  workdir = _prepare_workdir(workdir)
  with _held_lease(workdir, config.train.lease_timeout_s) as lease:
    return _train_in_workdir(config, resolved, workdir, lease)


def _train_in_workdir(config: ml_collections.ConfigDict,
                      resolved: config_resolution.ResolvedConfig, workdir: epath.Path,
                      lease: workdir_lease.WorkdirLease | None) -> dict[str, Any]:
  """The body of `train_and_evaluate`, run while this run holds the workdir's lease."""
  num_steps = config.train.num_steps

  program = train_program.build(config, resolved)  # logs the split; refuses replicated FSDP
  specs, mesh = resolved.specs, program.mesh
  modality_of = mixture.ModalitySchedule({n: s.probability for n, s in specs.items()},
                                         config.seed)
  _check_free_space(workdir, program.layout.abstract, config.train.keep_checkpoints)
  _prepare_data(config, specs)

  checkpointer = checkpointing.Checkpointer(
      str(checkpointing.checkpoints_dir(str(workdir))), save_every=config.train.checkpoint_every,
      keep=config.train.keep_checkpoints, modalities=tuple(specs),
      read_attempts=config.train.restore_attempts,
      retry_wait_s=config.train.restore_retry_wait_s)
  start_step, state, train_iters, batches_read = _restore_or_init(
      config, program, checkpointer, workdir, modality_of)
  # The frozen in-step text encoder's weights (text.encoder="t5"): an extra step argument.
  text_params = (() if program.text_encoder is None
                 else (in_step_encoder.load_params(config, program.text_encoder),))

  writer = reporting.create_writer(str(workdir))
  writer.write_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v)
                        for k, v in run_compatibility.flatten_config(config.to_dict()).items()})
  evaluators = create_evaluators(config, resolved, program.layout.graphdef, str(workdir), mesh)
  base_rng = jax.device_put(jax.random.PRNGKey(config.seed), program.replicated)
  balance_every = config.train.gradient_balance_every
  # Analytic model FLOPs per step per device of each modality's step.
  step_flops = {name: flops.train_step_flops(config, resolved, name).total / jax.device_count()
                for name in specs}
  # The same for all devices together, logged once: what an ablation converts steps into.
  writer.write_scalars(start_step, {f"perf/model_flops_per_step/{name}": f * jax.device_count()
                                    for name, f in step_flops.items()})
  window = reporting.MetricWindow(
      writer, modalities=tuple(specs), step_flops=step_flops,
      peak_tflops=reporting.peak_tflops_per_device(config.train.peak_tflops_per_device),
      log_every=config.train.log_every, num_steps=num_steps)
  nonfinite_policy = nonfinite.NonFinitePolicy(
      config.train.nonfinite, config.train.max_nonfinite_in_a_row, checkpointer.latest_step)
  losses: dict[int, float] = {}
  modalities: dict[int, str] = {}

  def on_metrics(step: int, name: str, host) -> None:
    losses[step] = float(host["loss"])
    modalities[step] = name
    window.add(step, name, host)
    nonfinite_policy.check(step, host)

  readback = _Readback(on_metrics)
  compiled: dict[str, Any] = {}  # modality -> compiled step, compiled on first use
  hooks = reporting.periodic_hooks(str(workdir), config.train.profile)

  def save(step: int, force: bool = False) -> None:
    """Saves on the interval (or forced) once step's metrics were checked finite: a state
    that went NaN never becomes the latest checkpoint."""
    if force or checkpointer.should_save(step):
      readback.flush()
      checkpointer.save(step, state, train_iters, _data_position(config, specs, batches_read),
                        config, force=force)

  with _sigterm_guard() as guard, _finish_saves_on_error(checkpointer):
    for step in range(start_step, num_steps):
      name = modality_of(step)
      if lease is not None:
        lease.check()  # another run took the workdir over: stop before writing anything more
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = pipeline.make_global_batch(next(train_iters[name]), program.batch_sharding)
        batches_read[name] += 1
        if name not in compiled:
          compile_start = time.time()
          compiled[name] = program.step_fns[name].lower(state, batch, base_rng,
                                                        *text_params).compile()
          window.exclude(time.time() - compile_start)
          logging.info("Compiled the %s train step: %.4g model FLOPs per step per device.", name,
                       step_flops[name])
        balance = None
        if name in program.balance_fns and (step + 1) % balance_every == 0:
          balance = program.balance_fns[name](state, batch, base_rng,  # before `state` is donated
                                              *text_params)
        state, metrics = compiled[name](state, batch, base_rng, *text_params)
      if balance is not None:
        prefix = f"train/{name}/" if len(specs) > 1 else "train/"
        writer.write_scalars(step + 1, {prefix + k: float(v)
                                        for k, v in jax.device_get(balance).items()})
      readback.push(step + 1, name, metrics)
      for hook in hooks:
        hook(step + 1)
      if _preempted(guard, checkpointer, step + 1):
        save(step + 1, force=True)
        checkpointer.wait()  # a second SIGTERM meanwhile only sets the flag again
        logging.warning("Saved the checkpoint of step %d in %s after SIGTERM; exiting. To resume, "
                        "rerun the same command with the same --workdir.", step + 1, workdir)
        writer.flush()
        return {"losses": losses, "modalities": modalities, "eval": None,
                "preempted_at": step + 1}
      save(step + 1)
      every = config.train.eval_every
      if evaluators and every and (step + 1) % every == 0 and step + 1 < num_steps:
        _evaluate(evaluators, state, step + 1, writer, config.eval.student, final=False)
    readback.flush()
    if checkpointer.latest_step() != num_steps:
      save(num_steps, force=True)
    checkpointer.wait()

  final = (_evaluate(evaluators, state, num_steps, writer, config.eval.student, final=True)
           if evaluators else None)
  writer.flush()
  checkpointer.close()
  return {"losses": losses, "modalities": modalities, "eval": final}


@contextlib.contextmanager
def _finish_saves_on_error(checkpointer: checkpointing.Checkpointer):
  """On an error in the loop, lets an async save already under way finish before the error
  propagates (the process may exit right after), without masking the error."""
  try:
    yield
  except BaseException:
    try:
      checkpointer.wait()
    except checkpointing.CheckpointWriteError as err:
      logging.error("%s", err)
    raise
