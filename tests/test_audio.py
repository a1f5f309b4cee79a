"""Audio: log-mel features, their inversion to a waveform, tokens, and the spoken-words data."""

import io
import itertools
import wave

import numpy as np
import pytest

from self_flow.data import spoken_words
from self_flow.modalities import audio
from self_flow.text import tokenizer

# Two contrasting speakers: a mid-pitch male voice and a slow, high-pitched female variant (the
# hardest case for 32 mel bins: its harmonics are far apart).
_ROUND_TRIP_WORDS = ("three", "seven", "zero", "six", "eight")
_SPEAKERS = (("en-us", 160, 50), ("en+f4", 110, 80))


@pytest.fixture(scope="module")
def words():
  """Ten real espeak-ng words as float32 waveforms (10, CLIP_SAMPLES), from two calls."""
  return np.concatenate([audio.from_int16(spoken_words.synthesize_words(_ROUND_TRIP_WORDS, *s))
                         for s in _SPEAKERS])


def _round_trip_errors(waveforms, num_iters=audio.GRIFFIN_LIM_ITERS):
  """Per clip: spectral convergence ||S - S'||_F / ||S||_F of STFT magnitudes, and the mean
  |log-mel difference| in normalised units, between each waveform and its reconstruction."""
  features = audio.log_mel(waveforms)
  rebuilt = audio.mel_to_waveform(features, num_iters=num_iters)
  assert rebuilt.shape == waveforms.shape
  magnitude, rebuilt_magnitude = np.abs(audio.stft(waveforms)), np.abs(audio.stft(rebuilt))
  convergence = (np.linalg.norm(magnitude - rebuilt_magnitude, axis=(-2, -1))
                 / np.linalg.norm(magnitude, axis=(-2, -1)))
  return convergence, np.abs(audio.log_mel(rebuilt) - features).mean(axis=(-2, -1))


def test_waveform_features_waveform_round_trip_error_is_bounded(words):
  """Measured on these ten clips (32 mels, 32 fast Griffin-Lim iterations): spectral convergence
  0.54-0.76 (mean 0.66) and mean |log-mel difference| 0.029-0.050 (mean 0.039, about 2 dB).
  Over all ten words of four speakers: 0.41-0.89 (mean 0.60) and 0.021-0.059 (mean 0.035). The
  32 mel bins cannot keep single harmonics, which bounds the spectral convergence (worst for
  high voices). A wrong filterbank inverse (frequencies reversed) gives about 1.4 and 0.25-0.52;
  the pseudo-inverse clipped at 0 instead of the least-squares fit gives log-mel errors up to
  0.14."""
  convergence, log_mel_error = _round_trip_errors(words)
  assert convergence.max() < 0.82 and convergence.mean() < 0.72, convergence
  assert log_mel_error.max() < 0.06 and log_mel_error.mean() < 0.045, log_mel_error
  # Griffin-Lim's phase estimate is what improves on a random phase (0.68 / 0.046 here).
  one_convergence, one_log_mel_error = _round_trip_errors(words, num_iters=1)
  assert convergence.mean() < one_convergence.mean()
  assert log_mel_error.mean() < one_log_mel_error.mean()


def test_mel_inverse_is_a_non_negative_least_squares_fit(words):
  """The updates make the linear spectrum reproduce the mel power: mean |error| 0.43 dB here,
  against 2.5 dB for the pseudo-inverse clipped at 0 (which `num_iters=0` returns)."""
  mel_power = 10.0 ** ((audio.log_mel(words) * audio.DB_HALF_RANGE + audio.DB_CENTER) / 10.0)
  bank = audio.mel_filterbank().astype(np.float64)

  def db_error(linear):
    assert linear.min() >= 0
    return np.abs(10 * np.log10(np.maximum(linear @ bank.T, 1e-9) / mel_power)).mean()

  assert db_error(audio.mel_to_linear(mel_power)) < 0.6
  assert db_error(audio.mel_to_linear(mel_power, num_iters=0)) > 1.5


