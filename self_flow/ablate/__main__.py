"""`python -m self_flow.ablate`: the command line's flags and main, which plan the runs, train each
in a `python -m self_flow.main` process of its own and write the results page."""

import json
import sys

from absl import app, flags, logging

from self_flow import ablate, base_config, storage
from self_flow.ablate import runner, study


def _define_flags() -> None:
  """The CLI's flags, defined only when run as a program (self_flow.main defines --config too)."""
  flags.DEFINE_string("config", None, "Config file and argument, e.g. configs/c2i.py:local "
                      "(method= is added per variant).")
  flags.DEFINE_list("variants", ["vanilla", "dual_timestep", "self_flow"],
                    f"Variants to compare; each is one of {sorted(base_config.METHODS)}, or "
                    f"{runner.VARIANT_FORMAT}.")
  flags.DEFINE_string("baseline", "", "The variant every other is paired with seed by seed "
                      "(default: the first of --variants).")
  flags.DEFINE_string("primary", "", "The pre-registered primary endpoint, a metric tag (e.g. "
                      "eval/image/probe_t0.5_layer2): reported first and tested alone, not "
                      "Holm-corrected with the rest.")
  flags.DEFINE_integer("eval_noise_draws", 0, "Evaluate the baseline's first trained run this "
                       "many times under new evaluation draws (eval.seed_offset 0, 1, ...) and "
                       "report each metric's spread; 0 = do not (each draw is one full "
                       "evaluation).")
  flags.DEFINE_integer("seeds", 3, "Seeds per variant (0..seeds-1).")
  flags.DEFINE_integer("steps", None, "Training steps of every run.")
  flags.DEFINE_string("output", None, "Directory for the runs and the results page (local or "
                      "gs://...).")
  flags.DEFINE_integer("eval_every", 0, "Steps between evaluations (the curves); 0 = only at "
                       "the end.")
  flags.DEFINE_multi_string("override", [], "Extra config setting for every run, "
                            "<key>=<value> (e.g. eval.num_samples=500); repeatable.")
  flags.DEFINE_string("import_results", "", "results.json (local or gs://...) of an earlier "
                      "study with the same settings: the runs it lists as finished are taken "
                      "from it, not trained (e.g. seed 0 of a study whose workdirs are gone, when "
                      "adding seeds).")
  flags.mark_flags_as_required(["config", "steps", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  config_file, _, config_arg = f.config.partition(":")
  runs = runner.plan_runs(f.variants, f.seeds, f.output)
  overrides = runner.run_overrides(f.steps, f.eval_every, runner.parse_overrides(f.override))
  fingerprint = json.dumps({"config": f.config, "overrides": overrides}, sort_keys=True)
  description = "python -m self_flow.ablate " + " ".join(sys.argv[1:])
  results = study.run_ablation(
      runs, runner.subprocess_train_fn(config_file, config_arg, overrides), f.output,
      fingerprint, description, f.import_results, f.baseline, f.primary, f.eval_noise_draws,
      runner.subprocess_reevaluate_fn(config_file, config_arg, overrides))
  failed = [r["name"] for r in results["runs"] if r["status"].startswith("failed")]
  logging.info("Results in %s.", storage.join(f.output, "results.md"))
  if failed:
    raise SystemExit(f"{len(failed)} of {len(runs)} runs failed ({', '.join(failed)}); their "
                     "logs are train.log in their workdirs. Rerun the same command to retry "
                     "them (finished runs are skipped).")


if __name__ == "__main__":
  __doc__ = ablate.__doc__  # what --help prints: the package's usage
  _define_flags()
  app.run(main)
