"""Entry point: python -m self_flow.main --config=configs/<name>.py[:arg] --workdir=DIR.

Kept short (Flax examples style): flags, the CPU device count, distributed init, hide accelerators from TensorFlow,
then `train.train_and_evaluate`. `--config.key=value` overrides any config key.
"""

import importlib.util
import os
import re
import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from self_flow import distributed

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, logs, samples.")
config_flags.DEFINE_config_file("config", None, "Run configuration file.", lock_config=True)
distributed.define_flags()
flags.DEFINE_bool("library_info_logs", False,
                  "Also log the INFO lines of the libraries (orbax, grain, tfds, ...); by default "
                  "only self_flow's INFO lines and every library's warnings and errors.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  from self_flow import accelerators, reporting  # pylint: disable=g-import-not-at-top
  if not FLAGS.library_info_logs:
    reporting.show_only_own_info_logs()
  config = FLAGS.config
  cpu_devices = accelerators.cpu_device_count(
      config.mesh.cpu_devices, (config.data.global_batch_size, config.eval.batch_size),
      accelerators.usable_cores())
  if cpu_devices is not None:  # before any backend starts; only the CPU backend reads it
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  distributed.initialize(FLAGS)
  try:  # TensorFlow is only used by clu/tfds for I/O: keep it off the accelerators.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except (ImportError, RuntimeError, ValueError):
    pass
  logging.info("JAX process %d/%d, %d local / %d global devices (%s).", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind)
  from self_flow import train  # pylint: disable=g-import-not-at-top
  result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if result.get("preempted_at") is not None:  # exit status 0: the scheduler may restart us
    logging.warning("Preempted: the checkpoint of step %d is saved in %s. To resume, rerun the "
                    "same command: python -m self_flow.main %s", result["preempted_at"],
                    FLAGS.workdir, shlex.join(sys.argv[1:]))


def with_installed_configs(argv: list[str]) -> list[str]:
  """`argv` with a `--config=configs/NAME.py[:ARG]` that does not exist here (outside a checkout,
  self_flow installed from a wheel) pointed at the installed `configs` package's file."""
  spec = importlib.util.find_spec("configs")
  if spec is None or not spec.submodule_search_locations:
    return argv
  installed = os.path.dirname(list(spec.submodule_search_locations)[0])
  resolved = []
  for arg in argv:
    match = re.fullmatch(r"(--config=)(configs/[^:]+\.py)(:.*)?", arg)
    if match and not os.path.exists(match[2]):
      arg = f"{match[1]}{os.path.join(installed, match[2])}{match[3] or ''}"
    resolved.append(arg)
  return resolved


if __name__ == "__main__":
  app.run(main, argv=with_installed_configs(sys.argv))