def test_mel_to_waveform_is_deterministic(words):
  features = audio.log_mel(words[:2])
  first = audio.mel_to_waveform(features, num_iters=4)
  np.testing.assert_array_equal(first, audio.mel_to_waveform(features, num_iters=4))
  assert -1 <= first.min() and first.max() <= 1 and np.abs(first).max() > 0.1


def test_log_mel_shape_range_and_silence(words):
  features = audio.log_mel(words)
  assert features.shape == (10, audio.NUM_FRAMES, audio.NUM_MELS) == (10, 64, 32)
  assert features.dtype == np.float32 and -1 <= features.min() and features.max() < 1
  assert features.max() > 0.5  # speech is loud in some bins...
  assert (features == -1).mean() > 0.2  # ...and the padding around a word is at the floor.
  np.testing.assert_array_equal(audio.log_mel(np.zeros(audio.CLIP_SAMPLES)), -1.0)


def test_log_mel_uses_the_filterbank(words):
  """The banded mel projection equals the dense filterbank product, and the filters are
  triangles of peak 1 that add up to 1 between the first and the last centre."""
  bank = audio.mel_filterbank()
  assert bank.max() <= 1 and bank.max(axis=1).min() > 0.85  # peaks fall between bins
  total = bank.sum(axis=0)
  inside = (np.argmax(bank[0]) < np.arange(bank.shape[1])) & (
      np.arange(bank.shape[1]) < np.argmax(bank[-1]))
  np.testing.assert_allclose(total[inside], 1.0, atol=1e-6)
  power = np.abs(audio.stft(words[:2])).astype(np.float64) ** 2
  db = 10 * np.log10(np.maximum(power @ bank.T.astype(np.float64), 10 ** (audio.DB_FLOOR / 10)))
  expected = np.clip((db - audio.DB_CENTER) / audio.DB_HALF_RANGE, -1, 1)
  np.testing.assert_allclose(audio.log_mel(words[:2]), expected, atol=1e-5)


