"""Tests for the latent-shard format: writer, built-in encoders, grain source and the CLI."""

import json
import os

from absl.testing import flagsaver
from array_record.python import array_record_module
import grain
import numpy as np
import pytest

from configs import multimodal, t2v
from self_flow import config_resolution
from self_flow.data import captioned, modality_sources, motion_captions, sources, spoken_words
from self_flow.data.latent_shards import encoders, layout, writer
from self_flow.data.latent_shards import reader as reader_lib
from self_flow.modalities import audio
from self_flow.tools import write_latent_shards

_NUM_EXAMPLES = 30
_NUM_SHARDS = 3
_MAX_LENGTH = 16
_SCALE, _SHIFT = 2.0, 0.25


def _examples(num: int = _NUM_EXAMPLES, seed: int = 0) -> list[dict]:
  """Random 8x6x2 images with random (sometimes non-ASCII, sometimes too long) captions."""
  rng = np.random.default_rng(seed)
  words = ["a", "cat", "dog", "über", "red", "shoe", "très", "long"]
  return [
      {
          "image": rng.integers(0, 256, (8, 6, 2), dtype=np.uint8),
          "caption": " ".join(rng.choice(words, rng.integers(0, 6))),
          "label": int(rng.integers(-1, 10)),
      }
      for _ in range(num)
  ]


def _write(output_dir, examples, split="train", **overrides):
  kwargs = dict(
      output_dir=str(output_dir),
      split=split,
      num_shards=_NUM_SHARDS,
      signal_encoder=encoders.avgpool2_encoder,
      text_encoder=encoders.bytes_text_encoder(_MAX_LENGTH),
      batch_size=7,  # Does not divide 30: the last batch is padded.
      latent_scale=_SCALE,
      latent_shift=_SHIFT,
      signal_encoder_name="avgpool2",
      text_encoder_name="bytes",
  )
  kwargs.update(overrides)
  return writer.write_shards(examples, **kwargs)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  """A directory with a train split of `_examples()` and a smaller test split."""
  directory = tmp_path_factory.mktemp("latents")
  examples = _examples()
  _write(directory, examples)
  _write(directory, _examples(5, seed=1), split="test")
  return str(directory), examples


def test_round_trip_matches_encoders_applied_directly(written):
  directory, examples = written
  source = reader_lib.LatentShardSource(directory, "train")
  assert len(source) == _NUM_EXAMPLES
  images = np.stack([e["image"] for e in examples]).astype(np.float32) / 127.5 - 1.0
  want_latents = (encoders.avgpool2_encoder(images) - _SHIFT) * _SCALE
  want_embeddings, want_masks = encoders.bytes_text_encoder(_MAX_LENGTH)(
      [e["caption"] for e in examples]
  )
  for index, example in enumerate(examples):
    record = source[index]
    assert record["latent"].dtype == np.float32 and record["latent"].shape == (4, 3, 2)
    np.testing.assert_array_equal(record["latent"], want_latents[index].astype(np.float16))
    np.testing.assert_array_equal(record["text_embedding"], want_embeddings[index])
    assert record["text_embedding"].dtype == np.float16  # as stored; the step widens it
    np.testing.assert_array_equal(record["text_mask"], want_masks[index])
    assert record["text_mask"].dtype == bool
    assert record["caption"] == example["caption"]
    assert record["label"] == example["label"] and record["label"].dtype == np.int32


def test_scale_shift_convention_and_bytes_encoder(tmp_path):
  image = np.full((1, 2, 2, 1), 255, np.uint8)  # -> 1.0 in [-1, 1].
  caption = "é!"  # UTF-8 bytes 0xc3 0xa9 0x21.
  example = {"image": image[0], "caption": caption, "label": 3}
  embeddings, mask = encoders.bytes_text_encoder(4)([caption])
  assert embeddings.shape == (1, 4, 256)
  np.testing.assert_array_equal(embeddings[0].argmax(-1)[:3], [0xC3, 0xA9, 0x21])
  np.testing.assert_array_equal(mask[0], [True, True, True, False])
  assert not embeddings[0, 3].any()
  truncated, truncated_mask = encoders.bytes_text_encoder(2)([caption])
  assert truncated.shape == (1, 2, 256) and truncated_mask.all()

  _write(tmp_path, [example], num_shards=1, signal_encoder=encoders.identity_encoder,
         latent_scale=0.5, latent_shift=3.0)
  record = reader_lib.LatentShardSource(str(tmp_path), "train")[0]
  # (1 - 3) * 0.5; the other conventions give 2.0 ((x + shift) * scale) or -2.5 (x * scale - shift).
  np.testing.assert_array_equal(record["latent"], np.full((2, 2, 1), -1.0))


