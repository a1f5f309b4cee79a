"""Configs: every variant and method validates; bad values are named with what is allowed."""

import pytest

from configs import c2i, multimodal, t2a, t2i, t2v
from self_flow import base_config, config_validation


@pytest.mark.parametrize("module", [c2i, t2i, t2v, t2a, multimodal])
@pytest.mark.parametrize("variant", ["default", "local"])
@pytest.mark.parametrize("method", sorted(base_config.METHODS))
def test_every_variant_and_method_validates(module, variant, method):
  config = module.get_config(f"{variant},method={method}")
  for section in (config.data, config.video, config.audio):
    if section.dataset == "latent_shards":
      with pytest.raises(ValueError, match="data_dir is empty"):  # the shard path is required
        config_validation.validate(config, num_devices=8)
      section.data_dir = "/shards"
  config_validation.validate(config, num_devices=8)
  assert config.objective.noising == base_config.METHODS[method]["noising"]
  assert config.objective.rep_loss_weight == base_config.METHODS[method]["rep_loss_weight"]


def test_paper_defaults():
  config = c2i.get_config()
  assert (config.objective.mask_ratio, config.objective.rep_loss_weight) == (0.25, 0.8)
  assert config.objective.time_distribution == "uniform"
  assert (config.optim.learning_rate, config.optim.grad_clip_norm) == (1e-4, 1.0)
  assert config.optim.ema_decay == 0.9999


@pytest.mark.parametrize("key,value,message", [
    ("model.preset", "XXL", r"model.preset='XXL'.*'B'"),
    ("model.patch_size", 5, r"model.patch_size=5 must be a positive divisor of data.image_size=28"),
    ("model.student_layer", 9, r"student_layer=9"),
    ("optim.ema_decay", 1.0, r"optim.ema_decay=1.0 .*\[0, 1\)"),
    ("sampling.method", "rk4", r"sampling.method='rk4'.*'heun'"),
    ("data.global_batch_size", 12, r"global_batch_size=12 must be divisible by mesh data\*fsdp=8"),
    ("mesh.fsdp", 3, r"'fsdp': 3"),
])
def test_bad_values_are_named(key, value, message):
  config = c2i.get_config("local")
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=message):
    config_validation.validate(config, num_devices=8)


def test_text_config_needs_the_mmdit():
  config = c2i.get_config("local")
  config.model.conditioning = "text"
  with pytest.raises(ValueError, match="model.conditioning='text' needs model.architecture"):
    config_validation.validate(config, num_devices=8)


def test_unknown_variant_and_arg():
  with pytest.raises(ValueError, match="'huge'"):
    c2i.get_config("huge")
  with pytest.raises(ValueError, match="'lr'"):
    c2i.get_config("local,lr=3")
  with pytest.raises(ValueError, match="method='sorted'"):
    c2i.get_config("local,method=sorted")


@pytest.mark.parametrize("mutate,message", [
    (lambda c: setattr(c, "modalities", ("image", "smell")), r"modalities=.*'smell'"),
    (lambda c: setattr(c, "modalities", ("video", "video")), r"must be distinct"),
    (lambda c: setattr(c.mixture.probabilities, "audio", 0.0), r"probabilities .*'audio': 0.0"),
    (lambda c: setattr(c.video, "patch_time", 3), r"video.patch_time"),
    (lambda c: setattr(c.audio, "frames_per_token", 5), r"audio.frames_per_token"),
    (lambda c: setattr(c.video, "image_size", 64), r"config.video .*must equal \(8, 32, 32, 1\)"),
    (lambda c: setattr(c.audio, "global_batch_size", 12), r"audio.global_batch_size=12"),
    (lambda c: setattr(c.video, "mask_ratio", 0.7), r"video.mask_ratio=0.7"),
    (lambda c: setattr(c.audio, "dataset", "librispeech"), r"audio.dataset='librispeech'"),
    (lambda c: c.audio.update(dataset="latent_shards", data_dir="/shards"),
     r"mix latent shards \(\['audio'\]\) with embedded data \(\['image', 'video'\]\)"),
    (lambda c: setattr(c.text, "encoder", "precomputed"),
     r"text.encoder='precomputed' does not match the data: embedded datasets carry byte tokens"),
])
def test_bad_multimodal_values_are_named(mutate, message):
  config = multimodal.get_config("local")
  mutate(config)
  with pytest.raises(ValueError, match=message):
    config_validation.validate(config, num_devices=8)


def test_video_and_audio_need_the_mmdit():
  config = c2i.get_config("local")
  config.modalities = ("image", "audio")
  with pytest.raises(ValueError, match="'audio', which needs model.architecture='mmdit'"):
    config_validation.validate(config, num_devices=8)


def test_paper_mixture_and_modality_settings():
  config = multimodal.get_config()
  assert dict(config.mixture.probabilities) == {"image": 0.57, "video": 0.30, "audio": 0.13}
  assert (config.video.mask_ratio, config.video.train_shift) == (0.1, 2.95)
  assert (config.audio.mask_ratio, config.audio.train_shift) == (0.5, 1.0)
  assert t2v.get_config().objective.time_distribution == "logit_normal"