def test_stft_inverts_exactly():
  waveform = np.random.default_rng(0).uniform(-0.5, 0.5, audio.CLIP_SAMPLES).astype(np.float32)
  spectrum = audio.stft(waveform)
  assert spectrum.shape == (audio.NUM_FRAMES, audio.N_FFT // 2 + 1)
  np.testing.assert_allclose(audio.istft(spectrum), waveform, atol=1e-5)


def test_resample_keeps_a_tone():
  """espeak-ng speaks at 22050 Hz; resampling to SAMPLE_RATE must keep pitch and level."""
  t = np.arange(22050) / 22050
  tone = np.sin(2 * np.pi * 440 * t) * np.hanning(len(t))
  rebuilt = spoken_words.resample(tone, 22050, audio.SAMPLE_RATE)
  assert len(rebuilt) == audio.SAMPLE_RATE
  u = np.arange(audio.SAMPLE_RATE) / audio.SAMPLE_RATE
  expected = np.sin(2 * np.pi * 440 * u) * np.interp(u, t, np.hanning(len(t)))
  np.testing.assert_allclose(rebuilt, expected, atol=2e-3)
  with pytest.raises(ValueError, match="new_rate=0"):
    spoken_words.resample(tone, 22050, 0)


def test_tokens_run_along_time():
  features = np.random.default_rng(1).normal(size=(3, 64, 32)).astype(np.float32)
  tokens = audio.tokenize(features, 4)
  assert tokens.shape == (3, 16, 128)
  np.testing.assert_array_equal(tokens[:, 5], features[:, 20:24].reshape(3, -1))
  np.testing.assert_array_equal(audio.detokenize(tokens, 4, 32), features)
  np.testing.assert_array_equal(audio.detokenize(audio.tokenize(features, 1), 1, 32), features)
  pos = np.asarray(audio.position_ids(64, 4))
  assert pos.dtype == np.int32
  np.testing.assert_array_equal(pos, np.stack([np.arange(16), np.zeros(16), np.zeros(16)], -1))


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="audio.frames_per_token=3"):
    audio.check_tokenizable(64, 3)
  with pytest.raises(ValueError, match="audio.frames_per_token=0"):
    audio.tokenize(np.zeros((1, 64, 32)), 0)
  with pytest.raises(ValueError, match="audio.frames_per_token=4"):
    audio.detokenize(np.zeros((1, 16, 100)), 4, 32)
  with pytest.raises(ValueError, match="audio.frames_per_token=5"):
    audio.position_ids(64, 5)
  with pytest.raises(ValueError, match="CLIP_SAMPLES=16128"):
    audio.log_mel(np.zeros(16000))
  with pytest.raises(ValueError, match=r"features must have shape \(\.\.\., 64, 32\)"):
    audio.mel_to_waveform(np.zeros((32, 64)))
  with pytest.raises(ValueError, match="num_iters=0"):
    audio.mel_to_waveform(np.zeros((64, 32)), num_iters=0)
  with pytest.raises(ValueError, match="waveform must be mono"):
    audio.write_wav(io.BytesIO(), np.zeros((2, 100)))
  with pytest.raises(ValueError, match="sample_rate=0"):
    audio.write_wav(io.BytesIO(), np.zeros(100), 0)
  with pytest.raises(ValueError, match="label=10"):
    spoken_words.transcript(10)
  with pytest.raises(ValueError, match="split='validation'"):
    spoken_words.split_combinations("validation")
  with pytest.raises(ValueError, match="pitch=120"):
    spoken_words.synthesize("one", "en-us", 160, 120)
  with pytest.raises(ValueError, match="speed=10"):
    spoken_words.synthesize("one", "en-us", 10, 50)
  with pytest.raises(ValueError, match="words='one'"):
    spoken_words.synthesize_words("one", "en-us", 160, 50)
  with pytest.raises(ValueError, match="voice='xx-nonexistent'"):
    spoken_words.synthesize("one", "xx-nonexistent", 160, 50)
  with pytest.raises(ValueError, match="max_length=0"):
    spoken_words.AudioCaptionTokens(0)


def test_wav_round_trip(tmp_path):
  waveform = np.sin(np.linspace(0, 200, audio.CLIP_SAMPLES)).astype(np.float32) * 0.5
  buffer = io.BytesIO()
  audio.write_wav(buffer, waveform)
  buffer.seek(0)
  pcm, rate = audio.read_wav(buffer)
  assert rate == audio.SAMPLE_RATE
  np.testing.assert_allclose(audio.from_int16(pcm), waveform, atol=1 / 32767)
  path = tmp_path / "clipped.wav"
  audio.write_wav(str(path), np.array([2.0, -2.0, 0.0], np.float32), 8000)
  with wave.open(str(path), "rb") as f:
    assert (f.getnchannels(), f.getsampwidth(), f.getframerate()) == (1, 2, 8000)
    np.testing.assert_array_equal(np.frombuffer(f.readframes(3), "<i2"), [32767, -32767, 0])


def test_synthesis_is_deterministic_centred_and_normalised():
  a = spoken_words.synthesize("four", "en-gb", 185, 35)
  np.testing.assert_array_equal(a, spoken_words.synthesize("four", "en-gb", 185, 35))
  assert a.shape == (audio.CLIP_SAMPLES,) and a.dtype == np.int16
  assert abs(np.abs(a).max() / 32767 - spoken_words.PEAK) < 1e-3
  loud = np.flatnonzero(np.abs(a) > 0.02 * np.abs(a).max())
  assert loud[-1] - loud[0] > 0.2 * audio.SAMPLE_RATE  # a spoken word, not a click
  assert loud[0] > 0 and loud[-1] < len(a) - 1  # the word fits, with silence around it
  assert abs((loud[0] + loud[-1]) / 2 - len(a) / 2) < 2  # centred
  assert not np.array_equal(a, spoken_words.synthesize("four", "en-gb", 185, 80))  # pitch