def test_metadata_documents_the_format_and_merges_splits(written):
  directory, _ = written
  metadata = layout.read_metadata(directory)
  assert metadata["format"] == layout.FORMAT and metadata["version"] == 3
  assert metadata["modality"] == "image"
  assert metadata["fields"]["latent"] == {"shape": [4, 3, 2], "dtype": "float16"}
  assert metadata["fields"]["text_embedding"] == {"shape": [_MAX_LENGTH, 256],
                                                  "dtype": "float16"}
  assert metadata["fields"]["text_mask"] == {"shape": [_MAX_LENGTH], "dtype": "bool"}
  assert (metadata["latent_scale"], metadata["latent_shift"]) == (_SCALE, _SHIFT)
  assert (metadata["signal_encoder"], metadata["text_encoder"]) == ("avgpool2", "bytes")
  train = metadata["splits"]["train"]
  assert {k: train[k] for k in ("num_examples", "num_shards", "shard_lengths", "skipped")} == {
      "num_examples": 30, "num_shards": 3, "shard_lengths": [10, 10, 10], "skipped": {}
  }
  assert train["job"]["num_examples"] == 30 and train["job"]["text_encoder"] == "bytes"
  assert metadata["splits"]["test"]["num_examples"] == 5
  assert metadata["splits"]["test"]["shard_lengths"] == [1, 2, 2]  # blocks [0,1) [1,3) [3,5)
  assert len(reader_lib.LatentShardSource(directory, "test")) == 5


def test_shards_are_three_group_size_one_files_read_in_any_order(written):
  directory, examples = written
  names = sorted(n for n in os.listdir(directory) if n.startswith("train-"))
  assert names == [f"train-{i:05d}-of-00003.array_record" for i in range(3)]
  for name in names:
    reader = array_record_module.ArrayRecordReader(os.path.join(directory, name))
    assert "group_size:1," in reader.writer_options_string()
    assert reader.num_records() == 10
    reader.close()
  source = reader_lib.LatentShardSource(directory, "train")
  order = np.random.default_rng(0).permutation(_NUM_EXAMPLES)
  assert [source[int(i)]["caption"] for i in order] == [examples[i]["caption"] for i in order]
  batch = source.__getitems__(order[:7])
  assert [r["label"] for r in batch] == [examples[i]["label"] for i in order[:7]]
  with pytest.raises(IndexError, match="30"):
    source[_NUM_EXAMPLES]


def test_repr_is_stable_and_names_no_directory(written, tmp_path):
  directory, examples = written
  copy = tmp_path / "copy"
  _write(copy, examples)
  reprs = {repr(reader_lib.LatentShardSource(d, "train")) for d in (directory, str(copy))}
  assert reprs == {
      "LatentShardSource(modality='image', split='train', num_examples=30, num_shards=3, "
      "latent_shape=(4, 3, 2), text_embedding_shape=(16, 256), signal_encoder='avgpool2', "
      "text_encoder='bytes')"
  }


def test_grain_pipeline(written):
  directory, _ = written
  source = reader_lib.LatentShardSource(directory, "train")
  batches = list(grain.MapDataset.source(source).shuffle(seed=0).batch(4))
  assert len(batches) == 8
  first = batches[0]
  assert first["latent"].shape == (4, 4, 3, 2) and first["latent"].dtype == np.float32
  assert first["text_embedding"].shape == (4, _MAX_LENGTH, 256)
  assert first["text_mask"].shape == (4, _MAX_LENGTH) and first["label"].shape == (4,)
  assert len(first["caption"]) == 4
  seen = sorted(int(l) for b in batches for l in b["label"])
  assert seen == sorted(int(source[i]["label"]) for i in range(len(source)))


