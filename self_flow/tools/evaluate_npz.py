"""CLI: FID, sFID, Inception Score, precision and recall of an ADM-format sample batch.

  python -m self_flow.tools.evaluate_npz --samples=samples.npz \
      --reference=VIRTUAL_imagenet256_labeled.npz --inception_weights=inception_fid.npz

Both files are .npz with uint8 NHWC images as `arr_0` (the reference may instead or also store
`mu`, `sigma`, `mu_s`, `sigma_s`, used as stored, as the ADM evaluator does). The InceptionV3
weights are a file the user supplies (see `self_flow.evaluation.inception` for the accepted
names); nothing is downloaded. Prints the metrics and writes them as JSON (default: beside the
samples, `<samples>.metrics.json`). Every path may be local or a URL (gs://...). Runs on the local
devices of one host.

The numbers are comparable to published ADM-evaluator numbers only with the TF graph's Inception
weights, --preprocessing=adm and --inception_input_size=299 (the defaults), 50k samples and the
same reference batch.
"""

import os
from collections.abc import Sequence

from absl import app, flags, logging

from self_flow import storage
from self_flow.evaluation import adm_metrics, inception


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the CLI flags on `flag_values`.

  Called only when run as a program (or by tests on their own FlagValues): other tools loaded
  in the same process define flags of the same names (e.g. --batch_size)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("samples", None, "Sample batch .npz (uint8 NHWC images as arr_0).", **fv)
  flags.DEFINE_string("reference", None, "Reference batch .npz (ADM reference, or any arr_0 "
                      "images).", **fv)
  flags.DEFINE_string("inception_weights", None, "FID InceptionV3 weights: .npz (TF graph or "
                      "pytorch-fid names) or .pth/.pt/.safetensors (pytorch-fid names).", **fv)
  flags.DEFINE_integer("batch_size", 256, "Images per InceptionV3 call (a multiple of the local "
                       "device count).", lower_bound=1, **fv)
  flags.DEFINE_string("output_json", None, "Where to write the metrics (default: "
                      "<samples without .npz>.metrics.json).", **fv)
  flags.DEFINE_string("reference_cache", None, "Cache of the reference activations (default: "
                      "<reference without .npz>.inception_cache.npz; empty: no cache).", **fv)
  flags.DEFINE_enum("preprocessing", "adm", ["adm", "pytorch_fid"],
                    "Resize and scaling before the network: adm = the TF graph's (ADM numbers), "
                    "pytorch_fid = F.interpolate + 2x-1.", **fv)
  flags.DEFINE_integer("inception_input_size", 299, "Side the images are resized to; only 299 "
                       "gives ADM-comparable numbers (smaller sides are for tests).",
                       lower_bound=75, **fv)
  flags.DEFINE_integer("is_split_size", 5000, "Samples per Inception Score split (ADM: 5000).",
                       lower_bound=1, **fv)
  flags.mark_flags_as_required(["samples", "reference", "inception_weights"], **fv)


def run(options: flags.FlagValues) -> dict:
  """Evaluates, prints the five metrics, writes the JSON; returns what it wrote."""
  extractor = adm_metrics.InceptionActivations(
      inception.load_params(options.inception_weights), batch_size=options.batch_size,
      preprocessing=options.preprocessing, input_size=options.inception_input_size)
  reference = adm_metrics.load_reference(options.reference, extractor, options.reference_cache)
  samples = adm_metrics.read_npz_images(options.samples)
  results = adm_metrics.evaluate(samples, reference, extractor, split_size=options.is_split_size)
  for name in adm_metrics.METRICS:
    print(f"{name}: {results[name]}")
  output = options.output_json or f"{os.path.splitext(options.samples)[0]}.metrics.json"
  report = {
      **results, "num_samples": int(len(samples)), "reference_statistics": reference.origin,
      "samples": storage.resolve(options.samples),
      "reference": storage.resolve(options.reference),
      "inception_weights": storage.resolve(options.inception_weights),
      "preprocessing": options.preprocessing,
      "inception_input_size": options.inception_input_size,
      "is_split_size": options.is_split_size}
  adm_metrics.write_json(output, report)
  logging.info("Wrote %s.", output)
  print(f"wrote {output}")
  return report


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  run(flags.FLAGS)


if __name__ == "__main__":
  define_flags()
  app.run(main)
