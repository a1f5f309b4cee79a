"""Video: spatio-temporal patch tokens, the moving-sprites dataset and its motion captions."""

import itertools
import os

import jax.numpy as jnp
import numpy as np
import pytest

from self_flow.data import captions, fashion_mnist_local, motion_captions, moving_sprites
from self_flow.modalities import video
from self_flow.text import tokenizer

MOTIONS = moving_sprites.MOTIONS
SHAPES = [((8, 32, 32, 1), 2, 8), ((8, 32, 32, 1), 1, 4), ((4, 16, 8, 3), 4, 2),
          ((12, 16, 16, 48), 1, 1)]
# (row, col) change per frame of each motion, written out independently of the module.
STEPS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}


@pytest.mark.parametrize("shape,patch_time,patch_size", SHAPES)
def test_patchify_round_trips_exactly(shape, patch_time, patch_size):
  clips = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
  tokens = video.patchify(clips, patch_time, patch_size)
  t, h, w, c = shape
  n = (t // patch_time) * (h // patch_size) * (w // patch_size)
  assert tokens.shape == (2, n, patch_time * patch_size * patch_size * c)
  back = video.unpatchify(tokens, patch_time, patch_size, t, h, w)
  np.testing.assert_array_equal(back, clips)
  np.testing.assert_array_equal(  # jax arrays take the same path
      video.unpatchify(video.patchify(jnp.asarray(clips), patch_time, patch_size),
                       patch_time, patch_size, t, h, w), clips)


@pytest.mark.parametrize("shape,patch_time,patch_size", SHAPES[:3])
def test_position_ids_are_3d_and_follow_the_token_order(shape, patch_time, patch_size):
  t, h, w, c = shape
  # Every pixel holds the (frame block, row block, col block) of the tube it belongs to.
  coords = np.stack(np.meshgrid(np.arange(t) // patch_time, np.arange(h) // patch_size,
                                np.arange(w) // patch_size, indexing="ij"), -1)
  clip = np.repeat(coords[..., None, :], c, axis=-2).reshape(t, h, w, c, 3)
  tokens = [video.patchify(clip[None, ..., axis], patch_time, patch_size)[0] for axis in range(3)]
  pos = np.asarray(video.position_ids(t, h, w, patch_time, patch_size))
  assert pos.shape == (tokens[0].shape[0], 3) and pos.dtype == np.int32
  for axis in range(3):
    assert np.all(tokens[axis] == pos[:, axis:axis + 1]), axis  # each token is one tube
  assert len({tuple(p) for p in pos}) == len(pos)
  assert pos[:, 0].max() == t // patch_time - 1  # time varies, unlike for images
  # Time-major: the frame block never decreases along the sequence.
  assert np.all(np.diff(pos[:, 0]) >= 0)


def test_token_features_are_frame_row_col_channel_within_a_tube():
  clip = np.arange(4 * 4 * 4 * 2).reshape(1, 4, 4, 4, 2)
  first = video.patchify(clip, 2, 2)[0, 0]
  np.testing.assert_array_equal(first, clip[0, :2, :2, :2].reshape(-1))


@pytest.mark.parametrize("args,key", [((8, 32, 3, 8), "video.patch_time=3"),
                                      ((8, 32, 2, 5), "video.patch_size=5"),
                                      ((8, 32, 0, 8), "video.patch_time=0"),
                                      ((8, 32, 2, -4), "video.patch_size=-4"),
                                      ((0, 32, 1, 8), "video.num_frames=0"),
                                      ((8, -32, 1, 8), "video.image_size=-32")])
def test_unpatchable_sizes_are_named(args, key):
  with pytest.raises(ValueError, match=key):
    video.check_patchable(*args)


def test_bad_shapes_are_refused():
  with pytest.raises(ValueError, match=r"\(B, T, H, W, C\)"):
    video.patchify(np.zeros((2, 32, 32, 1)), 1, 4)
  with pytest.raises(ValueError, match="video.patch_size=4"):
    video.patchify(np.zeros((1, 8, 32, 30, 1)), 1, 4)
  with pytest.raises(ValueError, match="do not tile"):
    video.unpatchify(np.zeros((1, 63, 16)), 1, 4, 4, 32, 32)


def test_preprocess_and_strips():
  clip = np.random.default_rng(0).integers(0, 256, moving_sprites.CLIP_SHAPE, dtype=np.uint8)
  out = video.preprocess({"video": clip, "label": np.int64(3), "motion": np.int64(2),
                          "speed": np.int32(1)})
  assert out["video"].dtype == np.float32 and out["video"].shape == moving_sprites.CLIP_SHAPE
  np.testing.assert_allclose(out["video"], clip / 127.5 - 1.0, atol=1e-6)
  assert out["label"].dtype == np.int32 and out["label"] == 3 and out["motion"] == 2

  clips = np.random.default_rng(1).integers(1, 256, (3, 4, 5, 6, 1), dtype=np.uint8)
  strips = video.to_strips(clips)
  assert strips.shape == (3 * 6 - 1, 4 * 7 - 1, 1)
  for b, f in itertools.product(range(3), range(4)):  # clip b on row b, frame f in column f
    np.testing.assert_array_equal(strips[b * 6:b * 6 + 5, f * 7:f * 7 + 6], clips[b, f])
  assert not strips[5].any() and not strips[:, 6].any()  # black gaps
  with pytest.raises(ValueError, match="uint8"):
    video.to_strips(clips.astype(np.float32))


def _sprite(seed=0):
  image = np.zeros((28, 28), np.uint8)
  image[6:22, 8:20] = np.random.default_rng(seed).integers(80, 255, (16, 12))
  return image


def _centroid(frame):
  rows, cols = np.nonzero(frame[..., 0])
  weights = frame[rows, cols, 0].astype(np.float64)
  return np.array([np.average(rows, weights=weights), np.average(cols, weights=weights)])


def test_sprite_is_the_2x2_mean_of_the_image():
  image = _sprite(3)
  clip = moving_sprites.make_clip(image, 0, 1, (5, 18))
  expected = np.round(image.reshape(14, 2, 14, 2).astype(float).mean((1, 3)))
  np.testing.assert_array_equal(clip[0, 5:19, 18:32, 0], expected)
  assert clip[0].sum() == clip[0, 5:19, 18:32].sum()  # the rest of the canvas is black


@pytest.mark.parametrize("motion", range(len(MOTIONS)))
@pytest.mark.parametrize("speed", moving_sprites.SPEEDS)
def test_clip_moves_in_the_named_direction_at_the_named_speed(motion, speed):
  start = {"left": (9, 18), "right": (9, 0), "up": (18, 9), "down": (0, 9)}
  clip = moving_sprites.make_clip(_sprite(), motion, speed, start[MOTIONS[motion]])
  assert clip.shape == moving_sprites.CLIP_SHAPE == (8, 32, 32, 1) and clip.dtype == np.uint8
  total = clip[0].sum()
  expected = np.array(STEPS[MOTIONS[motion]]) * speed
  for f in range(1, clip.shape[0]):
    assert clip[f].sum() == total  # the whole sprite stays in the frame
    np.testing.assert_allclose(_centroid(clip[f]) - _centroid(clip[f - 1]), expected, atol=1e-9)


@pytest.mark.parametrize("args,match", [((0, 2, (0, 10)), "leaves the 32x32 canvas"),
                                        ((3, 1, (12, 0)), "leaves the 32x32 canvas"),
                                        ((4, 1, (0, 0)), "motion=4"),
                                        ((0, 3, (0, 18)), "speed=3"),
                                        ((0, 1, (0,)), r"start=\(0,\)")])
def test_bad_clip_arguments_are_refused(args, match):
  with pytest.raises(ValueError, match=match):
    moving_sprites.make_clip(_sprite(), *args)
  with pytest.raises(ValueError, match="uint8 \\(28, 28\\)"):
    moving_sprites.make_clip(np.zeros((28, 27), np.uint8), 0, 1, (0, 18))


def test_choices_are_deterministic_and_fit_the_canvas():
  a = moving_sprites.draw_choices(300, 1000, seed=5)
  assert a == moving_sprites.draw_choices(300, 1000, seed=5)
  assert a != moving_sprites.draw_choices(300, 1000, seed=6)
  assert len({c.image_index for c in a}) == 300  # distinct source images
  for choice in a:  # raises if a trajectory left the canvas
    clip = moving_sprites.make_clip(np.full((28, 28), 255, np.uint8), choice.motion,
                                    choice.speed, choice.start)
    assert np.all(clip.sum(axis=(1, 2, 3)) == 14 * 14 * 255)
  assert np.bincount([c.motion for c in a], minlength=4).min() > 40  # every direction common
  assert np.bincount([c.speed for c in a]).tolist()[1:] > [100, 100]
  # Across the motion, the start is random too (not always centred).
  across = [c.start[0] if MOTIONS[c.motion] in ("left", "right") else c.start[1] for c in a]
  assert len(set(across)) > 10 and min(across) == 0 and max(across) == 32 - 14
  with pytest.raises(ValueError, match="num_clips=1001"):
    moving_sprites.draw_choices(1001, 1000, seed=0)


@pytest.fixture
def debian_files():
  if not all(map(os.path.exists, fashion_mnist_local.debian_files())):
    pytest.skip("the Debian Fashion-MNIST files are absent (apt-get install -y "
                "dataset-fashion-mnist).")


def test_generated_examples_are_deterministic_and_labelled(debian_files, tmp_path):
  builder = moving_sprites.MovingSprites(data_dir=str(tmp_path), file_format="array_record")
  first = list(itertools.islice(builder._generate_examples("test"), 5))
  again = list(itertools.islice(builder._generate_examples("test"), 5))
  labels = fashion_mnist_local.read_idx(fashion_mnist_local.idx_path("t10k", "labels-idx1"))
  choices = moving_sprites.draw_choices(moving_sprites.SPLITS["test"][1], len(labels),
                                        moving_sprites.SEED + moving_sprites.SPLITS["test"][2])
  for (key, ex), (key2, ex2), choice in zip(first, again, choices):
    assert key == key2 and set(ex) == {"video", "label", "motion", "speed"}
    np.testing.assert_array_equal(ex["video"], ex2["video"])
    assert ex["label"] == labels[choice.image_index] and ex["motion"] == choice.motion
    assert ex["video"].shape == moving_sprites.CLIP_SHAPE and ex["video"].max() > 0
  with pytest.raises(ValueError, match="split='validation'"):
    next(builder._generate_examples("validation"))


def test_dataset_records(video_data_dir):
  source = moving_sprites.open_video_source("test", video_data_dir)
  assert len(source) == moving_sprites.SPLITS["test"][1]
  assert repr(source) == repr(moving_sprites.open_video_source("test", video_data_dir))
  assert "0x" not in repr(source) and video_data_dir not in repr(source)
  records = source.__getitems__([3, 4])
  for record in records:
    assert record["video"].shape == moving_sprites.CLIP_SHAPE and record["video"].max() > 0
    assert 0 <= record["motion"] < 4 and record["speed"] in moving_sprites.SPEEDS
  np.testing.assert_array_equal(records[0]["video"], source[3]["video"])
  processed = video.preprocess(records[0])
  assert processed["video"].min() >= -1 and processed["video"].max() <= 1
  with pytest.raises(ValueError, match="split='validation'"):
    moving_sprites.open_video_source("validation", video_data_dir)


def test_missing_debian_files_are_named_with_the_fix(tmp_path, monkeypatch):
  monkeypatch.setattr(fashion_mnist_local, "DEBIAN_DIR", str(tmp_path / "absent"))
  with pytest.raises(FileNotFoundError, match="absent.*apt-get install -y dataset-fashion-mnist"):
    moving_sprites.open_video_source("train", str(tmp_path / "tfds"))


def _named_direction(text: str, label: int) -> set[str]:
  """The motions a caption names, after removing the object's name (which may hold 'up')."""
  name = max((n for n in captions.NAMES[label] if n in text), key=len)
  words = text.replace(name, " ").split()
  return {m for m in MOTIONS if m in words or motion_captions.DIRECTION_PHRASES[m].split()[-1]
          in words}


def test_captions_name_object_motion_and_speed():
  rng = np.random.default_rng(0)
  assert sorted(motion_captions.SPEED_WORDS) == list(moving_sprites.SPEEDS)
  speed_words_seen = set()
  for label in range(10):
    for motion, direction in enumerate(MOTIONS):
      for speed in moving_sprites.SPEEDS:
        for _ in range(8):
          text = motion_captions.train_caption(label, motion, speed, rng)
          assert any(name in text for name in captions.NAMES[label]), text
          assert _named_direction(text, label) == {direction}, text
          others = set(motion_captions.SPEED_WORDS.values()) - {
              motion_captions.SPEED_WORDS[speed]}
          assert not others & set(text.split()), text
          speed_words_seen |= set(text.split()) & set(motion_captions.SPEED_WORDS.values())
      held_out = motion_captions.heldout_caption(label, motion, 4)
      assert any(name in held_out for name in captions.NAMES[label]), held_out
      assert _named_direction(held_out, label) == {direction}, held_out
      assert held_out == motion_captions.heldout_caption(label, motion, 4)
  assert speed_words_seen == {"slowly", "quickly"}


def test_every_caption_fits_max_caption_bytes():
  fills = itertools.product(range(10), range(len(MOTIONS)), moving_sprites.SPEEDS)
  longest = 0
  for label, motion, speed in fills:
    for template in motion_captions.TRAIN_TEMPLATES + motion_captions.HELDOUT_TEMPLATES:
      for name in captions.NAMES[label]:
        text = motion_captions._fill(template, name, motion, speed)
        longest = max(longest, len(text.encode()))
  assert longest <= motion_captions.MAX_CAPTION_BYTES == 64


def test_heldout_templates_are_disjoint_from_training():
  def fixed_words(templates):
    return {w for t in templates for w in t.split() if "{" not in w}
  train_words = fixed_words(motion_captions.TRAIN_TEMPLATES)
  assert not train_words & fixed_words(motion_captions.HELDOUT_TEMPLATES)
  # No fixed text of a training template (e.g. " moving ", "a clip of ") inside a held-out
  # caption, whichever object, motion or index.
  pieces = {p.strip() for t in motion_captions.TRAIN_TEMPLATES
            for p in t.replace("{", "}").split("}")[::2] if p.strip()}
  assert pieces >= {"moving", "a clip of"}
  for label, motion, index in itertools.product(range(10), range(4), range(9)):
    text = motion_captions.heldout_caption(label, motion, index)
    assert not [p for p in pieces if f" {p} " in f" {text} "], text
  # Every held-out template and name is reached by the index.
  texts = {motion_captions.heldout_caption(7, 0, i) for i in range(9)}
  assert len(texts) == 9


def test_motion_class_and_bad_values():
  assert motion_captions.motion_class(7, 3) == 31
  np.testing.assert_array_equal(motion_captions.motion_class(np.array([0, 9]), np.array([1, 0])),
                                [1, 36])
  # A bijection onto the 40 joint classes.
  joint = {int(motion_captions.motion_class(label, m)) for label in range(10) for m in range(4)}
  assert joint == set(range(40))
  with pytest.raises(ValueError, match="motion="):
    motion_captions.motion_class(0, 4)
  with pytest.raises(ValueError, match="motion=4"):
    motion_captions.heldout_caption(0, 4, 0)
  with pytest.raises(ValueError, match="label=10"):
    motion_captions.train_caption(10, 0, 1, np.random.default_rng(0))
  with pytest.raises(ValueError, match="speed=3"):
    motion_captions.train_caption(0, 0, 3, np.random.default_rng(0))
  with pytest.raises(ValueError, match="index=-1"):
    motion_captions.heldout_caption(0, 0, -1)
  with pytest.raises(ValueError, match="max_length=0"):
    motion_captions.VideoCaptionTokens(0)


def test_caption_tokens_transform():
  element = {"video": np.zeros((8, 32, 32, 1)), "label": 7, "motion": 1, "speed": 2}
  transform = motion_captions.VideoCaptionTokens(64)
  out = transform.random_map(element, np.random.default_rng(1))
  assert out["text_tokens"].shape == (64,) and out["text_tokens"].dtype == np.int32
  assert out["text_mask"].shape == (64,) and out["text_mask"].dtype == bool
  text = tokenizer.detokenize(out["text_tokens"][None], out["text_mask"][None])[0]
  assert _named_direction(text, 7) == {"right"} and "speed" not in out
  assert any(name in text for name in captions.NAMES[7])
  again = transform.random_map(element, np.random.default_rng(1))
  np.testing.assert_array_equal(again["text_tokens"], out["text_tokens"])  # rng decides
