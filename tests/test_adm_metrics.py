"""ADM-style evaluation: the FID InceptionV3, its weight names, the five metrics, the two CLIs.

InceptionV3 runs with random weights at a 75x75 input (the smallest the architecture takes) to
keep the tests fast; the 299x299 shapes are checked with `jax.eval_shape`. The metric tests use
inputs whose answers are known in closed form.
"""

import json

import flax
import jax
import numpy as np
import pytest
from absl import app, flags
from etils import epath
from flax import traverse_util

from conftest import tiny_config
from equivalence import assert_equivalent, assert_fault_detected, rounding_bound
from self_flow import storage, train
from self_flow.evaluation import adm_metrics, inception
from self_flow.tools import evaluate_npz, sample_npz

flax.config.update("flax_always_shard_variable", False)

SMALL_INPUT = inception.MIN_INPUT_SIZE  # 75 -> a 3x3 mixed_6 map: 3 * 3 * 7 = 63 spatial dims.
BATCH = 8  # a multiple of the 8 fake devices


@pytest.fixture(scope="module")
def random_params():
  return inception.random_params(seed=0)


@pytest.fixture(scope="module")
def extractor(random_params):
  return adm_metrics.InceptionActivations(random_params, batch_size=BATCH,
                                          input_size=SMALL_INPUT)


def _images(n: int, seed: int, size: int = 32, channels: int = 3) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


# --- InceptionV3. ---


def test_inception_outputs_have_the_documented_shapes(random_params, extractor):
  model = inception.create_model(random_params)
  # The FID graph's variant: average pools in A, C and the first E block, max pool in the last.
  assert (model.Mixed_7b.pool, model.Mixed_7c.pool) == ("avg", "max")
  full = jax.eval_shape(model, jax.ShapeDtypeStruct((2, 299, 299, 3), np.float32))
  assert {k: v.shape for k, v in full.items()} == {
      "pool": (2, 2048), "spatial": (2, 17 * 17 * 7), "logits": (2, 1008)}

  images = _images(10, seed=0)  # two calls: 8, then 2 padded to 8
  activations = extractor(images)
  assert activations.pool.shape == (10, 2048)
  assert activations.spatial.shape == (10, 3 * 3 * 7)
  assert activations.logits.shape == (10, 1008)
  assert all(np.isfinite(a).all() and a.dtype == np.float32 for a in activations)
  assert (activations.pool >= 0).all()  # the mean of ReLU outputs
  # Padding never leaks into real rows; different images give different features.
  alone = extractor(images[8:])
  # Same images at other rows of the same compiled batch-8 program: only a batch-dependent
  # blocking of the convolutions could reorder their sums (bound 256 float32 roundings; measured
  # 0 on jax 0.10.2 and 0.12.1).
  bound = rounding_bound(256)
  assert_equivalent(alone.pool, activations.pool[8:], bound=bound)
  assert_fault_detected(activations.pool[7:9], activations.pool[8:], bound=bound,
                        fault="features one image off")
  assert np.abs(activations.pool[0] - activations.pool[1]).max() > 1e-3
  # Grayscale is replicated to RGB.
  gray = images[:BATCH, ..., :1]
  np.testing.assert_allclose(extractor(gray).pool, extractor(np.repeat(gray, 3, -1)).pool)
  with pytest.raises(ValueError, match="uint8"):
    extractor(images.astype(np.float32))
  with pytest.raises(ValueError, match="multiple of the 8 local devices"):
    adm_metrics.InceptionActivations(random_params, batch_size=12)


def test_pools_ignore_padding_as_tensorflow_does():
  x = np.arange(1.0, 10.0, dtype=np.float32).reshape(1, 3, 3, 1)
  averaged = np.asarray(inception.avg_pool_excluding_padding(x))[0, :, :, 0]
  assert averaged[0, 0] == pytest.approx((1 + 2 + 4 + 5) / 4)  # not / 9
  assert averaged[1, 1] == pytest.approx(5.0)
  assert averaged[0, 1] == pytest.approx((1 + 2 + 3 + 4 + 5 + 6) / 6)
  negative = np.asarray(inception.max_pool(-np.ones((1, 3, 3, 1), np.float32), 1, 1))
  np.testing.assert_array_equal(negative, -1.0)  # padded cells never win


