"""self_flow.data.captioned on small local datasets made here: webdataset tars, Parquet files,
image folders and a TFDS dataset, input specs, and `prepare`'s checks and crop. (Paths go
through etils.epath, as on gs://, where the same code is exercised against a server
elsewhere.)"""

import io
import json
import os
import tarfile
import types

import numpy as np
from PIL import Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from self_flow import storage
from self_flow.data.captioned import RawExample, SKIP_REASONS, Skipped
from self_flow.data.captioned import folder as folder_lib
from self_flow.data.captioned import inputs, parquet, prepare, sources, tfds_source


def encoded(size=(48, 40), mode="RGB", fmt="PNG", seed=0) -> bytes:
  """An image of random pixels, `size` = (width, height), encoded as `fmt`."""
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  image = Image.fromarray(pixels).convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, fmt)
  return buffer.getvalue()


def write_tar(path, members, mode="w") -> None:
  with tarfile.open(path, mode) as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def read_all(source, unit):
  return list(source.read(unit))


def prepared(items, image_size=32):
  return [prepare.prepare(item, image_size=image_size) for item in items]


def reasons(results):
  return [r.reason for r in results if isinstance(r, Skipped)]


# --- webdataset ---------------------------------------------------------------------------


def write_webdataset(directory):
  caption_json = json.dumps({"caption": "a json caption", "captions": ["second", "third"]})
  write_tar(directory / "shard-00000.tar", [
      ("000.jpg", encoded(fmt="JPEG")), ("000.txt", b"  a red square \n"),
      ("001.png", encoded(seed=1)), ("001.txt", b"from txt"), ("001.json", caption_json.encode()),
      ("002.jpg", encoded(fmt="JPEG", seed=2)),  # No caption.
      ("003.jpg", b"not an image"), ("003.txt", b"broken"),
      ("004.png", encoded(size=(8, 8))), ("004.txt", b"tiny"),
      ("005.txt", b"a caption without its image"),
      ("sub/006.seg.png", encoded(seed=6)),  # Not an image member: extension "seg.png".
      ("sub/006.JPEG", encoded(fmt="JPEG", seed=6)), ("sub/006.cls", b"3"),
      ("sub/006.txt", b"upper-case extension"),
      ("007.jpg", encoded(seed=7)), ("007.json", b"{not json"),
  ])
  # The second shard gzip-compressed under a .tar name: `r|*` detects the compression.
  write_tar(directory / "shard-00001.tar", [
      member for i in range(3) for member in (
          (f"1{i:02d}.webp", encoded(fmt="WEBP", seed=10 + i)),
          (f"1{i:02d}.txt", f"shard one, record {i}".encode()))], mode="w:gz")


def test_webdataset_records_captions_skips_and_units(tmp_path):
  write_webdataset(tmp_path)
  spec = str(tmp_path / "shard-{00000..00001}.tar")
  source = sources.open_source("webdataset", spec)
  units = source.units()
  assert units == [str(tmp_path / "shard-00000.tar"), str(tmp_path / "shard-00001.tar")]
  again = sources.open_source("webdataset", spec)  # As another host opens it.
  assert again.units() == units and repr(again) == repr(source)
  assert json.loads(json.dumps(source.describe()))["num_units"] == 2

  first = read_all(source, units[0])
  assert first == read_all(source, units[0])  # Deterministic.
  assert [item.key.rpartition("#")[2] for item in first] == [
      "000", "001", "002", "003", "004", "005", "sub/006", "007"]
  assert all(item.key.startswith(units[0] + "#") for item in first)
  by_key = {item.key.rpartition("#")[2]: item for item in first}
  assert by_key["000"].captions == ("a red square",)
  assert by_key["001"].captions == ("from txt", "a json caption", "second", "third")
  assert by_key["002"].captions == ()
  assert by_key["sub/006"].label == 3 and by_key["sub/006"].captions == ("upper-case extension",)
  assert by_key["000"].label == -1
  assert by_key["005"].reason == "missing_image"
  assert by_key["007"].reason == "unreadable_record" and "007.json" in by_key["007"].detail

  results = prepared(first)
  assert reasons(results) == ["missing_caption", "undecodable_image", "image_too_small",
                              "missing_image", "unreadable_record"]
  kept = [r for r in results if not isinstance(r, Skipped)]
  assert [r["key"].rpartition("#")[2] for r in kept] == ["000", "001", "sub/006"]
  assert all(r["image"].shape == (32, 32, 3) and r["image"].dtype == np.uint8 for r in kept)

  # Unit 1 is read without unit 0's file: no host touches another's unit.
  os.remove(units[0])
  second = read_all(source, units[1])
  assert [item.captions for item in second] == [
      (f"shard one, record {i}",) for i in range(3)]
  assert all(isinstance(r, dict) for r in prepared(second))
  with pytest.raises(ValueError, match="is not a unit"):
    read_all(source, str(tmp_path / "other.tar"))