def test_one_call_splits_into_the_words():
  """The dataset's path: one espeak-ng call per speaker, cut at the pauses between words, even
  for the slowest and the fastest speakers; each clip matches its word spoken alone in length."""
  for speed in (spoken_words.SPEEDS[0], spoken_words.SPEEDS[-1]):
    clips = spoken_words.synthesize_words(spoken_words.WORDS, "en-us+m3", speed, 20)
    assert clips.shape == (len(spoken_words.WORDS), audio.CLIP_SAMPLES)
    for word, clip in zip(spoken_words.WORDS[::3], clips[::3]):
      alone = spoken_words.synthesize(word, "en-us+m3", speed, 20)
      spans = [np.ptp(np.flatnonzero(np.abs(x) > 0.02 * np.abs(x).max())) for x in (clip, alone)]
      assert abs(spans[0] - spans[1]) < 0.1 * spans[1], (word, speed, spans)


def test_every_voice_sounds_different():
  """espeak-ng silently ignores a variant it cannot apply (an unknown "+f9", or any variant of
  "en-gb"); distinct audio shows each voice is used."""
  clips = [spoken_words.synthesize("five", voice, 160, 50) for voice in spoken_words.VOICES]
  for a, b in itertools.combinations(range(len(clips)), 2):
    assert not np.array_equal(clips[a], clips[b]), (spoken_words.VOICES[a],
                                                     spoken_words.VOICES[b])


def test_splits_hold_out_whole_speakers():
  train = set(spoken_words.split_combinations("train"))
  test = set(spoken_words.split_combinations("test"))
  grid = set(itertools.product(range(len(spoken_words.VOICES)), range(len(spoken_words.SPEEDS)),
                               range(len(spoken_words.PITCHES))))
  assert not train & test and train | test == grid
  assert (len(train), len(test)) == (252, 36)  # x 10 words: 2520 and 360 clips
  for axis, values in enumerate((spoken_words.VOICES, spoken_words.SPEEDS,
                                 spoken_words.PITCHES)):
    assert {c[axis] for c in test} == set(range(len(values)))  # every voice, speed, pitch


def test_dataset_records_and_captions(audio_data_dir):
  for split, num_combinations in (("train", 252), ("test", 36)):
    source = spoken_words.open_audio_source(split, audio_data_dir)
    assert len(source) == len(spoken_words.WORDS) * num_combinations
    assert repr(source) == (f"ImageSource(dataset='spoken_words', split='{split}', "
                            f"tfds_name='spoken_words', num_records={len(source)})")
    records = source.__getitems__(range(len(source)))
    labels = {int(r["label"]) for r in records}
    assert labels == set(range(len(spoken_words.WORDS)))  # every word in both splits
  record = source[0]
  assert record["transcript"].decode() == spoken_words.transcript(int(record["label"]))
  assert record["voice"].decode() in spoken_words.VOICES
  assert int(record["speed"]) in spoken_words.SPEEDS
  assert int(record["pitch"]) in spoken_words.PITCHES
  assert record["waveform"].shape == (audio.CLIP_SAMPLES,) and record["waveform"].dtype == np.int16
  speakers = {(r["voice"], int(r["speed"]), int(r["pitch"])) for r in records}
  index = spoken_words.VOICES.index(record["voice"].decode())
  assert spoken_words.is_heldout(index, spoken_words.SPEEDS.index(int(record["speed"])),
                                 spoken_words.PITCHES.index(int(record["pitch"])))
  assert len(speakers) == 36
  inputs = audio.preprocess(record)
  assert inputs["audio"].shape == (audio.NUM_FRAMES, audio.NUM_MELS)
  assert inputs["audio"].dtype == np.float32 and inputs["label"].dtype == np.int32
  out = spoken_words.AudioCaptionTokens(16).map({"label": np.int32(7)})
  assert out["text_tokens"].dtype == np.int32 and out["text_mask"].dtype == bool
  assert tokenizer.detokenize(out["text_tokens"][None], out["text_mask"][None]) == ["seven"]
