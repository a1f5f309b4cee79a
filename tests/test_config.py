"""Configs: every variant and method validates; bad values are named with what is allowed."""

import pytest

from configs import base, c2i, t2i
from self_flow import config_validation


@pytest.mark.parametrize("module", [c2i, t2i])
@pytest.mark.parametrize("variant", ["default", "local"])
@pytest.mark.parametrize("method", sorted(base.METHODS))
def test_every_variant_and_method_validates(module, variant, method):
  config = module.get_config(f"{variant},method={method}")
  if config.data.dataset == "latent_shards":
    with pytest.raises(ValueError, match="data_dir is empty"):  # the shard path is required
      config_validation.validate(config, num_devices=8)
    config.data.data_dir = "/shards"
  config_validation.validate(config, num_devices=8)
  assert config.objective.noising == base.METHODS[method]["noising"]
  assert config.objective.rep_loss_weight == base.METHODS[method]["rep_loss_weight"]


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