def test_webdataset_broken_tar_names_the_file(tmp_path):
  members = [(f"{i:03d}.{ext}", encoded(seed=i) if ext == "png" else b"caption")
             for i in range(3) for ext in ("png", "txt")]
  write_tar(tmp_path / "good.tar", members)
  data = (tmp_path / "good.tar").read_bytes()
  with tarfile.open(tmp_path / "good.tar") as tar:
    offsets = [member.offset for member in tar.getmembers()]
  (tmp_path / "truncated.tar").write_bytes(data[:offsets[2] + 700])  # Inside 001.png's data.
  (tmp_path / "corrupt.tar").write_bytes(  # 001.png's header overwritten.
      data[:offsets[2]] + b"\xff" * 512 + data[offsets[2] + 512:])
  (tmp_path / "empty.tar").write_bytes(b"")
  source = sources.open_source("webdataset", str(tmp_path))
  assert len(read_all(source, str(tmp_path / "good.tar"))) == 3
  for name, where in (
      ("truncated", "after 1 whole records, at or after the key '001': unexpected end of data"),
      ("corrupt", "after 0 whole records, at or after the key '000': a corrupt member header"),
      ("empty", "before its first record")):
    path = str(tmp_path / f"{name}.tar")
    with pytest.raises(ValueError, match="corrupt or truncated") as error:
      read_all(source, path)
    assert path in str(error.value) and where in str(error.value)


# --- parquet ------------------------------------------------------------------------------


def write_parquet(directory):
  images = [encoded(seed=i) for i in range(5)]
  pq.write_table(pa.table({
      "image": pa.array([images[0], images[1], None, images[3], b"garbage"], pa.binary()),
      "caption": ["zero", "one", "two", None, "four"],
      "extra": pa.array([["z1", "z2"], [], None, ["three"], ["f"]], pa.list_(pa.string())),
      "label": pa.array([0, 1, 2, None, 4], pa.int64()),
  }), directory / "a.parquet", row_group_size=2)
  struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
  pq.write_table(pa.table({  # A Hugging Face `datasets` Image column.
      "image": pa.array([{"bytes": images[0], "path": "x.png"},
                         {"bytes": None, "path": "elsewhere/y.png"}], struct),
      "caption": ["hf zero", "hf one"], "extra": [["hf"], None], "label": [7, 8],
  }), directory / "b.parquet", row_group_size=2)


