"""A finished run's last checkpoint evaluated again under other evaluation draws: the
evaluation's own noise, measured rather than assumed.

  python -m self_flow.ablate.reevaluate --config=configs/c2i.py:local,method=vanilla \\
    --workdir=RUN --seed_offsets=0,1,2,3,4 --output=evaluation_noise.json [--config.k=v ...]

Every evaluation draw (the sampling noise behind FD and class accuracy, the probe's and the
held-out loss's noise) takes its seed plus `eval.seed_offset`; a run evaluates with offset 0.
Each offset here is one full evaluation of the same EMA weights (the final one, probe included;
offset 0 repeats the run's own), and the JSON holds {"step": step, "metrics": {offset: {metric:
value}}}. The study harness runs it on one run of its baseline (`--eval_noise_draws`) and
reports each metric's spread over the draws beside the spread of the paired differences over
training seeds. Nothing is written into the run.
"""

import copy
import json
import sys
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from self_flow import storage


def reevaluate(config, workdir: str, seed_offsets: Sequence[int]) -> dict:
  """{"step": step, "metrics": {offset: metrics}} of the EMA weights of `workdir`'s latest
  checkpoint under each `eval.seed_offset` in `seed_offsets` (every modality's evaluator)."""
  # pylint: disable=g-import-not-at-top
  from self_flow import config_validation, train, train_program
  from self_flow.tools import sample_npz
  resolved = config_validation.validate(config)
  program = train_program.build(config, resolved)
  params, step = sample_npz.restore_ema_params(config, workdir)
  metrics = {}
  for offset in seed_offsets:
    offset_config = copy.deepcopy(config)
    offset_config.eval.seed_offset = int(offset)
    evaluators = train.create_evaluators(offset_config, resolved, program.layout.graphdef,
                                         workdir, program.mesh)
    metrics[int(offset)] = {name: value for evaluator in evaluators.values()
                            for name, value in evaluator.metrics(params, final=True).items()}
    logging.info("Re-evaluated step %d of %s with eval.seed_offset=%d.", step, workdir, offset)
  return {"step": step, "metrics": metrics}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  offsets = [int(x) for x in f.seed_offsets]
  if not offsets or min(offsets) < 0 or len(set(offsets)) != len(offsets):
    raise app.UsageError(f"--seed_offsets={f.seed_offsets} must be distinct integers >= 0.")
  result = reevaluate(f.config, f.workdir, offsets)
  storage.write_text(f.output, json.dumps(result, indent=1))
  logging.info("Wrote %s.", f.output)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "The run's config file and argument.")
  flags.DEFINE_string("workdir", None, "The finished run's workdir (local or gs://).")
  flags.DEFINE_list("seed_offsets", ["0", "1", "2", "3", "4"], "eval.seed_offset values to "
                    "evaluate under (0: the run's own draws).")
  flags.DEFINE_string("output", None, "Where the JSON goes (local or gs://).")
  flags.mark_flags_as_required(["config", "workdir", "output"])
  app.run(main, argv=sys.argv)