def test_resizes_match_tensorflow1_and_pytorch_bilinear():
  np.testing.assert_allclose(inception.resize_matrix(2, 4, "adm"),
                             [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])  # source = out * in / out
  np.testing.assert_allclose(inception.resize_matrix(2, 4, "pytorch_fid"),
                             [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])  # half-pixel
  for mode in inception.PREPROCESSING:
    np.testing.assert_allclose(inception.resize_matrix(5, 5, mode), np.eye(5))
    np.testing.assert_allclose(inception.resize_matrix(256, 299, mode).sum(1), 1.0, rtol=1e-6)
  pixels = np.array([0, 128, 255], np.uint8).reshape(1, 1, 3, 1).repeat(3, -1)
  adm = np.asarray(inception.preprocess(pixels, 3, "adm"))[0, 0, :, 0]
  torch = np.asarray(inception.preprocess(pixels, 3, "pytorch_fid"))[0, 0, :, 0]
  np.testing.assert_allclose(adm, [-1.0, 0.0, 127 / 128], atol=1e-6)  # (x - 128) / 128
  np.testing.assert_allclose(torch, [-1.0, 128 / 127.5 - 1, 1.0], atol=1e-6)  # x / 127.5 - 1
  with pytest.raises(ValueError, match="preprocessing='bicubic'"):
    inception.resize_matrix(2, 4, "bicubic")


# --- Weight names. ---


def _flat(params):
  return traverse_util.flatten_dict(params)