def test_parquet_columns_row_groups_and_hf_images(tmp_path, monkeypatch):
  write_parquet(tmp_path)
  source = sources.open_source("parquet", str(tmp_path / "*.parquet"),
                               caption_columns=("caption", "extra"), label_column="label")
  a, b = source.units()
  assert (a, b) == (str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet"))
  assert source.describe()["image_column"] == "image"  # The default, found in the file.

  read_groups = []
  original = pq.ParquetFile.read_row_group
  monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                      lambda self, i, **kw: read_groups.append(i) or original(self, i, **kw))
  assert source.num_records() == 7 and not read_groups  # 5 + 2 rows, from the footers
  rows = read_all(source, a)
  assert read_groups == [0, 1, 2]  # One row group at a time.
  assert [item.key for item in rows] == [f"{a}#{i}" for i in range(5)]
  assert rows[0].captions == ("zero", "z1", "z2") and rows[0].label == 0
  assert rows[1].captions == ("one",)
  assert rows[2].reason == "missing_image"
  assert rows[3].captions == ("three",) and rows[3].label == -1
  assert reasons(prepared(rows)) == ["missing_image", "undecodable_image"]

  hf = read_all(source, b)
  assert hf[0].captions == ("hf zero", "hf") and hf[0].label == 7
  assert hf[0].image == encoded(seed=0)
  assert hf[1].reason == "missing_image" and "elsewhere/y.png" in hf[1].detail


def test_parquet_column_errors_name_file_and_columns(tmp_path):
  write_parquet(tmp_path)
  path = str(tmp_path / "a.parquet")
  with pytest.raises(ValueError, match="has no caption column 'text'") as error:
    sources.open_source("parquet", path, caption_columns=("caption", "text"))
  assert path in str(error.value) and "['image', 'caption', 'extra', 'label']" in str(error.value)
  pq.write_table(pa.table({"photo": [b"x"], "caption": ["c"]}), tmp_path / "c.parquet")
  with pytest.raises(ValueError, match=r"none of the image columns .* \['photo', 'caption'\]"):
    sources.open_source("parquet", str(tmp_path / "c.parquet"))
  with pytest.raises(ValueError, match="label column 'caption' .* expected an integer type"):
    sources.open_source("parquet", path, label_column="caption")