def test_directory_without_metadata_is_refused(written, tmp_path):
  directory, _ = written
  partial = tmp_path / "partial"
  partial.mkdir()
  for name in os.listdir(directory):
    if name.endswith(".array_record"):
      os.link(os.path.join(directory, name), partial / name)
  with pytest.raises(FileNotFoundError, match="no metadata.json.*did not finish"):
    reader_lib.LatentShardSource(str(partial), "train")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    reader_lib.LatentShardSource(str(tmp_path / "absent"), "train")


def test_unknown_split_version_and_missing_shard_are_refused(written, tmp_path):
  directory, _ = written
  with pytest.raises(ValueError, match=r"'validation' is not in .*\['test', 'train'\]"):
    reader_lib.LatentShardSource(directory, "validation")
  bad = tmp_path / "bad"
  bad.mkdir()
  metadata = layout.read_metadata(directory)
  (bad / "metadata.json").write_text(json.dumps(dict(metadata, version=99)))
  with pytest.raises(ValueError, match="version=99"):
    reader_lib.LatentShardSource(str(bad), "train")
  (bad / "metadata.json").write_text(json.dumps(metadata))
  with pytest.raises(FileNotFoundError, match="lists 3 shards of split 'train'.*holds 0"):
    reader_lib.LatentShardSource(str(bad), "train")


def test_bad_encoder_names_and_arguments_are_refused(tmp_path):
  with pytest.raises(ValueError, match=r"Unknown image encoder 'vae'.*'avgpool2', 'identity'"):
    encoders.get_signal_encoder("image", "vae")
  with pytest.raises(ValueError, match=r"Unknown audio encoder 'avgpool2'.*'log_mel'"):
    encoders.get_signal_encoder("audio", "avgpool2")
  with pytest.raises(ValueError, match=r"Unknown modality 'text'.*'image', 'video', 'audio'"):
    encoders.get_signal_encoder("text", "bytes")
  with pytest.raises(ValueError, match=r"Unknown text encoder 't5'.*'bytes'"):
    encoders.get_text_encoder("t5", 8)
  with pytest.raises(ValueError, match="num_shards=0"):
    _write(tmp_path, _examples(2), num_shards=0)
  with pytest.raises(ValueError, match="split='a/b'"):
    _write(tmp_path, _examples(2), split="a/b")
  with pytest.raises(ValueError, match="No examples"):
    _write(tmp_path, [])
  with pytest.raises(ValueError, match="num_shards=3 exceeds the 2 examples"):
    _write(tmp_path, _examples(2))
  with pytest.raises(ValueError, match=r"Example 0 of shard .*: image has dtype float32.*uint8 \(H, W, C\)"):
    _write(tmp_path, [{"image": np.zeros((2, 2, 1), np.float32), "caption": ""}], num_shards=1)
  with pytest.raises(ValueError, match=r"Example 0 of shard .* lacks \['video'\]"):
    _write(tmp_path, _examples(2), modality="video", num_shards=1)
  with pytest.raises(ValueError, match=r"Unknown modality 'text'"):
    _write(tmp_path, _examples(2), modality="text", num_shards=1)
  with pytest.raises(ValueError, match=r"signal_encoder returned shape \(7, 8\).*\(B, h, w, c\)"):
    _write(tmp_path, _examples(2), signal_encoder=lambda x: x[..., 0, 0], num_shards=1)
  with pytest.raises(ValueError, match="beyond float16"):
    _write(tmp_path, _examples(2), latent_scale=1e6, num_shards=1)
  # Every refusal came before a shard was written (the output directory exists, empty).
  assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_adding_an_incompatible_split_is_refused(written, tmp_path):
  directory = tmp_path / "merge"
  _write(directory, _examples(3))
  with pytest.raises(ValueError, match="latent_scale=2.0.*latent_scale=1.0"):
    _write(directory, _examples(3), split="test", latent_scale=1.0)
  with pytest.raises(ValueError, match=r"holds splits \['train'\] written with fields="):
    _write(directory, _examples(3), split="test", text_encoder=encoders.bytes_text_encoder(8))
  # Rewriting the split with other settings needs the explicit flag; then its shards are
  # replaced. Without it nothing is deleted.
  with pytest.raises(ValueError, match=r"(?s)already holds split 'train'.*another job.*"
                                       r"Its shards are kept; pass overwrite=True"):
    _write(directory, _examples(4), num_shards=2, latent_scale=1.0)
  assert len(reader_lib.LatentShardSource(str(directory), "train")) == 3
  _write(directory, _examples(4), num_shards=2, latent_scale=1.0, overwrite=True)
  assert sorted(os.listdir(directory)) == [
      "manifests", "metadata.json", "train-00000-of-00002.array_record",
      "train-00001-of-00002.array_record"]
  assert len(reader_lib.LatentShardSource(str(directory), "train")) == 4