def test_weight_names_round_trip_in_both_namings(random_params, tmp_path):
  tf_names = inception.to_named_arrays(random_params, "tf")
  torch_names = inception.to_named_arrays(random_params, "torch")
  assert len(tf_names) == len(torch_names) == 94 * 5 + 1  # 94 conv + BN layers, the fc
  # Names and layouts of the published files.
  assert tf_names["mixed_6/conv/conv2d_params"].shape == (1, 1, 768, 192)  # sFID layer, HWIO
  assert tf_names["mixed_10/tower_1/mixed/conv_1/conv2d_params"].shape == (3, 1, 384, 384)
  assert tf_names["softmax/weights"].shape == (2048, 1008)
  assert torch_names["Mixed_6d.branch1x1.conv.weight"].shape == (192, 768, 1, 1)  # OIHW
  assert torch_names["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
  assert torch_names["fc.weight"].shape == (1008, 2048)
  np.testing.assert_array_equal(torch_names["Mixed_6d.branch1x1.conv.weight"],
                                tf_names["mixed_6/conv/conv2d_params"].transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(torch_names["Mixed_5b.branch5x5_2.bn.running_var"],
                                tf_names["mixed/tower/conv_1/batchnorm/moving_variance"])
  np.testing.assert_array_equal(torch_names["Conv2d_4a_3x3.bn.weight"],
                                tf_names["conv_4/batchnorm/gamma"])

  expected = _flat(random_params)
  extras = {"tf": {"softmax/biases": np.zeros(1008, np.float32)},
            "torch": {"fc.bias": np.zeros(1008, np.float32),
                      "Conv2d_1a_3x3.bn.num_batches_tracked": np.array(7)}}
  for naming, arrays in (("tf", tf_names), ("torch", torch_names)):
    back = _flat(inception.params_from_named_arrays({**arrays, **extras[naming]}))
    assert back.keys() == expected.keys()
    for key, value in expected.items():
      np.testing.assert_array_equal(back[key], value, err_msg=f"{naming} {key}")
  # The documented .npz goes through load_params unchanged.
  np.savez(tmp_path / "inception.npz", **tf_names)
  loaded = _flat(inception.load_params(str(tmp_path / "inception.npz")))
  np.testing.assert_array_equal(loaded[("Mixed_7c", "branch_pool", "var")],
                                expected[("Mixed_7c", "branch_pool", "var")])


def test_bad_weights_are_named_in_one_error(random_params):
  arrays = inception.to_named_arrays(random_params, "torch")
  del arrays["Mixed_6e.branch7x7dbl_4.bn.running_mean"]
  arrays["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
  arrays["Mixed_7b.branch_pool.conv.weight"] = np.zeros((192, 1280, 3, 3), np.float32)
  with pytest.raises(ValueError) as error:
    inception.params_from_named_arrays(arrays, source="w.pth")
  message = str(error.value)
  for fragment in ("w.pth", "'torch' naming", "missing (1): ['Mixed_6e.branch7x7dbl_4.bn."
                   "running_mean']", "unexpected (1): ['AuxLogits.fc.weight']",
                   "Mixed_7b.branch_pool.conv.weight: (192, 1280, 3, 3), expected "
                   "(192, 1280, 1, 1)"):
    assert fragment in message
  with pytest.raises(ValueError, match="no FID InceptionV3 layer in a known naming"):
    inception.params_from_named_arrays({"encoder.weight": np.zeros(3)})


# --- The metrics, on inputs with known answers. ---


def _activations(pool, spatial):
  return adm_metrics.Activations(pool, spatial, np.zeros((len(pool), 3), np.float32))


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
  rng = np.random.default_rng(0)
  pool, spatial = rng.normal(size=(300, 16)), rng.normal(size=(300, 8))
  base = adm_metrics.FrechetStatistics.from_activations(_activations(pool, spatial))
  assert abs(adm_metrics.fid(base, base)) < 1e-9 and abs(adm_metrics.sfid(base, base)) < 1e-9
  distances = []
  for shift in (0.5, 1.0, 2.0):  # a constant shift keeps the covariance: FID = |shift|^2
    moved = adm_metrics.FrechetStatistics.from_activations(
        _activations(pool + shift, spatial + shift))
    distances.append(adm_metrics.fid(base, moved))
    assert distances[-1] == pytest.approx(16 * shift**2, rel=1e-9)
    assert adm_metrics.sfid(base, moved) == pytest.approx(8 * shift**2, rel=1e-9)
  assert distances == sorted(distances)


def test_inception_score_exact_values():
  assert adm_metrics.inception_score(np.zeros((100, 1008))) == pytest.approx(1.0, abs=1e-12)
  classes = 10
  confident = 60.0 * np.eye(1008)[np.arange(100) % classes]  # p(y|x) one-hot to 1e-23
  assert adm_metrics.inception_score(confident) == pytest.approx(classes, rel=1e-12)
  # Splits of 10 consecutive samples: each holds every class once -> 10 each; sorted by class,
  # each split holds one class only -> 1 each (p(y|x) = p(y)).
  assert adm_metrics.inception_score(confident, split_size=10) == pytest.approx(10, rel=1e-12)
  by_class = 60.0 * np.eye(1008)[np.repeat(np.arange(classes), 10)]
  assert adm_metrics.inception_score(by_class, split_size=10) == pytest.approx(1.0, abs=1e-12)
  # Two classes with p(y|x) = (3/4, 1/4) and (1/4, 3/4): KL = log 2 - H(3/4, 1/4).
  logits = np.log([[0.75, 0.25], [0.25, 0.75]] * 5)
  entropy = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
  assert adm_metrics.inception_score(logits) == pytest.approx(np.exp(np.log(2) - entropy))


def test_manifold_radii_match_brute_force_in_any_block_size():
  features = np.random.default_rng(1).normal(size=(50, 5)).astype(np.float32)
  squared = ((features[:, None] - features[None]) ** 2).sum(-1)
  expected = np.sort(squared, axis=1)[:, 3]  # index 0 is the point itself
  for batch_size in (16, 50):
    np.testing.assert_allclose(adm_metrics.manifold_radii(features, 3, batch_size), expected,
                               rtol=1e-4, atol=1e-4)


def test_precision_recall_of_identical_disjoint_and_partly_covered_sets():
  rng = np.random.default_rng(2)
  reference = rng.normal(size=(40, 8)).astype(np.float32)
  assert adm_metrics.precision_recall(reference, reference, batch_size=16) == (1.0, 1.0)
  far = reference[:30] + 100.0
  assert adm_metrics.precision_recall(reference, far, batch_size=16) == (0.0, 0.0)
  # 1-D points 0..9 plus an outlier at 100: the outlier is outside the reference manifold
  # (precision 10/11); every reference point is a sample (recall 1).
  line = np.arange(10, dtype=np.float32)[:, None]
  samples = np.concatenate([line, [[100.0]]]).astype(np.float32)
  precision, recall = adm_metrics.precision_recall(line, samples, batch_size=4)
  assert precision == pytest.approx(10 / 11) and recall == 1.0


# --- Reference batches and their cache. ---


class _PixelFeatures:
  """A stand-in extractor: the first pixels as features. Counts its calls."""

  fingerprint = "pixels"

  def __init__(self):
    self.calls = 0

  def __call__(self, images):
    self.calls += 1
    flat = images.reshape(len(images), -1).astype(np.float32)
    return adm_metrics.Activations(flat[:, :6], flat[:, 6:10], flat[:, :3])


def test_reference_statistics_stored_or_computed_and_cached(tmp_path):
  images = _images(12, seed=3, size=4)
  plain = tmp_path / "plain.npz"
  np.savez(plain, arr_0=images)
  features = _PixelFeatures()
  direct = features(images)
  computed = adm_metrics.load_reference(str(plain), features)
  assert computed.origin == "computed" and features.calls == 2
  expected = adm_metrics.FrechetStatistics.from_activations(direct)
  np.testing.assert_allclose(computed.statistics.sigma, expected.sigma)
  np.testing.assert_allclose(computed.statistics.mu_s, expected.mu_s)
  np.testing.assert_array_equal(computed.pool, direct.pool)
  again = adm_metrics.load_reference(str(plain), features)  # from the cache beside it
  assert features.calls == 2 and (tmp_path / "plain.inception_cache.npz").exists()
  np.testing.assert_array_equal(again.statistics.sigma_s, computed.statistics.sigma_s)
  np.testing.assert_array_equal(again.pool, computed.pool)
  # Other images under the same name invalidate the cache.
  np.savez(plain, arr_0=_images(12, seed=4, size=4))
  adm_metrics.load_reference(str(plain), features)
  assert features.calls == 3

  stats = {"mu": np.ones(6), "sigma": np.eye(6), "mu_s": np.zeros(4), "sigma_s": np.eye(4)}
  adm_like = tmp_path / "adm_like.npz"
  np.savez(adm_like, arr_0=images, **stats)
  stored = adm_metrics.load_reference(str(adm_like), features, cache_path="")
  assert stored.origin == "stored" and stored.pool.shape == (12, 6)
  np.testing.assert_array_equal(stored.statistics.mu, stats["mu"])
  np.savez(adm_like, mu=stats["mu"], sigma=stats["sigma"])
  with pytest.raises(ValueError, match="stores .*'mu', 'sigma'.* of the statistics"):
    adm_metrics.load_reference(str(adm_like), features)


def test_evaluate_npz_cli_end_to_end(random_params, tmp_path):
  weights = tmp_path / "inception_fid.npz"
  np.savez(weights, **inception.to_named_arrays(random_params, "tf"))
  np.savez(tmp_path / "reference.npz", arr_0=_images(16, seed=5))
  np.savez(tmp_path / "samples.npz", arr_0=_images(12, seed=6), arr_1=np.arange(12))

  options = flags.FlagValues()
  evaluate_npz.define_flags(options)
  options(["evaluate_npz", f"--samples={tmp_path / 'samples.npz'}",
           f"--reference={tmp_path / 'reference.npz'}", f"--inception_weights={weights}",
           f"--batch_size={BATCH}", f"--inception_input_size={SMALL_INPUT}",
           "--is_split_size=6"])
  report = evaluate_npz.run(options)
  # One run only: each FID takes an eigendecomposition of a 2048 x 2048 matrix (seconds here).
  written = json.loads((tmp_path / "samples.metrics.json").read_text())
  assert written == report and written["reference_statistics"] == "computed"
  assert set(adm_metrics.METRICS) <= set(written) and written["num_samples"] == 12
  assert written["fid"] > 0 and written["sfid"] > 0 and written["inception_score"] >= 1.0
  assert 0.0 <= written["precision"] <= 1.0 and 0.0 <= written["recall"] <= 1.0
  assert written["inception_weights"] == str(weights)
  assert (tmp_path / "reference.inception_cache.npz").exists()


# --- Sampling into an .npz. ---


@pytest.fixture(scope="module")
def trained_run(fashion_mnist_dir, tmp_path_factory):
  """A tiny class-conditional model trained for 2 steps (no evaluation), and its config."""
  config = tiny_config("vanilla")
  config.data.data_dir = fashion_mnist_dir
  config.data.source = "debian"
  config.train.num_steps = 2
  config.train.checkpoint_every = 2
  config.eval.enabled = False
  config.sampling.num_steps = 2
  workdir = str(tmp_path_factory.mktemp("sample_run"))
  train.train_and_evaluate(config, workdir)
  return config, workdir


def _read(path):
  with np.load(path) as npz:
    return {k: npz[k] for k in npz.files}


def test_sample_npz_is_deterministic_per_index_across_calls_and_processes(trained_run, tmp_path):
  config, workdir = trained_run
  params, step = sample_npz.restore_ema_params(config, workdir)
  assert step == 2
  common = dict(num_samples=12, seed=3, batch_size=BATCH, source="test")

  def write(name, process_count=1, **kwargs):
    output = str(tmp_path / name)
    for index in reversed(range(process_count)):  # process 0 merges last, after the others
      result = sample_npz.write_samples(config, params, output=output, process_index=index,
                                        process_count=process_count, **{**common, **kwargs})
      assert result == (output if index == 0 else None)
    return _read(output)

  first = write("a.npz", part_size=8)
  assert sorted(first) == ["arr_0", "arr_1"]
  assert first["arr_0"].dtype == np.uint8 and first["arr_0"].shape == (12, 28, 28, 1)
  assert first["arr_1"].dtype == np.int64 and first["arr_1"].shape == (12,)
  assert ((0 <= first["arr_1"]) & (first["arr_1"] < 10)).all() and len(set(first["arr_1"])) > 2
  assert first["arr_0"].std() > 1  # not a constant image
  assert not (tmp_path / "a.npz.parts").exists()  # merged, then removed

  second = write("b.npz", part_size=8)
  two_processes = write("c.npz", process_count=2, part_size=8)
  for other in (second, two_processes):
    np.testing.assert_array_equal(other["arr_0"], first["arr_0"])
    np.testing.assert_array_equal(other["arr_1"], first["arr_1"])
  # Other part sizes change which samples share a batch, not what each sample is.
  regrouped = write("d.npz", part_size=5, rgb=True)
  np.testing.assert_array_equal(regrouped["arr_1"], first["arr_1"])
  assert regrouped["arr_0"].shape == (12, 28, 28, 3)
  assert np.abs(regrouped["arr_0"][..., 1:].astype(int) - regrouped["arr_0"][..., :1]).max() == 0
  assert np.abs(regrouped["arr_0"][..., :1].astype(int) - first["arr_0"]).max() <= 1
  # Another seed draws other samples.
  other_seed = write("e.npz", part_size=8, seed=4)
  assert not np.array_equal(other_seed["arr_1"], first["arr_1"])


def test_sample_npz_resumes_complete_parts_and_refuses_mixed_settings(trained_run, tmp_path,
                                                                      monkeypatch):
  config, workdir = trained_run
  params, _ = sample_npz.restore_ema_params(config, workdir)
  output = str(tmp_path / "s.npz")
  kwargs = dict(num_samples=10, seed=0, batch_size=BATCH, part_size=4, source="test")
  written = []  # every file sample_npz writes (parts and the merged output)
  local_output = storage.local_output
  monkeypatch.setattr(storage, "local_output",
                      lambda path: (written.append(epath.Path(path).name), local_output(path))[1])
  # Process 1 of 2 finishes (part 1 of parts 0-2); process 0 never ran.
  sample_npz.write_samples(config, params, output=output, process_index=1, process_count=2,
                           **kwargs)
  assert written == ["part_000001.npz"]
  with pytest.raises(ValueError, match="other settings"):
    sample_npz.write_samples(config, params, output=output, process_index=1, process_count=2,
                             **{**kwargs, "seed": 1})
  with pytest.raises(RuntimeError, match="1 part\\(s\\) are missing"):
    sample_npz.write_samples(config, params, output=output, process_index=0, process_count=3,
                             **kwargs)  # writes part 0; part 2 is nobody's
  # Restarted as one process: only the missing part is generated, then all are merged.
  written.clear()
  merged = sample_npz.write_samples(config, params, output=output, **kwargs)
  assert written == ["part_000002.npz", "s.npz"]
  assert _read(merged)["arr_0"].shape == (10, 28, 28, 1)
  text = config.copy_and_resolve_references()
  text.model.conditioning = "text"
  with pytest.raises(ValueError, match="class-conditional images"):
    sample_npz.write_samples(text, params, output=output, **kwargs)


def test_sample_npz_converted_takes_the_guidance_flags(monkeypatch, tmp_path):
  """--cfg_scale and the guidance interval reach the sampler's config (and so the parts'
  settings); a bad interval is refused before anything is sampled."""
  options = flags.FlagValues()
  sample_npz.define_flags(options)
  converted_config = tiny_config()  # the converter writes cfg_scale 1, interval [0, 1]
  monkeypatch.setattr(sample_npz, "load_converted", lambda directory: (converted_config, {}))
  seen = []
  monkeypatch.setattr(sample_npz, "write_samples", lambda config, params, **_: seen.append(
      config.sampling))
  options(["sample_npz", "--converted=CONVERTED", "--cfg_scale=1.5", "--guidance_high=0.7",
           f"--output={tmp_path / 's.npz'}"])
  sample_npz.run(options)
  assert (seen[0].cfg_scale, seen[0].guidance_low, seen[0].guidance_high) == (1.5, 0.0, 0.7)
  assert converted_config.sampling.cfg_scale == 1.0  # the loaded config is left as it was
  options["guidance_low"].value = 0.8
  with pytest.raises(app.UsageError, match=r"interval \[0.8, 0.7\]"):
    sample_npz.run(options)
  assert len(seen) == 1
