"""CLI: encodes a captioned image dataset once into latent shards for text-to-image training.

Pod-scale text-to-image training reads pre-encoded latents and caption embeddings
(`self_flow.data.latent_shards`) instead of running the encoders every step. This tool writes
them for a dataset the trainer already knows, using the built-in encoders; real autoencoders and
text encoders are plugged in from Python by passing callables to `latent_shards.write_shards`.

  python -m self_flow.tools.write_latent_shards --output_dir=DIR --dataset=fashion_mnist \
      --data_dir=./data/tfds --splits=train,test --num_shards=4 --image_encoder=avgpool2 \
      --text_encoder=bytes --text_max_length=64

Fashion-MNIST has no captions, so each image is captioned from its class name.
"""

from collections.abc import Iterator, Sequence
import itertools
from typing import Any

from absl import app, flags

from self_flow.data import fashion_mnist_local, latent_shards, sources

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", None, "Latent-shard directory to write (created if missing).")
flags.DEFINE_enum("dataset", "fashion_mnist", sources.DATASETS, "Image dataset to encode.")
flags.DEFINE_string("data_dir", "./data/tfds", "TFDS data directory of the image dataset.")
flags.DEFINE_enum("source", "auto", sources.SOURCES, "Where the image dataset comes from.")
flags.DEFINE_list("splits", ["train", "test"], "Splits to encode, comma-separated.")
flags.DEFINE_integer("num_shards", 4, "ArrayRecord shard files per split.", lower_bound=1)
flags.DEFINE_enum("image_encoder", "avgpool2", list(latent_shards.IMAGE_ENCODERS),
                  "Built-in image encoder.")
flags.DEFINE_enum("text_encoder", "bytes", list(latent_shards.TEXT_ENCODERS),
                  "Built-in text encoder.")
flags.DEFINE_integer("text_max_length", 64, "Text tokens per caption (padded or truncated).",
                     lower_bound=1)
flags.DEFINE_integer("batch_size", 256, "Examples per encoder call.", lower_bound=1)
flags.DEFINE_float("latent_scale", 1.0, "Stored latent = (encoded - latent_shift) * latent_scale.")
flags.DEFINE_float("latent_shift", 0.0, "See --latent_scale.")
flags.DEFINE_integer("max_examples", None, "Encode at most this many examples per split "
                     "(default: all).", lower_bound=1)
flags.mark_flags_as_required(["output_dir"])


def fashion_mnist_caption(label: int) -> str:
  """Returns a one-sentence caption naming the Fashion-MNIST class `label`."""
  if not 0 <= label < len(fashion_mnist_local.CLASS_NAMES):
    raise ValueError(
        f"Fashion-MNIST label {label} is out of range [0, {len(fashion_mnist_local.CLASS_NAMES)})."
    )
  name = fashion_mnist_local.CLASS_NAMES[label]
  article = "an" if name[0] in "aeiou" else "a"
  return f"a photo of {article} {name}"


def captioned_examples(
    source: Sequence[dict[str, Any]], max_examples: int | None
) -> Iterator[dict[str, Any]]:
  """Yields the first `max_examples` records of `source` (all if None) with their captions."""
  for index in itertools.islice(range(len(source)), max_examples):
    record = source[index]
    label = int(record["label"])
    yield {"image": record["image"], "caption": fashion_mnist_caption(label), "label": label}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  image_encoder = latent_shards.get_image_encoder(FLAGS.image_encoder)
  text_encoder = latent_shards.get_text_encoder(FLAGS.text_encoder, FLAGS.text_max_length)
  for split in FLAGS.splits:
    source = sources.open_image_source(FLAGS.dataset, split, FLAGS.data_dir, FLAGS.source)
    latent_shards.write_shards(
        captioned_examples(source, FLAGS.max_examples),
        output_dir=FLAGS.output_dir,
        split=split,
        num_shards=FLAGS.num_shards,
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        batch_size=FLAGS.batch_size,
        latent_scale=FLAGS.latent_scale,
        latent_shift=FLAGS.latent_shift,
        image_encoder_name=FLAGS.image_encoder,
        text_encoder_name=FLAGS.text_encoder,
    )


if __name__ == "__main__":
  app.run(main)