def test_a_rerun_writes_only_the_missing_shards(tmp_path):
  """A job killed after some shards (here: one shard lost its manifest, one its file too) is
  finished by rerunning it: finished shards are not written again, the missing ones are, and
  the result reads like an uninterrupted job's."""
  examples = _examples()
  _write(tmp_path / "straight", examples)
  directory = tmp_path / "run"
  _write(directory, examples)
  manifests = directory / "manifests"
  kept = (manifests / "train-00000-of-00003.array_record.json").read_text()
  kept_shard = (directory / "train-00000-of-00003.array_record").stat().st_mtime_ns
  for index in (1, 2):
    (manifests / f"train-{index:05d}-of-00003.array_record.json").unlink()
  (directory / "train-00002-of-00003.array_record").unlink()
  (directory / "metadata.json").unlink()
  _write(directory, examples)
  assert (manifests / "train-00000-of-00003.array_record.json").read_text() == kept
  assert (directory / "train-00000-of-00003.array_record").stat().st_mtime_ns == kept_shard
  for index in (1, 2):
    assert json.loads((manifests / f"train-{index:05d}-of-00003.array_record.json").read_text(
        ))["num_records"] == 10
  straight = reader_lib.LatentShardSource(str(tmp_path / "straight"), "train")
  rerun = reader_lib.LatentShardSource(str(directory), "train")
  for index in range(_NUM_EXAMPLES):
    for key in ("latent", "text_embedding", "caption"):
      np.testing.assert_array_equal(rerun[index][key], straight[index][key])
  # A finished job rerun writes nothing at all.
  before = {p: p.stat().st_mtime_ns for p in directory.glob("*.array_record")}
  _write(directory, examples)
  assert {p: p.stat().st_mtime_ns for p in directory.glob("*.array_record")} == before


def test_version_2_round_robin_directories_still_read(written, tmp_path):
  """Shards written before version 3 put example k in shard k % n: still read in written order."""
  directory, examples = written
  old = tmp_path / "v2"
  old.mkdir()
  metadata = layout.read_metadata(directory)
  rows = [[] for _ in range(_NUM_SHARDS)]
  for k in range(_NUM_EXAMPLES):
    rows[k % _NUM_SHARDS].append(k)
  source = reader_lib.LatentShardSource(directory, "train")
  for shard, indices in enumerate(rows):
    shard_writer = array_record_module.ArrayRecordWriter(
        str(old / layout.shard_name("train", shard, _NUM_SHARDS)), layout.WRITER_OPTIONS)
    raw = source._records  # pylint: disable=protected-access  (the stored bytes, re-filed)
    for k in indices:
      shard_writer.write(raw[k])
    shard_writer.close()
  metadata["version"] = 2
  metadata["splits"] = {"train": dict(metadata["splits"]["train"],
                                      shard_lengths=[len(r) for r in rows])}
  (old / "metadata.json").write_text(json.dumps(metadata))
  v2 = reader_lib.LatentShardSource(str(old), "train")
  assert [v2[k]["caption"] for k in range(_NUM_EXAMPLES)] == [e["caption"] for e in examples]


