"""The multi-process flags of every program that can run on all hosts of a pod, and their use.

Training (`self_flow.main`) and the encoding jobs (`tools.write_latent_shards`,
`tools.encode_latents`) start the same way on every host: JAX detects TPU pods, SLURM, Open MPI,
...; where it cannot (GPU hosts started by hand, several CPU processes on one machine), every
process names the coordinator, the process count and its own id.
"""

import os

from absl import flags


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines --distributed, --coordinator_address, --num_processes and --process_id, once per
  `flag_values` (several programs' modules may be imported into one process, e.g. by tests)."""
  if "coordinator_address" in flag_values:
    return
  fv = dict(flag_values=flag_values)
  flags.DEFINE_bool("distributed", None,
                    "Call jax.distributed.initialize(); default: when running on a TPU pod, when "
                    "JAX_COORDINATOR_ADDRESS is set or when --coordinator_address is given.", **fv)
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0's coordinator (default: JAX_COORDINATOR_ADDRESS or "
                      "detected).", **fv)
  flags.DEFINE_integer("num_processes", None, "Processes of a distributed run (default: "
                       "detected).", **fv)
  flags.DEFINE_integer("process_id", None, "This process's id, 0..num_processes-1 (default: "
                       "detected).", **fv)


def wanted(flag_values: flags.FlagValues = flags.FLAGS) -> bool:
  """Whether the flags (or the environment) ask for `jax.distributed.initialize`."""
  if flag_values.distributed is not None:
    return flag_values.distributed
  return bool(flag_values.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
              or os.environ.get("TPU_WORKER_HOSTNAMES"))


def initialize(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """`jax.distributed.initialize` with the flags' values, if `wanted`; call before JAX runs."""
  if wanted(flag_values):
    import jax  # pylint: disable=g-import-not-at-top  (after the CPU device count is set)
    jax.distributed.initialize(coordinator_address=flag_values.coordinator_address,
                               num_processes=flag_values.num_processes,
                               process_id=flag_values.process_id)