def test_parquet_reads_through_file_objects_without_closed(tmp_path, monkeypatch):
  """tf.io.gfile's files (epath's gs:// backend) have no `closed`, which pyarrow needs."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  write_parquet(tmp_path)

  class GFilePath:
    def __init__(self, path):
      self._path = os.fspath(path)

    def open(self, mode):
      return tf.io.gfile.GFile(self._path, mode)

  monkeypatch.setattr(parquet, "epath", types.SimpleNamespace(Path=GFilePath))
  source = sources.open_source("parquet", str(tmp_path / "a.parquet"))
  rows = read_all(source, source.units()[0])
  assert [row.captions for row in rows[:2]] == [("zero",), ("one",)] and len(rows) == 5


# --- folder -------------------------------------------------------------------------------


def test_folder_class_folders_sidecars_and_units(tmp_path, monkeypatch):
  root = tmp_path / "images"
  for path, data in {
      "cats/a.jpg": encoded(fmt="JPEG"), "cats/a.txt": b"first line\n\n  second line  \n",
      "cats/b.PNG": encoded(seed=1), "cats/b.json": b'{"captions": ["json one", "json two"]}',
      "cats/c.jpg": encoded(seed=2, fmt="JPEG"),  # No sidecar.
      "dogs/d.webp": encoded(seed=3, fmt="WEBP"), "dogs/d.txt": b"a dog",
      "dogs/e.png": encoded(seed=4), "dogs/e.json": b"[1, 2]",  # Not an object.
      "dogs/notes.md": b"ignored", "dogs/orphan.txt": b"no image",
  }.items():
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_bytes(data)
  source = sources.open_source("folder", str(root), examples_per_unit=2)
  units = source.units()
  assert [[item[0] for item in json.loads(unit)] for unit in units] == [
      ["cats/a.jpg", "cats/b.PNG"], ["cats/c.jpg", "dogs/d.webp"], ["dogs/e.png"]]
  assert source.describe()["class_names"] == ["cats", "dogs"]
  assert source.num_records() == 5  # counted from the listing

  # A fresh source (another host) reads a unit from the unit string alone: no listing.
  reader = sources.open_source("folder", str(root), examples_per_unit=2)
  monkeypatch.setattr(storage, "list_names", lambda d: pytest.fail(f"listed {d}"))
  records = [r for unit in units for r in reader.read(unit)]
  assert [r.key for r in records] == ["cats/a.jpg", "cats/b.PNG", "cats/c.jpg", "dogs/d.webp",
                                      "dogs/e.png"]
  assert [getattr(r, "label", None) for r in records[:4]] == [0, 0, 0, 1]
  assert records[0].captions == ("first line", "second line")
  assert records[1].captions == ("json one", "json two")
  assert records[2].captions == ()
  assert records[3].captions == ("a dog",)
  assert records[4].reason == "unreadable_record" and "e.json" in records[4].detail
  assert reasons(prepared(records)) == ["missing_caption", "unreadable_record"]
  with pytest.raises(ValueError, match="is not a unit"):
    list(reader.read('[["a.jpg", "zero", []]]'))


def test_folder_flat_and_layout_errors(tmp_path):
  (tmp_path / "flat").mkdir()
  (tmp_path / "flat" / "x.jpg").write_bytes(encoded(fmt="JPEG"))
  (tmp_path / "flat" / "x.txt").write_bytes(b"flat caption")
  source = sources.open_source("folder", str(tmp_path / "flat"))
  (record,) = read_all(source, source.units()[0])
  assert record.label == -1 and record.captions == ("flat caption",)
  (tmp_path / "flat" / "class").mkdir()
  with pytest.raises(ValueError, match="both class folders"):
    sources.open_source("folder", str(tmp_path / "flat")).units()
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="holds no .jpg"):
    sources.open_source("folder", str(tmp_path / "empty")).units()
  with pytest.raises(FileNotFoundError, match="not a directory"):
    sources.open_source("folder", str(tmp_path / "absent"))
  with pytest.raises(ValueError, match="examples_per_unit=0"):
    folder_lib.FolderSource(str(tmp_path / "flat"), examples_per_unit=0)


# --- TFDS ---------------------------------------------------------------------------------


def _png(i: int) -> bytes:
  return encoded(size=(36 + i, 34), seed=i)


class CaptionedTiny(tfds.core.GeneratorBasedBuilder):
  """5 images, each with a title and two captions in a sequence, and a class label."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(),
        "title": tfds.features.Text(),
        "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
        "label": tfds.features.ClassLabel(names=["a", "b"]),
    }), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(5):
      yield i, {"image": _png(i), "title": f"title {i}",
                "captions": {"text": [f"caption {i}a", f"caption {i}b"]}, "label": i % 2}


def build(data_dir, file_format) -> str:
  CaptionedTiny(data_dir=str(data_dir), file_format=file_format).download_and_prepare()
  return str(data_dir)


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_tfds_slices_features_and_encoded_images(tmp_path, file_format):
  data_dir = build(tmp_path, file_format)
  source = sources.open_source("tfds", "captioned_tiny", data_dir=data_dir, examples_per_unit=2)
  assert source.describe()["file_format"] == file_format
  assert source.units() == ["train[0:2]", "train[2:4]", "train[4:5]"]
  assert source.num_records() == 5
  assert source.describe()["caption_features"] == ["title", "captions/text"]
  records = [r for unit in reversed(source.units()) for r in source.read(unit)]
  assert [r.key for r in records] == ["train[4]", "train[2]", "train[3]", "train[0]", "train[1]"]
  record = records[3]
  assert record.image == _png(0)  # Still encoded.
  assert record.captions == ("title 0", "caption 0a", "caption 0b") and record.label == 0
  assert records[0].label == 0 and records[4].label == 1
  assert prepare.prepare(record, image_size=32)["image"].shape == (32, 32, 3)

  only = sources.open_source("tfds", "captioned_tiny", data_dir=data_dir,
                             caption_features=("captions/text",), label_feature=None)
  assert next(only.read("train[0:5]")).captions == ("caption 0a", "caption 0b")