def test_cli_writes_captioned_splits(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  records = {
      split: [{"image": rng.integers(0, 256, (28, 28, 1), dtype=np.uint8), "label": i % 10}
              for i in range(size)]
      for split, size in (("train", 12), ("test", 6))
  }
  opened = []

  def fake_open_image_source(dataset, split, data_dir, source="auto"):
    opened.append((dataset, split, data_dir, source))
    return records[split]

  monkeypatch.setattr(sources, "open_image_source", fake_open_image_source)
  output_dir = str(tmp_path / "cli")
  with flagsaver.flagsaver(output_dir=output_dir, splits=["train", "test"], num_shards=2,
                           text_max_length=32, max_examples=10, batch_size=4):
    write_latent_shards.main(["write_latent_shards"])
  assert opened == [("fashion_mnist", s, "./data/tfds", "auto") for s in ("train", "test")]
  train = reader_lib.LatentShardSource(output_dir, "train")
  test = reader_lib.LatentShardSource(output_dir, "test")
  assert (len(train), len(test)) == (10, 6)
  record = train[9]
  assert record["caption"] == "a photo of an ankle boot"
  assert record["label"] == 9 and record["latent"].shape == (14, 14, 1)
  assert record["text_embedding"].shape == (32, 256)
  assert train[0]["caption"] == "a photo of a t-shirt/top"


def test_video_and_audio_latents_keep_their_rank(tmp_path):
  """Clips are pooled per frame to (T, h, w, c); waveforms become (frames, mels) features."""
  rng = np.random.default_rng(0)
  clips = [{"video": rng.integers(0, 256, (4, 8, 6, 1), dtype=np.uint8), "caption": "a shoe",
            "label": i} for i in range(5)]
  _write(tmp_path / "video", clips, modality="video")
  video = reader_lib.LatentShardSource(str(tmp_path / "video"), "train")
  assert (video.modality, video.latent_shape) == ("video", (4, 4, 3, 1))
  want = (encoders.avgpool2_encoder(
      np.stack([c["video"] for c in clips]).astype(np.float32) / 127.5 - 1.0) - _SHIFT) * _SCALE
  for index in range(5):
    np.testing.assert_array_equal(video[index]["latent"], want[index].astype(np.float16))

  words = [{"waveform": rng.integers(-20000, 20000, audio.CLIP_SAMPLES, dtype=np.int16),
            "caption": "seven", "label": 7} for _ in range(3)]
  _write(tmp_path / "audio", words, modality="audio", signal_encoder=encoders.log_mel_encoder,
         signal_encoder_name="log_mel", latent_scale=1.0, latent_shift=0.0)
  speech = reader_lib.LatentShardSource(str(tmp_path / "audio"), "train")
  assert (speech.modality, speech.latent_shape) == ("audio", (audio.NUM_FRAMES, audio.NUM_MELS))
  np.testing.assert_allclose(speech[2]["latent"],
                             audio.log_mel(audio.from_int16(words[2]["waveform"])), atol=1e-3)
  with pytest.raises(ValueError, match=r"holds splits \['train'\] written with modality='audio'"):
    _write(tmp_path / "audio", clips, modality="video", split="test")
  with pytest.raises(ValueError, match=r"waveform has dtype float32.*int16 \(samples,\)"):
    _write(tmp_path / "bad", [{"waveform": np.zeros(8, np.float32), "caption": ""}],
           modality="audio", num_shards=1)


def test_trainer_refuses_shards_of_another_modality_or_shape(tmp_path):
  rng = np.random.default_rng(0)
  clips = [{"video": rng.integers(0, 256, (8, 32, 32, 1), dtype=np.uint8), "caption": "a bag"}
           for _ in range(2)]
  _write(tmp_path, clips, modality="video", num_shards=2)  # latents (8, 16, 16, 1)
  config = t2v.get_config("local")
  config.video.dataset = config.audio.dataset = "latent_shards"
  config.video.data_dir = config.audio.data_dir = str(tmp_path)
  config.modalities = ("video", "audio")  # the audio stream is pointed at the video shards
  spec = lambda modality: config_resolution.resolve(config).spec(modality)
  with pytest.raises(ValueError, match=r"holds video latents; the audio stream needs audio"):
    modality_sources.open_source(config, spec("audio"), "train")
  with pytest.raises(ValueError, match=r"config.video describes video latents of shape "
                                       r"\(8, 32, 32, 1\).*shape \(8, 16, 16, 1\)"):
    modality_sources.open_source(config, spec("video"), "train")
  config.video.image_size = 16
  with pytest.raises(ValueError, match=r"text.embedding_dim=4096, but the caption embeddings "
                                       r"in .* have width 256"):
    modality_sources.open_source(config, spec("video"), "train")
  config.text.embedding_dim = 256
  with pytest.raises(ValueError, match=r"text.max_length=64, but the caption embeddings in .* "
                                       r"have 16 tokens; set --config.text.max_length=16"):
    modality_sources.open_source(config, spec("video"), "train")
  config.text.max_length = 16
  assert len(modality_sources.open_source(config, spec("video"), "train")) == 2


def test_cli_writes_video_and_audio_shards(tmp_path, video_data_dir, audio_data_dir):
  """The CLI encodes the embedded clips and spoken words with their captions."""
  for modality, data_dir in (("video", video_data_dir), ("audio", audio_data_dir)):
    output_dir = str(tmp_path / modality)
    with flagsaver.flagsaver(output_dir=output_dir, modality=modality, data_dir=data_dir,
                             splits=["train"], num_shards=2, text_max_length=64,
                             max_examples=6, batch_size=4):
      write_latent_shards.main(["write_latent_shards"])
    source = reader_lib.LatentShardSource(output_dir, "train")
    embedded = _embedded_config(modality, data_dir)
    raw = modality_sources.open_source(
        embedded, config_resolution.resolve(embedded).spec(modality), "train")
    assert len(source) == 6 and source.modality == modality
    for index in (0, 5):
      record, original = source[index], raw[index]
      if modality == "video":
        assert source.latent_shape == (8, 16, 16, 1)
        assert source.metadata["signal_encoder"] == "avgpool2"
        # A training phrasing of the clip's object, direction and speed, fixed by its index.
        assert record["caption"] == motion_captions.train_caption(
            original["label"], original["motion"], original["speed"],
            np.random.default_rng(index))
        assert record["label"] == motion_captions.motion_class(original["label"],
                                                               original["motion"])
      else:
        assert source.latent_shape == (audio.NUM_FRAMES, audio.NUM_MELS)
        assert source.metadata["signal_encoder"] == "log_mel"
        assert record["caption"] == spoken_words.transcript(original["label"])
        np.testing.assert_allclose(record["latent"], audio.preprocess(original)["audio"],
                                   atol=1e-3)


def _embedded_config(modality: str, data_dir: str):
  config = multimodal.get_config("local")
  config.video.data_dir = config.audio.data_dir = data_dir
  return config


def _unit_kwargs(**overrides):
  kwargs = dict(inputs={"source": "test", "units": 3}, split="train",
                signal_encoder=encoders.avgpool2_encoder,
                text_encoder=encoders.bytes_text_encoder(_MAX_LENGTH), batch_size=2,
                signal_encoder_name="avgpool2", text_encoder_name="bytes")
  kwargs.update(overrides)
  return kwargs


def test_units_count_skipped_inputs_per_reason_and_keep_empty_shards_readable(tmp_path):
  """One shard per unit, holding what the unit yielded; Skipped markers are counted per reason
  in the manifests and the metadata, and a unit whose inputs were all skipped leaves an empty
  shard the reader passes over."""
  examples = _examples(5)
  units = [
      lambda: [examples[0], captioned.Skipped("a.tar#1", "undecodable_image", "bad JPEG"),
               examples[1], examples[2]],
      lambda: [captioned.Skipped("b.tar#0", "missing_caption", ""),
               captioned.Skipped("b.tar#1", "undecodable_image", "")],
      lambda: [examples[3], examples[4]],
  ]
  metadata = writer.write_units(units, output_dir=str(tmp_path), **_unit_kwargs())
  train = metadata["splits"]["train"]
  assert train["shard_lengths"] == [3, 0, 2] and train["num_examples"] == 5
  assert train["skipped"] == {"missing_caption": 1, "undecodable_image": 2}
  manifest = json.loads((tmp_path / "manifests" /
                         "train-00001-of-00003.array_record.json").read_text())
  assert manifest["num_records"] == 0 and manifest["skipped"] == {
      "missing_caption": 1, "undecodable_image": 1}
  source = reader_lib.LatentShardSource(str(tmp_path), "train")
  assert [source[i]["caption"] for i in range(5)] == [e["caption"] for e in examples]
  # A rerun on other inputs is another job: refused, nothing changed.
  with pytest.raises(ValueError, match="written by another job"):
    writer.write_units(units, output_dir=str(tmp_path),
                       **_unit_kwargs(inputs={"source": "other", "units": 3}))


def test_several_captions_per_example_are_stored_and_drawn_per_epoch(tmp_path):
  """C captions per example: (C, L, D) embeddings with unused rows masked out, the caption texts,
  and a per-epoch draw that is a pure function of (seed, position)."""
  rng = np.random.default_rng(0)
  examples = [{"image": rng.integers(0, 256, (8, 6, 2), dtype=np.uint8),
               "captions": [f"cap {i} {j}" for j in range(i % 3 + 1)] + (["x"] * 3 if i == 4
                                                                         else [])}
              for i in range(6)]
  _write(tmp_path, examples, num_shards=2, captions_per_example=3, text_dtype="bfloat16")
  metadata = layout.read_metadata(str(tmp_path))
  assert metadata["captions_per_example"] == 3 and metadata["text_dtype"] == "bfloat16"
  assert metadata["fields"]["text_embedding"] == {"shape": [3, _MAX_LENGTH, 256],
                                                  "dtype": "bfloat16"}
  source = reader_lib.LatentShardSource(str(tmp_path), "train")
  want, want_mask = encoders.bytes_text_encoder(_MAX_LENGTH)(["cap 1 0", "cap 1 1"])
  record = source[1]
  assert record["num_captions"] == 2 and record["captions"] == ("cap 1 0", "cap 1 1")
  np.testing.assert_array_equal(record["text_embedding"][:2], want)  # one-hot: exact in bf16
  np.testing.assert_array_equal(record["text_mask"][:2], want_mask)
  assert not record["text_mask"][2].any()  # the unused third row
  assert source[4]["num_captions"] == 3  # 5 given, the first 3 kept
  from self_flow.data import pipeline  # pylint: disable=g-import-not-at-top
  from self_flow.data.latent_shards import caption_draw  # pylint: disable=g-import-not-at-top

  def drawn(seed):
    iterator = pipeline.make_train_iterator(
        source, global_batch_size=6, seed=seed, process_index=0, process_count=1,
        worker_count=0, preprocess=pipeline.preprocess_latents,
        transforms=(caption_draw.DrawCaption(),))
    batches = [next(iterator) for _ in range(8)]
    assert batches[0]["text_embedding"].shape == (6, _MAX_LENGTH, 256)
    assert "num_captions" not in batches[0]
    return np.stack([b["text_embedding"] for b in batches])

  first = drawn(seed=0)
  np.testing.assert_array_equal(first, drawn(seed=0))  # deterministic
  # Every caption of example 2 (three of them) is drawn in 8 epochs: rows differ across epochs.
  assert len({row.tobytes() for row in first.reshape(-1, _MAX_LENGTH * 256)}) > 6


def test_token_ids_are_stored_for_a_text_encoder_run_in_the_step(tmp_path):
  def token_encoder(captions):
    from self_flow.text import tokenizer  # pylint: disable=g-import-not-at-top
    return tokenizer.tokenize(captions, _MAX_LENGTH)

  examples = _examples(4)
  _write(tmp_path, examples, num_shards=1, text_encoder=token_encoder)
  metadata = layout.read_metadata(str(tmp_path))
  assert metadata["fields"]["text_tokens"] == {"shape": [_MAX_LENGTH], "dtype": "int32"}
  assert "text_embedding" not in metadata["fields"]
  record = reader_lib.LatentShardSource(str(tmp_path), "train")[2]
  tokens, mask = token_encoder([examples[2]["caption"]])
  np.testing.assert_array_equal(record["text_tokens"], tokens[0])
  np.testing.assert_array_equal(record["text_mask"], mask[0])
