"""Video: spatio-temporal patch tokens, the moving-sprites dataset and its motion captions."""

import jax.numpy as jnp
import numpy as np
import pytest

from self_flow.data import captions, motion_captions, moving_sprites
from self_flow.modalities import video
from self_flow.text import tokenizer

SHAPES = [((8, 32, 32, 1), 2, 8), ((8, 32, 32, 1), 1, 4), ((4, 16, 8, 3), 4, 2),
          ((12, 16, 16, 48), 1, 1)]


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


@pytest.mark.parametrize("args,key", [((8, 32, 3, 8), "video.patch_time=3"),
                                      ((8, 32, 2, 5), "video.patch_size=5"),
                                      ((8, 32, 0, 8), "video.patch_time=0")])
def test_unpatchable_sizes_are_named(args, key):
  with pytest.raises(ValueError, match=key):
    video.check_patchable(*args)


def _sprite(seed=0):
  image = np.zeros((28, 28), np.uint8)
  image[6:22, 8:20] = np.random.default_rng(seed).integers(80, 255, (16, 12))
  return image


def _centroid(frame):
  rows, cols = np.nonzero(frame[..., 0])
  weights = frame[rows, cols, 0].astype(np.float64)
  return np.array([np.average(rows, weights=weights), np.average(cols, weights=weights)])


@pytest.mark.parametrize("motion", range(len(motion_captions.MOTIONS)))
@pytest.mark.parametrize("speed", moving_sprites.SPEEDS)
def test_clip_moves_in_the_named_direction_at_the_named_speed(motion, speed):
  start = {"left": (9, 18), "right": (9, 0), "up": (18, 9), "down": (0, 9)}
  clip = moving_sprites.make_clip(_sprite(), motion, speed,
                                  start[motion_captions.MOTIONS[motion]])
  assert clip.shape == moving_sprites.CLIP_SHAPE and clip.dtype == np.uint8
  total = clip[0].sum()
  step = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
  expected = np.array(step[motion_captions.MOTIONS[motion]]) * speed
  for f in range(1, clip.shape[0]):
    assert clip[f].sum() == total  # the whole sprite stays in the frame
    np.testing.assert_allclose(_centroid(clip[f]) - _centroid(clip[f - 1]), expected, atol=1e-9)


def test_clip_leaving_the_canvas_is_refused():
  with pytest.raises(ValueError, match="leaves the 32x32 canvas"):
    moving_sprites.make_clip(_sprite(), 0, 2, (0, 10))  # left from col 10: gone by frame 6


def test_choices_are_deterministic_and_fit_the_canvas():
  a = moving_sprites.draw_choices(300, 1000, seed=5)
  assert a == moving_sprites.draw_choices(300, 1000, seed=5)
  assert a != moving_sprites.draw_choices(300, 1000, seed=6)
  assert len({c.image_index for c in a}) == 300  # distinct source images
  for choice in a:  # raises if a trajectory left the canvas
    moving_sprites.make_clip(_sprite(), choice.motion, choice.speed, choice.start)
  motions = np.bincount([c.motion for c in a], minlength=4)
  assert motions.min() > 40  # every direction is common


def test_dataset_records(video_data_dir):
  source = moving_sprites.open_video_source("test", video_data_dir)
  assert len(source) == moving_sprites.SPLITS["test"][1]
  assert repr(source) == repr(moving_sprites.open_video_source("test", video_data_dir))
  record = source[3]
  assert record["video"].shape == moving_sprites.CLIP_SHAPE and record["video"].max() > 0
  processed = video.preprocess(record)
  assert processed["video"].min() >= -1 and processed["video"].max() <= 1
  with pytest.raises(ValueError, match="split='validation'"):
    moving_sprites.open_video_source("validation", video_data_dir)


def test_captions_name_object_and_motion():
  rng = np.random.default_rng(0)
  for label in range(10):
    for motion, direction in enumerate(motion_captions.MOTIONS):
      for speed in moving_sprites.SPEEDS:
        text = motion_captions.train_caption(label, motion, speed, rng)
        assert any(name in text for name in captions.NAMES[label]), text
        assert text.endswith(direction), text
        assert len(text.encode()) <= motion_captions.MAX_CAPTION_BYTES
      held_out = motion_captions.heldout_caption(label, motion, 4)
      assert held_out.endswith(direction) and len(held_out.encode()) <= 64
      assert held_out == motion_captions.heldout_caption(label, motion, 4)
  # The fixed words of training and held-out templates are disjoint.
  train_words = {w for t in motion_captions.TRAIN_TEMPLATES for w in t.split() if "{" not in w}
  heldout_words = {w for t in motion_captions.HELDOUT_TEMPLATES for w in t.split()
                   if "{" not in w}
  assert not train_words & heldout_words, train_words & heldout_words


def test_motion_class_and_bad_values():
  assert motion_captions.motion_class(7, 3) == 31
  np.testing.assert_array_equal(motion_captions.motion_class(np.array([0, 9]), np.array([1, 0])),
                                [1, 36])
  with pytest.raises(ValueError, match="motion=4"):
    motion_captions.heldout_caption(0, 4, 0)
  with pytest.raises(ValueError, match="speed=3"):
    motion_captions.train_caption(0, 0, 3, np.random.default_rng(0))


def test_caption_tokens_transform():
  element = {"video": np.zeros((8, 32, 32, 1)), "label": 7, "motion": 1, "speed": 2}
  out = motion_captions.VideoCaptionTokens(64).random_map(element, np.random.default_rng(1))
  text = tokenizer.detokenize(out["text_tokens"][None], out["text_mask"][None])[0]
  assert "right" in text and "speed" not in out
  assert any(name in text for name in captions.NAMES[7])