def test_tfds_feature_errors(tmp_path):
  data_dir = build(tmp_path, "array_record")
  open_tfds = lambda **kw: sources.open_source("tfds", "captioned_tiny", data_dir=data_dir, **kw)
  with pytest.raises(ValueError, match="no caption feature 'text'.*captions/text: Text"):
    open_tfds(caption_features=("text",))
  with pytest.raises(ValueError, match="caption feature 'label' .* expected a Text"):
    open_tfds(caption_features=("label",))
  with pytest.raises(ValueError, match="image feature 'title' .* expected one Image"):
    open_tfds(image_feature="title")
  with pytest.raises(ValueError, match="no split 'validation'"):
    open_tfds(split="validation")
  with pytest.raises(ValueError, match="is not a unit"):
    next(open_tfds().read("train[0:3]"))
  with pytest.raises(ValueError, match="no Text feature"):
    tfds_source._caption_features("x", {("image",): (tfds.features.Image(), False)}, None)


# --- inputs -------------------------------------------------------------------------------


def test_input_specs_expand_to_sorted_files(tmp_path):
  d = tmp_path / "d"
  (d / "sub").mkdir(parents=True)
  for i in range(4):
    (d / f"shard-{i:05d}.tar").write_bytes(b"")
  (d / "README.txt").write_bytes(b"")
  (d / "x.TAR").write_bytes(b"")
  names = lambda files: [os.path.relpath(f, d) for f in files]
  expand = lambda spec: names(inputs.expand_inputs(spec, (".tar",)))
  shards = [f"shard-{i:05d}.tar" for i in range(4)]
  assert expand(f"{d}/shard-*.tar") == shards
  assert expand(f"{d}/shard-{{00001..00002}}.tar") == shards[1:3]
  assert expand(f"{d}/shard-{{00002..00001}}.tar") == shards[1:3]
  assert expand(f"{d}/shard-0000{{3,0}}.tar") == [shards[0], shards[3]]
  assert expand(f"{d}/shard-00003.tar, {d}/shard-00000.tar") == [shards[0], shards[3]]
  assert expand(f"{d}/shard-0000[01].tar,{d}/shard-00000.tar") == shards[:2]  # Each once.
  assert expand(str(d)) == shards + ["x.TAR"]  # A directory: its .tar files, any case.
  assert expand(f"{d}/README.txt") == ["README.txt"]  # Named files are taken as named.


def test_input_spec_errors_name_the_pattern(tmp_path):
  (tmp_path / "a.tar").write_bytes(b"")
  expand = lambda spec: inputs.expand_inputs(spec, (".tar",))
  with pytest.raises(ValueError, match=r"The glob '.*/\*\.parquet' matches no \.tar files"):
    expand(f"{tmp_path}/*.parquet")
  with pytest.raises(FileNotFoundError, match=r"9 input files do not exist: '.*/b-1.tar' "
                     r"\(from '.*/b-\{1\.\.9\}\.tar'\).* and 4 more"):
    expand(f"{tmp_path}/b-{{1..9}}.tar")
  with pytest.raises(ValueError, match="names no files"):
    expand(" ")
  with pytest.raises(ValueError, match="empty item"):
    expand(f"{tmp_path}/a.tar,,")
  with pytest.raises(ValueError, match="Unbalanced"):
    expand(f"{tmp_path}/a-{{1..2.tar")
  with pytest.raises(ValueError, match="wildcard in a directory name"):
    expand(f"{tmp_path}/*/a.tar")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="directory .* holds no .tar files"):
    expand(str(tmp_path / "empty"))


def test_open_source_errors(tmp_path):
  with pytest.raises(ValueError, match=r"Unknown captioned source kind 'csv'; expected one of "
                     r"\('webdataset', 'parquet', 'tfds', 'folder'\)"):
    sources.open_source("csv", "x")
  with pytest.raises(ValueError, match="takes no option caption_columns; its options are "
                     r"\('caption_keys',\)"):
    sources.open_source("webdataset", "x.tar", caption_columns=("c",))
  with pytest.raises(ValueError, match="needs inputs"):
    sources.open_source("folder", "")
  with pytest.raises(ValueError, match="caption_keys='caption'"):
    sources.open_source("webdataset", str(tmp_path), caption_keys="caption")


# --- prepare ------------------------------------------------------------------------------


def test_prepare_crops_any_mode_to_rgb_like_adm():
  # ADM halves with BOX while the short side is >= 2 * size, then resizes (here: not at all) and
  # takes the center.
  image = Image.open(io.BytesIO(encoded(size=(128, 64))))
  np.testing.assert_array_equal(prepare.center_crop(image, 32),
                                np.asarray(image.resize((64, 32), Image.BOX))[:, 16:48])
  for mode in ("L", "RGBA", "P", "CMYK"):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = prepare.prepare(RawExample("k", encoded(size=(80, 48), mode=mode, fmt=fmt),
                                     (" a caption ", "", "a caption", "another")),
                          image_size=32)
    assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.uint8, mode
    assert out["captions"] == ("a caption", "another") and out["key"] == "k"
  pixels = np.arange(48 * 40, dtype=np.uint8).reshape(48, 40, 1)
  for array in (pixels, np.repeat(pixels, 3, -1)):
    out = prepare.prepare(RawExample("t", array, ("c",), label=5), image_size=32)
    assert out["image"].shape == (32, 32, 3) and out["label"] == 5
  small = RawExample("s", encoded(size=(20, 30)), ("c",))
  assert prepare.prepare(small, image_size=32).reason == "image_too_small"
  assert prepare.prepare(small, image_size=32, upscale_small=True)["image"].shape == (32, 32, 3)


def test_prepare_skips_each_bad_record_or_raises():
  png = encoded()
  cases = {
      "missing_caption": RawExample("m", png, ("  ", "")),
      "undecodable_image": RawExample("u", png[:len(png) // 2], ("c",)),  # Truncated.
      "image_too_small": RawExample("t", encoded(size=(31, 100)), ("c",)),
  }
  for reason, raw in cases.items():
    skipped = prepare.prepare(raw, image_size=32)
    assert skipped == Skipped(raw.key, reason, skipped.detail) and skipped.detail, reason
    with pytest.raises(ValueError, match=f"Record '{raw.key}' cannot be used \\({reason}\\)"):
      prepare.prepare(raw, image_size=32, bad_input="error")
  assert prepare.prepare(RawExample("g", b"GIF89a?", ("c",)),
                         image_size=32).reason == "undecodable_image"
  assert prepare.prepare(RawExample("n", png, ()), image_size=32).detail == "it has no caption"
  skipped = Skipped("r", "unreadable_record", "bad json")
  assert prepare.prepare(skipped, image_size=32) is skipped
  with pytest.raises(ValueError, match="'r' cannot be used \\(unreadable_record\\): bad json"):
    prepare.prepare(skipped, image_size=32, bad_input="error")
  for arguments, message in (({"image_size": 0}, "image_size=0"),
                             ({"image_size": 32, "bad_input": "drop"}, "bad_input='drop'.*skip"),
                             ({"image_size": 32, "upscale_small": "yes"}, "upscale_small='yes'")):
    with pytest.raises(ValueError, match=message):
      prepare.prepare(cases["missing_caption"], **arguments)
  with pytest.raises(ValueError, match="'late' is not one of"):
    Skipped("k", "late", "")
  assert set(SKIP_REASONS) >= {"undecodable_image", "missing_caption", "image_too_small",
                               "unreadable_record", "missing_image"}
